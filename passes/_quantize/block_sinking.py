"""Weight blocks carried through the element-wise ops between a Conv and the depthwise conv it feeds.

A depthwise conv's filters differ per channel as much as a pointwise conv's (PP-OCRv4 rec: per-channel weights on
every conv read 1-3 points more than blocks on the dense ones alone), but splitting it needs its input split, and a
DPU has no Split. When its input is a blocked Conv's Concat seen through element-wise ops (hard-swish, a learnable
affine), the Concat moves below the depthwise conv instead: each block's element-wise ops and its share of the
depthwise filters run on that block alone, and each depthwise block takes its own per-tensor weight scale. Below the
depthwise conv the blocks carry on through the next element-wise ops, and are joined again where an op reads every
channel: each element-wise op on the way quantizes per block, which is what a DPU's per-tensor power-of-two scales
lost on PP-OCRv4 rec's hard-swish and affine ops (docs/decisions.md, "Weight blocks through depthwise convs").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Clip", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid"}
MAX_REGION_NODES = 24  # a hard-swish and an affine are 6; more is not the pattern this is for


@dataclass
class Region:
    """The element-wise ``nodes`` (graph order) reading a tensor, the depthwise convs reading them, and the region's
    tensors something else reads (a residual Add, a pooling, a graph output): those get the blocks joined again."""

    nodes: list[onnx.NodeProto]
    depthwise: list[onnx.NodeProto]
    exits: list[str]


def depthwise_weight(index: GraphIndex, node: onnx.NodeProto, channels: int) -> np.ndarray | None:
    """A depthwise Conv's constant [channels, 1, kh, kw] filters, or None when ``node`` is no such conv."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    group = next((at.i for at in node.attribute if at.name == "group"), 1)
    weight = index.const(node.input[1])
    bias_ok = len(node.input) < 3 or not node.input[2] or index.const(node.input[2]) is not None
    if group != channels or weight is None or weight.ndim != 4 or weight.shape[:2] != (channels, 1) or not bias_ok:
        return None
    return weight


def sinkable_region(index: GraphIndex, tensor: str, channels: int) -> Region | None:
    """The element-wise ops reading ``tensor`` (and what they compute) with only it and constants as inputs, and the
    depthwise convs reading them; None when there are none."""
    members, depthwise = _reachable(index, tensor, channels)
    while True:  # an op that also reads an outside tensor (a residual partner, a gate) stays whole, and so what follows
        inside = {tensor, *(out for node in members for out in node.output)}
        kept = [node for node in members if _inputs_known(index, node, inside, channels)]
        if len(kept) == len(members):
            break
        members = kept
    depthwise = [conv for conv in depthwise if conv.input[0] in inside]
    if not members and not depthwise:
        return None
    taken = {id(node) for node in members + depthwise}
    exits = [
        name
        for name in sorted(inside)
        if name in index.outputs
        or index.uses[name] != len(index.readers(name))
        or any(id(reader) not in taken for reader in index.readers(name))
    ]
    order = {id(node): k for k, node in enumerate(index.graph.node)}
    return Region(sorted(members, key=lambda node: order[id(node)]), depthwise, exits)


