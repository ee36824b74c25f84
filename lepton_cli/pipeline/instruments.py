"""Instruments observe passes; they never change the model (TVM's ``PassInstrument``).

The run loop calls ``should_run`` and ``run_before_pass`` of each instrument in order, runs the pass, then
``run_after_pass`` in reverse order, so they nest: timing measures only the pass, the checker sees the
result before the output comparison runs it, and progress brackets everything.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import onnx

from lepton_cli.errors import InternalError
from lepton_cli.model.external_data import has_external, structure_copy
from lepton_cli.model.stats import collect_stats
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.equivalence import check_step
from lepton_cli.pipeline.records import StepCheck, StepRecord
from lepton_cli.pipeline.registry import PassResult, PassSpec
from lepton_cli.pipeline.targets import PassStep

StepProgress = Callable[[str, str, "StepRecord | None"], None]  # (pass name, phase "start"/"done", record)


class PassInstrument(Protocol):
    def should_run(self, ctx: PassContext, step: PassStep) -> bool:
        """False skips the pass (no record)."""
        ...

    def run_before_pass(self, ctx: PassContext, step: PassStep, model: onnx.ModelProto, record: StepRecord) -> None:
        """Called with the pass's input, before it runs."""
        ...

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        """Called with the pass's input and its result; may raise to stop the pipeline."""
        ...


class Instrument:
    """Does nothing at every hook: instruments override the hooks they need."""

    def should_run(self, ctx: PassContext, step: PassStep) -> bool:
        return True

    def run_before_pass(self, ctx: PassContext, step: PassStep, model: onnx.ModelProto, record: StepRecord) -> None:
        pass

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        pass


class Timing(Instrument):
    """Wall-clock seconds of the pass itself."""

    def __init__(self) -> None:
        self.started = 0.0

    def run_before_pass(self, ctx: PassContext, step: PassStep, model: onnx.ModelProto, record: StepRecord) -> None:
        self.started = time.perf_counter()

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        record.seconds = time.perf_counter() - self.started


class Stats(Instrument):
    """Node, op, parameter, MAC and size counts before and after the pass."""

    def run_before_pass(self, ctx: PassContext, step: PassStep, model: onnx.ModelProto, record: StepRecord) -> None:
        record.before = collect_stats(model)

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        record.after = record.before if result.model is before else collect_stats(result.model)


class Checker(Instrument):
    """``onnx.checker`` on every result: an invalid model is a bug in the pass that made it."""

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        if result.model is not before:
            check_model(result.model, spec.name)


def check_model(model: onnx.ModelProto, pass_name: str) -> None:
    try:
        onnx.checker.check_model(structure_copy(model) if has_external(model) else model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InternalError(
            f"pass {pass_name!r} produced an invalid model: {str(exc).strip().splitlines()[0][:300]}"
        ) from None


class Equivalence(Instrument):
    """Outputs before and after an exact or tolerance pass, compared on the check feeds (``equivalence``)."""

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        exactness = result.exactness or spec.exactness
        if exactness.kind not in ("exact", "tolerance"):
            record.check = StepCheck(exactness.kind)
            return
        record.check = check = check_step(before, result.model, ctx, exactness)
        if check.ok is False:
            what = check.detail or f"max abs error {check.max_abs_error:.3g} on {check.worst_output}"
            raise InternalError(
                f"pass {spec.name!r} changed the model's outputs beyond its declared {exactness.kind} tolerance ({what})"
            )


class Progress(Instrument):
    """Tells ``report`` when each pass starts and what its finished record holds."""

    def __init__(self, report: StepProgress) -> None:
        self.report = report

    def run_before_pass(self, ctx: PassContext, step: PassStep, model: onnx.ModelProto, record: StepRecord) -> None:
        self.report(step.name, "start", None)

    def run_after_pass(
        self, ctx: PassContext, spec: PassSpec, before: onnx.ModelProto, result: PassResult, record: StepRecord
    ) -> None:
        self.report(spec.name, "done", record)


def standard_instruments(progress: StepProgress | None = None) -> list[PassInstrument]:
    """Every pass is timed, counted, checked and (when it claims exactness) compared; progress outermost."""
    observers: list[PassInstrument] = [Stats(), Equivalence(), Checker(), Timing()]
    return ([Progress(progress)] if progress else []) + observers
