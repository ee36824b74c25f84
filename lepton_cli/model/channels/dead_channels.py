"""Dead channels: output channels that are provably exactly 0 wherever a consumer reads them.

A forward pass over the tracked tensors keeps one value per channel (NaN: unknown): a producer whose weights
for a channel are all zero yields its bias there, BatchNormalization and the piecewise-linear activations are
evaluated exactly in float32, and the zero-preserving ops map 0 to 0. A channel that is 0 at every consumer
contributes nothing and is removed bit-exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx

from lepton_cli.model.channels.builder import AnalysisBuilder
from lepton_cli.model.channels.groups import ChannelAnalysis, Producer
from lepton_cli.model.channels.ops import BINARY, ZERO_PRESERVING
from lepton_cli.model.op_traits import attr


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


def aligned_keep(a: ChannelAnalysis, dead: dict[int, np.ndarray], align: int) -> dict[int, np.ndarray]:
    """Keep everything but the dead channels, removing only as many as keep the count a multiple of ``align``."""
    keep = {}
    for g, idx in dead.items():
        size = a.sizes[g]
        remaining = size - len(idx)
        if align > 1 and remaining % align:
            remaining = min(size, int(math.ceil(remaining / align) * align))
        removable = size - remaining
        if remaining < 1 or removable <= 0:
            continue
        gone = set(idx[:removable].tolist())
        keep[g] = np.array([c for c in range(size) if c not in gone], np.int64)
    return keep


def propagate_values(b: AnalysisBuilder) -> None:
    """Fill ``b.a.values``: each tracked tensor's per-channel constant value (NaN = unknown), in graph order."""
    a = b.a
    producers = {p.node: p for p in a.producers}
    with np.errstate(all="ignore"):
        for index, node in enumerate(b.graph.node):
            out = node.output[0] if node.output else ""
            if out in a.layouts:
                a.values[out] = _node_values(b, node, producers.get(index)).astype(np.float32)


def _unknown(width: int) -> np.ndarray:
    return np.full(width, np.nan, np.float32)


def _node_values(b: AnalysisBuilder, node: onnx.NodeProto, producer: Producer | None) -> np.ndarray:
    width = sum(s.count for s in b.a.layouts[node.output[0]])
    op = node.op_type
    if op in BINARY:
        return _binary_values(b, node, width)
    if producer is not None:
        return _producer_values(b, node, producer, width)
    if op == "Conv":  # a tracked Conv that starts no group is depthwise
        return _depthwise_values(b, node, width)
    if op == "Concat":
        return _concat_values(b, node)
    xv = b.a.values.get(node.input[0] if node.input else "")
    rule = _UNARY.get(op)
    if xv is None or rule is None:
        return _unknown(width)
    return rule(b, node, xv)


def _optional_const(b: AnalysisBuilder, node: onnx.NodeProto, i: int) -> np.ndarray | None:
    return b.const(node.input[i]) if len(node.input) > i and node.input[i] else None


def _producer_values(b: AnalysisBuilder, node: onnx.NodeProto, p: Producer, width: int) -> np.ndarray:
    """A channel whose weights are all zero is its bias; the others are unknown."""
    w = b.const(p.weight)
    zero = np.all(np.moveaxis(w, p.out_axis, 0).reshape(w.shape[p.out_axis], -1) == 0, axis=1)
    bias = _optional_const(b, node, 2)
    if node.op_type == "Gemm" and (attr(node, "beta", 1.0) != 1.0):
        bias = None if bias is None else bias * np.float32(attr(node, "beta", 1.0))
    per = np.zeros(width, np.float32) if bias is None else _per_channel(bias, bias.ndim - 1, width)
    if per is None:
        return _unknown(width)
    return np.where(zero, per, np.nan).astype(np.float32)


def _depthwise_values(b: AnalysisBuilder, node: onnx.NodeProto, width: int) -> np.ndarray:
    w = b.const(node.input[1])
    zero = np.all(w.reshape(w.shape[0], -1) == 0, axis=1)
    xv = b.a.values.get(node.input[0])
    if xv is not None:
        zero |= xv == 0
    bias = _optional_const(b, node, 2)
    bias = np.zeros(width, np.float32) if bias is None else bias
    return np.where(zero, bias.astype(np.float32), np.nan).astype(np.float32)


