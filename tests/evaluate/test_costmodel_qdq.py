"""Cost model on QDQ graphs, priced as ONNX Runtime's CPU EP runs them: 8-bit QDQ node units as integer
kernels (their Q/DQ inside), float-kept and 16-bit (A16W8) nodes at the float rate beside their Q/DQ
nodes; on PP-OCRv4 det the all-int8 candidate is cheaper than one with float-kept convs, and A16W8 is
not cheaper than float."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import OCR_DET, needs_ocr
from onnx import TensorProto, helper, numpy_helper
from test_costmodel import HW, IDEAL  # the same idealised hardware facts

from lepton_cli.evaluate import costmodel
from lepton_cli.evaluate.costmodel import Efficiency

C, H = 32, 16


def _conv_graph(act: int | None, weights_int8: bool = True, relu: bool = False) -> onnx.ModelProto:
    """x -> [Q -> DQ] -> Conv(W) [-> Relu] -> [Q -> DQ] -> y; ``act``: the activations' Q/DQ type (None: float)."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s")]
    nodes = []
    x, w, out = "x", "w", "conv_out"
    if act is not None:
        zp = numpy_helper.from_array(np.array(0, helper.tensor_dtype_to_np_dtype(act)), "zp")
        inits.append(zp)
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        ]
        x = "xd"
    if weights_int8:
        inits += [
            numpy_helper.from_array(np.ones((C, C, 3, 3), np.int8), "wq"),
            numpy_helper.from_array(np.array(0, np.int8), "wz"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "s", "wz"], ["wd"]))
        w = "wd"
    else:
        inits.append(numpy_helper.from_array(np.ones((C, C, 3, 3), np.float32), "w"))
    nodes.append(helper.make_node("Conv", [x, w], [out], name="conv", pads=[1, 1, 1, 1]))
    if relu:
        nodes.append(helper.make_node("Relu", [out], ["relu_out"], name="relu"))
        out = "relu_out"
    if act is not None:
        nodes += [
            helper.make_node("QuantizeLinear", [out, "s", "zp"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "s", "zp"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, H])],
        inits,
    )
    opset = 21 if act in (TensorProto.UINT16, TensorProto.INT16) else 17
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _costs(model: onnx.ModelProto, eff: Efficiency = IDEAL) -> dict[str, costmodel.NodeCost]:
    costs, unknown = costmodel.node_costs(costmodel.infer(model), HW, eff)
    assert not unknown
    return {c.name if c.op in ("Conv", "Relu") else f"{c.op}:{i}": c for i, c in enumerate(costs)}


def test_8bit_qdq_conv_is_one_integer_kernel_moving_int8_bytes():
    costs = _costs(_conv_graph(TensorProto.UINT8, relu=True))
    conv = costs["conv"]
    assert conv.dtype == "int8"
    # the Relu before the output Q is dropped, and only the input Q (fed by the float graph input) runs
    assert "relu" not in costs and [c.op for c in costs.values()] == ["QuantizeLinear", "Conv", "DequantizeLinear"]
    assert conv.bytes == C * H * H * 1 + C * C * 9 * 1 + C * H * H * 1  # u8 in, s8 weights, u8 out


@pytest.mark.parametrize("act", [TensorProto.UINT16, TensorProto.INT16])
def test_16bit_qdq_conv_runs_at_the_float_rate_with_its_qdq_overhead(act):
    a16 = _costs(_conv_graph(act))
    float_conv = _costs(_conv_graph(None, weights_int8=False))
    assert a16["conv"].dtype == "fp32"
    assert a16["conv"].compute_s == pytest.approx(float_conv["conv"].compute_s)
    ops = [c.op for c in a16.values()]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 3  # the weight DQ runs every time
    assert sum(c.seconds for c in a16.values()) > sum(c.seconds for c in float_conv.values())


def test_float_kept_conv_between_int8_qdq_is_priced_at_fp32():
    kept = _costs(_conv_graph(TensorProto.UINT8, weights_int8=False))
    fused = _costs(_conv_graph(TensorProto.UINT8))
    assert kept["conv"].dtype == "fp32" and fused["conv"].dtype == "int8"
    assert sum(c.seconds for c in fused.values()) < sum(c.seconds for c in kept.values())


def test_contrib_16bit_qdq_shapes_are_known():
    """com.microsoft Q/DQ (16-bit before opset 21) have no ONNX shape inference; the estimate still sizes them."""
    model = _conv_graph(TensorProto.UINT16)
    model.opset_import[0].version = 17
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] != "wq":
            node.domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    ms, complete = costmodel.latency_ms(model, HW, eff=IDEAL)
    assert complete and ms > 0
    assert {n.domain for n in costmodel.infer(model).graph.node} == {"", "com.microsoft"}  # nodes restored


