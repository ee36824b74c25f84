"""Channel dependency groups of an ONNX graph, for structured (output-channel) pruning.

Removing output channel ``j`` of a Conv/Gemm is only valid if every tensor that carries that
channel loses it too: BatchNormalization and per-channel constants are sliced, activations and
pools pass channels through, a depthwise Conv keeps channel ``j`` as its own channel ``j`` (its
weight, bias and ``group`` shrink), the two operands of a residual ``Add`` (or an SE ``Mul``) must
lose the *same* channels (their producers form one group), a ``Concat`` on the channel axis lays
the groups side by side (channel offsets), ``Flatten`` repeats each channel ``H*W`` times in the
following Gemm's input, and the consuming Conv/Gemm/ConvTranspose loses the matching input
slice of its weight. Anything else that touches a tracked tensor (Reshape, Transpose, Softmax over
channels, a graph output, an op with subgraphs, ...) *pins* the groups it sees: they are never pruned.

The analysis is a union-find over "groups" with a per-tensor *layout* (the list of group segments
along axis 1), recorded edits (which constant input to slice along which axis, keyed on which
tensor's layout) and, for dead-channel removal, a per-channel constant-value lattice: a channel
whose value is provably exactly 0 wherever a consumer reads it contributes nothing and can be
removed bit-exactly.

Libraries checked first: onnx, onnxsim, onnx-ir and ONNX Runtime have no channel pruning; Intel
Neural Compressor and Olive prune PyTorch modules only; Torch-Pruning's ``DependencyGraph`` is the
model for the grouping idea but works on torch.fx/autograd graphs, not ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import drop_unused_initializers, subgraph_names
from lepton_cli.model.initializers import constants_to_initializers as move_constants_to_initializers
from lepton_cli.model.initializers import unlist_initializers_from_inputs
from lepton_cli.model.stats import _shape_map  # the shapes collect_stats uses for MACs; reused rather than re-inferred

# Ops that map each channel to itself, elementwise, with no constant operand to slice.
PASS_THROUGH = {
    "Relu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Tanh",
    "Identity",
    "Dropout",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Softplus",
    "Softsign",
    "Erf",
    "Gelu",
    "Mish",
    "ThresholdedRelu",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Cast",
    "Clip",
    "Sin",
    "Cos",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LpPool",
    "GlobalLpPool",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
# Dead-channel analysis: piecewise-linear ops (ReLU, Clip, HardSigmoid, ...) are evaluated exactly in
# float32 in ``_dead_values``; these map an exact 0 to an exact 0 and anything else to "unknown".
_ZERO_PRESERVING = {
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LpPool",
    "GlobalLpPool",
    "Tanh",
    "Softsign",
    "Erf",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "Sqrt",
    "Sin",
    "Resize",
    "Upsample",
}


@dataclass(frozen=True)
class Seg:
    """``count`` channels of ``group`` on axis 1, each repeated ``repeat`` times (after Flatten)."""

    group: int
    count: int
    repeat: int = 1


@dataclass
class Edit:
    """Slice constant input ``input_index`` of ``node`` along ``axis`` by the kept positions of ``key``'s layout."""

    node: int
    input_index: int
    axis: int
    key: str


@dataclass
class Producer:
    """A Conv/Gemm/ConvTranspose/MatMul whose output channels start a group."""

    node: int
    weight: str
    out_axis: int  # the weight's output-channel axis
    output: str


@dataclass
class Consumer:
    node: int
    weight: str
    in_axis: int
    input: str