def _concat_values(b: AnalysisBuilder, node: onnx.NodeProto) -> np.ndarray:
    V, L = b.a.values, b.a.layouts
    parts = [
        V[i] if i in V else _unknown(sum(s.count for s in L.get(i, [])) or (b.channels(i) or 0)) for i in node.input
    ]
    return np.concatenate(parts).astype(np.float32)


def _batch_norm(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    scale, beta, mean, var = (b.const(i).astype(np.float32) for i in node.input[1:5])
    eps = np.float32(attr(node, "epsilon", 1e-5))
    y = (xv - mean) / np.sqrt(var + eps) * scale + beta
    return np.where(scale == 0, beta, y).astype(np.float32)


def _relu(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    val = np.maximum(xv, np.float32(0))
    val[np.isnan(xv)] = np.nan
    return val


def _clip(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    lo = b.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "min", None)
    hi = b.const(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(node, "max", None)
    val = xv.copy()
    if lo is not None:
        val = np.where(np.isnan(val), val, np.maximum(val, np.float32(lo)))
    if hi is not None:
        val = np.where(np.isnan(val), val, np.minimum(val, np.float32(hi)))
    return val


def _hard_sigmoid(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    if node.op_type == "HardSigmoid":
        alpha, beta = np.float32(attr(node, "alpha", 0.2)), np.float32(attr(node, "beta", 0.5))
    else:
        alpha, beta = np.float32(1 / 6), np.float32(0.5)
    hs = np.clip(alpha * xv + beta, 0, 1)
    return hs if node.op_type == "HardSigmoid" else xv * hs


def _leaky_relu(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    return np.where(xv >= 0, xv, xv * np.float32(attr(node, "alpha", 0.01)))


def _copy(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    return xv.copy()


def _zero_preserving(b: AnalysisBuilder, node: onnx.NodeProto, xv: np.ndarray) -> np.ndarray:
    return np.where(xv == 0, np.float32(0), np.nan).astype(np.float32)


UnaryRule = Callable[[AnalysisBuilder, onnx.NodeProto, np.ndarray], np.ndarray]
_UNARY: dict[str, UnaryRule] = {
    **{op: _zero_preserving for op in ZERO_PRESERVING},
    **{op: _copy for op in ("Identity", "Dropout", "Cast", "Flatten", "Reshape")},
    "BatchNormalization": _batch_norm,
    "Relu": _relu,
    "Neg": lambda b, node, xv: -xv,
    "Abs": lambda b, node, xv: np.abs(xv),
    "Clip": _clip,
    "LeakyRelu": _leaky_relu,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_sigmoid,
}


def _per_channel(value: np.ndarray, axis: int, channels: int) -> np.ndarray | None:
    """A constant broadcast operand as one value per channel, or None if it varies within a channel."""
    if axis < 0 or value.ndim == 0 or value.shape[axis] == 1:
        flat = value.reshape(-1)
        return np.full(channels, flat[0], np.float32) if flat.size and np.all(flat == flat[0]) else None
    moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    if not np.all(moved == moved[:, :1]):
        return None
    return moved[:, 0].astype(np.float32)


def _operand_values(b: AnalysisBuilder, name: str, out_rank: int, width: int) -> np.ndarray:
    if name in b.a.values:
        return b.a.values[name]
    value = b.const(name)
    if value is None:
        return _unknown(width)
    per = _per_channel(value.astype(np.float32), 1 - (out_rank - value.ndim), width)
    return per if per is not None else _unknown(width)


def _binary_values(b: AnalysisBuilder, node: onnx.NodeProto, width: int) -> np.ndarray:
    out_rank = b.rank(node.output[0]) or 0
    operands = [_operand_values(b, name, out_rank, width) for name in node.input]
    if len(operands) != 2:
        return _unknown(width)
    x, y = operands
    op = node.op_type
    if op == "Mul":
        return np.where((x == 0) | (y == 0), np.float32(0), x * y).astype(np.float32)  # finite activations assumed
    if op == "Div":
        return np.where(x == 0, np.where(y == 0, np.nan, 0), x / y).astype(np.float32)
    combine = {"Add": np.add, "Sub": np.subtract, "Max": np.maximum, "Min": np.minimum}.get(op)
    return combine(x, y) if combine is not None else _unknown(width)
