"""Channel dependency groups of an ONNX graph: which output channels of Conv/Gemm can be removed together.

Removing output channel ``j`` of a Conv/Gemm is only valid if every tensor that carries that channel loses it
too: BatchNormalization and per-channel constants are sliced, activations and pools pass channels through, a
depthwise Conv keeps channel ``j`` as its own channel ``j`` (its weight, bias and ``group`` shrink), the two
operands of a residual ``Add`` (or an SE ``Mul``) must lose the *same* channels (their producers form one
group), a ``Concat`` on the channel axis lays the groups side by side (channel offsets), ``Flatten`` repeats
each channel ``H*W`` times in the following Gemm's input, and the consuming Conv/Gemm/ConvTranspose loses the
matching input slice of its weight. Anything else that touches a tracked tensor (Reshape, Transpose, Softmax
over channels, a graph output, an op with subgraphs, ...) *pins* the groups it sees: they are never pruned.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from lepton_cli.model.channels.builder import AnalysisBuilder
from lepton_cli.model.channels.dead_channels import propagate_values
from lepton_cli.model.channels.groups import ChannelAnalysis, Consumer, Edit, Producer, Seg
from lepton_cli.model.channels.ops import BINARY, PASS_THROUGH
from lepton_cli.model.graph_edit import subgraph_names
from lepton_cli.model.initializers import constants_to_initializers, unlist_initializers_from_inputs
from lepton_cli.model.op_traits import DEFAULT_DOMAINS, attr

Handler = Callable[[AnalysisBuilder, int, onnx.NodeProto], bool]


def weights_as_initializers(model: onnx.ModelProto) -> None:
    """What ``analyze`` needs: weights as initializers, not listed as graph inputs (a sliced weight must not
    leave an input declared with its old shape)."""
    unlist_initializers_from_inputs(model)
    constants_to_initializers(model)


def analyze(model: onnx.ModelProto) -> ChannelAnalysis:
    """Channel groups of ``model`` (its weights must be initializers: see ``weights_as_initializers``)."""
    b = AnalysisBuilder(model)
    a = b.a
    for index, node in enumerate(b.graph.node):
        tracked = [i for i in node.input if i in a.layouts]
        handler = _HANDLERS.get(node.op_type) if _is_plain(node) else None
        if handler is None or not handler(b, index, node):
            for name in tracked:
                b.pin(name)
    for out in b.graph.output:
        b.pin(out.name)
    for name in subgraph_names(b.graph):
        b.pin(name)
    a.pinned = {a.find(g) for g in a.pinned}  # re-rooted after all unions
    propagate_values(b)
    return a


def _is_plain(node: onnx.NodeProto) -> bool:
    """A standard-domain op without subgraphs: the only kind whose channel semantics are known here."""
    return node.domain in DEFAULT_DOMAINS and not any(
        at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute
    )


def _conv(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    a, L = b.a, b.a.layouts
    weight = b.const(node.input[1]) if len(node.input) > 1 else None
    bias_ok = len(node.input) < 3 or not node.input[2] or b.const(node.input[2]) is not None
    x = node.input[0]
    if weight is None or not bias_ok:
        return False
    group = attr(node, "group", 1)
    transpose = node.op_type == "ConvTranspose"
    c_in = weight.shape[0] if transpose else weight.shape[1] * group
    out = node.output[0]
    if not transpose and group > 1 and x in L and group == c_in and weight.shape[0] == c_in and weight.shape[1] == 1:
        # depthwise, multiplier 1: channel j in → channel j out
        L[out] = L[x]
        a.edits.append(Edit(index, 1, 0, out))
        if len(node.input) > 2 and node.input[2]:
            a.edits.append(Edit(index, 2, 0, out))
        a.group_attr.append((index, out))
        return True
    if group != 1:
        return False  # grouped convs keep their channels (pinning the input if tracked)
    in_axis, out_axis = (0, 1) if transpose else (1, 0)
    if x in L:
        if len(L[x]) and sum(s.count * s.repeat for s in L[x]) != weight.shape[in_axis]:
            return False
        a.edits.append(Edit(index, 1, in_axis, x))
        a.consumers.append(Consumer(index, node.input[1], in_axis, x))
    _new_producer(b, index, node, weight.shape[out_axis], out_axis)
    if len(node.input) > 2 and node.input[2]:
        a.edits.append(Edit(index, 2, 0, out))
    a.producers.append(Producer(index, node.input[1], out_axis, out))
    return True


def _new_producer(b: AnalysisBuilder, index: int, node: onnx.NodeProto, channels: int, out_axis: int) -> None:
    """A new group for ``node``'s output channels, and the weight slice along ``out_axis`` that follows it."""
    out = node.output[0]
    b.a.layouts[out] = [Seg(b.new_group(channels), channels)]
    b.a.edits.append(Edit(index, 1, out_axis, out))


def _gemm_axes(
    b: AnalysisBuilder, node: onnx.NodeProto, weight: np.ndarray
) -> tuple[int, int, np.ndarray | None] | None:
    """(input axis, output axis, bias) of a Gemm's or 2-D MatMul's weight, or None when its channels are not axis 1."""
    if node.op_type == "MatMul":
        return None if b.rank(node.input[0]) != 2 else (0, 1, None)  # MatMul on [N, T, C]: channels on the last axis
    if attr(node, "transA", 0):
        return None
    in_axis, out_axis = (1, 0) if attr(node, "transB", 0) else (0, 1)
    has_bias = len(node.input) > 2 and node.input[2]
    bias = b.const(node.input[2]) if has_bias else None
    if has_bias and (bias is None or (bias.ndim and bias.shape[-1] not in (1, weight.shape[out_axis]))):
        return None
    return in_axis, out_axis, bias


