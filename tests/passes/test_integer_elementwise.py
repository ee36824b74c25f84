"""Integer hard-swish and scalar-Add folds (passes/_quantize/integer_elementwise.py) on PP-OCRv4 det.

The detector's PP-LCNetV3 blocks end in hard-swish + a learnable scalar bias between int8 convs; the rewrite must
keep the int8 model's map on rendered pages it was not calibrated on, and ORT must then run those blocks as
QLinearAdd/QLinearMul without losing a single QLinearConv (a rescaled input breaks the fusion unless the reader's
int32 bias is rescaled with it).
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO, needs_ocr, unread_nodes
from det_int8 import fused_model, quantized_det
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.gated_sum import integer_gated_sums
from lepton_cli.passes._quantize.integer_elementwise import integer_elementwise, lowered, rewritten
from lepton_cli.passes._quantize.integer_gates import GATE_SUFFIX
from lepton_cli.passes._quantize.quantize_hoist import hoist_quantizes
from lepton_cli.passes._quantize.relu_fold import fold_rectifiers
from lepton_cli.passes._quantize.scalar_add_fold import fold_scalar_adds
from lepton_cli.passes._quantize.tuning import ranking_build
from lepton_cli.passes._quantize.upsample_copy import integer_upsamples

from lepton_cli.pipeline.registry import get_pass
from lepton_cli.samples.sample_set import load_samples


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """(fused float model, its Conv-only int8 QDQ model, held-out pages)."""
    return quantized_det(tmp_path_factory)


def _optimized(model: onnx.ModelProto, tmp_path, name: str) -> tuple[ort.InferenceSession, Counter]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / f"{name}-ort.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@needs_ocr
def test_hard_swish_blocks_run_as_integer_kernels_and_keep_the_map(det, tmp_path):
    fused, int8, held = det
    lowered_model = integer_elementwise(int8)
    done = rewritten(lowered_model)
    hardsigmoids = sum(n.op_type == "HardSigmoid" for n in fused.graph.node)
    assert done["scalar_adds_folded"] >= 4 and done["hardsigmoids_as_add"] >= hardsigmoids // 2, done
    assert done["gates_quantized"] == done["hardsigmoids_as_add"]  # Conv-only int8: every gate's Mul is quantized
    plain, plain_ops = _optimized(int8, tmp_path, "plain")
    rewrote, ops = _optimized(lowered_model, tmp_path, "lowered")
    assert ops["QLinearConv"] == plain_ops["QLinearConv"] > 0  # the rescaled biases keep every conv fused
    assert ops["QLinearMul"] >= done["gates_quantized"] and ops["QLinearAdd"] >= done["hardsigmoids_as_add"]
    assert ops["HardSigmoid"] == plain_ops["HardSigmoid"] - done["hardsigmoids_as_add"]
    assert not any(
        i.name not in {x for n in lowered_model.graph.node for x in n.input} for i in lowered_model.graph.initializer
    )  # nothing left for ORT to warn about
    assert unread_nodes(lowered_model) == []  # ORT runs unread nodes
    source = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in held:
        reference = source.run(None, feed)[0] > 0.3
        before = plain.run(None, feed)[0] > 0.3
        after = rewrote.run(None, feed)[0] > 0.3
        # the gate's own rounding (1/255 over [0, 1]) may flip a few boundary pixels, never many
        assert np.mean(after != reference) <= np.mean(before != reference) + 0.002


@needs_ocr
def test_relus_between_quantizes_fold_into_the_next_one(det, tmp_path):
    """Conv-only int8 leaves Q -> DQ -> Relu -> Q after each rectified Conv (the DBNet head's 1×1 Convs, the neck's
    squeeze-excite): the Relu goes into the second quantize (zero point 0 clips), ORT runs one float pass fewer per
    Relu, and the map on held-out pages is the plain int8 model's up to the one rounding dropped."""
    fused, int8, held = det
    folded = rewritten(integer_elementwise(int8))["relus_folded"]
    only_relus = onnx.ModelProto.FromString(int8.SerializeToString())
    assert fold_rectifiers(only_relus) == folded >= 2
    relus = sum(n.op_type == "Relu" for n in int8.graph.node)
    assert sum(n.op_type == "Relu" for n in only_relus.graph.node) == relus - folded
    plain, plain_ops = _optimized(int8, tmp_path, "plain")
    rewrote, ops = _optimized(only_relus, tmp_path, "relus")
    assert ops["DequantizeLinear"] < plain_ops["DequantizeLinear"] and ops["QLinearConv"] == plain_ops["QLinearConv"]
    for feed in held:
        before, after = plain.run(None, feed)[0], rewrote.run(None, feed)[0]
        assert np.mean((before > 0.3) != (after > 0.3)) <= 0.002


