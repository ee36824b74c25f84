"""Real models that must compile or refuse with exit 2, never stop with an internal error (exit 1):
a stateful audio model with an int64 scalar input and If branches (Silero VAD), calibration data of the
wrong size, declared-but-unused opset domains, an already-quantized model, PP-OCRv5 rec's fp16
conversion. Models come from PyPI wheels (tests/wheel_models.py) or from PP-OCRv4 (rapidocr)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from audio_speech import espeak_available, speech, vad_samples
from conftest import OCR_REC, REPO, needs_ocr
from wheel_models import PPOCRV5_REC, SILERO, SILERO_HALF, SILERO_OPSET18, tones, wheel_member

sys.path.insert(0, str(REPO / "benchmarks"))

VAD_SHAPES = ["--input-shape", "input=1,576", "--input-shape", "state=2,1,128"]


@pytest.fixture(scope="session")
def silero() -> Path:
    return wheel_member(*SILERO)


@pytest.fixture(scope="session")
def vad_speech(silero, tmp_path_factory) -> dict[str, np.ndarray]:
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to calibrate on")
    return vad_samples(silero, speech(), every=2)


@pytest.fixture(scope="session")
def prequantized_rec(tmp_path_factory) -> Path:
    """PP-OCRv4 rec after ONNX Runtime's quantize_dynamic: DynamicQuantizeLinear + ConvInteger/MatMulInteger
    inside, and opset imports of ai.onnx.training, com.microsoft.nchwc, ... that no node uses."""
    if OCR_REC is None:
        pytest.skip("rapidocr-onnxruntime (PP-OCRv4 models) not installed")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = tmp_path_factory.mktemp("prequantized")
    quant_pre_process(str(OCR_REC), str(folder / "pre.onnx"), skip_symbolic_shape=True)
    quantize_dynamic(str(folder / "pre.onnx"), str(folder / "rec_dynamic.onnx"), weight_type=QuantType.QInt8)
    return folder / "rec_dynamic.onnx"


@pytest.fixture(scope="session")
def text_lines(tmp_path_factory) -> Path:
    import ocr_textset

    images, _ = ocr_textset.make_set(12, 11, "calib", width=160)
    path = tmp_path_factory.mktemp("lines") / "lines160.npz"
    np.savez(path, x=images)
    return path


def _report(out: Path, model: str, target: str) -> dict:
    return json.loads((out / f"{model}.{target}.lepton" / "report.json").read_text())


def _no_internal_error(result) -> None:
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-2000:]


# --- scalars, int64 and state inputs (Silero VAD) -------------------------------------------------------


def test_scalar_input_samples_reach_ort_as_arrays(silero, tmp_path):
    """A scalar input (sr, int64, rank 0) given as one value for all samples or one value per sample."""
    from lepton_cli.model.sessions import make_session
    from lepton_cli.samples.sample_set import load_samples

    model = onnx.load(silero)
    window = np.random.default_rng(0).uniform(-0.1, 0.1, (3, 1, 576)).astype(np.float32)
    state = np.zeros((3, 2, 1, 128), np.float32)
    session = make_session(model)
    for sr in (np.array(16000, np.int64), np.full(3, 16000, np.int64), np.full(3, 16000, np.int32)):
        path = tmp_path / "vad.npz"
        np.savez(path, input=window, state=state, sr=sr)
        samples = load_samples(path, model)
        assert len(samples) == 3 and samples.shapes()["sr"] == []
        feed = samples.feed(2)
        assert isinstance(feed["sr"], np.ndarray) and feed["sr"].shape == () and feed["sr"].dtype == np.int64
        probability, new_state = session.run(None, feed)
        assert probability.shape == (1, 1) and new_state.shape == (2, 1, 128)


def test_scalar_input_of_wrong_rank_is_bad_input(silero, tmp_path):
    from lepton_cli.errors import BadInputError
    from lepton_cli.samples.sample_set import load_samples

    path = tmp_path / "vad.npz"
    np.savez(
        path,
        input=np.zeros((2, 1, 576), np.float32),
        state=np.zeros((2, 2, 1, 128), np.float32),
        sr=np.full((2, 1), 16000, np.int64),
    )
    with pytest.raises(BadInputError, match="'sr' is a scalar"):
        load_samples(path, onnx.load(silero))


def test_random_feeds_take_the_branch_the_model_compares_for(silero):
    """Without data, sr must be the constant the graph tests it against (16000), not a random 0..7
    that takes the 8 kHz branch, which fails on 16 kHz windows."""
    from lepton_cli.model.sessions import compared_constants, make_session, model_random_feed

    model = onnx.load(silero)
    assert {k: int(v) for k, v in compared_constants(model).items()} == {"sr": 16000}
    feed = model_random_feed(model, np.random.default_rng(0), {"input": [1, 576], "state": [2, 1, 128]})
    assert int(feed["sr"]) == 16000
    make_session(model).run(None, feed)


@pytest.mark.parametrize("target", ["cpu-avx", "cuda"])
def test_silero_vad_compiles_without_data(silero, target, tmp_path, run_cli):
    """Rank-0 int64 input, If branches, state in and out: compiles, every exact pass's check runs."""
    result = run_cli("compile", silero, "-t", target, "-o", tmp_path, "--no-bench", *VAD_SHAPES)
    _no_internal_error(result)
    assert result.code == 0, result.stderr[-2000:]
    report = _report(tmp_path, "silero_vad", target)
    checks = {s["name"]: s["check"] for s in report["pipeline"]}
    assert checks["fuse"]["ok"] is True and not checks["fuse"].get("guessed_dims")
    assert any("kept input shapes dynamic" in n for n in report["normalisation"]), report["normalisation"]


