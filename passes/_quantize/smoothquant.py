"""SmoothQuant (Xiao et al. 2023): move activation outliers of MatMul/Gemm inputs into their weights.

A per-tensor activation scale is set by its largest channel; a few outlier channels (typical
after a LayerNorm in transformers) leave the others a handful of int8 levels. With ``s_j =
max|x_j|^α / max|W_j|^(1-α)`` per input channel, ``x / s`` and ``s W`` compute the same product with
flatter activations and weights that per-channel scales absorb. The ``1/s`` is folded into the
per-channel affine constants that produce ``x`` (a LayerNorm's ``Mul(gamma)`` then ``Add(beta)``,
through shape-only Reshapes that keep the channel axis last), so no op is added and the float
model's outputs are unchanged. Layers whose input has no such producer are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._quantize.layer_stats import LayerStats
from lepton_cli.passes._quantize.weight_layers import WeightLayer, from_rows, load, store, to_rows

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


def smooth(model: onnx.ModelProto, layer: WeightLayer, stats: LayerStats, alpha: float) -> bool:
    """Migrate ``layer``'s input outliers into its weights in place; False when no producer can absorb 1/s."""
    if layer.kind == "conv" or stats.absmax.shape[0] != 1:
        return False
    weight = load(model, layer.weight)
    rows = to_rows(layer, weight).astype(np.float64)
    chain = _affine_producers(model, layer.node.input[0], rows.shape[1])
    if chain is None:
        return False
    act = np.maximum(stats.absmax[0], 1e-5)
    wmax = np.maximum(np.abs(rows).max(axis=0), 1e-5)
    scale = np.clip(act**alpha / wmax ** (1 - alpha), 1e-3, 1e3)
    for name, _ in chain:  # both Add(beta) and Mul(gamma) lie before the Gemm: each is divided by s
        store(model, name, load(model, name) / scale)
    store(model, layer.weight, from_rows(layer, rows * scale[None, :], weight.shape))
    return True
