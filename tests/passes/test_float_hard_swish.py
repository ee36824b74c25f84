"""Float-kept hard-swish blocks back at alpha 1/6 (``restore_hard_swish``), on PP-OCRv4 det and rendered pages: the
same map within float rounding, ORT fuses the blocks into its convolutions, and where a block feeds the first int8
layer its quantize takes the factor in its scale."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import needs_ocr
from det_int8 import fused_det_and_pages
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.float_hard_swish import SWISH_ALPHA, restore_hard_swish

from lepton_cli.samples.sample_set import load_samples


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    return fused_det_and_pages(tmp_path_factory)


def _alphas(model: onnx.ModelProto) -> list[float]:
    return [
        onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "alpha"))
        for n in model.graph.node
        if n.op_type == "HardSigmoid"
    ]


def _session(model: onnx.ModelProto, path) -> tuple[ort.InferenceSession, Counter]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@needs_ocr
def test_the_float_model_keeps_its_map_and_ort_fuses_the_restored_blocks(det, tmp_path):
    fused, calib_path, held = det
    restored, count = restore_hard_swish(fused)
    # the backbone's hard-swish blocks; not its squeeze-excite gates, nor the last block (a pooled gate reads it)
    assert count >= 12
    swish = lambda model: sum(np.isclose(a, SWISH_ALPHA) for a in _alphas(model))  # noqa: E731
    assert swish(restored) == swish(fused) + count
    before, before_ops = _session(fused, tmp_path / "before.onnx")
    after, after_ops = _session(restored, tmp_path / "after.onnx")
    assert after_ops["HardSigmoid"] <= before_ops["HardSigmoid"] - count  # run inside ORT's convolutions
    for feed in held:
        want, got = before.run(None, feed)[0], after.run(None, feed)[0]
        assert np.max(np.abs(want - got)) < 1e-3 and np.mean((want > 0.3) != (got > 0.3)) < 1e-4


@needs_ocr
def test_a_block_before_the_first_int8_layer_rescales_its_quantize(det, tmp_path):
    fused, calib_path, held = det
    stem = [n.name for n in fused.graph.node[:20]]  # the float-kept leading nodes of a shipped candidate
    calib = load_samples(calib_path, fused)
    ranges = calibrate(fused, calib, CalibrationSettings(method="minmax", chunk=6, max_samples=6), None, [])
    scheme = schemes.Int8Scheme(per_channel=True)
    int8 = schemes.quantize_int8(
        fused, schemes.save_ranges(ranges, tmp_path / "r.json"), "minmax", scheme, stem, tmp_path
    )
    restored, count = restore_hard_swish(int8)
    assert count >= 2
    rescaled = [n for n in restored.graph.node if n.op_type == "QuantizeLinear" and "_swish_rescaled" in n.input[1]]
    assert rescaled  # the boundary quantize took the factor; its dequantize keeps the scale it had
    plain, _ = _session(int8, tmp_path / "plain.onnx")
    after, _ = _session(restored, tmp_path / "restored.onnx")
    for feed in held:
        want, got = plain.run(None, feed)[0] > 0.3, after.run(None, feed)[0] > 0.3
        assert np.mean(want != got) <= 0.002  # an int8 rounding flipped here and there, never a region
