"""Weight blocks (passes/_quantize/weight_blocks.py) on PP-OCRv4 rec and rendered text lines.

Per-tensor power-of-two weights (a DPU's) leave the narrow output channels of its wide pointwise convs a few levels;
splitting those convs into blocks of channels whose scales agree keeps the float model and most of the accuracy.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import OCR_REC, REPO, needs_ocr
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.block_sinking import ELEMENTWISE
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.weight_blocks import split_weight_blocks

from lepton_cli.model.channels.channel_groups import analyze
from lepton_cli.model.channels.surgery import apply_order
from lepton_cli.model.load import upgrade_opset
from lepton_cli.model.sessions import make_session
from lepton_cli.model.shapes import bind_input_shapes
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target
from lepton_cli.samples.sample_set import load_samples

pytestmark = needs_ocr
ALIGN = 16  # fpga's channel_alignment
TABLE_CLS = ("table-cls==1.0.0", "table_cls/models/table_cls.onnx")  # MobileNetV3 with weight-decayed channels


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    work = tmp_path_factory.mktemp("blocks")
    model = _as_quantize_sees_it(onnx.load(OCR_REC), {"x": [1, 3, 48, 320]}, work)
    calib, _ = ocr_textset.make_set(16, 1, "calib")
    held, _ = ocr_textset.make_set(16, 2, "eval")
    np.savez(work / "calib.npz", x=calib)
    return model, work, [{"x": line[None]} for line in held]


def _as_quantize_sees_it(source: onnx.ModelProto, shapes: dict[str, list[int]], work) -> onnx.ModelProto:
    """``source`` fused as fpga fuses it and preprocessed as its quantize pass sees it."""
    target = load_target("fpga")
    model, _ = upgrade_opset(source, target.runtime.opset_min, target.runtime.opset_max)
    fuse = next(step for step in target.passes if step.name == "fuse")
    fused = get_pass("fuse").fn(bind_input_shapes(model, shapes), PassContext(target=target), fuse.params)
    return schemes.preprocess(fused.model, work)


def _logits(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    session = make_session(model)
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _decoded(logits: np.ndarray) -> list[list[int]]:
    """Greedy CTC: each line's best class per frame, repeats merged, blanks (class 0) dropped."""
    lines = []
    for best in logits.argmax(-1):
        merged = [int(c) for k, c in enumerate(best) if c != 0 and (k == 0 or c != best[k - 1])]
        lines.append(merged)
    return lines


def _char_agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """1 - edit distance / length, over all lines: the share of the float model's characters read alike."""
    edits = total = 0
    for a, b in zip(got, want):
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            previous, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
        edits, total = edits + row[-1], total + len(b)
    return 1 - edits / max(total, 1)


def test_blocks_keep_the_float_model_and_split_the_wide_pointwise_convs(rec):
    model, _, held = rec
    blocked, split = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    assert len(split) >= 5 and all(blocks >= 2 for blocks in split.values()), split
    np.testing.assert_allclose(_logits(blocked, held), _logits(model, held), atol=1e-3)
    inits = {t.name: t for t in blocked.graph.initializer}
    blocks: dict[str, list[int]] = {}
    for node in blocked.graph.node:
        if node.op_type == "Conv" and node.name.rsplit("_b", 1)[0] in split:
            blocks.setdefault(node.name.rsplit("_b", 1)[0], []).append(inits[node.input[1]].dims[0])
    for name, sizes in blocks.items():  # cut at whole 16-channel passes of the DPU (layout_transform pads the last)
        assert len(sizes) == split[name] and all(size % ALIGN == 0 for size in sizes[:-1]), (name, sizes)
    assert not any(node.name in split for node in blocked.graph.node)


def test_per_tensor_power_of_two_int8_reads_the_lines_with_blocks(rec):
    """Conv/MatMul/Gemm int8, symmetric power-of-two scales, per-tensor weights (fpga's grid), minmax ranges: the
    frames' best character agrees with the float model's far more often with blocks."""
    model, work, held = rec
    reference = _decoded(_logits(model, held))
    agreement = {}
    for label, candidate in {
        "plain": model,
        "blocks": split_weight_blocks(model, schemes.pow2_weight_scale, 16)[0],
    }.items():
        samples = load_samples(work / "calib.npz", candidate)
        settings = CalibrationSettings(method="minmax", chunk=16, max_samples=16, power_of_two=True)
        ranges = schemes.save_ranges(calibrate(candidate, samples, settings, None), work / f"{label}.json")
        scheme = schemes.Int8Scheme(
            activation_type="s8",
            per_channel=False,
            activation_symmetric=True,
            power_of_two=True,
            op_types=("Conv", "MatMul", "Gemm"),
        )
        int8 = schemes.quantize_int8(candidate, ranges, "minmax", scheme, [], work)
        agreement[label] = _char_agreement(_decoded(_logits(int8, held)), reference)
    assert agreement["blocks"] > 0.9 and agreement["blocks"] > agreement["plain"] + 0.1, agreement


