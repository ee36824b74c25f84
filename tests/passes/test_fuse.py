"""fuse: the graph changes the way the targets need (BN gone, weights folded, LayerNorm/Gelu fused,
bias Adds folded), outputs stay within the declared tolerance, and the ORT-offline option is
refused on portable targets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import DDDDOCR_DET, DIGITS, LIGHT_DIR, OCR_REC, needs_ddddocr_det, needs_ocr
from lepton_cli.passes.fuse import FuseParams  # noqa: E402  (installed from passes/)
from onnx import TensorProto, helper, numpy_helper

from lepton_cli.errors import BadInputError
from lepton_cli.model.load import load_model, upgrade_opset
from lepton_cli.model.sessions import make_session, random_feed
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target


def _fuse(model: onnx.ModelProto, target: str = "cpu-avx", tmp_path=None, **params) -> tuple[onnx.ModelProto, dict]:
    ctx = PassContext(target=load_target(target), **({"work_dir": tmp_path} if tmp_path else {}))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = get_pass("fuse").fn(copy, ctx, FuseParams(**params))
    onnx.checker.check_model(result.model)
    return result.model, result.summary


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _assert_same(before: onnx.ModelProto, after: onnx.ModelProto, dims=None, rtol=1e-4, atol=1e-5) -> None:
    feed = random_feed(graph_inputs(before), np.random.default_rng(0), dims)
    want = make_session(before).run(None, feed)
    have = make_session(after).run(None, feed)
    for w, h in zip(want, have):
        np.testing.assert_allclose(h, w, rtol=rtol, atol=atol)


def _real(path, target="cpu-avx", shapes=None) -> onnx.ModelProto:
    t = load_target(target)
    model, _ = upgrade_opset(load_model(path).model, t.runtime.opset_min, t.runtime.opset_max)
    return bind_input_shapes(model, shapes) if shapes else model


def test_digits_batchnorm_folded_into_conv():
    model = _real(DIGITS / "digits_cnn.onnx")
    assert _ops(model)["BatchNormalization"] > 0
    fused, summary = _fuse(model, "edge-arm")
    assert _ops(fused)["BatchNormalization"] == 0
    assert summary["removed_ops"]["BatchNormalization"] == _ops(model)["BatchNormalization"]
    _assert_same(model, fused)


def test_squeezenet_constant_weights_and_dropout_folded():
    model = _real(LIGHT_DIR / "light_squeezenet.onnx")
    fused, summary = _fuse(model, "fpga")
    ops = _ops(fused)
    assert ops["ConstantOfShape"] == 0 and ops["Dropout"] == 0 and ops["Identity"] == 0
    assert ops["Conv"] == _ops(model)["Conv"]  # every conv kept, weights now initializers
    assert summary["nodes_after"] < summary["nodes_before"]
    _assert_same(model, fused)


def test_densenet_bn_as_mul_add_folds_into_conv_bias():
    """densenet's BN after the conv is Mul+Add: onnxsim folds the Mul; we fold the Add into the bias."""
    model = _real(LIGHT_DIR / "light_densenet121.onnx")
    fused, summary = _fuse(model)
    assert summary["bias_adds_folded"] > 0
    conv_outputs = {n.output[0] for n in fused.graph.node if n.op_type == "Conv"}
    inits = {t.name for t in fused.graph.initializer}
    # no Add of a constant directly after a Conv is left
    assert not [
        n for n in fused.graph.node if n.op_type == "Add" and n.input[0] in conv_outputs and n.input[1] in inits
    ]
    _assert_same(model, fused)


def test_fold_limit_keeps_huge_constants_unfolded():
    model = _real(LIGHT_DIR / "light_bvlc_alexnet.onnx")
    small, _ = _fuse(model, fold_limit_mb=1.0)
    assert _ops(small)["ConstantOfShape"] > 0  # the big FC weights stay cheap to store
    assert small.ByteSize() < 20e6


