"""layout_transform: channels-last I/O where the target takes NHWC frames, channel padding to the
target's alignment, both computing what the source computes (bit-exact where only data moves)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import DDDDOCR_DET, DIGITS, OCR_DET, needs_ddddocr_det, needs_ocr
from lepton_cli.passes.fuse import FuseParams
from lepton_cli.passes.layout_transform import LayoutParams
from onnx import TensorProto, helper, numpy_helper

from lepton_cli.errors import BadInputError
from lepton_cli.model.io_contract import LAYOUT_KEY, adapt_feed, restore_output
from lepton_cli.model.load import load_model, upgrade_opset
from lepton_cli.model.sessions import make_session, random_feed
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target


def _layout(model: onnx.ModelProto, target: str, **params) -> tuple[onnx.ModelProto, dict]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = get_pass("layout_transform").fn(copy, PassContext(target=load_target(target)), LayoutParams(**params))
    onnx.checker.check_model(result.model)
    return result.model, result.summary


def _outputs(before, after, dims=None):
    feed = random_feed(graph_inputs(before), np.random.default_rng(0), dims)
    want = make_session(before).run(None, feed)
    have = make_session(after).run(None, adapt_feed(after, feed))
    return want, [restore_output(after, o.name, h) for o, h in zip(before.graph.output, have)]


def _assert_bit_exact(before, after, dims=None):
    for w, h in zip(*_outputs(before, after, dims)):
        assert w.shape == h.shape
        assert np.array_equal(w, h), float(np.max(np.abs(w - h)))


def _assert_close(before, after, dims=None, rtol=1e-5, atol=1e-6):
    for w, h in zip(*_outputs(before, after, dims)):
        assert w.shape == h.shape
        np.testing.assert_allclose(h, w, rtol=rtol, atol=atol)


def _model(nodes, inits, inputs, outputs, opset=13):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_digits_takes_nhwc_on_edge_arm():
    model = load_model(DIGITS / "digits_cnn.onnx").model
    src_dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    params = next(s.params for s in load_target("edge-arm").passes if s.name == "layout_transform")
    assert params.io_layout == "NHWC"
    out, summary = _layout(model, "edge-arm", io_layout=params.io_layout, pad_channels=params.pad_channels)
    dims = [d.dim_value or d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [src_dims[0], src_dims[2], src_dims[3], src_dims[1]]
    assert {p.key: p.value for p in out.metadata_props}[LAYOUT_KEY + out.graph.input[0].name] == "NHWC"
    assert summary["io"]["transposes_remaining"] == 1  # the input Transpose meets a Conv at once
    _assert_bit_exact(model, out)


def test_transposes_pushed_through_elementwise_ops_and_cancelled():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["a"]),
        helper.make_node("Add", ["a", "shift"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
    ]
    inits = {
        "scale": rng.normal(size=(3, 1, 1)),
        "shift": rng.normal(size=(1, 3, 1, 1)),
        "lo": np.array(0.0),
        "hi": np.array(0.5),
    }
    model = _model(nodes, inits, [("x", [1, 3, 8, 6])], [("y", [1, 3, 8, 6])])
    out, summary = _layout(model, "tpu", io_layout="NHWC")
    assert summary["io"]["transposes_added"] == 2
    assert summary["io"]["transposes_remaining"] == 0
    assert not [n for n in out.graph.node if n.op_type in ("Transpose", "Identity")]
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, 8, 6, 3]
    _assert_bit_exact(model, out)


def test_output_transpose_pulled_up_to_meet_an_existing_transpose():
    """A TF-style graph: NHWC → Transpose to NCHW → Sigmoid → 4-D output; NHWC output cancels it."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Sigmoid", ["t"], ["s"]),
        helper.make_node("Transpose", ["s"], ["y"], perm=[0, 3, 1, 2]),
    ]
    model = _model(
        nodes, {"w": np.random.default_rng(0).normal(size=(4, 3, 1, 1))}, [("x", [1, 3, 5, 5])], [("y", [1, 4, 5, 5])]
    )
    out, summary = _layout(model, "edge-arm", io_layout="NHWC")
    # before: 2 transposes; the added output Transpose is pulled above Sigmoid and composes to nothing
    assert sum(n.op_type == "Transpose" for n in out.graph.node) == 2  # input one + the graph's own first
    assert summary["io"]["transposes_cancelled"] >= 1
    _assert_bit_exact(model, out)