@pytest.mark.parametrize("target", ["mobile", "cuda"])
def test_a_half_precision_export_converts_to_fp16(target, tmp_path, run_cli):
    """Silero's half-precision export casts inside its STFT to fp16 itself. fp16 targets keep Pow fp32, and the
    converter's fp32 Cast in front of it, read after the model's own fp16 Cast, was taken for a round trip back to an
    fp32 tensor and removed: the Pow got fp16 and the model failed to load (exit 1). Only a Cast of an fp32 tensor
    round-trips."""
    half = wheel_member(*SILERO_HALF)
    result = run_cli("compile", half, "-t", target, "-o", tmp_path, "--no-bench", *VAD_SHAPES)
    _no_internal_error(result)
    assert result.code == 0, result.stderr[-2000:]


def test_an_opset_18_export_compiles_for_an_opset_17_runtime(tmp_path, run_cli):
    """Silero's If-less export is opset 18 (Pad, ReduceMean with an axes input, Split by num_outputs, inside its
    branches); the DPU's and TFLite's runtimes take 17, and onnx's converter has no 18 -> 17 Pad. Rewritten to the
    opset-17 forms it computes the same to the bit, and compiles (exit 2 before: "re-export the model")."""
    from lepton_cli.model.load import model_opset
    from lepton_cli.model.opset_down import down_to_17
    from lepton_cli.model.sessions import make_session, model_random_feed

    path = wheel_member(*SILERO_OPSET18)
    model = onnx.load(path)
    lowered, why = down_to_17(model)
    assert lowered is not None and model_opset(lowered) == 17, why
    assert why == "2 Pad, 2 ReduceMean, 2 Split"
    rng = np.random.default_rng(0)
    for _ in range(4):
        feed = model_random_feed(model, rng, {"input": [1, 576], "state": [2, 1, 128]})
        for ours, theirs in zip(make_session(lowered).run(None, feed), make_session(model).run(None, feed)):
            assert np.array_equal(ours, theirs)
    np.savez(tmp_path / "tones.npz", **vad_samples(path, tones(2, 0).reshape(-1), every=4))  # harmonic sounds
    result = run_cli(
        "compile", path, "-t", "fpga", "--calib", tmp_path / "tones.npz", "-o", tmp_path / "out", "--no-bench",
        "--max-accuracy-drop", "100",
    )  # fmt: skip
    _no_internal_error(result)
    assert result.code == 0, result.stderr[-2000:]
    report = _report(tmp_path / "out", "silero_vad_op18_ifless", "fpga")
    assert any("opset 18 -> 17" in n for n in report["normalisation"])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu-avx", "cuda", "edge-arm"])
