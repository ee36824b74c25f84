"""The pass pipeline: runs a target's ordered passes and instruments every one of them.

Passes only transform. The pipeline times each pass, records node/op/parameter/size counts
before and after, runs ``onnx.checker`` on every result, and for a pass declared exact or
within a tolerance compares outputs before and after on given or random inputs (as onnxsim's
``check_n`` does), failing with a message that names the pass.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from lepton_cli.errors import InternalError, LeptonError, QualityGateError
from lepton_cli.model.external_data import has_external, structure_copy
from lepton_cli.model.io_contract import adapt_feed, restore_output
from lepton_cli.model.sessions import make_session, model_random_feed, run_feeds
from lepton_cli.model.shapes import graph_inputs, require_static, unbound_dims
from lepton_cli.model.stats import ModelStats, collect_stats
from lepton_cli.pipeline.params import to_table
from lepton_cli.pipeline.registry import Exactness, PassResult, get_pass
from lepton_cli.pipeline.targets import Target
from lepton_cli.samples.sample_set import SampleSet

log = logging.getLogger("lepton")
log.addHandler(logging.NullHandler())  # the CLI shows warnings itself; a log file is opt-in
log.propagate = False

CHECK_SAMPLES = 3  # feeds per lossless-pass comparison
HOLDOUT_FRACTION = 0.25  # of --calib, scored (not calibrated on) when there is no --eval
MIN_HOLDOUT_SPLIT = 8  # fewer calibration samples: score on them all
SCORE_SAMPLE_LIMIT = 1000  # enough for a 0.1-point resolution; bounds compile time on big sets


ProgressReport = Callable[[str, str, "int | None", "int | None"], None]  # (pass, message, done, total)


@dataclass
class PassContext:
    """What the whole run shares: target, data, host facts, seed, budgets, warnings, a work folder."""

    target: Target
    calib: SampleSet | None = None
    eval: SampleSet | None = None
    host: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_accuracy_drop: float | None = None  # percentage points; None: the target's budget
    eval_metric: str = "auto"  # lepton_cli.evaluate.accuracy.METRICS
    source: onnx.ModelProto | None = (
        None  # the model the pipeline started from: lossy passes and the gate score against it
    )
    source_drop: float = 0.0  # the ledger: drop against the source the last lossy pass measured on its result
    granted: float = 0.0  # the ledger: drop against the source the last lossy pass was allowed
    lossy_spent: dict[str, float] = field(default_factory=dict)  # pass name -> points its result added to the ledger
    yielded: set[str] = field(default_factory=set)  # lossy passes skipped so that a later one meets its budget
    scorers: dict[str, Any] = field(default_factory=dict)  # ORT level -> the shared Evaluator (variants share it too)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lepton-")))
    warnings: list[str] = field(default_factory=list)
    on_warning: Callable[[str], None] | None = None
    on_progress: ProgressReport | None = None  # the progress display: passes report through ctx.progress, never print
    current_pass: str = ""

    def progress(self, message: str, done: int | None = None, total: int | None = None) -> None:
        """A pass's progress: a phase (``message``) or ``done`` of ``total`` steps of it."""
        if self.on_progress:
            self.on_progress(self.current_pass, message, done, total)

    def warn(self, message: str) -> None:
        text = f"{self.current_pass}: {message}" if self.current_pass else message
        self.warnings.append(text)
        log.warning(text)
        if self.on_warning:
            self.on_warning(text)

    @property
    def scoring_opt_level(self) -> str:
        """ORT level accuracy is scored at (lepton_cli.evaluate.accuracy.scoring_opt_level)."""
        from lepton_cli.evaluate.accuracy import scoring_opt_level  # accuracy imports this module

        return scoring_opt_level(list(self.target.hardware.isa), list(self.host.get("isa") or []))

    @property
    def accuracy_budget(self) -> float:
        return (
            self.max_accuracy_drop if self.max_accuracy_drop is not None else self.target.budgets.max_accuracy_drop_pct
        )

    def lossy_budget(self, share: float) -> float:
        """The drop against the source a lossy pass may reach: what the earlier ones were allowed (or reached, if
        more) plus its share of the budget, so the shares partition the budget and what one leaves carries over
        (edge-arm's channel pruning often finds nothing worth its half; int8 then gets the whole budget)."""
        return min(self.accuracy_budget, max(self.granted, self.source_drop) + share * self.accuracy_budget)

    def spent(self, allowed: float, drop_pct: float) -> None:
        """A lossy pass allowed ``allowed`` measured ``drop_pct`` against the source on its result: the ledger's
        new totals; what the pass added is recorded for the retry."""
        drop = max(0.0, drop_pct)
        if self.current_pass:
            self.lossy_spent[self.current_pass] = max(0.0, drop - self.source_drop)
        self.source_drop, self.granted = drop, allowed

    def scoring_data(self) -> tuple[SampleSet | None, SampleSet | None, str]:
        """(calibration samples, scored samples, what is scored): one split for the whole compile, so prune,
        quantize and the final gate measure on the same data. --eval when given, else a held-out part of --calib."""
        if "split" not in self.scorers:
            calib = self.calib
            if self.eval is not None and len(self.eval):
                split = (calib, self.eval, "--eval")
            elif calib is not None and len(calib) >= MIN_HOLDOUT_SPLIT:
                kept, held = calib.split(HOLDOUT_FRACTION, self.seed)
                split = (kept, held, f"held-out {len(held)} of --calib (agreement with the source)")
            elif calib is not None and len(calib):
                self.warn(
                    f"only {len(calib)} calibration samples and no --eval: scoring agreement on the calibration samples themselves"
                )
                split = (calib, calib, "--calib (agreement with the source, not held out)")
            else:
                split = (calib, None, "none")
            self.scorers["split"] = split
        return self.scorers["split"]

    def scorer(self, model: onnx.ModelProto | None = None) -> tuple[Any, str]:
        """(the Evaluator every lossy pass and the final gate share, what it scores), or (None, "none") without data.
        ``model`` is the source when no pipeline set one (a pass run on its own)."""
        from lepton_cli.evaluate.accuracy import Evaluator, label_free  # accuracy imports this module

        if self.source is None:
            self.source = model
        _, data, name = self.scoring_data()
        if data is None or self.source is None:
            return None, "none"
        level = self.scoring_opt_level
        if level not in self.scorers:
            metric = self.eval_metric if data is self.eval and data.labels is not None else label_free(self.eval_metric)
            labels = data.labels if data is self.eval else None
            self.scorers[level] = Evaluator(
                self.source, data, labels, limit=SCORE_SAMPLE_LIMIT, metric=metric, opt_level=level
            )
        return self.scorers[level], name

    def require_static_shapes(self, model: onnx.ModelProto) -> None:
        require_static(model, f"pass {self.current_pass!r}" if self.current_pass else "this step")

    def sample_feeds(self, model: onnx.ModelProto, count: int) -> list[dict[str, np.ndarray]]:
        """Real samples when calibration or eval data exist, else seeded random inputs."""
        for data in (self.calib, self.eval):
            if data is not None and len(data):
                return list(data.feeds(count))
        rng = np.random.default_rng(self.seed)
        return [model_random_feed(model, rng, self.input_shapes or None) for _ in range(count)]


