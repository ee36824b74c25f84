"""The polynomial in front of a Tanh (GELU's tanh form) computed on its input clipped where the Tanh has saturated.

``0.5·x·(1 + tanh(k·(x + c·x³)))``, as flax and GPT-2 style exports write GELU, carries x³ through the graph:
after Magika's Conv (x up to ±334) the cubic spans ±1.7e6, and on an int8 grid that wide every value under ~60
is zero, so the Tanh reads 0 and the GELU halves its input (its output lost 88 % of its norm on tpu). Clip(x, −L, L)
in front of the polynomial changes nothing in float32: beyond L the polynomial is at least 10 in size with the
sign of x, where tanh is exactly ±1.0, as it is at ±L. L is the smallest candidate for which that holds,
checked by evaluating the polynomial in float32 out to the largest float; the product with x keeps the unclipped x.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex
from lepton_cli.model.op_traits import opset

_ARITHMETIC: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Mul": np.multiply,
    "Add": np.add,
    "Sub": np.subtract,
    "Div": np.divide,
    "Pow": np.power,
}
SATURATED = 10.0  # |u| >= 10: tanh(u) is 1 - 4e-9, exactly 1.0 in float32 with room for any rounding of u
CLIP_BOUNDS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # the first that saturates is used
# where the check evaluates the polynomial beyond L: every binade up to float32's largest value
_BEYOND = np.concatenate([np.geomspace(1.0, 3e38, 4000, dtype=np.float64), [np.inf]])


def _scalar(g: GraphIndex, name: str) -> np.ndarray | None:
    """A float32 scalar constant (the check evaluates in float32: other precisions are left alone)."""
    value = g.const(name)
    if value is None or value.size != 1 or value.dtype != np.float32:
        return None
    return value.reshape(())


def _cone(g: GraphIndex, tanh: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]] | None:
    """(x, the nodes computing the Tanh's input from x alone): element-wise arithmetic on scalar constants and
    tensors only the cone reads, back to the one tensor something else reads too."""
    cone: list[onnx.NodeProto] = []
    inside = {id(tanh)}
    # readers before producers: a node joins once all its readers have
    for node in reversed(g.graph.node[: g.position(tanh)]):
        out = node.output[0]
        readers = g.readers(out)
        if node.op_type not in _ARITHMETIC or len(node.input) != 2 or out in g.outputs or not readers:
            continue
        if all(id(r) in inside for r in readers) and g.uses[out] == len(readers):
            cone.append(node)
            inside.add(id(node))
    produced = {n.output[0] for n in cone}
    leaves = {i for n in cone for i in n.input if i not in produced and _scalar(g, i) is None}
    if len(leaves) != 1 or tanh.input[0] not in produced:
        return None
    return leaves.pop(), cone


def _evaluate(g: GraphIndex, x: str, nodes: list[onnx.NodeProto], u: str, values: np.ndarray) -> np.ndarray:
    """u as float32 arithmetic on ``values`` for x, in the graph's order of operations."""
    with np.errstate(all="ignore"):  # out past float32's range the values are inf, as in the graph
        known = {x: values.astype(np.float32)}
        for node in sorted(nodes, key=g.position):
            a, b = (known[i] if i in known else _scalar(g, i) for i in node.input)
            known[node.output[0]] = _ARITHMETIC[node.op_type](a, b).astype(np.float32)
    return known[u]


def _clip_bound(g: GraphIndex, x: str, nodes: list[onnx.NodeProto], u: str) -> float | None:
    """The smallest L beyond which u keeps one sign on each side and |u| >= SATURATED, out to infinity."""
    for bound in CLIP_BOUNDS:
        for side in (1.0, -1.0):
            values = _evaluate(g, x, nodes, u, side * np.concatenate([[bound], bound * _BEYOND]))
            if not np.all(np.abs(values) >= SATURATED) or len(set(np.sign(values).tolist())) != 1:
                break
        else:
            return bound
    return None


def clip_saturated_tanh_inputs(model: onnx.ModelProto) -> int:
    """Insert, in place, Clip(x, −L, L) in front of each polynomial of x a Tanh reads, where exact; how many."""
    g, names = GraphIndex(model.graph), FreshNames(model)
    clipped = 0
    for tanh in [n for n in model.graph.node if n.op_type == "Tanh"]:
        found = _cone(g, tanh)
        if found is None or any(n.op_type == "Pow" and _scalar(g, n.input[0]) is not None for n in found[1]):
            continue  # c ** x is not a polynomial in x
        x, nodes = found
        bound = _clip_bound(g, x, nodes, tanh.input[0])
        if bound is None:
            continue
        out = names.fresh(x + "_clipped")
        if opset(model) >= 11:
            low = g.add_initializer(names.fresh(x + "_clip_low"), np.array(-bound, np.float32))
            high = g.add_initializer(names.fresh(x + "_clip_high"), np.array(bound, np.float32))
            clip = helper.make_node("Clip", [x, low, high], [out], name=names.fresh(out))
        else:
            clip = helper.make_node("Clip", [x], [out], name=names.fresh(out), min=-bound, max=bound)
        for node in nodes:
            g.replace_input(node, x, out)
        g.insert(min(g.position(n) for n in nodes), clip)
        clipped += 1
    return clipped