def test_silero_vad_compiles_on_speech(silero, vad_speech, target, tmp_path, run_cli):
    """Calibrated on real speech (states recorded by running the model over it); the compiled model's
    speech/silence decisions agree with the source's."""
    data = tmp_path / "speech.npz"
    np.savez(data, **vad_speech)
    result = run_cli("compile", silero, "-t", target, "-o", tmp_path, "--calib", data, "--no-bench")
    _no_internal_error(result)
    assert result.code == 0, result.stderr[-2000:]
    report = _report(tmp_path, "silero_vad", target)
    accuracy = report["accuracy"]
    assert accuracy["measured"] and accuracy["drop_pct"] <= 1.0, accuracy
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    if quantize["scheme"] == "int8":  # ORT's static quantizer does not enter If branches: said, not hidden
        assert quantize["applied"] == "none" and "nothing was quantized" in result.stderr
    else:  # the fp16 converter does: the branches' weights are fp16
        assert "nothing was quantized" not in result.stderr


def test_silero_vad_rank1_sample_rate_calibrates(silero, vad_speech, tmp_path, run_cli):
    """sr stored as one value per sample, shape (N,): the case that handed ORT a NumPy scalar."""
    data = tmp_path / "speech_rank1.npz"
    count = len(vad_speech["input"])
    np.savez(data, input=vad_speech["input"], state=vad_speech["state"], sr=np.full(count, 16000, np.int64))
    result = run_cli("compile", silero, "-t", "cpu-avx", "-o", tmp_path, "--calib", data, "--no-bench")
    _no_internal_error(result)
    assert result.code == 0, result.stderr[-2000:]


# --- calibration data of the wrong size ------------------------------------------------------------------


@needs_ocr
def test_calib_of_another_size_than_the_bound_input_is_exit_2(tmp_path, run_cli):
    import ocr_textset

    lines, _ = ocr_textset.make_set(4, 2, "calib", width=32)  # [4, 3, 48, 32]
    data = tmp_path / "small.npz"
    np.savez(data, x=np.ascontiguousarray(lines[:, :, 8:40, :]))  # [4, 3, 32, 32]
    result = run_cli(
        "compile",
        OCR_REC,
        "-t",
        "cpu-avx",
        "-o",
        tmp_path / "out",
        "--input-shape",
        "x=1,3,48,320",
        "--calib",
        data,
        "--no-bench",
    )
    assert result.code == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "'x'" in error[0] and "[1, 3, 32, 32]" in error[0] and "[1, 3, 48, 320]" in error[0], (
        result.stderr
    )
    assert "--input-shape x=1,3,32,32" in result.stderr
    assert not (tmp_path / "out").exists()


# --- opset imports that no node uses ---------------------------------------------------------------------


def test_unused_opset_imports_are_dropped_used_ones_refused(tmp_path):
    from lepton_cli.errors import BadInputError
    from lepton_cli.model.load import load_model

    path = REPO / "examples" / "digits" / "digits_cnn.onnx"
    model = onnx.load(path)
    model.opset_import.extend(
        [onnx.helper.make_opsetid("Paddle", 1), onnx.helper.make_opsetid("com.microsoft.nchwc", 1)]
    )
    declared = tmp_path / "declared.onnx"
    onnx.save(model, declared)
    loaded = load_model(declared)
    assert loaded.dropped_domains == ["Paddle", "com.microsoft.nchwc"]
    assert {o.domain for o in loaded.model.opset_import} == {""}
    model.graph.node[-1].domain = "Paddle"  # now a node uses it
    used = tmp_path / "used.onnx"
    onnx.save(model, used)
    with pytest.raises(BadInputError, match="outside the allowlist"):
        load_model(used)


# --- an already-quantized model --------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu-avx", "cuda"])
def test_prequantized_digits_compile_with_their_quantization(target, tmp_path, run_cli):
    from lepton_cli.passes._quantize.prequantized import quantized_ops
    from onnxruntime.quantization import QuantType, quantize_dynamic

    digits = REPO / "examples" / "digits"
    model = tmp_path / "digits_dynamic.onnx"
    quantize_dynamic(str(digits / "digits_cnn.onnx"), str(model), weight_type=QuantType.QInt8)
    assert quantized_ops(onnx.load(model))["DynamicQuantizeLinear"] > 0
    result = run_cli(
        "compile",
        model,
        "-t",
        target,
        "-o",
        tmp_path / "out",
        "--calib",
        digits / "calib.npz",
        "--eval",
        digits / "eval.npz",
        "--no-bench",
    )
    _no_internal_error(result)
    assert result.code == 0 and "already quantized" in result.stderr, result.stderr[-2000:]
    report = _report(tmp_path / "out", "digits_dynamic", target)
    assert next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]["applied"] == "none"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu-avx", "cuda"])