@dataclass
class ChannelAnalysis:
    layouts: dict[str, list[Seg]] = field(default_factory=dict)
    parent: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)
    edits: list[Edit] = field(default_factory=list)
    group_attr: list[tuple[int, str]] = field(default_factory=list)  # depthwise convs: (node, output key)
    resize_sizes: list[tuple[int, str]] = field(default_factory=list)  # Resize with constant sizes
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    bn_after: dict[str, int] = field(default_factory=dict)  # producer output → BatchNormalization node
    values: dict[str, np.ndarray] = field(default_factory=dict)  # per layout channel: float value, NaN unknown

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def groups(self) -> list[int]:
        return sorted({self.find(g) for g in self.parent})

    def prunable(self) -> list[int]:
        return [g for g in self.groups() if g not in self.pinned]

    def positions(self, key: str, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along axis 1 of tensor ``key`` that survive when group ``g`` keeps channels ``keep[g]``."""
        out, offset = [], 0
        for seg in self.layouts[key]:
            root = self.find(seg.group)
            kept = keep.get(root, np.arange(seg.count))
            idx = (kept[:, None] * seg.repeat + np.arange(seg.repeat)[None, :]).reshape(-1)
            out.append(offset + idx)
            offset += seg.count * seg.repeat
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def channel_values(self, key: str, group: int) -> list[np.ndarray]:
        """The dead-channel lattice values of ``group``'s channels in tensor ``key`` (one array per segment)."""
        vals, offset, found = self.values.get(key), 0, []
        for seg in self.layouts[key]:
            if self.find(seg.group) == group and vals is not None:
                found.append(vals[offset : offset + seg.count])
            offset += seg.count
        return found


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Weights as initializers, not listed as inputs: a sliced weight must not leave an input of the old shape."""
    unlist_initializers_from_inputs(model)
    return move_constants_to_initializers(model)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.shapes = _shape_map(model)
        self.a = ChannelAnalysis()
        self.next_group = 0

    def const(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = tensor_array(self.inits[name])
        return self._arrays[name]

    def new_group(self, size: int, pinned: bool = False) -> int:
        g = self.next_group
        self.next_group += 1
        self.a.parent[g] = g
        self.a.sizes[g] = size
        if pinned:
            self.a.pinned.add(g)
        return g

    def union(self, x: int, y: int) -> None:
        rx, ry = self.a.find(x), self.a.find(y)
        if rx == ry:
            return
        self.a.parent[ry] = rx
        if rx in self.a.pinned or ry in self.a.pinned:
            self.a.pinned.add(rx)

    def pin(self, name: str) -> None:
        for seg in self.a.layouts.get(name, []):
            self.a.pinned.add(self.a.find(seg.group))

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def channels(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return shape[1] if shape and len(shape) > 1 else None


def analyze(model: onnx.ModelProto) -> ChannelAnalysis:
    """Channel groups of ``model`` (its constants must be initializers: see ``constants_to_initializers``)."""
    b = _Builder(model)
    a = b.a
    L = a.layouts
    for index, node in enumerate(b.graph.node):
        op = node.op_type
        tracked = [i for i in node.input if i in L]
        handled = False
        if node.domain not in ("", "ai.onnx") or any(
            at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute
        ):
            pass
        elif op in ("Conv", "ConvTranspose"):
            handled = _conv(b, index, node)
        elif op in ("Gemm", "MatMul"):
            handled = _gemm(b, index, node)
        elif op in ("BatchNormalization", "InstanceNormalization"):
            if node.input[0] in L and all(b.const(i) is not None for i in node.input[1:]) and len(node.output) == 1:
                L[node.output[0]] = L[node.input[0]]
                a.edits.extend(Edit(index, i, 0, node.output[0]) for i in range(1, len(node.input)))
                handled = True
                if op == "BatchNormalization":
                    a.bn_after[node.input[0]] = index
        elif op in PASS_THROUGH:
            extra_ok = all(b.const(i) is not None for i in node.input[1:] if i)  # Clip min/max
            used_outputs = [o for o in node.output[1:] if o]
            if node.input and node.input[0] in L and extra_ok and not used_outputs:
                L[node.output[0]] = L[node.input[0]]
                handled = True
        elif op in ("Resize", "Upsample"):
            handled = _resize(b, index, node)
        elif op in BINARY:
            handled = _binary(b, index, node)
        elif op == "Concat":
            handled = _concat(b, node)
        elif op in ("Flatten", "Reshape"):
            shape = b.shapes.get(node.input[0])
            if (
                node.input[0] in L
                and _flattens_to_2d(b, node, shape)
                and shape
                and len(shape) >= 2
                and all(d for d in shape[2:])
            ):
                inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
                L[node.output[0]] = [Seg(s.group, s.count, s.repeat * inner) for s in L[node.input[0]]]
                handled = True
        if not handled:
            for name in tracked:
                b.pin(name)
    for out in b.graph.output:
        b.pin(out.name)
    for name in subgraph_names(b.graph):
        b.pin(name)
    # Re-root pinned flags after all unions.
    a.pinned = {a.find(g) for g in a.pinned}
    _dead_values(b)
    return a


def _flattens_to_2d(b: _Builder, node: onnx.NodeProto, shape: list[int | None] | None) -> bool:
    """Flatten(axis=1), or Reshape to [0 or N, -1] (PyTorch's x.view(N, -1)): [N, C, ...] → [N, C*...]."""
    if node.op_type == "Flatten":
        return _attr(node, "axis", 1) == 1
    target = b.const(node.input[1]) if len(node.input) > 1 else None
    if target is None or target.size != 2 or int(target[1]) != -1 or not shape:
        return False
    return int(target[0]) == 0 or (shape[0] is not None and int(target[0]) == shape[0])


def _conv(b: _Builder, index: int, node: onnx.NodeProto) -> bool:
    a, L = b.a, b.a.layouts
    weight = b.const(node.input[1]) if len(node.input) > 1 else None
    bias_ok = len(node.input) < 3 or not node.input[2] or b.const(node.input[2]) is not None
    x = node.input[0]
    if weight is None or not bias_ok:
        return False
    group = _attr(node, "group", 1)
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
    g = b.new_group(weight.shape[out_axis])
    L[out] = [Seg(g, weight.shape[out_axis])]
    a.edits.append(Edit(index, 1, out_axis, out))
    if len(node.input) > 2 and node.input[2]:
        a.edits.append(Edit(index, 2, 0, out))
    a.producers.append(Producer(index, node.input[1], out_axis, out))
    return True


def _gemm(b: _Builder, index: int, node: onnx.NodeProto) -> bool:
    a, L = b.a, b.a.layouts
    weight = b.const(node.input[1])
    x, out = node.input[0], node.output[0]
    if weight is None or weight.ndim != 2:
        return False
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return False
        trans_b = _attr(node, "transB", 0)
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        bias = b.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (
            len(node.input) > 2
            and node.input[2]
            and (bias is None or (bias.ndim and bias.shape[-1] not in (1, weight.shape[out_axis])))
        ):
            return False
    else:
        if b.rank(x) != 2:
            return False  # MatMul on [N, T, C]: channels sit on the last axis, not axis 1
        in_axis, out_axis, bias = 0, 1, None
    if x in L:
        if sum(s.count * s.repeat for s in L[x]) != weight.shape[in_axis]:
            return False
        a.edits.append(Edit(index, 1, in_axis, x))
        a.consumers.append(Consumer(index, node.input[1], in_axis, x))
    g = b.new_group(weight.shape[out_axis])
    L[out] = [Seg(g, weight.shape[out_axis])]
    a.edits.append(Edit(index, 1, out_axis, out))
    if bias is not None and bias.ndim and bias.shape[-1] == weight.shape[out_axis] > 1:
        a.edits.append(Edit(index, 2, bias.ndim - 1, out))
    a.producers.append(Producer(index, node.input[1], out_axis, out))
    return True


def _resize(b: _Builder, index: int, node: onnx.NodeProto) -> bool:
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


def _binary(b: _Builder, index: int, node: onnx.NodeProto) -> bool:
    a, L = b.a, b.a.layouts
    out = node.output[0]
    out_rank = b.rank(out)
    tracked = [i for i in node.input if i in L]
    if not tracked or out_rank is None or out_rank < 2:
        return False
    if node.op_type == "Pow" and node.input[0] not in L:
        return False
    const_edits = []
    for position, name in enumerate(node.input):
        if name in L:
            if b.rank(name) != out_rank:
                return False
            continue
        value = b.const(name)
        shape = list(value.shape) if value is not None else b.shapes.get(name)
        if shape is None:
            return False
        axis = 1 - (out_rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            continue
        if value is None:
            return False  # a full-channel operand we cannot slice
        const_edits.append(Edit(index, position, axis, out))
    first = L[tracked[0]]
    for other in tracked[1:]:
        segs = L[other]
        if len(segs) != len(first) or any(s.count != t.count or s.repeat != t.repeat for s, t in zip(segs, first)):
            return False
        for s, t in zip(segs, first):
            b.union(s.group, t.group)
    L[out] = first
    a.edits.extend(const_edits)
    return True


def _concat(b: _Builder, node: onnx.NodeProto) -> bool:
    L = b.a.layouts
    rank = b.rank(node.output[0])
    axis = _attr(node, "axis", 0)
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


# ---- dead channels: per-channel constant values ------------------------------------------


def _per_channel(value: np.ndarray, axis: int, channels: int) -> np.ndarray | None:
    """A constant broadcast operand as one value per channel, or None if it varies within a channel."""
    if axis < 0 or value.ndim == 0 or value.shape[axis] == 1:
        flat = value.reshape(-1)
        return np.full(channels, flat[0], np.float32) if flat.size and np.all(flat == flat[0]) else None
    moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    if not np.all(moved == moved[:, :1]):
        return None
    return moved[:, 0].astype(np.float32)


def _dead_values(b: _Builder) -> None:
    """Forward pass of the constant lattice over tracked tensors (NaN = unknown)."""
    a, L = b.a, b.a.layouts
    V = a.values
    producers = {p.node: p for p in a.producers}
    with np.errstate(all="ignore"):
        for index, node in enumerate(b.graph.node):
            out = node.output[0] if node.output else ""
            if out not in L:
                continue
            width = sum(s.count for s in L[out])
            op = node.op_type
            val = np.full(width, np.nan, np.float32)
            x = node.input[0] if node.input else ""
            xv = V.get(x)
            if index in producers:
                p = producers[index]
                w = b.const(p.weight)
                zero = np.all(np.moveaxis(w, p.out_axis, 0).reshape(w.shape[p.out_axis], -1) == 0, axis=1)
                bias = b.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                if op == "Gemm" and (_attr(node, "beta", 1.0) != 1.0):
                    bias = None if bias is None else bias * np.float32(_attr(node, "beta", 1.0))
                per = np.zeros(width, np.float32) if bias is None else _per_channel(bias, bias.ndim - 1, width)
                if per is not None:
                    val = np.where(zero, per, np.nan).astype(np.float32)
            elif op == "Conv":  # depthwise
                w = b.const(node.input[1])
                zero = np.all(w.reshape(w.shape[0], -1) == 0, axis=1)
                if xv is not None:
                    zero |= xv == 0
                bias = b.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(width, np.float32)
                val = np.where(zero, bias.astype(np.float32), np.nan).astype(np.float32)
            elif op == "Concat":
                val = np.concatenate(
                    [
                        V[i]
                        if i in V
                        else np.full(sum(s.count for s in L.get(i, [])) or (b.channels(i) or 0), np.nan, np.float32)
                        for i in node.input
                    ]
                ).astype(np.float32)
            elif xv is None:
                pass
            elif op == "BatchNormalization":
                scale, beta, mean, var = (b.const(i).astype(np.float32) for i in node.input[1:5])
                eps = np.float32(_attr(node, "epsilon", 1e-5))
                y = (xv - mean) / np.sqrt(var + eps) * scale + beta
                val = np.where(scale == 0, beta, y).astype(np.float32)
            elif op in ("Relu",):
                val = np.maximum(xv, np.float32(0))
                val[np.isnan(xv)] = np.nan
            elif op in ("Identity", "Dropout", "Cast", "Flatten", "Reshape"):
                val = xv.copy()
            elif op == "Neg":
                val = -xv
            elif op == "Abs":
                val = np.abs(xv)
            elif op == "Clip":
                lo = b.const(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "min", None)
                hi = b.const(node.input[2]) if len(node.input) > 2 and node.input[2] else _attr(node, "max", None)
                val = xv.copy()
                if lo is not None:
                    val = np.where(np.isnan(val), val, np.maximum(val, np.float32(lo)))
                if hi is not None:
                    val = np.where(np.isnan(val), val, np.minimum(val, np.float32(hi)))
            elif op == "LeakyRelu":
                val = np.where(xv >= 0, xv, xv * np.float32(_attr(node, "alpha", 0.01)))
            elif op in ("HardSigmoid", "HardSwish"):
                alpha, beta = (
                    (np.float32(_attr(node, "alpha", 0.2)), np.float32(_attr(node, "beta", 0.5)))
                    if op == "HardSigmoid"
                    else (np.float32(1 / 6), np.float32(0.5))
                )
                hs = np.clip(alpha * xv + beta, 0, 1)
                val = hs if op == "HardSigmoid" else xv * hs
            elif op in _ZERO_PRESERVING:
                val = np.where(xv == 0, np.float32(0), np.nan).astype(np.float32)
            if op in BINARY:
                val = _binary_values(b, node, width)
            V[out] = val.astype(np.float32)
            if op in ("Flatten", "Reshape"):
                V[out] = xv.copy() if xv is not None else val


def _binary_values(b: _Builder, node: onnx.NodeProto, width: int) -> np.ndarray:
    out_rank = b.rank(node.output[0]) or 0
    operands = []
    for name in node.input:
        if name in b.a.values:
            operands.append(b.a.values[name])
            continue
        value = b.const(name)
        if value is not None:
            per = _per_channel(value.astype(np.float32), 1 - (out_rank - value.ndim), width)
            operands.append(per if per is not None else np.full(width, np.nan, np.float32))
        else:
            operands.append(np.full(width, np.nan, np.float32))
    if len(operands) != 2:
        return np.full(width, np.nan, np.float32)
    x, y = operands
    op = node.op_type
    if op == "Mul":
        r = x * y
        return np.where((x == 0) | (y == 0), np.float32(0), r).astype(np.float32)  # finite activations assumed
    if op == "Add":
        return x + y
    if op == "Sub":
        return x - y
    if op == "Div":
        return np.where(x == 0, np.where(y == 0, np.nan, 0), x / y).astype(np.float32)
    if op == "Max":
        return np.maximum(x, y)
    if op == "Min":
        return np.minimum(x, y)
    return np.full(width, np.nan, np.float32)


def dead_channels(a: ChannelAnalysis) -> dict[int, np.ndarray]:
    """Per prunable group: the channels that are exactly zero at every consumer that reads them."""
    result: dict[int, np.ndarray] = {}
    reads: dict[int, list[np.ndarray]] = {}
    for c in a.consumers:
        for seg in a.layouts[c.input]:
            root = a.find(seg.group)
            reads.setdefault(root, []).extend(a.channel_values(c.input, root))
    for root in a.prunable():
        vals = reads.get(root)
        if not vals:
            continue
        dead = np.ones(a.sizes[root], bool)
        for v in vals:
            dead &= v == 0
        if dead.any():
            result[root] = np.flatnonzero(dead)
    return result


# ---- importance and surgery -----------------------------------------------------------------


def channel_importance(model: onnx.ModelProto, a: ChannelAnalysis, norm: str = "l2") -> dict[int, np.ndarray]:
    """Per group: each channel's summed, per-layer-normalised weight norm over its producers (output
    slices, scaled by a following BatchNormalization's gamma/std) and consumers (input slices)."""
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = tensor_array(inits[name]).astype(np.float64)
        return arrays[name]

    def norms(w: np.ndarray, axis: int) -> np.ndarray:
        m = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        n = np.abs(m).sum(1) if norm == "l1" else np.sqrt((m**2).sum(1))
        mean = n.mean()
        return n / mean if mean > 0 else n

    scores: dict[int, np.ndarray] = {g: np.zeros(a.sizes[g]) for g in a.groups()}
    nodes = model.graph.node
    for p in a.producers:
        n = norms(arr(p.weight), p.out_axis)
        bn = a.bn_after.get(p.output)
        if bn is not None:
            scale, _, _, var = (arr(i) for i in nodes[bn].input[1:5])
            n = n * np.abs(scale) / np.sqrt(var + _attr(nodes[bn], "epsilon", 1e-5))
        scores[a.find(a.layouts[p.output][0].group)] += n
    for c in a.consumers:
        w = arr(c.weight)
        per_pos = np.moveaxis(w, c.in_axis, 0).reshape(w.shape[c.in_axis], -1)
        pos_norm = np.abs(per_pos).sum(1) if norm == "l1" else (per_pos**2).sum(1)
        offset = 0
        for seg in a.layouts[c.input]:
            block = pos_norm[offset : offset + seg.count * seg.repeat].reshape(seg.count, seg.repeat).sum(1)
            block = block if norm == "l1" else np.sqrt(block)
            mean = block.mean()
            scores[a.find(seg.group)] += block / mean if mean > 0 else block
            offset += seg.count * seg.repeat
    return scores


def apply_keep(model: onnx.ModelProto, a: ChannelAnalysis, keep: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` where group ``g`` keeps only channels ``keep[g]`` (sorted indices)."""
    keep = {a.find(g): np.sort(np.asarray(k, np.int64)) for g, k in keep.items()}
    for g in keep:
        if g in a.pinned:
            raise ValueError(f"group {g} is pinned")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    changed = {g for g, k in keep.items() if len(k) != a.sizes[g]}
    if not changed:
        return result

    def touches(key: str) -> bool:
        return any(a.find(s.group) in changed for s in a.layouts[key])

    sliced: dict[tuple[str, int, bytes], str] = {}
    for e in a.edits:
        if not touches(e.key):
            continue
        node = graph.node[e.node]
        name = node.input[e.input_index]
        pos = a.positions(e.key, keep)
        cache_key = (name, e.axis, pos.tobytes())
        if cache_key not in sliced:
            value = tensor_array(inits[name])
            new_name = f"{name}__pruned{len(sliced)}"
            tensor = numpy_helper.from_array(np.ascontiguousarray(np.take(value, pos, axis=e.axis)), new_name)
            graph.initializer.append(tensor)
            inits[new_name] = tensor
            sliced[cache_key] = new_name
        node.input[e.input_index] = sliced[cache_key]
    for index, key in a.group_attr:
        if touches(key):
            node = graph.node[index]
            for at in node.attribute:
                if at.name == "group":
                    at.i = len(a.positions(key, keep))
    for index, key in a.resize_sizes:
        if touches(key):
            node = graph.node[index]
            sizes = tensor_array(inits[node.input[3]]).copy()
            sizes[1] = len(a.positions(key, keep))
            new_name = f"{node.input[3]}__pruned{len(sliced)}"
            sliced[(new_name, 0, b"")] = new_name
            graph.initializer.append(numpy_helper.from_array(sizes, new_name))
            node.input[3] = new_name
    # Drop initializers nothing reads any more, and stale shapes of the resized tensors.
    drop_unused_initializers(result)
    del graph.value_info[:]
    return result
