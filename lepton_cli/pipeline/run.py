"""The pass pipeline: checks every pass's preconditions, then runs the target's enabled passes in order,
calling the instruments around each; lossy passes that spent budget yield it when a later one needs it.

The loop only orders; instruments observe (``instruments``), the budget is a ledger (``ledger``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import onnx

from lepton_cli.errors import InternalError, LeptonError, QualityGateError
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.instruments import PassInstrument, StepProgress, standard_instruments
from lepton_cli.pipeline.ledger import FINAL_GATE
from lepton_cli.pipeline.params import to_table
from lepton_cli.pipeline.records import StepRecord
from lepton_cli.pipeline.registry import SKIPPED, PassResult, PassSpec, get_pass
from lepton_cli.pipeline.targets import PassStep

FinalCheck = Callable[[onnx.ModelProto], "str | None"]  # the compiled model -> why it fails the accuracy gate, or None
YIELDED = "skipped: a later lossy pass needed its share of the accuracy budget"


def check_requirements(model: onnx.ModelProto, ctx: PassContext, steps: Iterable[PassStep]) -> None:
    """Every enabled pass's preconditions (``requires``), before any pass runs: a run that cannot work fails first."""
    for step in steps:
        spec = get_pass(step.name)
        if step.enabled and spec.requires is not None:
            spec.requires(model, ctx, step.params)


def run_pipeline(
    model: onnx.ModelProto,
    ctx: PassContext,
    progress: StepProgress | None = None,
    final_check: FinalCheck | None = None,
    instruments: list[PassInstrument] | None = None,
) -> tuple[onnx.ModelProto, list[StepRecord]]:
    """Run every enabled pass of ``ctx.target`` in order; return the final model and the step records.

    Every lossy pass, and ``final_check`` (the compile's accuracy gate), score against ``model`` (the
    source) on the same data, and the budget is one ledger of drop against it. When a lossy pass cannot
    meet its budget (QualityGateError), or the final check fails, after earlier lossy passes spent part
    of it, the pipeline runs once more without those earlier passes, so their share goes to the failing
    one (int8 is what makes a model smaller and faster on every int8 target; pruning is a bonus). A final
    check still failing is returned to the caller, which reports it (exit 3); a pass failing after the
    retry raises. ``instruments`` default to ``standard_instruments(progress)``.
    """
    check_requirements(model, ctx, ctx.target.passes)
    observers = instruments if instruments is not None else standard_instruments(progress)
    warnings_before = len(ctx.warnings)
    ctx.source = model
    while True:
        try:
            compiled, records = _run_passes(model, ctx, observers)
            failure = final_check(compiled) if final_check else None
            if failure is None or not _retry_without_spenders(ctx, FINAL_GATE, failure, warnings_before):
                return compiled, records
        except QualityGateError as exc:
            first_attempt = exc.attempt_summary if exc.attempt_summary is not None else exc.message
            if not _retry_without_spenders(ctx, ctx.current_pass, first_attempt, warnings_before):
                raise


def _retry_without_spenders(ctx: PassContext, failed: str, first_attempt: str, warnings_before: int) -> bool:
    """Set up the run without the lossy passes that spent budget before ``failed``; False when there are none."""
    spent = {name: ctx.ledger.spent[name] for name in ctx.ledger.spenders(failed)} if failed else {}
    if not ctx.ledger.yield_for(failed):
        return False
    del ctx.warnings[warnings_before:]
    ctx.current_pass = ""
    listed = ", ".join(
        f"{name} {drop:.2f}" + (" (its model still changed)" if drop <= 0 else "") for name, drop in spent.items()
    )
    ctx.warn(
        f"{failed} could not meet its accuracy budget after {listed} points were spent before it; "
        f"compiled again without {', '.join(spent)} (its share went to {failed}). First attempt: {first_attempt}"
    )
    return True


def _run_passes(
    model: onnx.ModelProto, ctx: PassContext, instruments: list[PassInstrument]
) -> tuple[onnx.ModelProto, list[StepRecord]]:
    records: list[StepRecord] = []
    current = model
    for step in ctx.target.passes:
        if not step.enabled:
            continue
        ctx.current_pass = step.name
        if not all(instrument.should_run(ctx, step) for instrument in instruments):
            continue
        spec = get_pass(step.name)
        record = StepRecord(step.name, to_table(step.params), step.why)
        for instrument in instruments:
            instrument.run_before_pass(ctx, step, current, record)
        if spec.needs_static_shapes:
            ctx.require_static_shapes(current)
        result = _apply(spec, step, current, ctx)
        record.summary = result.summary
        for instrument in reversed(instruments):
            instrument.run_after_pass(ctx, spec, current, result, record)
        if result.budget_use is not None:
            ctx.ledger.enter(step.name, result.budget_use)
        records.append(record)
        current = result.model
    ctx.current_pass = ""
    return current, records


def _apply(spec: PassSpec, step: PassStep, current: onnx.ModelProto, ctx: PassContext) -> PassResult:
    """The pass's result on a copy of ``current`` (kept intact for the instruments), or ``current`` unchanged
    when the pass yielded its share of the budget."""
    if step.name in ctx.ledger.yielded:
        ctx.ledger.pass_over(step.name, getattr(step.params, "budget_share", 1.0))
        return PassResult(current, {"applied": "none", "yielded": YIELDED}, exactness=SKIPPED)
    working = onnx.ModelProto()
    working.CopyFrom(current)
    try:
        result = spec.fn(working, ctx, step.params)
    except LeptonError:
        raise
    except Exception as exc:  # a pass bug: name the pass, keep the traceback for --debug
        raise InternalError(f"pass {step.name!r} failed: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(result, PassResult):
        raise InternalError(f"pass {step.name!r} returned {type(result).__name__}, not PassResult")
    return result
