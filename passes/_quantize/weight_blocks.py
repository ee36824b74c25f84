"""Per-channel weight precision on per-tensor hardware: a Conv split into blocks of output channels.

A DPU scales each weight tensor by one power of two. After BatchNorm folding, PP-OCRv4 rec's 480x480 pointwise convs
hold output channels whose largest weights lie 36-38x apart: one scale leaves the small channels a few levels (weight
SNR 11-14 dB), and its Conv/MatMul/Gemm-int8 model reads 31-46 % of characters where per-channel weights read 98.6 %
(docs/decisions.md, "Weight blocks"). Here a Conv's output channels are reordered by the scale each would take alone
(the channel analysis moves every reader's slice with them, so the float model computes the same function), and the
Conv becomes one Conv per run of channels whose scales agree, each with its own per-tensor scale, joined by a Concat.
Blocks are whole multiples of the target's channel alignment, so the DPU's channel parallelism is kept. A depthwise
conv the Conv feeds through element-wise ops is split with it (block_sinking.py), and the channel order then follows
its filters' scales too. Gemm and 2-D MatMul layers are split by output columns the same way (dense_blocks.py).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
from lepton_cli.passes._quantize.block_sinking import sink_concat, sinkable_region, split_conv
from lepton_cli.passes._quantize.dense_blocks import DENSE, dense_weight, ends_the_graph, split_dense
from lepton_cli.passes._quantize.schemes import rounding_error

from lepton_cli.model.channels.channel_groups import analyze, weights_as_initializers
from lepton_cli.model.channels.groups import ChannelAnalysis, Producer
from lepton_cli.model.channels.surgery import apply_order
from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers

ScaleOf = Callable[[np.ndarray], float]  # a weight tensor's per-tensor scale on the target's grid
NEGLIGIBLE = 2.0**-20  # beyond the DPU's 16-bit shift range from the layer's largest weight: zero on its int8 grid
NO_OCTAVE = -1000  # below every real octave: such channels sort last
MIN_GAIN_DB = 3.0  # a split that buys the layer's weights less than half a bit is not worth its Concat


def max_scale(weight: np.ndarray) -> float:
    """A symmetric int8 scale that clips nothing: what per-tensor weights take on a target without power-of-two."""
    return float(np.abs(weight).max()) / 127 or 1.0


def split_weight_blocks(
    model: onnx.ModelProto, scale_of: ScaleOf, align: int, through_depthwise: bool = True, widest: int | None = None
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """(``model`` with its Convs, Gemms and 2-D MatMuls split into weight blocks where that gains ``MIN_GAIN_DB``,
    {layer name: blocks}); with ``through_depthwise``, the depthwise convs a blocked Conv feeds through element-wise
    ops are split with it. With ``widest``, no block has more output channels, and a wider layer is always split."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    weights_as_initializers(working)
    a = analyze(working)
    orders: dict[int, np.ndarray] = {}
    cuts: dict[str, list[int]] = {}
    restored: dict[str, np.ndarray] = {}  # column orders of the layers whose output ends the graph
    out_axes: dict[str, int] = {}  # the dense layers' weight axis of output channels
    inits = {t.name: t for t in working.graph.initializer}
    before = GraphIndex(working.graph)  # where the depthwise convs are and what reads each layer, pre-order
    for producer in a.producers:
        group, node = a.group_of(producer), working.graph.node[producer.node]
        if group in orders or node.name in restored:
            continue
        if node.op_type in DENSE:
            planned = _plan_dense(before, a, producer, node, scale_of, max(align, 1), widest)
            out_axes[node.name] = producer.out_axis
            if planned is not None and group in a.pinned:
                restored[node.name], cuts[node.name] = planned
            elif planned is not None:
                orders[group], cuts[node.name] = planned
            continue
        followers = _depthwise_followers(before, producer.output, a.sizes[group]) if through_depthwise else []
        planned = _plan(working, a, producer, inits, scale_of, max(align, 1), followers, widest)
        if planned is not None:
            orders[group], cuts[node.name] = planned
    if not cuts:
        return model, {}
    ordered = apply_order(working, a, orders)
    index, names = GraphIndex(ordered.graph), FreshNames(ordered)
    for node in [n for n in ordered.graph.node if n.name in cuts]:
        bounds, output = cuts[node.name], node.output[0]
        if node.op_type in DENSE:
            split_dense(index, names, node, out_axes[node.name], bounds, restored.get(node.name))
            continue
        split_conv(index, names, node, [node.input[0]] * (len(bounds) - 1), bounds)
        for name in sink_concat(index, names, index.producer[output], bounds) if through_depthwise else []:
            cuts[name] = bounds
    drop_unused_initializers(ordered)  # the whole weights the blocks were cut from
    return ordered, {name: len(bounds) - 1 for name, bounds in cuts.items()}


