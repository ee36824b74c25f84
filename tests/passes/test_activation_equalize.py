"""Activation equalisation through hard-swish (quantize recovery, activation_equalize.py), on PP-OCRv4 det with
rendered pages: exact in float, evener channel ranges, a fully int8 model closer to the source."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import DDDDOCR_DET, OCR_DIR, REPO, needs_ddddocr_det, needs_ocr
from det_int8 import det_maps, fused_det_and_pages, fused_model
from lepton_cli.passes._quantize import activation_equalize, schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.conv_smoothing import channel_absmax
from lepton_cli.passes._quantize.recovery import RecoverySettings, recover
from onnx import helper

from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.model.sessions import make_session
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target
from lepton_cli.samples.sample_set import load_samples


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    fused, calib_path, held = fused_det_and_pages(tmp_path_factory)
    calib = list(load_samples(calib_path, fused).feeds(6))
    return fused, calib, held, calib_path


def _coarse_share(model: onnx.ModelProto, tensors: list[str], feeds: list[dict]) -> float:
    """The share of the tensors' channels whose range is under a sixteenth of their tensor's widest channel: on one
    int8 scale they keep under 16 levels."""
    ranges = channel_absmax(model, tensors, feeds)
    return float(np.mean([np.mean(r < r.max() / 16) for r in ranges.values()]))


@needs_ocr
def test_hard_swish_regions_are_rescaled_exactly_and_their_channels_evened(det):
    fused, calib, held, _ = det
    regions = activation_equalize.find_regions(fused)
    assert len(regions) >= 10 and all(region.gates and region.closers for region in regions)
    equalized, count = activation_equalize.equalized(fused, calib)
    assert count >= 10
    # one Mul carries each region's scale into each of its HardSigmoids
    added = sum(n.op_type == "Mul" for n in equalized.graph.node) - sum(n.op_type == "Mul" for n in fused.graph.node)
    assert count <= added <= sum(len(r.gates) for r in regions)
    source, rewritten = det_maps(fused, held), det_maps(equalized, held)  # pages the scales were not measured on
    np.testing.assert_allclose(rewritten, source, atol=1e-3)
    tensors = sorted({t for r in regions for t in r.tensors})
    before, after = _coarse_share(fused, tensors, held), _coarse_share(equalized, tensors, held)
    assert after < before / 2, (before, after)  # 11.6 % -> 3.0 %


@needs_ocr
def test_a_region_whose_tensor_leaves_the_graph_is_left_alone(det):
    fused, _, _, _ = det
    regions = activation_equalize.find_regions(fused)
    leaky = onnx.ModelProto()
    leaky.CopyFrom(fused)
    leaky.graph.output.append(helper.make_tensor_value_info(regions[0].tensors[-1], onnx.TensorProto.FLOAT, None))
    found = {r.producer.name for r in activation_equalize.find_regions(leaky)}
    assert regions[0].producer.name not in found and len(found) == len(regions) - 1


def _int8_error(model: onnx.ModelProto, calib_path, held: list[dict], source: np.ndarray, tmp) -> float:
    """Relative error of ``model``'s every-op int8 model (percentile ranges) against ``source`` on ``held``."""
    ranges = calibrate(
        model,
        load_samples(calib_path, model),
        CalibrationSettings(method="percentile", chunk=6, max_samples=6),
        None,
        [],
    )
    scheme = schemes.Int8Scheme(per_channel=True, op_types=())
    int8 = schemes.quantize_int8(model, schemes.save_ranges(ranges, tmp / "r.json"), "percentile", scheme, [], tmp)
    got = det_maps(int8, held)
    return float(np.linalg.norm(got - source) / np.linalg.norm(source))


@needs_ocr
def test_the_fully_int8_model_reads_closer_to_the_source(det, tmp_path):
    """Every op int8 at per-tensor activation scales: the equalised source's maps err a third less on held-out
    pages (0.47 -> 0.32 relative error at 160 px)."""
    fused, calib, held, calib_path = det
    source = det_maps(fused, held)
    equalized, _ = activation_equalize.equalized(fused, calib)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = _int8_error(fused, calib_path, held, source, tmp_path / "a")
    evened = _int8_error(equalized, calib_path, held, source, tmp_path / "b")
    assert evened < 0.8 * plain, (plain, evened)


