"""`lepton compile` on real models for every builtin target: the output loads in ONNX Runtime and,
where every pass that ran is lossless, computes what the source computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import LIGHT_MODELS, OCR_DET, OCR_REC, needs_ocr

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
    feed = random_feed(graph_inputs(source), np.random.default_rng(0), dims)
    expected = make_session(source, opt_level="basic").run(None, feed)
    session = make_session(compiled, opt_level="basic")  # loads in ORT: the first thing a user needs
    got = session.run(None, adapt_feed(compiled, feed))
    lossless = all(step.check.kind != "lossy" for step in result.steps)
    for output, want, have in zip(source.graph.output, expected, got):
        have = restore_output(compiled, output.name, have)
        assert have.shape == want.shape, (output.name, have.shape, want.shape)
        assert np.isfinite(have).all()
        if lossless:
            np.testing.assert_allclose(have, want, rtol=1e-3, atol=1e-4, err_msg=f"{model_path.name} → {target}")
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
