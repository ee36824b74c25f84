"""Proof that fuse and layout_transform keep what a model computes, on every real graph we have:

(1) every onnx node test case ONNX Runtime can run, (2) onnx's pytorch-converted and
pytorch-operator models with their data sets, (3) the light model zoo, (4) PP-OCRv4 det and rec.

Each pass's output runs under the same ONNX Runtime settings as its input (CPU EP, graph
optimizations disabled, one thread). fuse must agree within rtol 1e-4 / atol 1e-5; layout_transform
(channels-last I/O + channel padding) is counted bit-exact or, where padding a consumer's input
channels changes the GEMM's K and so ORT's summation order, within its declared rtol 1e-5 / atol 1e-6.
Each test prints how many cases ran, passed (and how many bit-exact) and were skipped, with each
skip's reason. The full sweep is ``slow``; a sampled subset runs by default.
"""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS, LIGHT_DIR, LIGHT_MODELS, OCR_DET, OCR_REC, ONNX_DATA, needs_ocr
from onnx import numpy_helper

from lepton_cli.model.io_contract import adapt_feed, restore_output
from lepton_cli.model.sessions import make_session, random_feed
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target

FUSE_TOL = dict(rtol=1e-4, atol=1e-5)
LAYOUT_TOL = dict(rtol=1e-5, atol=1e-6)
HALF_TYPES = (np.dtype(np.float16),)
HALF_RTOL = float(np.finfo(np.float16).eps)  # one ulp of fp16 at [1, 2)
# Cheap onnx node-test modules (each generates its cases in < 0.1 s) for the default subset.
FAST_NODE_MODULES = (
    "abs",
    "add",
    "clip",
    "concat",
    "conv",
    "convtranspose",
    "depthtospace",
    "div",
    "dropout",
    "einsum",
    "erf",
    "flatten",
    "gather",
    "gelu",
    "gemm",
    "globalaveragepool",
    "globalmaxpool",
    "hardsigmoid",
    "hardswish",
    "identity",
    "layernormalization",
    "leakyrelu",
    "matmul",
    "mul",
    "neg",
    "pad",
    "pow",
    "prelu",
    "reducemean",
    "relu",
    "reshape",
    "sigmoid",
    "slice",
    "softmax",
    "spacetodepth",
    "sqrt",
    "sub",
    "tanh",
    "transpose",
    "unsqueeze",
    "where",
    "batch_normalization",
    "instance_normalization",
)
FAST_NODE_CASES = 150


@dataclass
class Tally:
    title: str
    run: int = 0
    passed: int = 0
    bit_exact: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    not_bit_exact: list[str] = field(default_factory=list)
    half_ulp: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def report(self) -> str:
        lines = [
            f"{self.title}: ran {self.run}, passed {self.passed} ({self.bit_exact} bit-exact), "
            f"failed {len(self.failed)}, skipped {sum(self.skipped.values())}"
        ]
        lines += [f"  skipped {n:4d}: {reason}" for reason, n in self.skipped.most_common()]
        if self.half_ulp:
            lines.append(
                f"  fp16 outputs beyond rtol {FUSE_TOL['rtol']} but within one fp16 ulp: {', '.join(self.half_ulp)}"
            )
        if self.not_bit_exact:
            lines.append(f"  within tolerance, not bit-exact: {', '.join(self.not_bit_exact[:20])}")
        lines += [f"  FAILED {name}" for name in self.failed[:30]]
        return "\n".join(lines)


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    why_no_feeds: str = "no data set"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    for marker in ("NOT_IMPLEMENTED", "INVALID_GRAPH", "INVALID_ARGUMENT", "FAIL", "RUNTIME_EXCEPTION", "NO_SUCHFILE"):
        if marker in text:
            return marker
    import re

    # group like messages: drop names and numbers, keep the gist
    gist = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", text)[:90]
    return f"{exc.__class__.__name__}: {gist}"


# ---- case sources ------------------------------------------------------------------------------


def _feeds_from_arrays(model: onnx.ModelProto, data_sets) -> tuple[list[dict[str, np.ndarray]], str]:
    names = [sig.name for sig in graph_inputs(model)]
    feeds = []
    for inputs, _ in data_sets:
        # float8/int4/bfloat16 inputs come as TensorProto: numpy (ml_dtypes) arrays are what ORT takes
        inputs = [numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v for v in inputs]
        if not all(isinstance(v, (np.ndarray, np.generic)) for v in inputs):
            return [], "inputs are sequences/optionals, not tensors"
        inputs = [np.asarray(v) for v in inputs]  # numpy scalars (Clip's min/max) are 0-d tensors
        if len(inputs) != len(names):  # optional trailing inputs left out of the data set
            return [], "data set does not feed every graph input"
        feeds.append(dict(zip(names, inputs)))
    return feeds, "" if feeds else "no data set"


