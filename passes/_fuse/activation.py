"""Elementwise folds for hard-swish networks (MobileNetV3, PP-LCNet): hard-swish and scalar affine blocks.

* ``x * Clip(x + 3, 0, 6) / 6`` and ``HardSwish(x)``  ->  ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))``: the
  same function (HardSigmoid = clip(x/6 + 1/2, 0, 1)) in two ops, both in every opset we target; faster under ONNX
  Runtime than the ``HardSwish`` op (docs/decisions.md, "Fuse and layout").
* ``Conv(Mul(t, s))`` with a scalar s -> the Conv with weights * s: exact even with zero padding
  (s * 0 = 0).
* ``Conv(Add(t, b))`` with a scalar b and no padding -> the Conv's bias + b * sum(W): exact where every
  output reads only real inputs (a padded Conv would add b to its zero border too, so it is left alone).
* ``Mul(Mul(x, HardSigmoid(x)), s)`` where x comes from a Conv read by nothing else -> scale that Conv
  by s and divide HardSigmoid's alpha by s (the same function of the unscaled x).

All are exact in real arithmetic; float rounding differs by an ulp or so (the fuse pass's tolerance).
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._fuse.moments import scalar
from onnx import helper

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers, refill_nodes
from lepton_cli.model.op_traits import attrs

HARD_SIGMOID_ALPHA, HARD_SIGMOID_BETA = 1.0 / 6.0, 0.5


def _other(node: onnx.NodeProto, name: str) -> str | None:
    if len(node.input) != 2 or name not in node.input or node.input[0] == node.input[1]:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _clip_bounds(g: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    if node.op_type != "Clip":
        return None
    if len(node.input) == 1:  # opset < 11: attributes
        a = attrs(node)
        return float(a.get("min", -np.inf)), float(a.get("max", np.inf))
    lo = scalar(g, node.input[1]) if len(node.input) > 1 and node.input[1] else -np.inf
    hi = scalar(g, node.input[2]) if len(node.input) > 2 and node.input[2] else np.inf
    return None if lo is None or hi is None else (lo, hi)


def _match_hard_swish(g: GraphIndex, add: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """(x, output, nodes to remove) for x * Clip(x + 3, 0, 6) / 6 in any of its usual orders, or the HardSwish op."""
    if add.op_type == "HardSwish":  # PP-OCRv5's export: the op ORT runs slower, and no quantizer makes integer
        return add.input[0], add.output[0], [add]
    if add.op_type != "Add":
        return None
    x = next((i for i in add.input if scalar(g, _other(add, i) or "") == 3.0), None)
    clip = g.only_reader(add.output[0]) if x is not None else None
    if clip is None or _clip_bounds(g, clip) != (0.0, 6.0):
        return None
    nxt = g.only_reader(clip.output[0])
    if nxt is None:
        return None
    if nxt.op_type == "Mul" and _other(nxt, clip.output[0]) == x:  # (x * clip) / 6  or  (x * clip) * (1/6)
        last = g.only_reader(nxt.output[0])
        if last is not None and _divides_by_six(g, last, nxt.output[0]):
            return x, last.output[0], [add, clip, nxt, last]
    if _divides_by_six(g, nxt, clip.output[0]):  # x * (clip / 6)
        last = g.only_reader(nxt.output[0])
        if last is not None and last.op_type == "Mul" and _other(last, nxt.output[0]) == x:
            return x, last.output[0], [add, clip, nxt, last]
    return None


def _divides_by_six(g: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    if node.op_type == "Div" and len(node.input) == 2 and node.input[0] == tensor:
        return scalar(g, node.input[1]) == 6.0
    if node.op_type == "Mul":
        factor = scalar(g, _other(node, tensor) or "")
        return factor is not None and abs(factor - 1.0 / 6.0) < 1e-7
    return False


def fuse_hard_swish(model: onnx.ModelProto) -> int:
    """Rewrite decomposed hard-swish and the HardSwish op as Mul(x, HardSigmoid(x)). Returns how many."""
    g = GraphIndex(model.graph)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # a removed node's first output -> what replaces it
    removed: set[str] = set()  # nodes are keyed by their first output (unique in an SSA graph)
    for node in model.graph.node:
        found = _match_hard_swish(g, node)
        if found is None or any(n.output[0] in removed for n in found[2]):
            continue
        x, out, nodes = found
        base = nodes[0].name or out
        hsig = helper.make_node(
            "HardSigmoid",
            [x],
            [out + "__hsig"],
            name=base + "_hardsigmoid",
            alpha=HARD_SIGMOID_ALPHA,
            beta=HARD_SIGMOID_BETA,
        )
        mul = helper.make_node("Mul", [x, out + "__hsig"], [out], name=base + "_hardswish")
        replaced[nodes[-1].output[0]] = [hsig, mul]  # where the last node was: x is defined by then
        removed.update(n.output[0] for n in nodes)
    if not replaced:
        return 0
    nodes = []
    for node in model.graph.node:
        if node.output[0] in replaced:
            nodes.extend(replaced[node.output[0]])
        elif node.output[0] not in removed:
            nodes.append(node)
    refill_nodes(model, nodes)
    return len(replaced)


def _conv_parts(g: GraphIndex, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    if conv.op_type != "Conv" or len(conv.input) < 2:
        return None
    weight = g.const(conv.input[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return None
    has_bias = len(conv.input) > 2 and conv.input[2]
    bias = g.const(conv.input[2]) if has_bias else np.zeros(weight.shape[0], weight.dtype)
    return (weight, bias) if bias is not None else None


def _set_conv(g: GraphIndex, conv: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray) -> None:
    g.set_input(conv, 1, g.set_const(conv.input[1], weight.astype(weight.dtype)))
    name = g.set_const(conv.input[2] if len(conv.input) > 2 and conv.input[2] else conv.output[0] + "_bias", bias)
    while len(conv.input) < 3:
        conv.input.append("")
    g.set_input(conv, 2, name)


def _unpadded(conv: onnx.NodeProto) -> bool:
    a = attrs(conv)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto == "VALID" or (auto == "NOTSET" and not any(a.get("pads", [])))


def _fold_into_next_conv(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """Fold a scalar Mul/Add into the Conv that alone reads it (the Conv then reads the Mul/Add's input)."""
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
        return False
    conv = g.only_reader(node.output[0])
    parts = _conv_parts(g, conv) if conv is not None and conv.input[0] == node.output[0] else None
    if parts is None:
        return False
    for source in node.input:
        value = scalar(g, _other(node, source) or "")
        if value is None or g.const(source) is not None:
            continue
        weight, bias = parts
        if node.op_type == "Mul":
            _set_conv(g, conv, weight * np.asarray(value, weight.dtype), bias)
        elif _unpadded(conv):
            _set_conv(
                g,
                conv,
                weight,
                bias + np.asarray(value, weight.dtype) * weight.reshape(weight.shape[0], -1).sum(axis=1),
            )
        else:
            return False
        g.set_input(conv, 0, source)
        return True
    return False


def _fold_into_hard_swish(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """Mul(Mul(x, HardSigmoid(x)), s) with x = Conv(...) read only by the two: scale the Conv instead."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return False
    for inner_out in node.input:
        s = scalar(g, _other(node, inner_out) or "")
        inner = g.producer.get(inner_out)
        if s is None or s == 0.0 or inner is None or inner.op_type != "Mul" or not g.sole_use(inner_out):
            continue
        hsig = next(
            (
                g.producer.get(i)
                for i in inner.input
                if g.producer.get(i) is not None and g.producer[i].op_type == "HardSigmoid"
            ),
            None,
        )
        if hsig is None or _other(inner, hsig.output[0]) != hsig.input[0] or not g.sole_use(hsig.output[0]):
            continue
        x = hsig.input[0]
        conv = g.producer.get(x)
        parts = _conv_parts(g, conv) if conv is not None else None
        readers = sorted(n.output[0] for n in g.readers(x))
        if parts is None or x in g.outputs or readers != sorted([hsig.output[0], inner.output[0]]):
            continue
        weight, bias = parts
        _set_conv(g, conv, weight * np.asarray(s, weight.dtype), bias * np.asarray(s, bias.dtype))
        a = attrs(hsig)
        for attr in list(hsig.attribute):
            hsig.attribute.remove(attr)
        hsig.attribute.extend(
            [
                helper.make_attribute("alpha", float(a.get("alpha", 0.2)) / s),
                helper.make_attribute("beta", float(a.get("beta", 0.5))),
            ]
        )
        g.set_output(inner, 0, node.output[0])
        return True
    return False


def fold_scalar_affine(model: onnx.ModelProto) -> int:
    """Fold scalar Mul/Add blocks into a neighbouring Conv (see the module docstring). Returns folds done."""
    folds = 0
    for fold in (_fold_into_next_conv, _fold_into_hard_swish):
        g = GraphIndex(model.graph)
        while (node := next((n for n in model.graph.node if fold(g, n)), None)) is not None:
            g.remove(node)  # the folded Mul/Add: the Conv (or the hard-swish's Mul) now does its work
            folds += 1
    if folds:
        drop_unused_initializers(model)
    return folds