def test_prequantized_model_keeps_its_quantization(prequantized_rec, text_lines, target, tmp_path, run_cli):
    from lepton_cli.passes._quantize.prequantized import quantized_ops

    source_ops = quantized_ops(onnx.load(prequantized_rec))
    assert source_ops["DynamicQuantizeLinear"] > 0
    result = run_cli("compile", prequantized_rec, "-t", target, "-o", tmp_path, "--calib", text_lines, "--no-bench")
    _no_internal_error(result)
    assert result.code == 0, result.stderr[-2000:]
    assert "already quantized" in result.stderr and "dropped unused opset imports" in result.stderr
    report = _report(tmp_path, "rec_dynamic", target)
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")
    assert quantize["summary"]["already_quantized"] == dict(source_ops)
    fuse = next(s for s in report["pipeline"] if s["name"] == "fuse")
    assert fuse["check"]["ok"] is True
    assert report["accuracy"]["drop_pct"] <= 1.0, report["accuracy"]


# --- fp16 conversion of PP-OCRv5 rec ---------------------------------------------------------------------


def test_ppocrv5_rec_fp16_types_agree_after_fuse():
    """Stale value_info left by fuse named fp32-kept initializers (LayerNorm weights); the fp16
    converter retyped them to fp16 and shape inference failed: (1) vs (10)."""
    import dataclasses

    from lepton_cli.passes._quantize import schemes

    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.pipeline.context import PassContext
    from lepton_cli.pipeline.run import run_pipeline
    from lepton_cli.pipeline.targets import load_target

    target = load_target("cuda")
    target = dataclasses.replace(target, passes=[p for p in target.passes if p.name == "fuse"])
    model = bind_input_shapes(onnx.load(wheel_member(*PPOCRV5_REC)), {"x": [1, 3, 48, 160]})
    fused, _ = run_pipeline(model, PassContext(target=target))
    schemes.name_nodes(fused)
    converted = schemes.to_fp16(fused, list(schemes.FP16_BLOCK_DEFAULT), [])
    inferred = onnx.shape_inference.infer_shapes(converted)
    inits = {i.name: i.data_type for i in converted.graph.initializer}
    assert not [v.name for v in inferred.graph.value_info if v.name in inits]
    assert any(t == onnx.TensorProto.FLOAT for t in inits.values())  # blocked ops kept fp32 weights


# --- packaging -------------------------------------------------------------------------------------------