@needs_ocr
def test_the_neck_concat_and_its_upsampling_copy_bytes_and_give_the_same_map(det, tmp_path):
    """The quantize after the neck's Concat of three nearest-upsampled maps and a fourth moves above the Concat and
    the Resizes: they copy uint8, and the model computes the same map bit for bit (QDQ evaluated unfused)."""
    _, int8, held = det
    hoisted = onnx.ModelProto.FromString(int8.SerializeToString())
    assert hoist_quantizes(hoisted) >= 1
    concat = next(n for n in hoisted.graph.node if n.op_type == "Concat")
    producers = {o: n for n in hoisted.graph.node for o in n.output}
    inputs = [producers[t] for t in concat.input]
    assert sum(n.op_type == "Resize" for n in inputs) == 3 and all(
        n.op_type in ("Resize", "QuantizeLinear") for n in inputs
    )
    assert all(producers[n.input[0]].op_type == "QuantizeLinear" for n in inputs if n.op_type == "Resize")
    assert rewritten(integer_elementwise(int8))["quantizes_hoisted"] == 4  # one per Concat input
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain, moved = (
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for m in (int8, hoisted)
    )
    for feed in held:
        assert np.array_equal(plain.run(None, feed)[0], moved.run(None, feed)[0])


@needs_ocr
def test_the_neck_top_down_sums_run_as_integer_kernels_and_keep_the_map(det, tmp_path):
    """Each FPN step ``Q(x * (1 + g) + Resize(y))``: the gate gets a quantize over [0, 2], the product one at twice
    x's scale (never clipped), the Resize copies integers; ORT runs QLinearMul + QLinearAdd there and the map on
    held-out pages stays the plain int8 model's within a rounding."""
    fused, int8, held = det
    lowered_sums = onnx.ModelProto.FromString(int8.SerializeToString())
    done = integer_gated_sums(lowered_sums)
    assert done == 3 and rewritten(integer_elementwise(int8))["gated_sums"] == 3
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in lowered_sums.graph.initializer}
    producers = {o: n for n in lowered_sums.graph.node for o in n.output}
    for q in [n for n in lowered_sums.graph.node if n.name.endswith("_gated_sum")]:
        source = producers[q.input[0]]
        if source.op_type == "Mul":  # the product: twice the scale of the dequantized map it gates
            x = next(producers[i] for i in source.input if producers[i].op_type == "DequantizeLinear")
            assert np.isclose(inits[q.input[1]], 2 * inits[x.input[1]]) and inits[q.input[2]] == inits[x.input[2]]
    plain, plain_ops = _optimized(int8, tmp_path, "plain")
    rewrote, ops = _optimized(lowered_sums, tmp_path, "sums")
    assert ops["QLinearAdd"] >= plain_ops["QLinearAdd"] + done and ops["QLinearMul"] >= plain_ops["QLinearMul"] + done
    source = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in held:
        reference = source.run(None, feed)[0] > 0.3
        before, after = plain.run(None, feed)[0] > 0.3, rewrote.run(None, feed)[0] > 0.3
        assert np.mean(after != reference) <= np.mean(before != reference) + 0.002


