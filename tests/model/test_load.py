"""upgrade_opset: old exports reach the target's opset and still compute what they did."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ONNX_DATA
from onnx import numpy_helper

from lepton_cli.model.load import model_opset, upgrade_opset

PADS = ["test_ConstantPad2d", "test_ReflectionPad2d", "test_ReplicationPad2d", "test_ZeroPad2d"]


@pytest.mark.parametrize("name", PADS)
def test_an_ir3_pad_model_upgrades_and_computes_the_same(name):
    """The converter turns Pad's pads attribute into an initialiser, which IR 3 requires to be a graph input too."""
    folder = ONNX_DATA / "pytorch-converted" / name
    model = onnx.load(str(folder / "model.onnx"))
    assert model.ir_version == 3 and model_opset(model) == 6
    upgraded, note = upgrade_opset(model, 13, 21)
    assert model_opset(upgraded) == 13 and upgraded.ir_version >= 7 and note == "upgraded opset 6 → 13"
    onnx.checker.check_model(upgraded)
    x = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb")))
    session = ort.InferenceSession(upgraded.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {upgraded.graph.input[0].name: x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["test_PReLU_1d_multiparam", "test_PReLU_2d_multiparam", "test_PReLU_3d_multiparam"])
def test_an_opset6_per_channel_prelu_keeps_its_channel_axis_after_the_upgrade(name):
    """PRelu-6 applies a [C] slope along axis 1, PRelu-7+ from the last axis: upgraded as-is it failed to run (exit 1)."""
    folder = ONNX_DATA / "pytorch-converted" / name
    upgraded, _ = upgrade_opset(onnx.load(str(folder / "model.onnx")), 13, 21)
    x = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb")))
    session = ort.InferenceSession(upgraded.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {upgraded.graph.input[0].name: x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