def _catches_import_error(block: ast.Try) -> bool:
    names = {ast.unparse(h.type) for h in block.handlers if h.type is not None}
    return bool(names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"})


def test_runtime_imports_are_declared_dependencies():
    """Every third-party module Lepton imports at run time is in [project].dependencies (Pillow was
    only in the [test] extra, so `--calib DIR --preprocess` failed for a plain `pip install`)."""
    import importlib.metadata
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def dist_name(dep: str) -> str:
        return (
            dep.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
        )

    # Runtime dependencies, and the optional extras a feature names in its exit-2 message (not [test]).
    extras = [dep for name, deps in project.get("optional-dependencies", {}).items() if name != "test" for dep in deps]
    declared = {dist_name(dep) for dep in [*project["dependencies"], *extras]}
    owners = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for folder in ("lepton_cli", "passes"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            fallbacks = {
                id(n) for handler in ast.walk(tree) if isinstance(handler, ast.ExceptHandler) for n in ast.walk(handler)
            }  # `except ImportError: import other` alternatives
            fallbacks |= {
                id(n)
                for block in ast.walk(tree)
                if isinstance(block, ast.Try) and _catches_import_error(block)
                for statement in block.body
                for n in ast.walk(statement)
            }  # `try: import optional`
            for node in ast.walk(tree):
                if id(node) in fallbacks:
                    continue
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    else []
                )
                for name in names:
                    top = name.split(".")[0]
                    if top in stdlib or top == "lepton_cli":
                        continue
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                    variants = {
                        d for d in declared if d.startswith(top.lower().replace("_", "-") + "-")
                    }  # tensorflow-cpu
                    if not dists & declared and not (top not in owners and variants):
                        missing.add(f"{top} ({path.relative_to(REPO)})")
    assert not missing, f"imported at run time but not in [project].dependencies: {sorted(missing)}"


# --- the quantize search's memory ------------------------------------------------------------------------


@pytest.mark.parametrize("run_mb", [256, 1e-9])
def test_streamed_local_errors_rank_as_the_float64_reference(run_mb, tmp_path, monkeypatch):
    """local_errors reduces each feed's tensors to sums before the next run, fetching them in groups of
    at most RUN_MB (1e-9: one tensor per run); the ranking matches the per-tensor NSRs computed from
    every feed's tensors held at once as float64 (what it did before)."""
    from lepton_cli.passes._quantize import sensitivity

    monkeypatch.setattr(sensitivity, "RUN_MB", run_mb)
    from lepton_cli.passes._quantize import schemes
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
    from lepton_cli.passes._quantize.sensitivity import local_errors, with_outputs

    from lepton_cli.model.sessions import make_session
    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.samples.sample_set import load_samples

    digits = REPO / "examples" / "digits"
    model = bind_input_shapes(onnx.load(digits / "digits_cnn.onnx"), {"image": [1, 1, 8, 8]})  # as compile does
    calib = load_samples(digits / "calib.npz", model)
    base = schemes.preprocess(model, tmp_path)
    ranges = schemes.save_ranges(calibrate(base, calib, CalibrationSettings(method="minmax")), tmp_path / "r.json")
    quantized = schemes.quantize_int8(base, ranges, "minmax", schemes.Int8Scheme(op_types=()), [], tmp_path)
    candidates = [n.name for n in base.graph.node]  # every node: digits has few quantized ones
    feeds = list(load_samples(digits / "eval.npz", model, role="--eval").feeds(8))
    ranked = local_errors(base, quantized, candidates, feeds)
    names_in_runs = sorted({t for n in base.graph.node for t in [*n.input, *n.output] if t})
    assert (len(sensitivity._groups(base, names_in_runs)) > 5) == (run_mb < 1)

    nodes = {n.name: n for n in base.graph.node if n.name in set(candidates)}
    names = sorted({t for n in nodes.values() for t in [*n.input, *n.output] if t})
    held = {}
    for tag, graph in (("ref", base), ("got", quantized)):
        extended, keep = with_outputs(graph, names)
        session = make_session(extended)
        held[tag] = [dict(zip(keep, (v.astype(np.float64) for v in session.run(keep, feed)))) for feed in feeds]

    def nsr(name):
        pairs = [(r[name], g[name]) for r, g in zip(held["ref"], held["got"]) if name in r and name in g]
        return (
            sum(float(np.sum((r - g) ** 2)) for r, g in pairs) / max(sum(float(np.sum(r**2)) for r, _ in pairs), 1e-30)
            if pairs
            else None
        )

    expected = []
    for name, node in nodes.items():
        outs = [v for v in map(nsr, node.output) if v is not None]
        ins = [v for v in map(nsr, node.input) if v is not None]
        if outs:
            expected.append((name, max(outs) - (max(ins) if ins else 0.0)))
    expected.sort(key=lambda item: -item[1])
    assert len(ranked) == len(expected) >= 4
    assert [n for n, _ in ranked] == [n for n, _ in expected]
    np.testing.assert_allclose([v for _, v in ranked], [v for _, v in expected], rtol=1e-4, atol=1e-9)


def test_histogram_bound_when_the_first_chunk_of_a_tensor_is_all_zeros():
    """np.histogram gives constant data the range (v-0.5, v+0.5): an |x| histogram of zeros starts at
    -0.5, which the bound must not take for a signed histogram (percentile calibration)."""
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, _bound_histograms
    from onnxruntime.quantization.calibrate import HistogramCollector

    class Calibrator:
        collector = HistogramCollector(
            method="percentile", symmetric=True, num_bins=256, num_quantized_bins=128, percentile=99.9, scenario="same"
        )

    calibrator = Calibrator()
    calibrator.collector.collect({"t": [np.zeros(100, np.float32)]})
    _bound_histograms(calibrator, CalibrationSettings(method="percentile", histogram_bins=256))
    calibrator.collector.collect({"t": [np.linspace(-5000, 5000, 1001, dtype=np.float32)]})
    hist, edges, low, high = calibrator.collector.histogram_dict["t"]
    assert len(hist) <= 4 * 256 and float(edges[-1]) >= 5000 and int(hist.sum()) == 1101
