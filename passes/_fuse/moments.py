"""Matchers for a normalisation written out in elementary ops: means, squares, and the centered input."""

from __future__ import annotations

import numpy as np
import onnx

from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.model.op_traits import attrs

BROADCASTS = ("Reshape", "Expand", "Unsqueeze", "Identity")  # carry the mean to x's shape, values unchanged


def scalar(g: GraphIndex, name: str) -> float | None:
    value = g.const(name)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(value.reshape(()))


def square_of(g: GraphIndex, name: str) -> str | None:
    """t where ``name`` is Mul(t, t) or Pow(t, 2)."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    if node is not None and node.op_type == "Pow" and scalar(g, node.input[1]) == 2.0:
        return node.input[0]
    return None


def reduced_axes(g: GraphIndex, reduce: onnx.NodeProto) -> tuple[int, ...] | None:
    if len(reduce.input) > 1 and reduce.input[1]:  # opset 13+ ReduceSum (18+ ReduceMean): axes as an input
        axes = g.const(reduce.input[1])
        return None if axes is None else tuple(int(a) for a in axes.ravel())
    axes = attrs(reduce).get("axes")
    return None if axes is None else tuple(int(a) for a in axes)


def mean_of(g: GraphIndex, shapes: dict, name: str) -> tuple[str, onnx.NodeProto, onnx.NodeProto | None] | None:
    """(x, the reduction, the Mul/Div scaling it or None) where ``name`` is the mean of x over some axes:
    ReduceMean(x), or ReduceSum(x) times 1/N (or divided by N) for the N elements it sums."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "ReduceMean":
        return (node.input[0], node, None) if reduced_axes(g, node) is not None else None
    if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    sum_at = 0 if node.op_type == "Div" else next((k for k in (0, 1) if scalar(g, node.input[1 - k])), None)
    if sum_at is None:
        return None
    reduce, scale = g.producer.get(node.input[sum_at]), scalar(g, node.input[1 - sum_at])
    if reduce is None or reduce.op_type != "ReduceSum" or not scale:
        return None
    axes, dims = reduced_axes(g, reduce), shapes.get(reduce.input[0])
    if not axes or not dims or any(dims[a] is None for a in axes):
        return None
    count = float(np.prod([dims[a] for a in axes]))
    if not np.isclose(scale if node.op_type == "Div" else 1.0 / scale, count, rtol=1e-5):
        return None
    return reduce.input[0], reduce, node


def centered(g: GraphIndex, x: str, mean: str) -> str | None:
    """The output of a Sub(x, mean carried to x's shape through Reshape/Expand/Unsqueeze), if the graph has one."""
    frontier, seen = [mean], set()
    while frontier:
        name = frontier.pop()
        seen.add(name)
        for reader in g.readers(name):
            if reader.op_type == "Sub" and list(reader.input) == [x, name]:
                return reader.output[0]
            if reader.op_type in BROADCASTS and reader.input[0] == name and reader.output[0] not in seen:
                frontier.append(reader.output[0])
    return None