@dataclass
class StepRecord:
    name: str
    params: dict[str, Any]
    why: str
    seconds: float
    before: ModelStats
    after: ModelStats
    summary: dict[str, Any]
    check: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "why": self.why,
            "seconds": round(self.seconds, 4),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "summary": self.summary,
            "check": self.check,
        }


# A rewrite within tolerance may still err by what reassociating float sums does over a deep network; ONNX
# Runtime's own fusions on the source show that floor, and a few times it is still float noise.
NOISE_FLOOR_FACTOR = 4.0


def compare_outputs(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], exactness: Exactness
) -> dict[str, Any]:
    """Run both models under identical ONNX Runtime settings and compare every output."""
    ref = run_feeds(make_session(before), feeds)
    new_session = make_session(after)
    # A pass may change the input layout (e.g. NCHW → NHWC); it records how in the model metadata.
    new_feeds = [adapt_feed(after, feed) for feed in feeds]
    got = run_feeds(new_session, new_feeds)
    names = [o.name for o in before.graph.output]
    errors: dict[str, float] = {}
    failed: set[str] = set()
    for ref_outputs, got_outputs in zip(ref, got):
        for name, expected, actual in zip(names, ref_outputs, got_outputs):
            actual = restore_output(after, name, actual)
            if expected.shape != actual.shape:
                return {
                    "kind": exactness.kind,
                    "ok": False,
                    "detail": f"output {name!r} shape {actual.shape} != {expected.shape}",
                }
            if exactness.kind == "exact":
                same = np.array_equal(expected, actual, equal_nan=True)
            else:
                same = _within_scaled_tolerance(expected, actual, exactness.rtol, exactness.atol)
            if expected.size and np.issubdtype(expected.dtype, np.number):
                err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
                errors[name] = max(errors.get(name, 0.0), err)
            if not same:
                failed.add(name)
    worst_name = max(errors, key=errors.get, default="")
    check = {
        "kind": exactness.kind,
        "ok": not failed,
        "samples": len(feeds),
        "max_abs_error": errors.get(worst_name, 0.0),
        "worst_output": worst_name,
        "rtol": exactness.rtol,
        "atol": exactness.atol,
    }
    if failed and exactness.kind == "tolerance":
        floor = _float_noise_floor(before, feeds, ref, names)
        check["noise_floor"] = {name: floor.get(name, 0.0) for name in sorted(failed)}
        check["ok"] = all(
            name in errors and errors[name] <= NOISE_FLOOR_FACTOR * floor.get(name, 0.0) for name in failed
        )
    return check