@needs_ocr
def test_the_recovery_step_equalizes_the_reference_the_search_quantizes(det):
    fused, calib, held, _ = det
    settings = RecoverySettings(activation_equalize=True)
    assert settings.steps == ["activation_equalize"] and settings.any_step
    recovered = recover(fused, calib, schemes.Int8Scheme(per_channel=True), settings)
    assert recovered.summary["activation_regions_equalized"] >= 10
    assert recovered.reference is recovered.quantize_source  # no per-layer step: one model
    np.testing.assert_allclose(det_maps(recovered.reference, held), det_maps(fused, held), atol=1e-3)


def test_a_target_may_list_it_in_a_recovery_tier():
    params = from_table(
        get_pass("quantize").params_cls,
        {"fast_recovery_tier": ["activation_equalize", "adaround"], "activation_equalize": False},
        "t.quantize",
    )
    assert params.fast_recovery_tier == ["activation_equalize", "adaround"]


@needs_ddddocr_det
def test_silu_regions_of_a_yolox_detector_are_rescaled_exactly(tmp_path):
    """ddddocr's YOLOX detector: each SiLU's Sigmoid takes the scale as a HardSigmoid does; every region is rescaled,
    the boxes and scores stay the source's on captchas the scales were not measured on, and the every-op int8
    model's scores err less (0.153 -> 0.121 relative error at 416 px)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_quant_recovery import captchas

    fused = fused_model(DDDDOCR_DET, {"images": [1, 3, 256, 256]})
    calib, held = captchas(4, 1, 256), [{"images": x[None]} for x in captchas(3, 2, 256)]
    np.savez(tmp_path / "calib.npz", images=calib)
    equalized, count = activation_equalize.equalized(fused, [{"images": x[None]} for x in calib])
    regions = activation_equalize.find_regions(fused)
    assert count == len(regions) >= 30 and all(gate.op_type == "Sigmoid" for r in regions for gate, _ in r.gates)

    def heads(m: onnx.ModelProto) -> np.ndarray:
        session = make_session(m)
        return np.concatenate([session.run(None, feed)[0] for feed in held])

    source = heads(fused)
    np.testing.assert_allclose(heads(equalized), source, atol=1e-4 * np.abs(source).max())


@needs_ocr
def test_a_model_whose_input_layout_transform_made_nhwc_is_equalized_too(det):
    """tpu's layout_transform gives the model an NHWC input (recorded in its metadata); the calibration feeds stay
    in the source's NCHW form, and the exactness check must adapt them once, not twice (the recovery tier was
    skipped on PP-OCRv5 rec for tpu: "invalid dimensions for input: x")."""
    fused, calib, held, _ = det
    target = load_target("tpu")
    step = next(s for s in target.passes if s.name == "layout_transform")
    nhwc = get_pass("layout_transform").fn(fused, PassContext(target=target), step.params).model
    assert list(nhwc.metadata_props) and nhwc.graph.input[0].type.tensor_type.shape.dim[3].dim_value == 3
    equalized, count = activation_equalize.equalized(nhwc, calib)
    assert count >= 10
    source = make_session(nhwc)
    rewritten = make_session(equalized)
    for feed in held[:2]:
        adapted = adapt_feed(nhwc, feed)
        want, got = source.run(None, adapted)[0], rewritten.run(None, adapted)[0]
        np.testing.assert_allclose(got, want, atol=1e-3)


@needs_ocr
def test_fpga_equalizes_before_its_weight_blocks_split_the_convs(run_cli, tmp_path):
    """fpga splits per-tensor weight layers into weight blocks joined by Concats, which end every region; the step
    runs on the source before the blocks (PP-LCNet's direction classifier: its regions are equalised, every scale
    still a power of two for the DPU)."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    target = tmp_path / "fpga-eq.toml"
    target.write_text('extends = "fpga"\nname = "fpga-eq"\n\n[pass_params.quantize]\nactivation_equalize = true\n')
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=ocr_textset.make_set(16, 1, "calib", width=192)[0])
    result = run_cli(
        "compile", OCR_DIR / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "--target", target, "--input-shape",
        "x=1,3,48,192", "--calib", calib, "-o", tmp_path / "out", "--no-bench", "--quiet", "--json",
        "--max-accuracy-drop", "100",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads(next((tmp_path / "out").glob("*.lepton/report.json")).read_text())
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    assert quantize["weight_blocks"] and quantize["recovery"]["activation_regions_equalized"] >= 5
