"""Bias correction on the quantized model (passes/_quantize/quantized_bias.py) on PP-OCRv4 det and rendered pages.

The int8 model (every Conv, MinMax) shifts its layers' output means; matching them to the float model's, layer by
layer in graph order on the calibration pages, must bring the map closer to the float one on pages it never saw.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import needs_ocr
from det_int8 import det_maps, quantized_det_and_calib, snr_db
from digits_steps import quantize_summary
from lepton_cli.passes._quantize.quantized_bias import bias_sites, correct_quantized_biases, nodes_by_name
from onnx import numpy_helper


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """(fused float model, its Conv-only int8 QDQ model, held-out pages, calibration pages)."""
    return quantized_det_and_calib(tmp_path_factory)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


@needs_ocr
def test_a_shifted_float_bias_is_measured_back(det):
    """The float model as its own 'quantized' model, one conv's bias moved by 0.5: the correction finds the shift
    in that conv's output mean and removes it (the biases are fed as session inputs while measuring)."""
    fused, _, held, calib = det
    shifted = _copy(fused)
    site = bias_sites(shifted, nodes_by_name(fused))[3]
    bias = next(t for t in shifted.graph.initializer if t.name == site.bias)
    original = numpy_helper.to_array(bias).copy()
    bias.CopyFrom(numpy_helper.from_array((original + 0.5).astype(np.float32), site.bias))
    assert len(correct_quantized_biases(shifted, fused, calib)) > 10
    restored = numpy_helper.to_array(next(t for t in shifted.graph.initializer if t.name == site.bias))
    np.testing.assert_allclose(restored, original, atol=1e-3)
    np.testing.assert_allclose(det_maps(shifted, held[:1]), det_maps(fused, held[:1]), atol=1e-3)


@needs_ocr
def test_the_int8_map_moves_towards_the_float_map_on_held_out_pages(det):
    fused, int8, held, calib = det
    corrected = _copy(int8)
    count = len(correct_quantized_biases(corrected, fused, calib))
    assert count == len(bias_sites(int8, nodes_by_name(fused))) > 40
    reference = det_maps(fused, held)
    plain, better = snr_db(reference, det_maps(int8, held)), snr_db(reference, det_maps(corrected, held))
    assert better > plain + 5.0, (plain, better)  # measured 3.96 -> 13.63 dB
    stored = [t for t in corrected.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert stored  # ORT's int32 biases were corrected in their integer steps, still int32


def test_a_target_turns_it_on_and_the_report_says_what_it_gained(run_cli, tmp_path):
    """digits (a trained CNN, its own calibration images) through `lepton compile`: the quantize step reports the
    layers corrected, and its recovery table scores the fully quantized model without and with the step."""
    summary = quantize_summary(run_cli, tmp_path, "quantized_bias_correction = true")
    # two convs (ORT folded their Relus into the quantizes and gave them the Relus' output names) and two Gemms
    assert summary["quantized_biases_corrected"] == 4
    rows = summary["recovery"]["gains"]["rows"]
    assert [r["steps"] for r in rows] == [[], ["quantized_bias_correction"]]
    assert rows[0]["snr_db"] != rows[1]["snr_db"]


@needs_ocr
def test_a_channel_with_a_zero_step_keeps_its_bias(det):
    """A channel whose int32 bias has a zero scale has no weights to correct; dividing its shift by zero once
    stored -2^31 there (NaN cast to int32), as a correction too large for int32 did."""
    fused, int8, _, calib = det
    broken = _copy(int8)
    site = bias_sites(broken, nodes_by_name(fused))[0]
    dequantize = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == site.bias)
    scale = next(t for t in broken.graph.initializer if t.name == dequantize.input[1])
    values = numpy_helper.to_array(scale).copy()
    values.reshape(-1)[0] = 0.0
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    before = numpy_helper.to_array(next(t for t in broken.graph.initializer if t.name == site.bias)).copy()
    corrected = correct_quantized_biases(broken, fused, calib[:2])
    assert corrected[site.bias].reshape(-1)[0] == before.reshape(-1)[0]
    assert np.any(corrected[site.bias] != before)  # the channels with a step were still corrected