def test_output_channel_padding_is_bit_exact_and_keeps_output_shapes():
    """The first Conv feeds another: padded to 16 with zero filters. The second writes the graph output through a
    Relu and feeds no Conv: it keeps its 7 channels (padding it would only be cut off again)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["d"]),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    model = _model(
        nodes,
        {"w": rng.normal(size=(5, 3, 3, 3)), "b": rng.normal(size=5), "w2": rng.normal(size=(7, 5, 1, 1))},
        [("x", [2, 3, 9, 9])],
        [("y", [2, 7, 9, 9])],
    )
    out, summary = _layout(model, "fpga", pad_channels=True)
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    first, second = [n for n in out.graph.node if n.op_type == "Conv"]
    assert weights[first.input[1]].shape == (16, 3, 3, 3) and not weights[first.input[1]][5:].any()
    assert weights[first.input[2]].shape == (16,) and not weights[first.input[2]][5:].any()
    assert weights[second.input[1]].shape == (7, 16, 1, 1) and not weights[second.input[1]][:, 5:].any()
    assert summary["padding"]["convs_padded"] == 1 and summary["padding"]["channels_added"] == 11
    assert not [n for n in out.graph.node if n.op_type in ("Slice", "Gather")]
    _assert_bit_exact(model, out)


@needs_ddddocr_det
def test_a_yolox_heads_box_and_score_convs_keep_their_channels_so_no_gather_cuts_the_padding():
    """ddddocr's YOLOX detector on tpu (channels to multiples of 8): its backbone is aligned already, and the head's
    4-box, 1-objectness and 1-class Convs feed only their Concat and the output, so nothing is padded and no Gather
    (which the Edge TPU does not run) restores channels before the output. (Before: those 9 Convs were padded and
    three Gathers cut the padding off again.)"""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset as textset

    model = bind_input_shapes(onnx.load(DDDDOCR_DET), {"images": [1, 3, 416, 416]})
    out, summary = _layout(model, "tpu", pad_channels=True)
    assert summary["padding"].get("convs_padded", 0) == 0 and summary["padding"]["convs"] >= 80
    assert not [n for n in out.graph.node if n.op_type == "Gather"]
    page = textset.render_page(np.random.default_rng(4), textset.EVAL_FONTS, textset.EVAL_WORDS, 416)
    feed = {"images": np.asarray(page, np.float32).transpose(2, 0, 1)[None]}
    want = make_session(model).run(None, feed)[0]
    have = restore_output(out, "output", make_session(out).run(None, adapt_feed(out, feed))[0])
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-3)


def test_residual_add_concat_batchnorm_and_depthwise_padded_consistently():
    rng = np.random.default_rng(2)
    r = lambda *s: rng.normal(size=s)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["ab"]),  # residual: both operands padded alike
        helper.make_node("BatchNormalization", ["ab", "s", "beta", "mean", "var"], ["bn"]),
        helper.make_node("HardSigmoid", ["bn"], ["h"]),  # h(0) = 0.5: padded lanes are not zero here
        helper.make_node("Conv", ["h", "wdw", "bdw"], ["dw"], group=5, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["dw", "wc"], ["c"]),
        helper.make_node("Concat", ["h", "c"], ["cat"], axis=1),
        helper.make_node("Mul", ["cat", "chscale"], ["m"]),
        helper.make_node("Conv", ["m", "wd", "bd"], ["y"]),
    ]
    inits = {
        "wa": r(5, 3, 3, 3),
        "ba": r(5),
        "wb": r(5, 3, 3, 3),
        "s": r(5),
        "beta": r(5),
        "mean": r(5),
        "var": np.abs(r(5)) + 0.5,
        "wdw": r(5, 1, 3, 3),
        "bdw": r(5),
        "wc": r(6, 5, 1, 1),
        "chscale": r(1, 11, 1, 1),
        "wd": r(4, 11, 1, 1),
        "bd": r(4),
    }
    model = _model(nodes, inits, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])])
    out, summary = _layout(model, "tpu", pad_channels=True, alignment=8)
    p = summary["padding"]
    assert p["convs_padded"] == 3 and p["concats_padded"] == 1 and p["depthwise_padded"] == 1
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    convs = {n.output[0]: n for n in out.graph.node if n.op_type == "Conv"}
    assert weights[convs["c"].input[1]].shape == (8, 8, 1, 1)  # its input (depthwise of padded h) has 8 channels
    final = weights[convs["y"].input[1]]  # writes the graph output: its own 4 channels stay unpadded
    assert final.shape[0] == 4
    assert final.shape[1] == 16  # concat of two 8-channel groups
    assert not final[:, 5:8].any() and not final[:, 14:16].any()  # each group's padding gets zero weights
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert list(weights[bn.input[2]][5:]) == [0.0] * 3 and list(weights[bn.input[4]][5:]) == [1.0] * 3
    _assert_close(model, out)


@needs_ocr
def test_ppocr_det_conv_channels_are_multiples_of_16_on_fpga():
    target = load_target("fpga")
    model, _ = upgrade_opset(load_model(OCR_DET).model, target.runtime.opset_min, target.runtime.opset_max)
    model = bind_input_shapes(model, {"x": [1, 3, 160, 160]})
    ctx = PassContext(target=target)
    fused = get_pass("fuse").fn(model, ctx, FuseParams()).model
    params = next(s.params for s in target.passes if s.name == "layout_transform")
    out, summary = _layout(fused, "fpga", io_layout=params.io_layout, pad_channels=params.pad_channels)
    weights = {t.name: t.dims for t in out.graph.initializer}
    image = out.graph.input[0].name
    checked, unpadded = Counter(), []
    for node in out.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in weights:
            continue
        dims = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_ch = dims[0] if node.op_type == "Conv" else dims[1] * group
        if out_ch % 16:
            unpadded.append(node.output[0])
        if group == 1 and node.input[0] != image:
            in_ch = dims[1] if node.op_type == "Conv" else dims[0]
            assert in_ch % 16 == 0, (node.name, list(dims))
        checked[node.op_type] += 1
    assert checked["Conv"] >= 50 and summary["padding"]["convs_padded"] > 10
    # only the head's last layer (one map channel, read by the output's Sigmoid and no other Conv) keeps its count
    producers = {o: n for n in out.graph.node for o in n.output}
    assert len(unpadded) == 1 and producers[out.graph.output[0].name].input[0] == unpadded[0]
    _assert_close(fused, out, rtol=1e-5, atol=1e-6)


@needs_ocr
def test_ppocr_det_dynamic_dims_survive_nhwc():
    model = load_model(OCR_DET).model
    out, _ = _layout(model, "mobile", io_layout="NHWC")
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert dims[3].dim_value == 3 and dims[1].dim_param and dims[2].dim_param
    assert len(out.graph.output[0].type.tensor_type.shape.dim) == 4
    _assert_bit_exact(model, out, {"x": [1, 3, 64, 96]})


def test_layout_params_validated_from_toml():
    from lepton_cli.pipeline.params import from_table

    with pytest.raises(BadInputError, match="alignment"):
        from_table(LayoutParams, {"alignment": 0}, "passes[2] (layout_transform)")
    with pytest.raises(BadInputError, match="io_layout"):
        from_table(LayoutParams, {"io_layout": "NCWH"}, "passes[2] (layout_transform)")