def _gemm(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    a, L = b.a, b.a.layouts
    weight = b.const(node.input[1])
    x, out = node.input[0], node.output[0]
    if weight is None or weight.ndim != 2:
        return False
    axes = _gemm_axes(b, node, weight)
    if axes is None:
        return False
    in_axis, out_axis, bias = axes
    if x in L:
        if sum(s.count * s.repeat for s in L[x]) != weight.shape[in_axis]:
            return False
        a.edits.append(Edit(index, 1, in_axis, x))
        a.consumers.append(Consumer(index, node.input[1], in_axis, x))
    _new_producer(b, index, node, weight.shape[out_axis], out_axis)
    if bias is not None and bias.ndim and bias.shape[-1] == weight.shape[out_axis] > 1:
        a.edits.append(Edit(index, 2, bias.ndim - 1, out))
    a.producers.append(Producer(index, node.input[1], out_axis, out))
    return True


def _norm(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    L = b.a.layouts
    if node.input[0] not in L or any(b.const(i) is None for i in node.input[1:]) or len(node.output) != 1:
        return False
    L[node.output[0]] = L[node.input[0]]
    b.a.edits.extend(Edit(index, i, 0, node.output[0]) for i in range(1, len(node.input)))
    if node.op_type == "BatchNormalization":
        b.a.bn_after[node.input[0]] = index
    return True


def _pass_through(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    L = b.a.layouts
    extra_ok = all(b.const(i) is not None for i in node.input[1:] if i)  # Clip min/max
    used_outputs = [o for o in node.output[1:] if o]
    if not (node.input and node.input[0] in L and extra_ok and not used_outputs):
        return False
    L[node.output[0]] = L[node.input[0]]
    return True


def _flatten(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    L = b.a.layouts
    shape = b.shapes.get(node.input[0])
    if not (node.input[0] in L and _flattens_to_2d(b, node, shape) and shape and len(shape) >= 2):
        return False
    if not all(d for d in shape[2:]):
        return False
    inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    L[node.output[0]] = [Seg(s.group, s.count, s.repeat * inner) for s in L[node.input[0]]]
    return True


def _flattens_to_2d(b: AnalysisBuilder, node: onnx.NodeProto, shape: list[int | None] | None) -> bool:
    """Flatten(axis=1), or Reshape to [0 or N, -1] (PyTorch's x.view(N, -1)): [N, C, ...] → [N, C*...]."""
    if node.op_type == "Flatten":
        return attr(node, "axis", 1) == 1
    target = b.const(node.input[1]) if len(node.input) > 1 else None
    if target is None or target.size != 2 or int(target[1]) != -1 or not shape:
        return False
    return int(target[0]) == 0 or (shape[0] is not None and int(target[0]) == shape[0])


def _resize(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    x = node.input[0]
    if x not in b.a.layouts:
        return False
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        sizes = b.const(node.input[3])
        if sizes is None:
            return False
        b.a.resize_sizes.append((index, node.output[0]))
    elif len(node.input) > 2 and node.input[2 if node.op_type == "Resize" else 1]:
        scales = b.const(node.input[2 if node.op_type == "Resize" else 1])
        if scales is None or scales.size < 2 or scales[1] != 1:
            return False
    b.a.layouts[node.output[0]] = b.a.layouts[x]
    return True


def _constant_operand_edits(b: AnalysisBuilder, index: int, node: onnx.NodeProto, out_rank: int) -> list[Edit] | None:
    """Slices of a broadcast op's per-channel constant operands, or None when an operand cannot follow the
    channels (a tracked one of another rank, or a full-channel operand that is not a constant)."""
    L, edits = b.a.layouts, []
    for position, name in enumerate(node.input):
        if name in L:
            if b.rank(name) != out_rank:
                return None
            continue
        value = b.const(name)
        shape = list(value.shape) if value is not None else b.shapes.get(name)
        if shape is None:
            return None
        axis = 1 - (out_rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            continue
        if value is None:
            return None
        edits.append(Edit(index, position, axis, node.output[0]))
    return edits


def _binary(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    L = b.a.layouts
    out_rank = b.rank(node.output[0])
    tracked = [i for i in node.input if i in L]
    if not tracked or out_rank is None or out_rank < 2:
        return False
    if node.op_type == "Pow" and node.input[0] not in L:
        return False
    const_edits = _constant_operand_edits(b, index, node, out_rank)
    if const_edits is None:
        return False
    first = L[tracked[0]]
    for other in tracked[1:]:
        segs = L[other]
        if len(segs) != len(first) or any(s.count != t.count or s.repeat != t.repeat for s, t in zip(segs, first)):
            return False
        for s, t in zip(segs, first):
            b.union(s.group, t.group)
    L[node.output[0]] = first
    b.a.edits.extend(const_edits)
    return True


def _concat(b: AnalysisBuilder, index: int, node: onnx.NodeProto) -> bool:
    L = b.a.layouts
    rank = b.rank(node.output[0])
    axis = attr(node, "axis", 0)
    if not rank or (axis % rank) != 1 or not any(i in L for i in node.input):
        return False
    segs: list[Seg] = []
    for name in node.input:
        if name in L:
            segs.extend(L[name])
        else:
            count = b.channels(name)
            if not count:
                return False
            segs.append(Seg(b.new_group(count, pinned=True), count))
    L[node.output[0]] = segs
    return True


_HANDLERS: dict[str, Handler] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "Gemm": _gemm,
    "MatMul": _gemm,
    "BatchNormalization": _norm,
    "InstanceNormalization": _norm,
    "Resize": _resize,
    "Upsample": _resize,
    "Concat": _concat,
    "Flatten": _flatten,
    "Reshape": _flatten,
    **{op: _pass_through for op in PASS_THROUGH},
    **{op: _binary for op in BINARY},
}
