"""`lepton compile` on real models for every builtin target: the output loads in ONNX Runtime and returns finite
outputs of the source's shapes; compiled with only the target's lossless steps, it computes what the source computes
on real data (digits, rendered text lines and pages), within the tolerance the steps declare."""

from __future__ import annotations

import json
import sys
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS, LIGHT_MODELS, OCR_DET, OCR_REC, REPO, needs_ocr, unread_nodes

from lepton_cli.compile.compiler import CompileOptions, compile_model
from lepton_cli.model.io_contract import adapt_feed, restore_output
from lepton_cli.model.sessions import make_session, random_feed
from lepton_cli.model.shapes import graph_inputs
from lepton_cli.pipeline.targets import BUILTIN_TARGETS

OCR_SHAPES = {"det": ["x=1,3,320,320"], "rec": ["x=1,3,48,320"]}


CALIB_SAMPLES = 4  # enough for every target's static int8 to run; accuracy is benchmarks' job
NO_GATE = 100.0  # these models come without labelled data: the test is that each target compiles and runs


def _random_calib(source: onnx.ModelProto, dims: dict[str, list[int]], path) -> None:
    """The zoo models ship no data: a seeded random calibration set (tpu and fpga refuse to run without one)."""
    rng = np.random.default_rng(1)
    feeds = [random_feed(graph_inputs(source), rng, dims) for _ in range(CALIB_SAMPLES)]
    np.savez(path, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})


def _compile_and_compare(model_path, target, tmp_path, input_shapes=()):
    source = onnx.load(model_path)
    dims = {spec.split("=")[0]: [int(d) for d in spec.split("=")[1].split(",")] for spec in input_shapes}
    calib = tmp_path / "calib.npz"
    _random_calib(source, dims, calib)
    result = compile_model(
        CompileOptions(
            model=model_path,
            target=target,
            output_dir=tmp_path,
            calib=calib,
            input_shapes=list(input_shapes),
            max_accuracy_drop=NO_GATE,
        )
    )
    compiled = onnx.load_from_string(result.model_bytes)  # the bundle holds it encrypted
    assert unread_nodes(compiled) == []  # ORT runs unread nodes
    feed = random_feed(graph_inputs(source), np.random.default_rng(0), dims)
    expected = make_session(source, opt_level="basic").run(None, feed)
    session = make_session(compiled, opt_level="basic")  # loads in ORT: the first thing a user needs
    got = session.run(None, adapt_feed(compiled, feed))
    for output, want, have in zip(source.graph.output, expected, got):
        have = restore_output(compiled, output.name, have)
        assert have.shape == want.shape, (output.name, have.shape, want.shape)
        assert np.isfinite(have).all()
    return result


FAST_LIGHT = [p for p in LIGHT_MODELS if p.stem in ("light_squeezenet", "light_shufflenet")]


# The zoo's synthetic constant weights drive activations far beyond fp16's 65504 (light_squeezenet
# ~6e9, alexnet 5e11, resnet50 9.4e18, inception_v1 7.9e20, vgg19 2.5e31): the fp16 targets (cuda,
# mobile) keep those nodes fp32 and must still return finite outputs (asserted above).


@pytest.mark.parametrize("target", BUILTIN_TARGETS)
@pytest.mark.parametrize("model_path", FAST_LIGHT, ids=lambda p: p.stem)
def test_light_models_fast(model_path, target, tmp_path):
    _compile_and_compare(model_path, target, tmp_path)


def test_fp16_overflow_stays_fp32_within_the_budget(tmp_path):
    """squeezenet's activations reach 6e9 (fp16 ends at 65504): those nodes stay fp32, the fp16 model is finite on
    every calibration sample and meets the default budget (the converter's fp16 casts between fp32-kept nodes removed)."""
    model_path = next(p for p in LIGHT_MODELS if p.stem == "light_squeezenet")
    calib = tmp_path / "calib.npz"
    _random_calib(onnx.load(model_path), {}, calib)
    result = compile_model(CompileOptions(model=model_path, target="cuda", output_dir=tmp_path, calib=calib))
    step = next(s for s in result.steps if s.name == "quantize")
    assert step.summary["fp16_range"]["finite"] and step.summary["fp16_overflow_kept"]
    compiled = onnx.load_from_string(result.model_bytes)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in compiled.graph.initializer)  # still an fp16 model
    session = make_session(compiled)
    data = np.load(calib)
    for row in range(CALIB_SAMPLES):
        outputs = session.run(None, adapt_feed(compiled, {name: data[name][row] for name in data.files}))
        assert all(np.isfinite(o).all() for o in outputs)
    assert result.report["accuracy"]["drop_pct"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("target", BUILTIN_TARGETS)
@pytest.mark.parametrize("model_path", [p for p in LIGHT_MODELS if p not in FAST_LIGHT], ids=lambda p: p.stem)
def test_light_models_all(model_path, target, tmp_path):
    _compile_and_compare(model_path, target, tmp_path)


@needs_ocr
@pytest.mark.parametrize("target", BUILTIN_TARGETS)
def test_ppocr_det(target, tmp_path):
    _compile_and_compare(OCR_DET, target, tmp_path, OCR_SHAPES["det"])


@needs_ocr
@pytest.mark.slow
@pytest.mark.parametrize("target", BUILTIN_TARGETS)
def test_ppocr_rec(target, tmp_path):
    _compile_and_compare(OCR_REC, target, tmp_path, OCR_SHAPES["rec"])


def test_nine_light_models_are_covered():
    assert len(LIGHT_MODELS) == 9


# --- Lossless steps only: the compiled model against the source on real data ---------------------------------------

# The pipeline accepts a tolerance-declared step whose error stays within this many times the difference ONNX
# Runtime's own graph optimisations make to the source (float reassociation, not a wrong rewrite).
NOISE_FLOOR_FACTOR = 4.0


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)  # strings, numbers, booleans and arrays of them read the same in TOML