def _float_noise_floor(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], ref: list[list[np.ndarray]], names: list[str]
) -> dict[str, float]:
    """Per output, the largest difference ONNX Runtime's own graph optimisations make to ``model`` on ``feeds``."""
    optimised = run_feeds(make_session(model, opt_level="all"), feeds)
    floor: dict[str, float] = {}
    for ref_outputs, opt_outputs in zip(ref, optimised):
        for name, expected, actual in zip(names, ref_outputs, opt_outputs):
            if expected.size and np.issubdtype(expected.dtype, np.floating):
                diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
                floor[name] = max(floor.get(name, 0.0), float(np.nanmax(diff)))
    return floor


def _within_scaled_tolerance(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> bool:
    """|actual − expected| ≤ atol + rtol · max|expected| everywhere (NaN where NaN); the max is taken per
    channel (axis 1) for outputs of rank ≥ 3, over the whole output otherwise.

    rtol scales with the output's magnitude, not each element's: reassociated float sums (a folded
    BatchNorm, a reordered GEMM) err by a fraction of the values summed, so a near-zero element of a
    large-valued map (a background pixel of PP-OCRv4 det's probability map at 640x640 on real text:
    5e-5 after fuse) may differ by more than rtol of itself. np.allclose's per-element rtol rejected that.
    """
    if not np.issubdtype(expected.dtype, np.number) or expected.size == 0:
        return bool(np.array_equal(expected, actual))
    ref = expected.astype(np.float64)
    got = actual.astype(np.float64)
    nan = np.isnan(ref)
    if not np.array_equal(nan, np.isnan(got)):
        return False
    finite = np.isfinite(ref) & np.isfinite(got)
    if not np.array_equal(ref[~finite & ~nan], got[~finite & ~nan]):  # infinities must match exactly
        return False
    magnitude = np.where(finite, np.abs(ref), 0.0)
    if ref.ndim >= 3:  # per channel (axis 1): a detector's [1, 84, 8400] boxes (~640) must not loosen its scores (0..1)
        scale = np.max(magnitude, axis=tuple(a for a in range(ref.ndim) if a != 1), keepdims=True)
    else:
        scale = np.max(magnitude) if magnitude.size else 0.0
    bound = np.broadcast_to(atol + rtol * scale, ref.shape)
    return bool(np.all(np.abs(got[finite] - ref[finite]) <= bound[finite]))


def check_model(model: onnx.ModelProto, pass_name: str) -> None:
    try:
        onnx.checker.check_model(structure_copy(model) if has_external(model) else model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InternalError(
            f"pass {pass_name!r} produced an invalid model: {str(exc).strip().splitlines()[0][:300]}"
        ) from None


GUESSED_BATCH, GUESSED_EXTENT = 1, 64  # stand-ins for unbound dims in check inputs


def _check_feeds(model: onnx.ModelProto, ctx: PassContext) -> tuple[list[dict[str, np.ndarray]], bool]:
    """Feeds for the comparison and whether unbound dims had to be guessed."""
    if not unbound_dims(model) or ctx.calib is not None or ctx.eval is not None:
        return ctx.sample_feeds(model, CHECK_SAMPLES), False
    dims = {
        sig.name: ctx.input_shapes.get(sig.name)
        or [
            d if isinstance(d, int) else (GUESSED_BATCH if axis == 0 else GUESSED_EXTENT)
            for axis, d in enumerate(sig.dims)
        ]
        for sig in graph_inputs(model)
    }
    guessed = any(not sig.is_static and sig.name not in ctx.input_shapes for sig in graph_inputs(model))
    rng = np.random.default_rng(ctx.seed)
    return [model_random_feed(model, rng, dims) for _ in range(CHECK_SAMPLES)], guessed


def _check_step(
    before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext, exactness: Exactness
) -> dict[str, Any]:
    feeds, guessed = _check_feeds(before, ctx)
    try:
        return compare_outputs(before, after, feeds, exactness) | ({"guessed_dims": True} if guessed else {})
    except Exception as exc:  # ORT rejects the guessed sizes (e.g. too small for a kernel): say so, don't fail
        if not guessed:
            raise InternalError(f"pass {ctx.current_pass!r}: cannot run the model to compare outputs: {exc}") from exc
        ctx.warn(
            "output comparison skipped: unbound input dims and guessed sizes do not run; pass --input-shape to enable it"
        )
        return {"kind": exactness.kind, "ok": None, "skipped": "unbound input dims"}


ProgressFn = Callable[[str, str, StepRecord | None], None]  # (pass name, phase "start"/"done", record)


FinalCheck = Callable[[onnx.ModelProto], "str | None"]  # the compiled model -> why it fails the accuracy gate, or None


def run_pipeline(
    model: onnx.ModelProto, ctx: PassContext, progress: ProgressFn | None = None, final_check: FinalCheck | None = None
) -> tuple[onnx.ModelProto, list[StepRecord]]:
    """Run every enabled pass of ``ctx.target`` in order; return the final model and the step records.

    Every lossy pass, and ``final_check`` (the compile's accuracy gate), score against ``model`` (the
    source) on the same data, and the budget is one ledger of drop against it. When a lossy pass cannot
    meet its budget (QualityGateError), or the final check fails, after earlier lossy passes spent part
    of it, the pipeline runs once more without those earlier passes, so their share goes to the failing
    one: int8 is what makes a model smaller and faster on every int8 target, channel pruning is a bonus
    (PP-OCRv4 rec on edge-arm: pruning spent 0.21 of 0.5 points; int8 then needed more than the 0.29
    left, and met the budget alone). A final check still failing is returned to the caller, which
    reports it (exit 3); a pass failing after the retry raises.
    """
    warnings_before = len(ctx.warnings)
    ctx.source = model
    while True:
        try:
            compiled, records = _run_passes(model, ctx, progress)
            failure = final_check(compiled) if final_check else None
            if failure is None or not _retry_without_spenders(ctx, "the accuracy gate", failure, warnings_before):
                return compiled, records
        except QualityGateError as exc:
            if not _retry_without_spenders(ctx, ctx.current_pass, exc.message.split("; tried:")[0], warnings_before):
                raise


def _retry_without_spenders(ctx: PassContext, failed: str, first_attempt: str, warnings_before: int) -> bool:
    """Set up the run without the lossy passes that spent budget before ``failed``; False when there are none."""
    spenders = [name for name, drop in ctx.lossy_spent.items() if drop > 0 and name != failed]
    if not failed or not spenders:
        return False
    spent = ", ".join(f"{name} {ctx.lossy_spent[name]:.2f}" for name in spenders)
    del ctx.warnings[warnings_before:]
    ctx.current_pass = ""
    ctx.warn(
        f"{failed} could not meet its accuracy budget after {spent} points were spent before it; "
        f"compiled again without {', '.join(spenders)} (its share went to {failed}). First attempt: {first_attempt}"
    )
    ctx.yielded.update(spenders)
    ctx.source_drop = ctx.granted = 0.0
    ctx.lossy_spent.clear()
    return True


def _run_passes(
    model: onnx.ModelProto, ctx: PassContext, progress: ProgressFn | None
) -> tuple[onnx.ModelProto, list[StepRecord]]:
    records: list[StepRecord] = []
    current = model
    for step in ctx.target.passes:
        if not step.enabled:
            continue
        spec = get_pass(step.name)
        ctx.current_pass = step.name
        if progress:
            progress(step.name, "start", None)
        if spec.needs_static_shapes:
            ctx.require_static_shapes(current)
        before_stats = collect_stats(current)
        if step.name in ctx.yielded:  # skipped for a later lossy pass: its whole share carries over
            ctx.spent(ctx.lossy_budget(getattr(step.params, "budget_share", 1.0)), ctx.source_drop)
            record = StepRecord(
                step.name,
                to_table(step.params),
                step.why,
                0.0,
                before_stats,
                before_stats,
                {"applied": "none", "yielded": "skipped: a later lossy pass needed its share of the accuracy budget"},
                {"kind": "skipped"},
            )
            records.append(record)
            if progress:
                progress(step.name, "done", record)
            continue
        started = time.perf_counter()
        # Passes may edit the proto in place; the pipeline keeps `current` intact for the before/after check.
        working = onnx.ModelProto()
        working.CopyFrom(current)
        try:
            result = spec.fn(working, ctx, step.params)
        except LeptonError:
            raise
        except Exception as exc:  # a pass bug: name the pass, keep the traceback for --debug
            raise InternalError(f"pass {step.name!r} failed: {exc.__class__.__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        if not isinstance(result, PassResult):
            raise InternalError(f"pass {step.name!r} returned {type(result).__name__}, not PassResult")
        check_model(result.model, step.name)
        if result.budget_use is not None:
            ctx.spent(result.budget_use.allowed, result.budget_use.drop)
        exactness = result.exactness or spec.exactness
        check: dict[str, Any] = {"kind": exactness.kind}
        if exactness.kind != "lossy":
            check = _check_step(current, result.model, ctx, exactness)
            if check.get("ok") is False:
                raise InternalError(
                    f"pass {step.name!r} changed the model's outputs beyond its declared {exactness.kind} tolerance "
                    f"({check.get('detail') or 'max abs error %.3g on %s' % (check['max_abs_error'], check['worst_output'])})"
                )
        record = StepRecord(
            step.name,
            to_table(step.params),
            step.why,
            seconds,
            before_stats,
            collect_stats(result.model),
            result.summary,
            check,
        )
        records.append(record)
        current = result.model
        if progress:
            progress(step.name, "done", record)
    ctx.current_pass = ""
    return current, records


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes: same inputs, byte-identical compiled model."""
    return model.SerializeToString(deterministic=True)
