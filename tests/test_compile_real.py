"""`lepton compile` on real models for every builtin target: the output loads in ONNX Runtime and,
where every pass that ran is lossless, computes what the source computes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import LIGHT_MODELS, OCR_DET, OCR_REC, needs_ocr
from lepton_cli.compiler import CompileOptions, compile_model
from lepton_cli.ort import make_session, random_feed
from lepton_cli.pipeline import adapt_feed, restore_output
from lepton_cli.shapes import graph_inputs
from lepton_cli.targets import BUILTIN_TARGETS

OCR_SHAPES = {"det": ["x=1,3,320,320"], "rec": ["x=1,3,48,320"]}


CALIB_SAMPLES = 4  # enough for every target's static int8 to run; accuracy is benchmarks' job
NO_GATE = 100.0  # these models come without labelled data: the test is that each target compiles and runs


def _random_calib(source: onnx.ModelProto, dims: dict[str, list[int]], path) -> None:
    """The zoo models ship no data: a seeded random calibration set (tpu and fpga refuse to run without one)."""
    rng = np.random.default_rng(1)
    feeds = [random_feed(graph_inputs(source), rng, dims) for _ in range(CALIB_SAMPLES)]
    np.savez(path, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})


FP16_MAX = 65504.0


def _stores_fp16(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def _peak_activation(source: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    """Largest |value| of any float tensor the source computes on ``feed``."""
    from lepton_cli.quant.tuning import _with_outputs

    names = [o for n in source.graph.node for o in n.output if o]
    probe, _ = _with_outputs(source, names)
    values = make_session(probe, opt_level="disable").run(None, feed)
    return max((float(np.max(np.abs(v))) for v in values if v.size and np.issubdtype(v.dtype, np.floating)), default=0.0)


def _compile_and_compare(model_path, target, tmp_path, input_shapes=()):
    source = onnx.load(model_path)
    dims = {spec.split("=")[0]: [int(d) for d in spec.split("=")[1].split(",")] for spec in input_shapes}
    calib = tmp_path / "calib.npz"
    _random_calib(source, dims, calib)
    result = compile_model(CompileOptions(model=model_path, target=target, output_dir=tmp_path, calib=calib,
                                          input_shapes=list(input_shapes), max_accuracy_drop=NO_GATE))
    compiled = onnx.load_from_string(result.model_bytes)  # the bundle holds it encrypted
    feed = random_feed(graph_inputs(source), np.random.default_rng(0), dims)
    expected = make_session(source, opt_level="basic").run(None, feed)
    session = make_session(compiled, opt_level="basic")  # loads in ORT: the first thing a user needs
    got = session.run(None, adapt_feed(compiled, feed))
    lossless = all(step.check.get("kind") != "lossy" for step in result.steps)
    for output, want, have in zip(source.graph.output, expected, got):
        have = restore_output(compiled, output.name, have)
        assert have.shape == want.shape, (output.name, have.shape, want.shape)
        if not np.isfinite(have).all() and (model_path.stem, target) in FP16_OVERFLOW and _stores_fp16(compiled):
            peak = _peak_activation(source, feed)
            if peak > FP16_MAX:  # the zoo's synthetic weights (see FP16_OVERFLOW), not a compiler fault
                pytest.xfail(f"source activations reach {peak:.1e}, beyond fp16's {FP16_MAX:g}")
        assert np.isfinite(have).all()
        if lossless:
            np.testing.assert_allclose(have, want, rtol=1e-3, atol=1e-4, err_msg=f"{model_path.name} → {target}")
    return result


FAST_LIGHT = [p for p in LIGHT_MODELS if p.stem in ("light_squeezenet", "light_shufflenet")]


# The zoo's synthetic constant weights drive activations far beyond fp16's 65504 (light_squeezenet
# ~6e9, alexnet 5e11, zfnet512 7.5e11, resnet50 9.4e18, inception_v1 7.9e20, vgg19 2.5e31): their fp16
# models (cuda, mobile) return NaN even with the overflowing nodes kept fp32 (fp16 Conv accumulation).
# With a real budget the accuracy gate refuses them (exit 3); here the gate is off. They still compile
# and load; only a non-finite output with the source's activations measured past fp16's range is xfail.
FP16_OVERFLOW = {(model, target) for target in ("cuda", "mobile") for model in (
    "light_squeezenet", "light_bvlc_alexnet", "light_zfnet512", "light_resnet50", "light_inception_v1", "light_vgg19")}


@pytest.mark.parametrize("target", BUILTIN_TARGETS)
@pytest.mark.parametrize("model_path", FAST_LIGHT, ids=lambda p: p.stem)
def test_light_models_fast(model_path, target, tmp_path):
    _compile_and_compare(model_path, target, tmp_path)


def test_fp16_overflow_is_refused_by_the_accuracy_gate(tmp_path):
    """The same compile with a real budget: NaN outputs never "agree", so quantize (and the final gate) refuse it: exit 3."""
    from lepton_cli.errors import QualityGateError

    model_path = next(p for p in LIGHT_MODELS if p.stem == "light_squeezenet")
    calib = tmp_path / "calib.npz"
    _random_calib(onnx.load(model_path), {}, calib)
    with pytest.raises(QualityGateError, match="accuracy budget"):
        compile_model(CompileOptions(model=model_path, target="cuda", output_dir=tmp_path, calib=calib))
    assert not list(tmp_path.glob("*.lepton"))


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