def lossless_target(builtin: str, folder: Path) -> Path:
    """A target file extending ``builtin`` with its lossless steps only: quantize off, prune on dead channels only
    (exact); fuse and layout_transform as the builtin sets them."""
    raw = tomllib.loads(resources.files("lepton_cli.builtin_targets").joinpath(f"{builtin}.toml").read_text())
    lines = [f'extends = "{builtin}"', f'name = "{builtin}-lossless"']
    for step in raw["passes"]:
        step = step | ({"enabled": False} if step["name"] == "quantize" else {})
        step = step | ({"mode": "dead"} if step["name"] == "prune" else {})
        lines += ["", "[[passes]]", *(f"{key} = {_toml(value)}" for key, value in step.items())]
    path = folder / f"{builtin}-lossless.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _scaled_error_bound(expected: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """atol + rtol · max|expected|, the max per channel (axis 1) for rank ≥ 3 (the pipeline's tolerance)."""
    magnitude = np.abs(expected.astype(np.float64))
    axes = tuple(a for a in range(expected.ndim) if a != 1) if expected.ndim >= 3 else None
    return atol + rtol * np.max(magnitude, axis=axes, keepdims=expected.ndim >= 3)


def compile_lossless_and_compare(model_path, target, tmp_path, data: dict[str, np.ndarray], input_shapes=()) -> int:
    """Compile with ``target``'s lossless steps, run source and compiled on every sample of ``data`` (adapting the
    feed and restoring each output through the compiled model's I/O contract) and compare; returns how many
    outputs were compared."""
    np.savez(tmp_path / "data.npz", **data)
    result = compile_model(
        CompileOptions(
            model=model_path,
            target=str(lossless_target(target, tmp_path)),
            output_dir=tmp_path / "out",
            eval=tmp_path / "data.npz",  # the pipeline's own per-step checks run on these samples too
            input_shapes=list(input_shapes),
            bench=False,
        )
    )
    ran = [step for step in result.report["pipeline"] if step["check"]["kind"] != "skipped"]
    checks = {step["name"]: step["check"] for step in ran}
    assert checks and all(c["kind"] in ("exact", "tolerance") and c["ok"] for c in checks.values()), checks
    rtol, atol = sum(c.get("rtol", 0.0) for c in checks.values()), sum(c.get("atol", 0.0) for c in checks.values())
    source, compiled = onnx.load(model_path), onnx.load_from_string(result.model_bytes)
    reference, optimised = make_session(source), make_session(source, opt_level="all")
    session = make_session(compiled)
    names = [output.name for output in source.graph.output]
    compared = 0
    for row in range(len(next(iter(data.values())))):
        feed = {name: values[row : row + 1] for name, values in data.items() if name in _input_names(source)}
        expected, floor_run = reference.run(None, feed), optimised.run(None, feed)
        got = session.run(None, adapt_feed(compiled, feed))
        for name, want, have, noise in zip(names, expected, got, floor_run):
            have = restore_output(compiled, name, have)
            assert have.shape == want.shape, (name, have.shape, want.shape)
            error = np.abs(have.astype(np.float64) - want)
            floor = NOISE_FLOOR_FACTOR * float(np.max(np.abs(noise.astype(np.float64) - want), initial=0.0))
            within = np.all(error <= _scaled_error_bound(want, rtol, atol)) or np.max(error, initial=0.0) <= floor
            assert within, (
                f"{model_path.name} → {target}, sample {row}, output {name}: max error {np.max(error):.3g}, "
                f"declared rtol {rtol:g} atol {atol:g}, 4x ORT's own noise {floor:.3g}; steps {list(checks)}"
            )
            compared += 1
    return compared


def _input_names(model: onnx.ModelProto) -> set[str]:
    return {sig.name for sig in graph_inputs(model)}


def _digits_data(count: int) -> dict[str, np.ndarray]:
    data = np.load(DIGITS / "eval.npz")
    return {"image": data["image"][:count]}


def _ocr_textset():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    return ocr_textset


@pytest.mark.parametrize("target", BUILTIN_TARGETS)
def test_digits_lossless_steps_compute_what_the_source_computes(target, tmp_path):
    assert compile_lossless_and_compare(DIGITS / "digits_cnn.onnx", target, tmp_path, _digits_data(32)) == 32


def _fast_on(*fast: str) -> list:
    """Every builtin target; those not in ``fast`` only with `make test-all` (each is a PP-OCR compile)."""
    return [target if target in fast else pytest.param(target, marks=pytest.mark.slow) for target in BUILTIN_TARGETS]


@needs_ocr
@pytest.mark.parametrize("target", _fast_on("edge-arm"))  # NHWC I/O: the feed and outputs go through the I/O contract
def test_ppocr_rec_lossless_steps_on_text_lines(target, tmp_path):
    images, _ = _ocr_textset().make_set(4, 3, "eval")
    assert compile_lossless_and_compare(OCR_REC, target, tmp_path, {"x": images}, OCR_SHAPES["rec"]) == 4


@needs_ocr
@pytest.mark.parametrize("target", _fast_on("cuda"))  # channels padded to multiples of 8
def test_ppocr_det_lossless_steps_on_pages(target, tmp_path):
    pages = _ocr_textset().make_pages(4, seed=3, role="eval", size=320)
    assert compile_lossless_and_compare(OCR_DET, target, tmp_path, {"x": pages}, OCR_SHAPES["det"]) == 4
