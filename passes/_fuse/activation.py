"""Elementwise folds for MobileNetV3 / PP-LCNet style models: hard-swish and scalar affine blocks.

Library checked first: onnxsim 0.8 (and its onnxoptimizer fork) folds constants and BatchNorm but
leaves a decomposed hard-swish ``x * Clip(x + 3, 0, 6) / 6`` as four elementwise ops, and ONNX
Runtime's graph optimiser (1.32, all levels) has no hard-swish fusion either. PaddlePaddle exports
(PP-OCRv4 det/rec) write every activation that way, followed by PP-LCNetV3's learnable affine block
``y * s + b`` (scalar s, b): six full passes over each activation map. Measured on PP-OCRv4 det at
640x640 (ORT CPU EP, 1 thread, AMD EPYC, ORT profiling): Add, Mul, Clip and Div took 36% of fp32 latency.
With these folds, benchmarks/bench_fuse.py measured det at 0.81x and rec at 0.77x the source's latency.

* ``x * Clip(x + 3, 0, 6) / 6``  ->  ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))``: the same function
  (HardSigmoid = clip(x/6 + 1/2, 0, 1)) in two ops, both in every opset we target. Not the ``HardSwish``
  op (opset 14): ORT's HardSwish kernel ran 1.29 ms on a 1x16x320x320 map against 0.89 ms for
  HardSigmoid + Mul (MLAS-vectorised), and 2.65 ms for the decomposed form.
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
from onnx import helper

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers

HARD_SIGMOID_ALPHA, HARD_SIGMOID_BETA = 1.0 / 6.0, 0.5


def _scalar(g: GraphIndex, name: str) -> float | None:
    value = g.const(name)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(value.reshape(()))


def _other(node: onnx.NodeProto, name: str) -> str | None:
    if len(node.input) != 2 or name not in node.input or node.input[0] == node.input[1]:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Rewriter:
    """Use-def maps over a graph, kept current while nodes are replaced."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = GraphIndex(model.graph)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and self.g.sole_use(tensor) else None

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        if node.op_type != "Clip":
            return None
        if len(node.input) == 1:  # opset < 11: attributes
            a = _attrs(node)
            return float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        lo = _scalar(self.g, node.input[1]) if len(node.input) > 1 and node.input[1] else -np.inf
        hi = _scalar(self.g, node.input[2]) if len(node.input) > 2 and node.input[2] else np.inf
        return None if lo is None or hi is None else (lo, hi)