@needs_ocr
def test_the_neck_integer_upsamples_become_channel_row_copies_with_the_same_map(det, tmp_path):
    """After the hoist the three upsamples before the neck's Concat read uint8; each becomes Transpose, Unsqueeze,
    Expand, Reshape, Transpose (ORT's channel-last Resize computes an index per byte), ORT runs three Resizes fewer,
    and the map on held-out pages is the same bit for bit. The whole lowering also rewrites the top-down sums' three."""
    _, int8, held = det
    hoisted = onnx.ModelProto.FromString(int8.SerializeToString())
    hoist_quantizes(hoisted)
    copied = onnx.ModelProto.FromString(hoisted.SerializeToString())
    assert integer_upsamples(copied) == 3
    assert rewritten(integer_elementwise(int8))["upsamples_expanded"] == 6
    plain, plain_ops = _optimized(hoisted, tmp_path, "hoisted")
    rewrote, ops = _optimized(copied, tmp_path, "copied")
    assert ops["Resize"] == plain_ops["Resize"] - 3 and ops["Expand"] == 3
    for feed in held:
        assert np.array_equal(plain.run(None, feed)[0], rewrote.run(None, feed)[0])


@needs_ocr
def test_a_folded_scalar_add_reads_as_the_add_did(det):
    """QDQ evaluated unfused (exact integer semantics): after ``+ b`` moved into the zero point, what the next layer
    reads is ``t + b`` rounded to the (coarser, never narrower) grid, for every folded Add on held-out pages."""
    _, int8, held = det
    folded, names = fold_scalar_adds(int8)
    assert len(names) >= 4
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in int8.graph.initializer}
    constants = {add.output[0]: add for add in int8.graph.node if add.name in names}
    checks = []  # (t, dequantized, b, scale, zero point, calibrated range)
    for quantize in folded.graph.node:
        if quantize.op_type != "QuantizeLinear" or not quantize.input[1].endswith("_folded_scale"):
            continue
        plain = next(n for n in int8.graph.node if n.output[0] == quantize.output[0])
        add = constants[plain.input[0]]
        b = float(next(inits[i] for i in add.input if i in inits).reshape(-1)[0])
        dequantize = next(n for n in folded.graph.node if n.input and n.input[0] == quantize.output[0])
        folded_inits = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
        scale, zero = float(folded_inits[dequantize.input[1]]), int(folded_inits[dequantize.input[2]])
        old_scale, old_zero = float(inits[plain.input[1]]), int(inits[plain.input[2]])
        calibrated = (old_scale * (0 - old_zero), old_scale * (255 - old_zero))
        checks.append((quantize.input[0], dequantize.output[0], b, scale, zero, calibrated))
    assert len(checks) == len(names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    probe = onnx.ModelProto.FromString(folded.SerializeToString())
    wanted = [name for t, dq, *_ in checks for name in (t, dq)]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted)
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for feed in held[:2]:
        values = dict(zip([o.name for o in probe.graph.output], session.run(None, feed)))
        for t, dq, b, scale, zero, (low, high) in checks:
            representable = (scale * (0 - zero), scale * (255 - zero))
            assert representable[0] <= low + scale and representable[1] >= high - scale  # covers the calibrated range
            expected = np.clip(values[t] + b, *representable)
            assert np.abs(values[dq] - expected).max() <= scale / 2 + 1e-5


def test_the_ranking_bypasses_nodes_in_the_model_before_lowering():
    def plain(method: str, keep: list[str]) -> onnx.ModelProto:
        return onnx.ModelProto()

    build = lowered(plain)
    assert ranking_build(build) is plain and ranking_build(plain) is plain


