"""SmoothQuant (Xiao et al. 2023): move activation outliers of MatMul/Gemm inputs into their weights.

A per-tensor activation scale is set by its largest channel; a few outlier channels (typical
after a LayerNorm in transformers) leave the others a handful of int8 levels. With ``s_j =
max|x_j|^α / max|W_j|^(1-α)`` per input channel, ``x / s`` and ``s W`` compute the same product with
flatter activations and weights that per-channel scales absorb. The ``1/s`` is folded into the
per-channel affine constants that produce ``x`` (a LayerNorm's ``Mul(gamma)`` then ``Add(beta)``,
through shape-only Reshapes that keep the channel axis last), so no op is added and the float
model's outputs are unchanged. Where nothing can absorb it (a post-LN encoder's LayerNorm output also
feeds the residual; a Gelu output), a ``Mul(x, 1/s)`` is inserted on this layer's input alone and stays
float: one per-channel multiply of the activations, which the int8 model then quantizes flattened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.layer_stats import LayerStats
from lepton_cli.passes._quantize.weight_layers import WeightLayer, from_rows, load, store, to_rows

from lepton_cli.model.graph_edit import FreshNames, GraphIndex

PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # the channel axis stays last: checked by shape


def _affine_producers(model: onnx.ModelProto, tensor: str, channels: int) -> list[tuple[str, str]] | None:
    """[(initializer, op)] of the Add(beta) and Mul(gamma) producing ``tensor``, each value read once."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    found: list[tuple[str, str]] = []
    while tensor in producer and readers.get(tensor, 0) == 1 and tensor not in outputs:
        node = producer[tensor]
        if node.op_type in PASS_THROUGH:
            tensor = node.input[0]
            continue
        if node.op_type not in ("Add", "Mul"):
            break
        const = [i for i in node.input if i in inits]
        data = [i for i in node.input if i not in inits]
        if len(const) != 1 or len(data) != 1 or list(inits[const[0]].dims) != [channels] or readers.get(const[0]) != 1:
            break
        found.append((const[0], node.op_type))
        if node.op_type == "Mul":
            return found  # the Mul scales everything before it: the chain ends here
        tensor = data[0]
    return None


@dataclass(frozen=True)
class Smoothed:
    layers: tuple[str, ...]  # the layers reading the smoothed input: one scale for all of them
    inserted: str | None  # the float Mul put on their input when no producer could absorb 1/s


def smooth(
    model: onnx.ModelProto, layers: list[WeightLayer], stats: LayerStats, alpha: float, insert: bool = False
) -> Smoothed | None:
    """Migrate the input outliers of ``layers`` (all reading one tensor, whose statistics ``stats`` are) into their
    weights in place, ``1/s`` folded into the producing affine constants or (only with ``insert``) one float ``Mul``
    that all of them read; None when they are left alone. One scale for the group: Q, K and V projections of
    one LayerNorm output share one Mul (as in the paper), not three."""
    if any(layer.kind == "conv" for layer in layers) or stats.absmax.shape[0] != 1:
        return None
    weights = [load(model, layer.weight) for layer in layers]
    rows = [to_rows(layer, weight).astype(np.float64) for layer, weight in zip(layers, weights)]
    chain = _affine_producers(model, layers[0].node.input[0], rows[0].shape[1]) if len(layers) == 1 else None
    if chain is None and not insert:
        return None
    act = np.maximum(stats.absmax[0], 1e-5)
    wmax = np.maximum(np.max([np.abs(r).max(axis=0) for r in rows], axis=0), 1e-5)
    scale = np.clip(act**alpha / wmax ** (1 - alpha), 1e-3, 1e3)
    inserted = _insert_scale(model, layers, (1.0 / scale).astype(np.float32)) if chain is None else None
    for name, _ in chain or []:  # both Add(beta) and Mul(gamma) lie before the Gemm: each is divided by s
        store(model, name, load(model, name) / scale)
    for layer, layer_rows, weight in zip(layers, rows, weights):
        store(model, layer.weight, from_rows(layer, layer_rows * scale[None, :], weight.shape))
    return Smoothed(tuple(layer.name for layer in layers), inserted)


def _insert_scale(model: onnx.ModelProto, layers: list[WeightLayer], inverse: np.ndarray) -> str:
    """``layers`` read ``Mul(x, inverse)`` (over the last axis, the channels) instead of ``x``; the Mul's name."""
    names = FreshNames(model)
    name = names.fresh(f"{layers[0].name}_smooth")
    index = GraphIndex(model.graph)
    constant = index.add_initializer(names.fresh(f"{name}_inverse"), inverse)
    mul = onnx.helper.make_node("Mul", [layers[0].node.input[0], constant], [names.fresh(f"{name}_out")], name=name)
    first = min(i for i, n in enumerate(model.graph.node) if n.name in {layer.name for layer in layers})
    index.insert(first, mul)
    for layer in layers:
        index.set_input(layer.node, 0, mul.output[0])
    return name