def _match_hard_swish(r: _Rewriter, add: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """(x, output, nodes to remove) for x * Clip(x + 3, 0, 6) / 6 in any of its usual orders."""
    if add.op_type != "Add":
        return None
    x = next((i for i in add.input if _scalar(r.g, _other(add, i) or "") == 3.0), None)
    clip = r.only_consumer(add.output[0]) if x is not None else None
    if clip is None or r.clip_bounds(clip) != (0.0, 6.0):
        return None
    nxt = r.only_consumer(clip.output[0])
    if nxt is None:
        return None
    if nxt.op_type == "Mul" and _other(nxt, clip.output[0]) == x:  # (x * clip) / 6  or  (x * clip) * (1/6)
        last = r.only_consumer(nxt.output[0])
        if last is not None and _divides_by_six(r, last, nxt.output[0]):
            return x, last.output[0], [add, clip, nxt, last]
    if _divides_by_six(r, nxt, clip.output[0]):  # x * (clip / 6)
        last = r.only_consumer(nxt.output[0])
        if last is not None and last.op_type == "Mul" and _other(last, nxt.output[0]) == x:
            return x, last.output[0], [add, clip, nxt, last]
    return None


def _divides_by_six(r: _Rewriter, node: onnx.NodeProto, tensor: str) -> bool:
    if node.op_type == "Div" and len(node.input) == 2 and node.input[0] == tensor:
        return _scalar(r.g, node.input[1]) == 6.0
    if node.op_type == "Mul":
        factor = _scalar(r.g, _other(node, tensor) or "")
        return factor is not None and abs(factor - 1.0 / 6.0) < 1e-7
    return False


def fuse_hard_swish(model: onnx.ModelProto) -> int:
    """Rewrite decomposed hard-swish as Mul(x, HardSigmoid(x)). Returns how many."""
    r = _Rewriter(model)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # a removed node's first output -> what replaces it
    removed: set[str] = set()  # nodes are keyed by their first output (unique in an SSA graph)
    for node in model.graph.node:
        found = _match_hard_swish(r, node)
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
    _replace_nodes(model, nodes)
    return len(replaced)


def _replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    copies = []
    for node in nodes:  # copies: clearing the repeated field releases the originals
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    drop_unused_initializers(model)


def _conv_parts(r: _Rewriter, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    if conv.op_type != "Conv" or len(conv.input) < 2:
        return None
    weight = r.g.const(conv.input[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return None
    has_bias = len(conv.input) > 2 and conv.input[2]
    bias = r.g.const(conv.input[2]) if has_bias else np.zeros(weight.shape[0], weight.dtype)
    return (weight, bias) if bias is not None else None


def _set_conv(r: _Rewriter, conv: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray) -> None:
    conv.input[1] = r.g.set_const(conv.input[1], weight.astype(weight.dtype))
    name = r.g.set_const(conv.input[2] if len(conv.input) > 2 and conv.input[2] else conv.output[0] + "_bias", bias)
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = name


def _unpadded(conv: onnx.NodeProto) -> bool:
    a = _attrs(conv)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto == "VALID" or (auto == "NOTSET" and not any(a.get("pads", [])))


def _fold_into_next_conv(r: _Rewriter, node: onnx.NodeProto) -> bool:
    """Fold a scalar Mul/Add into the Conv that alone reads it (the Conv then reads the Mul/Add's input)."""
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
        return False
    conv = r.only_consumer(node.output[0])
    parts = _conv_parts(r, conv) if conv is not None and conv.input[0] == node.output[0] else None
    if parts is None:
        return False
    for source in node.input:
        value = _scalar(r.g, _other(node, source) or "")
        if value is None or r.g.const(source) is not None:
            continue
        weight, bias = parts
        if node.op_type == "Mul":
            _set_conv(r, conv, weight * np.asarray(value, weight.dtype), bias)
        elif _unpadded(conv):
            _set_conv(
                r,
                conv,
                weight,
                bias + np.asarray(value, weight.dtype) * weight.reshape(weight.shape[0], -1).sum(axis=1),
            )
        else:
            return False
        conv.input[0] = source
        return True
    return False


def _fold_into_hard_swish(r: _Rewriter, node: onnx.NodeProto) -> bool:
    """Mul(Mul(x, HardSigmoid(x)), s) with x = Conv(...) read only by the two: scale the Conv instead."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return False
    for inner_out in node.input:
        s = _scalar(r.g, _other(node, inner_out) or "")
        inner = r.producer.get(inner_out)
        if s is None or s == 0.0 or inner is None or inner.op_type != "Mul" or not r.g.sole_use(inner_out):
            continue
        hsig = next(
            (
                r.producer.get(i)
                for i in inner.input
                if r.producer.get(i) is not None and r.producer[i].op_type == "HardSigmoid"
            ),
            None,
        )
        if hsig is None or _other(inner, hsig.output[0]) != hsig.input[0] or not r.g.sole_use(hsig.output[0]):
            continue
        x = hsig.input[0]
        conv = r.producer.get(x)
        parts = _conv_parts(r, conv) if conv is not None else None
        readers = sorted(n.output[0] for n in r.consumers.get(x, []))
        if parts is None or x in r.g.outputs or readers != sorted([hsig.output[0], inner.output[0]]):
            continue
        weight, bias = parts
        _set_conv(r, conv, weight * np.asarray(s, weight.dtype), bias * np.asarray(s, bias.dtype))
        a = _attrs(hsig)
        for attr in list(hsig.attribute):
            hsig.attribute.remove(attr)
        hsig.attribute.extend(
            [
                helper.make_attribute("alpha", float(a.get("alpha", 0.2)) / s),
                helper.make_attribute("beta", float(a.get("beta", 0.5))),
            ]
        )
        inner.output[0] = node.output[0]
        return True
    return False


def fold_scalar_affine(model: onnx.ModelProto) -> int:
    """Fold scalar Mul/Add blocks into a neighbouring Conv (see the module docstring). Returns folds done."""
    folds = 0
    for fold in (_fold_into_next_conv, _fold_into_hard_swish):
        while True:  # one fold per scan: the use-def maps are rebuilt after each (graphs are small)
            r = _Rewriter(model)
            node = next((n for n in model.graph.node if fold(r, n)), None)
            if node is None:
                break
            model.graph.node.remove(node)
            folds += 1
    if folds:
        drop_unused_initializers(model)
    return folds