def _graph(nodes, inits, opset, inputs, out_rank):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(out_rank)])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_conv_with_bias_then_add_and_gemm_then_add_fold():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "cb"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw"], ["g"], transB=1),
        helper.make_node("Add", ["gb", "g"], ["y"]),
    ]
    inits = {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
        "cb": rng.normal(size=(1, 4, 1, 1)).astype(np.float32),
        "gw": rng.normal(size=(5, 4 * 8 * 8)).astype(np.float32),
        "gb": rng.normal(size=(5,)).astype(np.float32),
    }
    model = _graph(nodes, inits, 13, [("x", [2, 3, 8, 8])], 2)
    fused, summary = _fuse(model)
    assert _ops(fused)["Add"] == 0 and summary["bias_adds_folded"] == 2
    _assert_same(model, fused)


def _layer_norm_nodes(axes_as_input: bool):
    def mean(src, dst):
        if axes_as_input:
            return helper.make_node("ReduceMean", [src, "axes"], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=[-1])

    return [
        mean("x", "m"),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        mean("d2", "v"),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n"]),
        helper.make_node("Mul", ["n", "g"], ["ng"]),
        helper.make_node("Add", ["ng", "b"], ["y"]),
    ]


def test_layer_norm_fused_by_raising_opset_within_the_target():
    rng = np.random.default_rng(2)
    inits = {
        "two": np.array(2, np.float32),
        "eps": np.array(1e-5, np.float32),
        "g": rng.normal(size=16).astype(np.float32),
        "b": rng.normal(size=16).astype(np.float32),
    }
    model = _graph(_layer_norm_nodes(False), inits, 13, [("x", [2, 7, 16])], 3)
    fused, summary = _fuse(model, "edge-arm")  # opset_max 19 allows LayerNormalization (17)
    assert _ops(fused)["LayerNormalization"] == 1 and summary["opset"] == 17
    _assert_same(model, fused)
    not_fused, _ = _fuse(model, "edge-arm", fuse_norms=False)
    assert _ops(not_fused)["LayerNormalization"] == 0