def test_a_channel_order_that_is_not_a_permutation_is_refused(rec):
    model, _, _ = rec
    a = analyze(onnx.ModelProto.FromString(model.SerializeToString()))
    group = a.prunable()[0]
    with pytest.raises(ValueError, match="not a permutation"):
        apply_order(model, a, {group: np.zeros(a.sizes[group], np.int64)})


def _depthwise_blocks(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Depthwise block convs (group = their channels, more than one) by the conv they were cut from."""
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        group = next((at.i for at in node.attribute if at.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and group == inits[node.input[1]].dims[0] and "_b" in node.name:
            found.setdefault(node.name.rsplit("_b", 1)[0], []).append(node)
    return found


def test_blocks_reach_the_depthwise_convs_through_hard_swish_without_a_split(rec):
    """The Concat moves below the hard-swish and affine ops into the depthwise conv: each block's depthwise filters
    get their own scale, and the DPU, which has no Split or Slice, runs every piece."""
    model, _, held = rec
    blocked, split = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    depthwise = _depthwise_blocks(blocked)
    assert len(depthwise) >= 8 and all(len(blocks) == split[name] for name, blocks in depthwise.items()), split

    def cuts(m: onnx.ModelProto) -> int:
        return sum(node.op_type in ("Split", "Slice", "Gather") for node in m.graph.node)

    restores = [node for node in blocked.graph.node if node.op_type == "Gather" and node.name.endswith("_order")]
    assert cuts(blocked) == cuts(model) + len(restores)  # the model's own (its neck's), and the classifier's order
    producers = {out: node for node in blocked.graph.node for out in node.output}
    for blocks in depthwise.values():  # each block reads its own hard-swish copy, not a slice of the joined tensor
        assert all(producers[conv.input[0]].op_type != "Concat" for conv in blocks)
    np.testing.assert_allclose(_logits(blocked, held), _logits(model, held), atol=1e-3)
    # the blocks follow the depthwise filters' scales too: more and finer than the pointwise convs alone ask for
    dense_only, split_dense = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN, through_depthwise=False)
    assert not _depthwise_blocks(dense_only) and sum(split.values()) > sum(split_dense.values())


def test_a_depthwise_input_a_graph_output_shows_stays_whole(rec):
    """A graph output pins its channels' order: the conv before it and the depthwise conv it feeds stay whole."""
    model, _, held = rec
    blocked, _ = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    first = sorted(_depthwise_blocks(blocked))[0]
    conv = next(node for node in model.graph.node if node.name == first)
    watched = onnx.ModelProto.FromString(model.SerializeToString())
    watched.graph.output.append(onnx.helper.make_tensor_value_info(conv.input[0], onnx.TensorProto.FLOAT, None))
    rewatched, split = split_weight_blocks(watched, schemes.pow2_weight_scale, ALIGN)
    assert first not in _depthwise_blocks(rewatched) and first not in split
    assert len(_depthwise_blocks(rewatched)) == len(_depthwise_blocks(blocked)) - 1
    np.testing.assert_allclose(_logits(rewatched, held), _logits(model, held), atol=1e-3)


def test_depthwise_blocks_carry_on_through_the_next_hard_swish_and_join_where_a_dense_op_reads(rec):
    """Below a split depthwise conv each block keeps its own hard-swish and affine; the blocks are joined again only
    where an op that reads every channel (a pointwise conv, the squeeze-excite's pooling) or an outside tensor does."""
    model, _, _ = rec
    blocked, _ = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in blocked.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for blocks in _depthwise_blocks(blocked).values():
        assert all(reader.op_type != "Concat" for conv in blocks for reader in readers[conv.output[0]])
    joins = [node for node in blocked.graph.node if node.name.endswith("_joined")]
    assert len(joins) >= len(_depthwise_blocks(blocked))
    for join in joins:  # some reader needs every channel: not only element-wise ops of constants
        assert any(
            reader.op_type not in ELEMENTWISE
            or any(name in readers and name != join.output[0] for name in reader.input)
            for reader in readers[join.output[0]]
        ), (join.name, [reader.op_type for reader in readers[join.output[0]]])


def test_weight_decayed_channels_join_a_block_the_dpu_shifts_reach(tmp_path):
    """table-cls (MobileNetV3, from its wheel): weight decay left hundreds of output channels at ~1e-17 of their
    layer's largest weight. As blocks of their own they took power-of-two scales ~2^50 below their conv's other
    blocks (the DPU check: shift_cut 26 where 16 is the limit); they join the block before them now, every block's
    scale within the DPU's 16-bit shift range of its conv's largest, and the float model is unchanged on a table."""
    from collections import defaultdict

    from wheel_models import wheel_member

    sys.path.insert(0, str(REPO))
    from benchmarks.corpus.data import imagenet_batch
    from benchmarks.document_pages import CALIB_FACES, render_table

    model = _as_quantize_sees_it(onnx.load(wheel_member(*TABLE_CLS)), {"input": [1, 3, 224, 224]}, tmp_path)
    split, blocks = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    assert len(blocks) >= 20
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in split.graph.initializer}
    scales = defaultdict(list)
    for node in split.graph.node:
        if node.op_type == "Conv" and node.name.rsplit("_b", 1)[0] in blocks:
            scales[node.name.rsplit("_b", 1)[0]].append(schemes.pow2_weight_scale(weights[node.input[1]]))
    assert min(min(s) / max(s) for s in scales.values()) >= 2.0**-16
    words = "Year Region Units Price Total Share North South East West".split()
    table = imagenet_batch([render_table(np.random.default_rng(3), words, CALIB_FACES, ruled=True).resize((224, 224))])
    want, got = (make_session(m).run(None, {"input": table})[0] for m in (model, split))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_graph_rewrites_run_on_the_source_before_the_blocks_split_its_convs(tmp_path, tmp_path_factory):
    """Cross-layer equalisation pairs convs joined by ReLU-family ops; a blocked conv's Concat ends its pair (PP-OCRv4
    det: 20 pairs in the source, 14 once blocked). The recovery steps that rewrite the graph run before the blocks, so
    every pair is equalised and the blocks follow the equalised weights; the float model is unchanged."""
    from conftest import OCR_DET
    from det_int8 import fused_det_and_pages, fused_model
    from lepton_cli.passes._quantize.equalization import find_pairs
    from lepton_cli.passes.quantize import make_plan

    from lepton_cli.pipeline.params import from_table

    _, calib_path, held = fused_det_and_pages(tmp_path_factory)
    fused = fused_model(OCR_DET, {"x": [1, 3, 160, 160]}, "fpga")
    blocked, _ = split_weight_blocks(fused, schemes.pow2_weight_scale, ALIGN)
    assert len(find_pairs(blocked)) < len(find_pairs(fused))
    target = load_target("fpga")
    step = next(s for s in target.passes if s.name == "quantize")
    params = from_table(get_pass("quantize").params_cls, vars(step.params) | {"equalize": True}, "fpga.quantize")
    ctx = PassContext(target=target, calib=load_samples(calib_path, fused), work_dir=tmp_path)
    summary: dict = {}
    space = make_plan(params, ctx).space(fused, ctx, ctx.calib, summary)
    assert summary["recovery"]["equalized_pairs"] == len(find_pairs(fused))
    assert summary["weight_blocks"] and len(space.float_model.graph.node) > len(fused.graph.node)
    source, rewritten = make_session(fused), make_session(space.float_model)
    for feed in held[:2]:
        np.testing.assert_allclose(rewritten.run(None, feed)[0], source.run(None, feed)[0], atol=1e-4)