def node_cases(modules: tuple[str, ...] | None = None) -> list[Case]:
    """onnx's node test cases, generated in memory (all of them, or those of the named modules)."""
    if modules is None:
        from onnx.backend.test.loader import load_model_tests

        raw = load_model_tests(kind="node")
    else:
        package = importlib.import_module("onnx.backend.test.case.node")
        start = len(package._NodeTestCases)
        for name in modules:
            importlib.import_module(f"onnx.backend.test.case.node.{name}")
        raw = package._NodeTestCases[start:] or [c for c in package._NodeTestCases]
    cases = []
    for case in raw:
        feeds, why = _feeds_from_arrays(case.model, case.data_sets)
        cases.append(Case(case.name, case.model, feeds, why))
    return cases


def _read_pb(path: Path) -> np.ndarray | None:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(tensor)
    except Exception:  # a sequence/optional proto: not a plain tensor input
        return None


def disk_cases(kind: str) -> list[Case]:
    cases = []
    for folder in sorted((ONNX_DATA / kind).iterdir()):
        model = onnx.load(folder / "model.onnx")
        names = [sig.name for sig in graph_inputs(model)]
        feeds = []
        for data in sorted(folder.glob("test_data_set_*")):
            arrays = [_read_pb(p) for p in sorted(data.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
            if len(arrays) != len(names) or any(a is None for a in arrays):
                feeds = []
                break  # sequences/optionals or a partial data set
            feeds.append(dict(zip(names, arrays)))
        cases.append(Case(f"{kind}/{folder.name}", model, feeds, "inputs are sequences/optionals or partial"))
    return cases


def model_case(path: Path, shapes: dict[str, list[int]] | None = None, target: str = "cpu-avx") -> Case:
    from lepton_cli.model.load import load_model, upgrade_opset

    t = load_target(target)
    model, _ = upgrade_opset(load_model(path).model, t.runtime.opset_min, t.runtime.opset_max)
    if shapes:
        model = bind_input_shapes(model, shapes)
    rng = np.random.default_rng(0)
    return Case(path.stem, model, [random_feed(graph_inputs(model), rng, shapes) for _ in range(2)])


# ---- the check ---------------------------------------------------------------------------------


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = make_session(model)
    return [session.run(None, feed) for feed in feeds]


def _compare(ref: onnx.ModelProto, new: onnx.ModelProto, expected, feeds, tol: dict) -> tuple[bool, bool, str]:
    """(within tolerance, bit-exact, detail)."""
    got = _run(new, [adapt_feed(new, f) for f in feeds])
    names = [o.name for o in ref.graph.output]
    exact = close = True
    half_ulp: list[str] = []
    for want_all, have_all in zip(expected, got):
        for name, want, have in zip(names, want_all, have_all):
            have = restore_output(new, name, np.asarray(have))
            want = np.asarray(want)
            if want.shape != have.shape or want.dtype != have.dtype:
                return False, False, f"{name}: {have.dtype}{have.shape} != {want.dtype}{want.shape}"
            same = np.array_equal(want, have, equal_nan=want.dtype.kind in "fc")
            exact &= bool(same)
            if not same:
                ok = np.issubdtype(want.dtype, np.floating) and np.allclose(have, want, equal_nan=True, **tol)
                if not ok and want.dtype in HALF_TYPES:
                    # rtol 1e-4 is below fp16's resolution (eps 9.8e-4): allow one fp16 ulp, reported apart
                    ok = np.allclose(
                        have.astype(np.float32),
                        want.astype(np.float32),
                        rtol=HALF_RTOL,
                        atol=tol["atol"],
                        equal_nan=True,
                    )
                    if ok:
                        half_ulp.append(name)
                if not ok:
                    err = (
                        float(np.nanmax(np.abs(have.astype(np.float64) - want.astype(np.float64))))
                        if want.size
                        else 0.0
                    )
                    return False, False, f"{name}: max abs error {err:.3g}"
                close &= ok
    return close, exact, "fp16 ulp" if half_ulp else ""


@dataclass
class Sweep:
    fuse: Tally
    layout: Tally


def sweep(cases: list[Case], title: str, layout_target: str = "tpu", tmp: Path | None = None) -> Sweep:
    """fuse on every case (cpu-avx: widest opset), then layout_transform (NHWC I/O + padding) on its result."""
    import tempfile

    work = Path(tmp or tempfile.mkdtemp(prefix="lepton-sweep-"))
    fuse_target, layout_t = load_target("cpu-avx"), load_target(layout_target)
    fuse_ctx = PassContext(target=fuse_target, work_dir=work)
    layout_ctx = PassContext(target=layout_t, work_dir=work)
    fuse_spec, layout_spec = get_pass("fuse"), get_pass("layout_transform")
    fuse_params = next(s.params for s in fuse_target.passes if s.name == "fuse")
    from lepton_cli.passes.layout_transform import LayoutParams

    layout_params = LayoutParams(io_layout="NHWC", pad_channels=True, alignment=layout_t.hardware.channel_alignment)
    result = Sweep(
        Tally(f"fuse on {title}"), Tally(f"layout_transform ({layout_target}: NHWC I/O + channel padding) on {title}")
    )
    for case in cases:
        if not case.feeds:
            result.fuse.skip(case.why_no_feeds)
            result.layout.skip(case.why_no_feeds)
            continue
        try:
            expected = _run(case.model, case.feeds)
        except Exception as exc:
            reason = f"ONNX Runtime cannot run the source model ({_reason(exc)})"
            result.fuse.skip(reason)
            result.layout.skip(reason)
            continue
        if not all(isinstance(o, np.ndarray) for o in expected[0]):
            result.fuse.skip("outputs are sequences/optionals, not tensors")
            result.layout.skip("outputs are sequences/optionals, not tensors")
            continue
        if any(
            not np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind in "fc")
            for a, b in zip(expected[0], _run(case.model, case.feeds[:1])[0])
        ):
            result.fuse.skip("nondeterministic outputs (random op)")
            result.layout.skip("nondeterministic outputs (random op)")
            continue
        fused = _apply(fuse_spec, case, case.model, fuse_ctx, fuse_params, expected, FUSE_TOL, result.fuse)
        if fused is None:
            result.layout.skip("fuse failed on this case")
            continue
        fused_expected = _run(fused, case.feeds)
        _apply(layout_spec, case, fused, layout_ctx, layout_params, fused_expected, LAYOUT_TOL, result.layout)
    return result


def _apply(spec, case: Case, model, ctx, params, expected, tol, tally: Tally) -> onnx.ModelProto | None:
    tally.run += 1
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        new = spec.fn(copy, ctx, params).model
        onnx.checker.check_model(new)
        ok, exact, detail = _compare(model, new, expected, case.feeds, tol)
    except Exception as exc:
        tally.failed.append(
            f"{case.name}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        )
        return None
    if not ok:
        tally.failed.append(f"{case.name}: {detail}")
        return None
    tally.passed += 1
    tally.bit_exact += exact
    if detail == "fp16 ulp":
        tally.half_ulp.append(case.name)
    if not exact:
        tally.not_bit_exact.append(case.name)
    return new


def _show(result: Sweep, capsys) -> None:
    with capsys.disabled():
        print("\n" + result.fuse.report() + "\n" + result.layout.report())


def _assert_clean(result: Sweep, min_run: int) -> None:
    assert not result.fuse.failed, result.fuse.report()
    assert not result.layout.failed, result.layout.report()
    assert result.fuse.run >= min_run and result.layout.run >= min_run, (result.fuse.report(), result.layout.report())


# ---- default (fast) subset -------------------------------------------------------------------------


def test_sampled_node_cases_and_two_models(capsys, tmp_path):
    cases = node_cases(FAST_NODE_MODULES)
    step = max(1, len(cases) // FAST_NODE_CASES)
    sample = cases[::step][:FAST_NODE_CASES]
    sample += [model_case(DIGITS / "digits_cnn.onnx"), model_case(LIGHT_DIR / "light_squeezenet.onnx")]
    result = sweep(sample, f"{len(sample) - 2} sampled node cases + digits + squeezenet", "fpga", tmp_path)
    _show(result, capsys)
    _assert_clean(result, min_run=100)
    # Channels-last I/O and output padding are data moves: on these graphs everything is bit-exact.
    assert result.layout.bit_exact == result.layout.passed, result.layout.report()


# ---- the full sweep ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_node_case(capsys, tmp_path):
    cases = node_cases()
    result = sweep(cases, f"{len(cases)} onnx node test cases", "tpu", tmp_path)
    _show(result, capsys)
    _assert_clean(result, min_run=1000)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pytorch-converted", "pytorch-operator"])
def test_pytorch_models(kind, capsys, tmp_path):
    cases = disk_cases(kind)
    result = sweep(cases, f"{len(cases)} {kind} models", "fpga", tmp_path)
    _show(result, capsys)
    _assert_clean(result, min_run=len(cases) // 2)


@pytest.mark.slow
@pytest.mark.parametrize("layout_target", ["fpga", "tpu"])
def test_light_zoo(layout_target, capsys, tmp_path):
    cases = [model_case(p) for p in LIGHT_MODELS]
    result = sweep(cases, f"{len(cases)} light-zoo models", layout_target, tmp_path)
    _show(result, capsys)
    _assert_clean(result, min_run=len(cases))


@needs_ocr
@pytest.mark.slow
@pytest.mark.parametrize("layout_target", ["fpga", "tpu", "cuda"])
def test_ppocr(layout_target, capsys, tmp_path):
    cases = [model_case(OCR_DET, {"x": [1, 3, 320, 320]}), model_case(OCR_REC, {"x": [1, 3, 48, 320]})]
    result = sweep(cases, "PP-OCRv4 det + rec", layout_target, tmp_path)
    _show(result, capsys)
    _assert_clean(result, min_run=2)