def test_gelu_fused_only_where_the_target_has_opset_20():
    half = {"sq2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32), "half": np.array(0.5, np.float32)}
    nodes = [
        helper.make_node("Div", ["x", "sq2"], ["a"]),
        helper.make_node("Erf", ["a"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["f"]),
        helper.make_node("Mul", ["x", "f"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["y"]),
    ]
    model = _graph(nodes, half, 13, [("x", [2, 7, 16])], 3)
    on_cpu, summary = _fuse(model, "cpu-avx")  # opset_max 21
    assert _ops(on_cpu)["Gelu"] == 1 and summary["opset"] == 20
    _assert_same(model, on_cpu)
    on_tpu, _ = _fuse(model, "tpu")  # opset_max 17: no Gelu op there
    assert _ops(on_tpu)["Gelu"] == 0 and _ops(on_tpu)["Erf"] == 1


@needs_ocr
def test_ppocr_rec_layer_norms_fused_on_edge_arm():
    model = _real(OCR_REC, "edge-arm", {"x": [1, 3, 48, 320]})
    fused, summary = _fuse(model, "edge-arm")
    assert _ops(fused)["LayerNormalization"] == 5
    assert _ops(fused)["BatchNormalization"] == 0 and _ops(fused)["Constant"] == 0
    _assert_same(model, fused)


def test_ort_offline_refused_on_portable_targets():
    model = _real(DIGITS / "digits_cnn.onnx")
    with pytest.raises(BadInputError, match="ort_offline"):
        _fuse(model, "fpga", ort_offline=True)


def test_ort_offline_emits_ort_fused_graph_on_cpu_avx(tmp_path):
    model = _real(DIGITS / "digits_cnn.onnx")
    fused, summary = _fuse(model, "cpu-avx", tmp_path, ort_offline=True)
    assert summary["ort_offline"] is True
    assert any(n.domain == "com.microsoft" for n in fused.graph.node)  # e.g. FusedConv (Conv+Relu)
    _assert_same(model, fused)


def test_fuse_params_validated_from_toml():
    from lepton_cli.pipeline.params import from_table

    with pytest.raises(BadInputError, match="fold_limit_mb"):
        from_table(FuseParams, {"fold_limit_mb": 0}, "passes[0] (fuse)")
    with pytest.raises(BadInputError, match="ort_offlin"):
        from_table(FuseParams, {"ort_offlin": True}, "passes[0] (fuse)")


def test_ort_offline_on_a_portable_user_target_is_exit_2(run_cli, tmp_path):
    target = tmp_path / "my-fpga.toml"
    target.write_text('extends = "fpga"\n[pass_params.fuse]\nort_offline = true\n', encoding="utf-8")
    result = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", target, "-o", tmp_path / "out")
    assert result.code == 2, result.stderr
    assert "ort_offline" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def _hard_swish_block(pad: int) -> onnx.ModelProto:
    """Conv -> x*Clip(x+3,0,6)/6 -> *s + b (PP-LCNetV3's learnable affine) -> Conv(pad), as Paddle exports it."""
    rng = np.random.default_rng(1)
    c = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    inits = [
        c("w1", rng.standard_normal((8, 3, 3, 3)) * 0.5),
        c("b1", rng.standard_normal(8)),
        c("three", 3.0),
        c("zero", 0.0),
        c("six", 6.0),
        c("s", 0.63),
        c("b", -0.55),
        c("w2", rng.standard_normal((4, 8, 3 if pad else 1, 3 if pad else 1)) * 0.3),
        c("b2", rng.standard_normal(4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["k"]),
        helper.make_node("Mul", ["c", "k"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["h"]),
        helper.make_node("Mul", ["h", "s"], ["hs"]),
        helper.make_node("Add", ["hs", "b"], ["hb"]),
        helper.make_node("Conv", ["hb", "w2", "b2"], ["y"], pads=[pad] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "hswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16 if pad else 14, 16 if pad else 14])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("pad", [0, 1])
def test_hard_swish_and_scalar_affine_fold(pad):
    model = _hard_swish_block(pad)
    fused, summary = _fuse(model)
    ops = _ops(fused)
    assert summary["hard_swish_fused"] == 1 and ops["Clip"] == 0 and ops["Div"] == 0
    assert ops["HardSigmoid"] == 1 and ops["Mul"] == 1  # the affine scale went into the next Conv's weights
    # the affine shift folds into the next Conv's bias only when that Conv has no zero border
    assert ops["Add"] == (0 if pad == 0 else 1)
    assert summary["scalar_affine_folded"] == (2 if pad == 0 else 1)
    _assert_same(model, fused)
    unfused, summary = _fuse(model, fuse_activations=False)
    assert _ops(unfused)["Clip"] == 1 and summary["hard_swish_fused"] == 0


@pytest.mark.parametrize("conv_output_read_elsewhere", [False, True])
def test_scale_before_a_non_conv_goes_into_the_hard_swish_input_conv(conv_output_read_elsewhere):
    model = _hard_swish_block(1)
    graph = model.graph
    graph.node.remove(graph.node[-1])  # the scaled map now feeds a residual Add, not a Conv
    graph.node.extend([helper.make_node("Add", ["hb", "c" if conv_output_read_elsewhere else "hb"], ["y"])])
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    fused, summary = _fuse(model)
    hsig = next(n for n in fused.graph.node if n.op_type == "HardSigmoid")
    alpha = helper.get_attribute_value(next(a for a in hsig.attribute if a.name == "alpha"))
    if conv_output_read_elsewhere:  # scaling the Conv would change what the Add reads: left alone
        assert _ops(fused)["Mul"] == 2 and summary["scalar_affine_folded"] == 0 and alpha == pytest.approx(1 / 6)
    else:  # x*hsig(x)*s == x'*hsig'(x') with x' = s*x from the scaled Conv and alpha' = alpha/s
        assert _ops(fused)["Mul"] == 1 and summary["scalar_affine_folded"] == 1 and alpha == pytest.approx(1 / 6 / 0.63)
    _assert_same(model, fused)


@needs_ocr
@pytest.mark.parametrize("which", ["det", "rec"])
def test_ppocr_hard_swish_and_affine_blocks_fold(which):
    from conftest import OCR_DET

    from lepton_cli.pipeline.equivalence import compare_outputs
    from lepton_cli.pipeline.registry import tolerance

    path, shape = (OCR_DET, [1, 3, 160, 160]) if which == "det" else (OCR_REC, [1, 3, 48, 320])
    model = _real(path, "cpu-avx", {"x": shape})
    fused, summary = _fuse(model)
    before, after = _ops(_fuse(model, fuse_activations=False)[0]), _ops(fused)
    # every decomposed hard-swish (Add 3, Clip 0..6, Mul, Div 6) became HardSigmoid + Mul
    assert summary["hard_swish_fused"] == before["Clip"] - after["Clip"] > 0 and after["Div"] < before["Div"]
    assert summary["scalar_affine_folded"] > 0
    assert sum(after.values()) < sum(before.values()) - 3 * summary["hard_swish_fused"]
    feeds = [random_feed(graph_inputs(model), np.random.default_rng(k)) for k in range(2)]
    check = compare_outputs(model, fused, feeds, tolerance(rtol=1e-4, atol=1e-5))
    assert check.ok, check


def test_hard_swish_stays_add_clip_mul_where_the_target_lacks_hard_sigmoid():
    model = _hard_swish_block(0)
    fused, summary = _fuse(model, "tpu")  # tpu's supported_ops has no HardSigmoid and no Div
    ops = _ops(fused)
    assert summary["hard_swish_fused"] == 0 and ops["HardSigmoid"] == 0 and ops["Clip"] == 1
    assert summary["as_integer_chip_ops"] == 1 and ops["Div"] == 0  # x * clip / 6 -> x * clip * (1/6)
    _assert_same(model, fused)


@needs_ocr
def test_tpu_runs_ppocr_direction_classifiers_hard_activations_as_edge_tpu_ops():
    """PP-LCNet writes hard-swish with Div(6) and its squeeze-excite gates with HardSigmoid: neither is an Edge TPU
    op, so on tpu all 27 stayed float on the host. fuse writes them as Add/Clip/Mul; the classifier reads rendered
    lines as before."""
    import sys

    from conftest import OCR_DET, REPO

    from lepton_cli.pipeline.equivalence import compare_outputs
    from lepton_cli.pipeline.registry import tolerance

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    model = _real(OCR_DET.with_name("ch_ppocr_mobile_v2.0_cls_infer.onnx"), "tpu", {"x": [1, 3, 48, 192]})
    before = _ops(model)
    fused, summary = _fuse(model, "tpu")
    after = _ops(fused)
    assert before["Div"] >= 10 and before["HardSigmoid"] >= 5
    assert after["Div"] == after["HardSigmoid"] == after["HardSwish"] == 0
    assert summary["as_integer_chip_ops"] == before["Div"] + before["HardSigmoid"]
    assert set(after) <= set(load_target("tpu").runtime.supported_ops), set(after)
    lines = ocr_textset.make_set(4, 5, "eval", width=192)[0]
    check = compare_outputs(model, fused, [{"x": line[None]} for line in lines], tolerance(rtol=1e-4, atol=1e-5))
    assert check.ok, check


def test_ppocrv5_rec_hard_swish_ops_become_hard_sigmoid_and_mul(tmp_path):
    """PP-OCRv5 rec's export writes the HardSwish op (28 of them): ORT runs it slower than HardSigmoid + Mul and no
    quantizer makes it integer. Rewritten, the recogniser reads rendered lines as before."""
    import sys

    from conftest import REPO
    from wheel_models import PPOCRV5_REC, wheel_member

    from lepton_cli.pipeline.equivalence import compare_outputs
    from lepton_cli.pipeline.registry import tolerance

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    model = _real(wheel_member(*PPOCRV5_REC), "cpu-avx", {"x": [1, 3, 48, 320]})
    fused, summary = _fuse(model)
    before, after = _ops(_fuse(model, fuse_activations=False)[0]), _ops(fused)
    assert before["HardSwish"] >= 20 and after["HardSwish"] == 0
    assert summary["hard_swish_fused"] >= before["HardSwish"] and after["HardSigmoid"] >= before["HardSwish"]
    lines = ocr_textset.make_set(3, 4, "eval")[0]
    check = compare_outputs(model, fused, [{"x": line[None]} for line in lines], tolerance(rtol=1e-4, atol=1e-5))
    assert check.ok, check
    on_tpu, tpu_summary = _fuse(model, "tpu")  # no HardSigmoid there: each HardSwish becomes Add/Clip/Mul/Mul
    assert _ops(on_tpu)["HardSwish"] == _ops(on_tpu)["HardSigmoid"] == 0 and tpu_summary["as_integer_chip_ops"] >= 28
    check = compare_outputs(model, on_tpu, [{"x": line[None]} for line in lines], tolerance(rtol=1e-4, atol=1e-5))
    assert check.ok, check


@needs_ocr
def test_ppocr_det_head_deconvs_run_as_1x1_convs_and_one_depth_to_space():
    """PP-OCRv4 det's DBNet head (ConvTranspose 2×2/2, ReLU, ConvTranspose 2×2/2, Sigmoid) runs at the neck's
    resolution and rearranges once: the same probability map on rendered pages; tpu, which has no DepthToSpace,
    keeps its ConvTransposes."""
    import sys

    from conftest import OCR_DET, REPO

    from lepton_cli.pipeline.equivalence import compare_outputs
    from lepton_cli.pipeline.registry import tolerance

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    model = _real(OCR_DET, "cpu-avx", {"x": [1, 3, 160, 160]})
    fused, summary = _fuse(model)
    before = _ops(_fuse(model, deconv_as_depth=False)[0])
    assert before["ConvTranspose"] == 2 and summary["deconvs_as_depth"] == 2
    assert _ops(fused)["ConvTranspose"] == 0 and _ops(fused)["DepthToSpace"] == 1
    shuffle = next(n for n in fused.graph.node if n.op_type == "DepthToSpace")
    assert shuffle.output[0] == fused.graph.output[0].name  # the head's Sigmoid runs before the rearrangement
    assert next(a.i for a in shuffle.attribute if a.name == "blocksize") == 4
    pages = ocr_textset.make_pages(3, 4, "eval", size=160)
    check = compare_outputs(model, fused, [{"x": page[None]} for page in pages], tolerance(rtol=1e-4, atol=1e-5))
    assert check.ok, check
    assert _fuse(model, "tpu")[1]["deconvs_as_depth"] == 0


@needs_ocr
def test_ppocr_det_squeeze_excite_residuals_become_one_mul():
    """PP-OCRv4 det's RSE-FPN: each ``x + x * g`` (g a [1, C, 1, 1] squeeze-excite gate) becomes ``x * (1 + g)``: one
    pass over the feature map fewer each, the same map on rendered pages."""
    import sys

    from conftest import OCR_DET, REPO

    from lepton_cli.pipeline.equivalence import compare_outputs
    from lepton_cli.pipeline.registry import tolerance

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    model = _real(OCR_DET, "cpu-avx", {"x": [1, 3, 160, 160]})
    fused, summary = _fuse(model)
    plain = _fuse(model, gated_residuals=False)[0]
    assert summary["gated_residuals_folded"] >= 6
    assert _ops(fused)["Add"] == _ops(plain)["Add"] and _ops(fused)["Mul"] == _ops(plain)["Mul"]  # Adds moved to gates
    ones = {t.name for t in fused.graph.initializer if list(t.dims) == [] and numpy_helper.to_array(t) == 1.0}
    gate_adds = [n for n in fused.graph.node if n.op_type == "Add" and n.input[1] in ones]
    assert len(gate_adds) == summary["gated_residuals_folded"]  # each + 1 runs on a gate's C values
    pages = ocr_textset.make_pages(3, 4, "eval", size=160)
    check = compare_outputs(model, fused, [{"x": page[None]} for page in pages], tolerance(rtol=1e-4, atol=1e-5))
    assert check.ok, check


def test_a_full_size_gate_is_left_alone():
    """``x + x * y`` with y as large as x is two passes either way: unchanged; a [1, C, 1, 1] gate is folded."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Sigmoid", ["p"], ["small"]),
        helper.make_node("Mul", ["x", "small"], ["xs"]),
        helper.make_node("Add", ["x", "xs"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["full"]),
        helper.make_node("Mul", ["full", "a"], ["af"]),
        helper.make_node("Add", ["af", "a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    fused, summary = _fuse(model, fuse_activations=False)
    assert summary["gated_residuals_folded"] == 1
    _assert_same(model, fused)


def _deconv_graph(kernel: int, stride: int, second_out: int) -> onnx.ModelProto:
    rng = np.random.default_rng(kernel)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 6, kernel, kernel)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(6, second_out, 2, 2)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w1", "b1"], ["t"], strides=[stride, stride]),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "w2"], ["y"], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "deconvs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [w1, b1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    "kernel, stride, second_out, rewritten, shuffles",
    [(2, 2, 3, 2, 1), (3, 3, 1, 2, 1), (3, 2, 1, 1, 1), (2, 2, 200, 2, 2)],
    ids=["2x2-chain", "3x3-chain", "overlapping-first-left", "large-second-own-chain"],
)
def test_deconv_chains_rewritten_only_where_exact_and_small(kernel, stride, second_out, rewritten, shuffles):
    """An overlapping ConvTranspose (kernel 3, stride 2) is left as it is; a second one whose dense weight would be
    large ends the chain and is rewritten on its own; what is rewritten computes the same tensor (rectangular
    input, bias, a ReLU between)."""
    model = _deconv_graph(kernel, stride, second_out)
    fused, summary = _fuse(model)
    assert summary["deconvs_as_depth"] == rewritten
    assert _ops(fused)["ConvTranspose"] == 2 - rewritten and _ops(fused)["DepthToSpace"] == shuffles
    _assert_same(model, fused)


@needs_ddddocr_det
def test_yolox_focus_becomes_one_space_to_depth_with_the_same_boxes(tmp_path):
    """ddddocr's YOLOX detector starts with a Focus (four stride-2 slices, concatenated): fuse makes it SpaceToDepth
    and permutes the first Conv's input channels, so the boxes on rendered pages stay the source's and ORT's quantizer
    preprocessing finds no Slice/Concat to turn into SpaceToDepth + a channel Gather (which the Edge TPU lacks). A
    target without SpaceToDepth keeps the slices."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset as textset
    from lepton_cli.passes._quantize import schemes

    from lepton_cli.evaluate import output_roles as roles

    model = _real(DDDDOCR_DET, "cpu-avx", {"images": [1, 3, 416, 416]})
    fused, summary = _fuse(model)
    assert summary["focus_as_space_to_depth"] == 1 and _ops(fused)["SpaceToDepth"] == 1 and _ops(fused)["Slice"] == 0
    assert _ops(schemes.preprocess(fused, tmp_path))["Gather"] == 0
    rng = np.random.default_rng(3)
    source, rewritten = make_session(model), make_session(fused)
    for _ in range(2):
        page = textset.render_page(rng, textset.EVAL_FONTS, textset.EVAL_WORDS, 416)
        feed = {"images": np.asarray(page, np.float32).transpose(2, 0, 1)[None]}
        want, have = source.run(None, feed)[0][0], rewritten.run(None, feed)[0][0]
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-3)
        boxes = [roles.detections(out, "yolox:416x416", roles.DETECTION_CONF) for out in (want, have)]
        assert len(boxes[0][0]) == len(boxes[1][0]) > 0 and roles.match(*boxes)[0] == len(boxes[0][0])
    kept, summary = _fuse(model, "fpga")  # the DPU's op list has no SpaceToDepth
    assert summary["focus_as_space_to_depth"] == 0 and _ops(kept)["Slice"] == 4


def _photographs(size: int = 224) -> np.ndarray:
    """scikit-learn's two sample photographs, ImageNet-normalised NCHW (the corpus's own loading)."""
    from benchmarks.corpus.data import imagenet_batch, load_photo

    photos = [load_photo(f"sklearn:{name}").resize((size, size)) for name in ("china.jpg", "flower.jpg")]
    return imagenet_batch(photos)


def test_shufflenet_channel_shuffles_become_gathers_with_the_same_outputs():
    model = _real(LIGHT_DIR / "light_shufflenet.onnx", shapes={"gpu_0/data_0": [1, 3, 224, 224]})
    fused, summary = _fuse(model, "cpu-avx", shuffle_as_gather=True)  # as targets/cpu-avx.toml sets it
    plain, plain_summary = _fuse(model, "cpu-avx")
    assert summary["channel_shuffles_as_gather"] == 16 and plain_summary["channel_shuffles_as_gather"] == 0
    assert _ops(fused)["Gather"] == 16 and _ops(fused)["Transpose"] == 0 and _ops(plain)["Transpose"] == 16
    assert _ops(fused)["Reshape"] == _ops(plain)["Reshape"] - 32  # each shuffle's two Reshapes went with it
    for photo in _photographs():
        feed = {"gpu_0/data_0": photo[None]}
        want, got = make_session(plain).run(None, feed)[0], make_session(fused).run(None, feed)[0]
        np.testing.assert_array_equal(got, want)  # the same values moved: not one bit differs
    assert next(step for step in load_target("cpu-avx").passes if step.name == "fuse").params.shuffle_as_gather
    no_gather = _fuse(model, "tpu", shuffle_as_gather=True)[1]  # the Edge TPU has no GATHER: the Transpose stays
    assert no_gather["channel_shuffles_as_gather"] == 0


def test_onnxsim_folding_notes_stay_off_the_users_stderr(capfd):
    """onnxsim's C++ folder writes "WARNING: failed to run ..." to fd 2 for each node it cannot fold (NudeNet's
    YOLOv8 head computes its Reshape targets from shapes): nine lines per fuse the user cannot act on."""
    from wheel_models import NUDENET, wheel_member

    target = load_target("cpu-avx")
    model = bind_input_shapes(onnx.load(wheel_member(*NUDENET)), {"images": [1, 3, 320, 320]})
    params = next(s.params for s in target.passes if s.name == "fuse")
    capfd.readouterr()
    fused = get_pass("fuse").fn(model, PassContext(target=target), params).model
    assert "failed to run" not in capfd.readouterr().err
    assert len(fused.graph.node) < len(model.graph.node)  # onnxsim still ran and folded


@pytest.mark.parametrize("divisor, rewritten", [(6.0, True), (1e-40, False), ([2.0, 0.0], False)])
def test_a_division_by_zero_or_by_a_subnormal_stays_a_div_on_tpu(divisor, rewritten):
    """x / 1e-40 is finite where x * (1 / 1e-40) = x * inf is not, and a zero has no reciprocal."""
    d = numpy_helper.from_array(np.asarray(divisor, np.float32), "d")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Div", ["r", "d"], ["y"])],
        "div",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [d],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    fused, summary = _fuse(model, "tpu")
    assert (_ops(fused)["Div"] == 0) == rewritten and summary["as_integer_chip_ops"] == int(rewritten)