@needs_ocr
def test_pp_ocrv4_rec_silu_gates_run_as_qlinear_sigmoid_and_read_the_same_text(tmp_path):
    """The SVTR neck's SiLU (x * Sigmoid(x)) between int8 Gemms/convs: its gate gets a [0, 1] quantize and ORT runs
    QLinearSigmoid; the recogniser reads held-out rendered lines as the plain int8 model does."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset
    from conftest import OCR_REC

    fused = fused_model(OCR_REC, {"x": [1, 3, 48, 160]})
    np.savez(tmp_path / "calib.npz", x=ocr_textset.make_set(8, 1, "calib", width=160)[0])
    ops = ("Conv", "MatMul", "Gemm")
    settings = CalibrationSettings(method="minmax", chunk=8, max_samples=8)
    ranges = calibrate(fused, load_samples(tmp_path / "calib.npz", fused), settings, None, list(ops))
    scheme = schemes.Int8Scheme(per_channel=True, op_types=ops)
    int8 = schemes.quantize_int8(
        fused, schemes.save_ranges(ranges, tmp_path / "r.json"), "minmax", scheme, [], tmp_path
    )
    lowered_model = integer_elementwise(int8)
    done = rewritten(lowered_model)
    sigmoid_outputs = {n.output[0] for n in lowered_model.graph.node if n.op_type == "Sigmoid"}
    sigmoid_gates = sum(
        n.name.endswith(GATE_SUFFIX) and n.input[0] in sigmoid_outputs for n in lowered_model.graph.node
    )
    assert sigmoid_gates >= 3, done
    plain, _ = _optimized(int8, tmp_path, "plain")
    rewrote, lowered_ops = _optimized(lowered_model, tmp_path, "lowered")
    assert lowered_ops["QLinearSigmoid"] >= sigmoid_gates
    lines, truth = ocr_textset.make_set(12, 3, "eval", width=160)
    chars = ocr_textset.charset(onnx.load(OCR_REC))  # the table lives in the source's metadata
    read = [
        ocr_textset.ctc_greedy(np.concatenate([s.run(None, {"x": line[None]})[0] for line in lines]), chars)
        for s in (plain, rewrote)
    ]
    assert ocr_textset.char_accuracy(read[1], truth) >= ocr_textset.char_accuracy(read[0], truth) - 1.0


def test_a_power_of_two_target_cannot_turn_it_on():
    """A DPU rescales by shifts: folded scales (|b| / k) and the gates' 1/255 would break every-scale-a-power-of-two."""
    from lepton_cli.errors import BadInputError
    from lepton_cli.pipeline.params import from_table

    params_cls = get_pass("quantize").params_cls
    assert from_table(params_cls, {"integer_elementwise": True}, "passes[quantize]").integer_elementwise
    with pytest.raises(BadInputError, match="integer_elementwise"):
        from_table(params_cls, {"integer_elementwise": True, "power_of_two_scales": True}, "passes[quantize]")


def _requantized_rectifier(op: str, zero_point: int, scale: float, shape: list[int]) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s1"),
        numpy_helper.from_array(np.array(128, np.uint8), "z1"),
        numpy_helper.from_array(np.array(scale, np.float32), "s2"),
        numpy_helper.from_array(np.array(zero_point, np.uint8), "z2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    rectifier = (
        helper.make_node("Relu", ["d1"], ["r"]) if op == "Relu" else helper.make_node("Clip", ["d1", "lo", "hi"], ["r"])
    )
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"]),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"]),
        rectifier,
        helper.make_node("QuantizeLinear", ["r", "s2", "z2"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rectified",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    "op, zero_point, scale, shape, folds",
    [
        ("Relu", 0, 0.04, [1, 16, 16, 16], True),
        ("Relu", 3, 0.04, [1, 16, 16, 16], False),
        ("Clip", 0, 0.02, [1, 16, 16, 16], True),
        ("Clip", 0, 0.04, [1, 16, 16, 16], False),
        ("Relu", 0, 0.04, [1, 4096, 1, 1], True),
        ("Relu", 0, 0.04, [1, 1024, 1, 1], False),
    ],
    ids=["relu", "zero-point-above-minimum", "clip-covering-range", "clip-below-range", "vector", "small-vector"],
)
def test_a_rectifier_folds_only_where_the_quantize_clips_the_same(op, zero_point, scale, shape, folds):
    """Zero point at the minimum, and for Clip(0, 6) a range that ends at or below 6 (255 × 0.02 = 5.1, not
    255 × 0.04 = 10.2), over at least MIN_ELEMENTS values (a squeeze-excite vector keeps its Relu): then the folded
    model reads what the rectifier gave, up to the dropped first rounding."""
    model = _requantized_rectifier(op, zero_point, scale, shape)
    folded = onnx.ModelProto.FromString(model.SerializeToString())
    assert fold_rectifiers(folded) == int(folds)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ semantics as written
    feed = {"x": np.linspace(-6, 6, int(np.prod(shape)), dtype=np.float32).reshape(shape)}
    want, have = (
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for m in (model, folded)
    )
    assert np.abs(have - want).max() <= 0.05 / 2 + scale + 1e-6  # the dropped rounding, then one step of ours
