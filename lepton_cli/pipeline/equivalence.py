"""Output equivalence of a pass's input and result, as onnxsim's ``check_n`` does it: run both models on the
same given or random inputs under identical ONNX Runtime settings and compare every output, bit for bit or
within the tolerance the pass declares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from lepton_cli.errors import InternalError
from lepton_cli.model.io_contract import adapt_feed, restore_output
from lepton_cli.model.sessions import make_session, model_random_feed, run_feeds
from lepton_cli.model.shapes import graph_inputs, unbound_dims
from lepton_cli.pipeline.records import StepCheck
from lepton_cli.pipeline.registry import Exactness

if TYPE_CHECKING:  # pragma: no cover
    from lepton_cli.pipeline.context import PassContext

CHECK_SAMPLES = 3  # feeds per comparison
GUESSED_BATCH, GUESSED_EXTENT = 1, 64  # stand-ins for unbound dims in check inputs
# A rewrite within tolerance may still err by what reassociating float sums does over a deep network; ONNX
# Runtime's own fusions on the source show that floor, and a few times it is still float noise.
NOISE_FLOOR_FACTOR = 4.0

Feeds = list[dict[str, np.ndarray]]


def compare_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds: Feeds, exactness: Exactness) -> StepCheck:
    """Run both models under identical ONNX Runtime settings and compare every output. ``feeds`` are in the source's
    form; each model takes them, and gives its outputs back, as its own I/O contract says (a pass may change the input
    layout, NCHW → NHWC, and records how in the model metadata; a rewrite after it compares two such models)."""
    ref = run_in_source_form(before, feeds)
    got = run_in_source_form(after, feeds)
    names = [o.name for o in before.graph.output]
    errors: dict[str, float] = {}
    failed: set[str] = set()
    for ref_outputs, got_outputs in zip(ref, got):
        for name, expected, actual in zip(names, ref_outputs, got_outputs):
            if expected.shape != actual.shape:
                return StepCheck(
                    exactness.kind, ok=False, detail=f"output {name!r} shape {actual.shape} != {expected.shape}"
                )
            if expected.size and np.issubdtype(expected.dtype, np.number):
                err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
                errors[name] = max(errors.get(name, 0.0), err)
            if not _same(expected, actual, exactness):
                failed.add(name)
    worst = max(errors, key=errors.get, default="")  # type: ignore[arg-type]
    check = StepCheck(
        exactness.kind,
        ok=not failed,
        samples=len(feeds),
        max_abs_error=errors.get(worst, 0.0),
        worst_output=worst,
        rtol=exactness.rtol,
        atol=exactness.atol,
    )
    if failed and exactness.kind == "tolerance":
        floor = _float_noise_floor(before, feeds, ref, names)
        check.noise_floor = {name: floor.get(name, 0.0) for name in sorted(failed)}
        check.ok = all(name in errors and errors[name] <= NOISE_FLOOR_FACTOR * floor.get(name, 0.0) for name in failed)
    return check


def run_in_source_form(model: onnx.ModelProto, feeds: Feeds, opt_level: str = "disable") -> list[list[np.ndarray]]:
    """``model``'s outputs on source-form ``feeds``, adapted to its I/O contract and restored from it."""
    names = [o.name for o in model.graph.output]
    runs = run_feeds(make_session(model, opt_level=opt_level), [adapt_feed(model, feed) for feed in feeds])
    return [[restore_output(model, name, value) for name, value in zip(names, outputs)] for outputs in runs]


def _same(expected: np.ndarray, actual: np.ndarray, exactness: Exactness) -> bool:
    if exactness.kind == "exact":
        return bool(np.array_equal(expected, actual, equal_nan=True))
    return within_scaled_tolerance(expected, actual, exactness.rtol, exactness.atol)


def _float_noise_floor(
    model: onnx.ModelProto, feeds: Feeds, ref: list[list[np.ndarray]], names: list[str]
) -> dict[str, float]:
    """Per output, the largest difference ONNX Runtime's own graph optimisations make to ``model`` on ``feeds``."""
    optimised = run_in_source_form(model, feeds, opt_level="all")
    floor: dict[str, float] = {}
    for ref_outputs, opt_outputs in zip(ref, optimised):
        for name, expected, actual in zip(names, ref_outputs, opt_outputs):
            if expected.size and np.issubdtype(expected.dtype, np.floating):
                diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
                floor[name] = max(floor.get(name, 0.0), float(np.nanmax(diff)))
    return floor


def within_scaled_tolerance(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> bool:
    """|actual − expected| ≤ atol + rtol · max|expected| everywhere (NaN where NaN); the max is taken per
    channel (axis 1) for outputs of rank ≥ 3, over the whole output otherwise.

    rtol scales with the output's magnitude, not each element's: reassociated float sums (a folded
    BatchNorm, a reordered GEMM) err by a fraction of the values summed, so a near-zero element of a
    large-valued map may differ by more than rtol of itself (docs/decisions.md, "Pipeline").
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


def check_feeds(model: onnx.ModelProto, ctx: PassContext) -> tuple[Feeds, bool]:
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


def check_step(before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext, exactness: Exactness) -> StepCheck:
    """``compare_outputs`` on the check feeds; a comparison guessed sizes cannot run is skipped with a warning."""
    feeds, guessed = check_feeds(before, ctx)
    try:
        check = compare_outputs(before, after, feeds, exactness)
    except Exception as exc:  # ORT rejects the guessed sizes (e.g. too small for a kernel): say so, don't fail
        if not guessed:
            raise InternalError(f"pass {ctx.current_pass!r}: cannot run the model to compare outputs: {exc}") from exc
        ctx.warn(
            "output comparison skipped: unbound input dims and guessed sizes do not run; pass --input-shape to enable it"
        )
        return StepCheck(exactness.kind, ok=None, skipped="unbound input dims")
    check.guessed_dims = guessed
    return check