def _plan(
    model: onnx.ModelProto,
    a: ChannelAnalysis,
    producer: Producer,
    inits: dict[str, onnx.TensorProto],
    scale_of: ScaleOf,
    align: int,
    followers: list[np.ndarray],
    widest: int | None,
) -> tuple[np.ndarray, list[int]] | None:
    """(channel order, block boundaries) for a dense 2-D Conv whose channels may be reordered, or None. Channels go
    by the Conv's own scale, then by those of the depthwise ``followers`` that will be split with it."""
    node = model.graph.node[producer.node]
    group = a.group_of(producer)
    if node.op_type != "Conv" or group in a.pinned or producer.weight not in inits:
        return None
    weight = tensor_array(inits[producer.weight]).astype(np.float64)
    groups = next((at.i for at in node.attribute if at.name == "group"), 1)
    if weight.ndim != 4 or groups != 1 or weight.shape[0] != a.sizes[group]:
        return None
    return _blocks([weight, *followers], scale_of, align, widest)


def _blocks(
    weights: list[np.ndarray], scale_of: ScaleOf, align: int, widest: int | None
) -> tuple[np.ndarray, list[int]] | None:
    """(channel order, block boundaries) for layers sharing output channels (axis 0), or None where a split gains
    less than ``MIN_GAIN_DB`` and the layer is no wider than ``widest``. Channels go by the first layer's scale, then
    by the others'; no block is wider than ``widest``."""
    if weights[0].shape[0] < 2 * align:
        return None
    octaves = np.array([_octaves(layer, scale_of) for layer in weights])
    order = np.lexsort(-octaves[::-1])  # the last key sorts first: the Conv's own
    bounds = [0]
    for start in range(align, len(order), align):  # a new block where the next chunk needs a power of 2 lower
        chunk, block = octaves[:, order[start : start + align]].max(axis=1), octaves[:, order[bounds[-1] : start]]
        # a chunk of zero or negligible channels joins the block before it: on its own its scale is none a DPU
        # shift reaches (MobileNetV3's weight-decayed channels, ~1e-17: shift_cut 26 where 16 is the limit)
        if ((chunk > NO_OCTAVE) & (chunk < block.max(axis=1))).any():
            bounds.append(start)
    bounds.append(len(order))
    if widest:  # a wider block would leave the accelerator: cut it into widths it runs
        bounds = sorted({*bounds, *(b for s, e in zip(bounds, bounds[1:]) for b in range(s + widest, e, widest))})
    whole = [0, len(order)]
    gain = max(_snr(layer[order], bounds, scale_of) - _snr(layer, whole, scale_of) for layer in weights)
    if len(bounds) < 3 or (gain < MIN_GAIN_DB and len(order) <= (widest or len(order))):
        return None
    return order, bounds


def _plan_dense(
    index: GraphIndex,
    a: ChannelAnalysis,
    producer: Producer,
    node: onnx.NodeProto,
    scale_of: ScaleOf,
    align: int,
    widest: int | None,
) -> tuple[np.ndarray, list[int]] | None:
    """(column order, block boundaries) for a Gemm or 2-D MatMul, or None. A layer whose columns are pinned gets
    blocks only where its output ends the graph (dense_blocks.py: a Gather then restores the order)."""
    weight = dense_weight(index, node, producer.out_axis)
    group = a.group_of(producer)
    if weight is None or weight.shape[0] != a.sizes[group]:
        return None
    if group in a.pinned and not ends_the_graph(index, producer.output):
        return None
    return _blocks([weight.astype(np.float64)], scale_of, align, widest)


def _depthwise_followers(index: GraphIndex, tensor: str, channels: int) -> list[np.ndarray]:
    """The filters of the depthwise convs that ``tensor``'s blocks would reach through element-wise ops."""
    region = sinkable_region(index, tensor, channels)
    return [index.const(conv.input[1]).astype(np.float64) for conv in region.depthwise] if region else []


def _octaves(layer: np.ndarray, scale_of: ScaleOf) -> np.ndarray:
    """Each output channel's octave: log2 of its scale alone, rounded down; ``NO_OCTAVE`` for a zero channel
    (layout_transform's padding) or one negligible beside the layer's largest weight."""
    peaks = np.abs(layer).reshape(len(layer), -1).max(axis=1)
    real = peaks > NEGLIGIBLE * peaks.max()
    return np.array([math.floor(math.log2(scale_of(c))) if keep else NO_OCTAVE for c, keep in zip(layer, real)])


def _snr(weight: np.ndarray, bounds: list[int], scale_of: ScaleOf) -> float:
    """The weights' int8 signal-to-noise ratio (dB) with one scale per block of rows."""
    noise = 0.0
    for start, end in zip(bounds, bounds[1:]):
        block = weight[start:end]
        noise += rounding_error(block, scale_of(block))
    return 10 * math.log10(float(np.square(weight).sum()) / max(noise, 1e-30))