@pytest.fixture(scope="module")
def det_candidates(tmp_path_factory):
    """PP-OCRv4 det at 320x320, quantized for cpu-avx by the pass's own plan: all int8, the 8 largest convs
    kept float, and every activation 16-bit (A16W8). Calibrated on 2 random images: the
    estimate reads the graph's structure and shapes, not its scales."""
    from lepton_cli.passes._quantize import schemes
    from lepton_cli.passes._quantize.heads import head_overrides
    from lepton_cli.passes.quantize import make_plan

    from lepton_cli.host.detect import HostInfo
    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.pipeline.context import PassContext
    from lepton_cli.pipeline.params import from_table
    from lepton_cli.pipeline.registry import get_pass
    from lepton_cli.pipeline.targets import load_target
    from lepton_cli.samples.sample_set import load_samples

    work = tmp_path_factory.mktemp("det")
    model, _ = upgrade_opset(onnx.load(OCR_DET), 13, 21)
    model = bind_input_shapes(model, {"x": [1, 3, 320, 320]})
    np.savez(work / "calib.npz", x=np.random.default_rng(0).random((2, 3, 320, 320), np.float32))
    target = load_target("cpu-avx")
    step = next(s for s in target.passes if s.name == "quantize")
    table = vars(step.params) | {"methods": ["minmax"]}
    params = from_table(get_pass("quantize").params_cls, table, "cpu-avx.quantize")
    host = dataclasses.replace(HostInfo.unknown(), arch="x86_64", isa=("avx512_vnni", "avx2"))
    ctx = PassContext(target=target, calib=load_samples(work / "calib.npz", model), host=host, work_dir=work)
    schemes.name_nodes(model)
    plan = make_plan(params, ctx)
    space = plan.space(model, ctx, ctx.calib, {})
    build = space.builds[-1]
    int8 = build("minmax", [])
    convs = [n for n in space.float_model.graph.node if n.op_type == "Conv"]
    shapes = costmodel.shape_map(costmodel.infer(space.float_model))
    largest = sorted(convs, key=lambda n: -int(np.prod([d or 1 for d in shapes.get(n.output[0], [1])])))[:8]
    kept = build("minmax", [n.name for n in largest])
    scheme = replace(plan.scheme, op_types=tuple(space.tiers[-1]))
    every = [n.name for n in space.float_model.graph.node]
    scheme = replace(scheme, extra=scheme.extra | head_overrides(space.float_model, every, "u8"))
    ranges = next(Path(work).glob("ranges-*minmax.json"))
    a16w8 = schemes.quantize_int8(space.float_model, ranges, "minmax", scheme, [], Path(work))
    every_op = space.builds[0]("minmax", [])  # cpu-avx's first tier: every op ORT quantizes
    return {"fp32": space.float_model, "int8": int8, "float_kept": kept, "a16w8": a16w8, "every_op": every_op}


@needs_ocr
def test_det_estimates_order_the_candidates_as_the_runtime_runs_them(det_candidates):
    from lepton_cli.pipeline.targets import load_target

    hw = load_target("cpu-avx").hardware
    ms = {}
    for label, model in det_candidates.items():
        ms[label], complete = costmodel.latency_ms(model, hw, input_shapes={"x": [1, 3, 320, 320]})
        assert complete, label
    assert ms["int8"] < ms["float_kept"] < ms["fp32"], ms
    # Measured on this model (cost_choice.md): every-op int8 0.735x fp32, Conv/MatMul/Gemm-only 0.756x; int8
    # Add/Mul requantize per element and are no faster than float, so the two tiers must not be priced far apart.
    assert 0.85 * ms["int8"] <= ms["every_op"] <= ms["int8"], ms
    assert ms["a16w8"] >= ms["fp32"], ms  # ORT fuses no 16-bit Conv: float compute plus Q/DQ on every tensor
    a16 = costmodel.node_costs(costmodel.infer(det_candidates["a16w8"]), hw)[0]
    assert not [c for c in a16 if c.op == "Conv" and c.dtype == "int8"]


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> dict[str, int]:
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # where the QDQ fusions run
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


@needs_ocr
@pytest.mark.parametrize("label", ["int8", "float_kept", "a16w8"])
def test_det_integer_kernels_are_those_the_installed_runtime_makes(det_candidates, label, tmp_path):
    """The fusion rules read from ORT's source, checked against the ORT this project runs: its optimized graph."""
    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.pipeline.targets import load_target

    model = bind_input_shapes(det_candidates[label], {"x": [1, 3, 320, 320]})
    costs = costmodel.node_costs(costmodel.infer(model), load_target("cpu-avx").hardware)[0]
    ops = _ort_optimized_ops(model, tmp_path)
    int8_convs = sum(c.op == "Conv" and c.dtype == "int8" for c in costs)
    float_convs = sum(c.op == "Conv" and c.dtype == "fp32" for c in costs)
    assert int8_convs == ops["QLinearConv"]
    assert float_convs == ops["Conv"] + ops["FusedConv"]
    assert sum(c.op == "QuantizeLinear" for c in costs) == ops["QuantizeLinear"]
    expected = {"int8": float_convs == 0, "float_kept": int8_convs > 0 and float_convs >= 8, "a16w8": int8_convs == 0}
    assert expected[label], (int8_convs, float_convs)
