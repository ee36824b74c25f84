"""Feed-forward equalisation through GELU: the hidden channels' int8 ranges evened out, exactly in float.

In a BERT-style feed-forward block ``W2 · gelu(W1 · y + b1)`` a few of the hidden channels reach 4-20x the median
one (all-MiniLM-L6: 20x in its first layer), so one int8 scale per tensor leaves most of them a few levels where the
second projection reads them. GELU is ``x · Φ(x)``, written by exporters as ``x · (erf(x / √2) + 1) · 0.5``: with
``x = d · x'`` it is ``d · (x' · Φ(d · x'))``. So the first projection's output channel ``c`` is divided by ``d_c``
(its weight columns and bias), the gate's ``Div(x, √2)`` (or ``Mul(x, 1/√2)``) takes ``d`` back with a per-channel
constant, and the second projection's input rows are multiplied by ``d``. ``d`` evens out the hidden channels' ranges
before and after the GELU (activation_equalize.choose_scales). The channels are the tensors' last axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.activation_equalize import choose_scales
from lepton_cli.passes._quantize.residual_scaling import dimension_absmax
from lepton_cli.passes._quantize.weight_layers import WeightLayer, from_rows, load, store, to_rows, weight_layers

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers
from lepton_cli.pipeline.equivalence import compare_outputs
from lepton_cli.pipeline.registry import Exactness


@dataclass
class Block:
    """One feed-forward block: ``second(gelu(first))`` with the GELU written out around an Erf."""

    first: WeightLayer  # writes x (its bias, or the Add of a [D] bias after it, scaled with it)
    gate: onnx.NodeProto  # Div(x, c) or Mul(x, c) feeding the Erf: its constant becomes per channel
    second: WeightLayer  # reads gelu(x): input rows scaled
    hidden: str  # x
    activation: str  # gelu(x), as the second projection reads it


def _scalar(g: GraphIndex, name: str) -> bool:
    value = g.const(name)
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) > 0


def _x(g: GraphIndex, layer: WeightLayer) -> str:
    """The first projection's biased output: its own, or that of the MatMul's bias Add."""
    out = layer.node.output[0]
    if layer.kind == "matmul" and layer.bias is not None:
        return g.readers(out)[0].output[0]
    return out


def _gelu(g: GraphIndex, x: str) -> tuple[onnx.NodeProto, str] | None:
    """(the gate's scaling node, the GELU's output) when ``x`` is read only by ``x · (erf(x·c) + 1) · 0.5``."""
    readers = g.readers(x)
    gate = next(
        (n for n in readers if n.op_type in ("Div", "Mul") and n.input[0] == x and _scalar(g, n.input[1])), None
    )
    product = next((n for n in readers if n.op_type == "Mul" and n is not gate), None)
    if gate is None or product is None or len(readers) != 2:
        return None
    erf = g.only_reader(gate.output[0])
    plus = g.only_reader(erf.output[0]) if erf is not None and erf.op_type == "Erf" else None
    if plus is None or plus.op_type != "Add" or plus.output[0] not in product.input:
        return None
    if g.only_reader(plus.output[0]) is not product:
        return None
    out = product.output[0]
    half = g.only_reader(out)
    while half is not None and half.op_type == "Mul" and any(_scalar(g, i) for i in half.input):
        out, half = half.output[0], g.only_reader(half.output[0])
    return gate, out


def find_blocks(model: onnx.ModelProto) -> list[Block]:
    """Every dense -> GELU(erf) -> dense block whose weights only it reads (the gate's constant gets a copy)."""
    g = GraphIndex(model.graph)
    layers = [layer for layer in weight_layers(model) if layer.kind != "conv"]
    by_node = {layer.node.name: layer for layer in layers}
    blocks = []
    for first in layers:
        x = _x(g, first)
        found = _gelu(g, x)
        second = g.only_reader(found[1]) if found else None
        layer = by_node.get(second.name) if second is not None else None
        if found is None or layer is None or layer.node.input[0] != found[1] or x in g.outputs:
            continue
        blocks.append(Block(first, found[0], layer, x, found[1]))
    return blocks


def _apply(model: onnx.ModelProto, g: GraphIndex, block: Block, d: np.ndarray) -> None:
    first, second = block.first, block.second
    weight = load(model, first.weight)
    store(model, first.weight, from_rows(first, to_rows(first, weight) / d[:, None], weight.shape))
    if first.bias is not None:
        store(model, first.bias, load(model, first.bias) / d)
    weight = load(model, second.weight)
    store(model, second.weight, from_rows(second, to_rows(second, weight) * d[None, :], weight.shape))
    c = float(g.const(block.gate.input[1]).reshape(-1)[0])
    per_channel = c / d if block.gate.op_type == "Div" else c * d  # x' / (c / d) = x / c; x' · (c · d) = x · c
    g.set_input(block.gate, 1, g.set_const(block.gate.input[1], per_channel.astype(np.float32)))


def equalized(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, int]:
    """(``model`` with its GELU blocks equalised on ``feeds``, how many were), or ``model`` itself and 0 when none
    gains or the rewritten model does not reproduce the source's outputs."""
    blocks = find_blocks(model)
    if not blocks or not feeds:
        return model, 0
    ranges = dimension_absmax(model, sorted({t for b in blocks for t in (b.hidden, b.activation)}), feeds)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g, count = GraphIndex(result.graph), 0
    for block in find_blocks(result):
        d = choose_scales({t: ranges[t] for t in (block.hidden, block.activation) if t in ranges})
        if d is not None:
            _apply(result, g, block, d.astype(np.float64))
            count += 1
    drop_unused_initializers(result)
    # as fuse's rewrites are judged: within 1e-4 of each output's scale, or of ONNX Runtime's own float noise
    if count == 0 or not compare_outputs(model, result, feeds[:2], Exactness("tolerance", 1e-4, 1e-7)).ok:
        return model, 0
    return result, count