def _restores(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "Gather" and node.name.endswith("_order")]


def test_the_classifier_is_split_into_blocks_and_its_columns_keep_their_order(rec):
    """PP-OCRv4 rec's CTC classifier (a Gemm to 6625 classes) feeds only the outputs' Softmax: its columns cannot be
    reordered, so its blocks take columns by scale and a Gather after their Concat restores the order. The float
    model reads the same, and a Gemm whose output another weighted layer reads is split only where its channels move."""
    model, _, held = rec
    blocked, split = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    gemms = [node for node in model.graph.node if node.op_type == "Gemm"]
    classifier = gemms[-1]
    assert split.get(classifier.name, 0) >= 2, split
    (restore,) = _restores(blocked)
    producers = {out: node for node in blocked.graph.node for out in node.output}
    concat = producers[restore.input[0]]
    assert restore.output[0] == classifier.output[0] and concat.op_type == "Concat"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in blocked.graph.initializer}
    blocks = [producers[name] for name in concat.input]
    assert all(block.op_type == "Gemm" for block in blocks) and len(blocks) == split[classifier.name]
    widths = [inits[block.input[1]].shape[1] for block in blocks]
    assert all(width % ALIGN == 0 for width in widths[:-1]) and sum(widths) == 6625
    scales = [schemes.pow2_weight_scale(inits[block.input[1]]) for block in blocks]
    assert len(set(scales)) == len(scales)  # one power of two per block, each its own
    np.testing.assert_allclose(_logits(blocked, held), _logits(model, held), atol=1e-3)
    # another Gemm is split only where the channel analysis moves its readers' rows with the columns: no Gather
    a = analyze(onnx.ModelProto.FromString(model.SerializeToString()))
    pinned = {model.graph.node[p.node].name for p in a.producers if a.group_of(p) in a.pinned}
    others = [gemm.name for gemm in gemms[:-1] if gemm.name in split]
    assert others and not pinned.intersection(others) and classifier.name in pinned