def _reachable(index: GraphIndex, tensor: str, channels: int) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(element-wise ops reachable from ``tensor`` through element-wise ops, depthwise convs reading them)."""
    members: list[onnx.NodeProto] = []
    depthwise: list[onnx.NodeProto] = []
    seen: set[int] = set()
    frontier = [tensor]
    while frontier:
        name = frontier.pop()
        for reader in index.readers(name):
            if id(reader) in seen:
                continue
            seen.add(id(reader))
            if depthwise_weight(index, reader, channels) is not None and list(reader.input).count(name) == 1:
                if reader.input[0] == name:
                    depthwise.append(reader)
            elif reader.op_type in ELEMENTWISE and len(members) < MAX_REGION_NODES:
                members.append(reader)
                frontier.extend(reader.output)
    return members, depthwise


def _inputs_known(index: GraphIndex, node: onnx.NodeProto, inside: set[str], channels: int) -> bool:
    """Every input of ``node`` comes from the region or is a scalar or per-channel constant."""
    for name in node.input:
        value = index.const(name) if name and name not in inside else None
        if name and name not in inside and (value is None or _channel_axis(value, channels) is None):
            return False
    return True


def _channel_axis(value: np.ndarray, channels: int) -> int | None:
    """-1 for a scalar constant (shared by every block), the axis of an NCHW per-channel one, None otherwise."""
    if value.size == 1:
        return -1
    axis = value.ndim - 3
    if axis >= 0 and value.shape[axis] == channels and value.size == channels:
        return axis
    return None


def sink_concat(
    index: GraphIndex, names: FreshNames, concat: onnx.NodeProto, bounds: list[int], depth: int = 2
) -> list[str]:
    """Move ``concat`` (its inputs: blocks ``bounds`` of a tensor's channels) below the element-wise ops and depthwise
    convs it feeds, and ``depth`` - 1 times more below those convs; returns the split depthwise convs' names."""
    region = sinkable_region(index, concat.output[0], bounds[-1]) if depth >= 1 else None
    if region is None:
        return []
    at = index.position(concat) + 1
    renamed = [{concat.output[0]: block_input} for block_input in concat.input]
    for number, (start, end) in enumerate(zip(bounds, bounds[1:])):
        for node in region.nodes:
            at = _insert_copy(index, names, node, renamed[number], (start, end, bounds[-1]), number, at)
    for name in region.exits:  # what outside ops read is joined again, right after the blocks computed it
        if name != concat.output[0]:
            at = _insert_join(index, names, [block[name] for block in renamed], name, at)
    for node in region.nodes:
        index.remove(node)
    if concat.output[0] not in region.exits:
        index.remove(concat)
    split = []
    for conv in region.depthwise:
        output = conv.output[0]
        split_conv(index, names, conv, [block[conv.input[0]] for block in renamed], bounds)
        split += [conv.name, *sink_concat(index, names, index.producer[output], bounds, depth - 1)]
    return split


def _insert_join(index: GraphIndex, names: FreshNames, blocks: list[str], output: str, at: int) -> int:
    index.insert(at, helper.make_node("Concat", blocks, [output], names.fresh(f"{output}_joined"), axis=1))
    return at + 1


def split_conv(
    index: GraphIndex, names: FreshNames, conv: onnx.NodeProto, block_inputs: list[str], bounds: list[int]
) -> None:
    """Replace ``conv`` by one Conv per block ``bounds`` of output channels, block k reading ``block_inputs[k]``,
    and a Concat writing its output. A depthwise conv's blocks are depthwise over their own channels."""
    weight = index.const(conv.input[1])
    bias = index.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    depthwise = depthwise_weight(index, conv, bounds[-1]) is not None and bounds[-1] > 1
    outputs = []
    for number, (start, end) in enumerate(zip(bounds, bounds[1:])):
        inputs = [
            block_inputs[number],
            index.add_initializer(names.fresh(f"{conv.input[1]}_b{number}"), weight[start:end]),
        ]
        if bias is not None:
            inputs.append(index.add_initializer(names.fresh(f"{conv.input[2]}_b{number}"), bias[start:end]))
        outputs.append(names.fresh(f"{conv.output[0]}_b{number}"))
        block = helper.make_node("Conv", inputs, [outputs[-1]], names.fresh(f"{conv.name}_b{number}"))
        block.attribute.extend(at for at in conv.attribute if not (depthwise and at.name == "group"))
        if depthwise:
            block.attribute.append(helper.make_attribute("group", end - start))
        index.insert(index.position(conv), block)
    joined = helper.make_node("Concat", outputs, [conv.output[0]], names.fresh(f"{conv.name}_blocks"), axis=1)
    index.insert(index.position(conv), joined)
    index.remove(conv)


def _insert_copy(
    index: GraphIndex,
    names: FreshNames,
    node: onnx.NodeProto,
    renamed: dict[str, str],
    block: tuple[int, int, int],
    number: int,
    at: int,
) -> int:
    """Insert at ``at`` ``node``'s copy for one block of channels (``block``: start, end, all); returns the next
    position. Its outputs are named ``<output>_b<number>``, recorded in ``renamed``."""
    start, end, channels = block
    inputs = []
    for name in node.input:
        value = index.const(name) if name and name not in renamed else None
        axis = _channel_axis(value, channels) if value is not None else -1
        if value is not None and axis >= 0:
            name = index.add_initializer(names.fresh(f"{name}_b{number}"), np.take(value, range(start, end), axis))
        inputs.append(renamed.get(name, name))
    outputs = []
    for name in node.output:
        renamed[name] = names.fresh(f"{name}_b{number}")
        outputs.append(renamed[name])
    copy = helper.make_node(node.op_type, inputs, outputs, names.fresh(f"{node.name}_b{number}"), domain=node.domain)
    copy.attribute.extend(node.attribute)
    index.insert(at, copy)
    return at + 1