def test_gemm_blocks_keep_the_lines_that_per_tensor_gemm_weights_lose(rec):
    """Only the Gemms int8 on fpga's grid (per-tensor power-of-two weights and activations), the convs float: one
    scale across the classifier's 6625 columns changes characters that its blocks keep."""
    model, work, held = rec
    reference = _decoded(_logits(model, held))
    agreement = {}
    for label, candidate in {
        "plain": model,
        "blocks": split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)[0],
    }.items():
        samples = load_samples(work / "calib.npz", candidate)
        settings = CalibrationSettings(method="minmax", chunk=16, max_samples=16, power_of_two=True)
        ranges = schemes.save_ranges(calibrate(candidate, samples, settings, None), work / f"gemm-{label}.json")
        scheme = schemes.Int8Scheme(
            activation_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True, op_types=("Gemm",)
        )
        int8 = schemes.quantize_int8(candidate, ranges, "minmax", scheme, [], work)
        agreement[label] = _char_agreement(_decoded(_logits(int8, held)), reference)
    assert agreement["blocks"] == 1.0 and agreement["plain"] < 0.995, agreement


def test_a_classifier_with_transposed_weights_splits_along_its_rows(rec):
    """PyTorch exports a Linear as Gemm(transB=1) with weights [out, in]: the same classifier written so is split along
    its weight's first axis into the same blocks, and reads the same logits."""
    model, _, held = rec
    transposed = onnx.ModelProto.FromString(model.SerializeToString())
    classifier = [node for node in transposed.graph.node if node.op_type == "Gemm"][-1]
    inits = {t.name: t for t in transposed.graph.initializer}
    weight = onnx.numpy_helper.to_array(inits[classifier.input[1]])
    assert not any(at.name == "transB" and at.i for at in classifier.attribute)
    inits[classifier.input[1]].CopyFrom(
        onnx.numpy_helper.from_array(np.ascontiguousarray(weight.T), classifier.input[1])
    )
    kept = [at for at in classifier.attribute if at.name != "transB"]
    del classifier.attribute[:]
    classifier.attribute.extend([*kept, onnx.helper.make_attribute("transB", 1)])
    want = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)[1][classifier.name]
    blocked, split = split_weight_blocks(transposed, schemes.pow2_weight_scale, ALIGN)
    assert split[classifier.name] == want and len(_restores(blocked)) == 1
    widths = [
        t.dims[0]
        for t in blocked.graph.initializer
        if t.name.startswith(f"{classifier.input[1]}_b") and len(t.dims) == 2
    ]
    assert len(widths) == want and sum(widths) == weight.shape[1]
    np.testing.assert_allclose(_logits(blocked, held), _logits(model, held), atol=1e-3)


def test_no_classifier_block_is_wider_than_a_dpu_layer(rec):
    """A DPU layer computes at most 256 passes of its channel parallelism (4096 output channels on fpga): by scale
    alone PP-OCRv4 rec's classifier has a block of 4800 columns, which the DPU check sends to the CPU. With the limit
    every block fits, the wide one cut in two, and the logits are the same."""
    model, _, held = rec
    classifier = [node for node in model.graph.node if node.op_type == "Gemm"][-1]

    def widths(blocked: onnx.ModelProto) -> list[int]:
        inits = {t.name: t for t in blocked.graph.initializer}
        (restore,) = _restores(blocked)
        concat = next(node for node in blocked.graph.node if restore.input[0] in node.output)
        producers = {out: node for node in blocked.graph.node for out in node.output}
        return [inits[producers[name].input[1]].dims[1] for name in concat.input]

    free, _ = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN)
    widest = load_target("fpga").runtime.max_layer_channels()  # what the quantize pass splits at on fpga
    assert widest == 256 * ALIGN
    limited, split = split_weight_blocks(model, schemes.pow2_weight_scale, ALIGN, widest=widest)
    assert max(widths(free)) > 256 * ALIGN and max(widths(limited)) <= 256 * ALIGN
    assert split[classifier.name] == len(widths(free)) + 1 and sum(widths(limited)) == 6625
    np.testing.assert_allclose(_logits(limited, held), _logits(model, held), atol=1e-3)
