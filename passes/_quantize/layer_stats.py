"""Second-order statistics of each weight layer's inputs on calibration data, streamed sample by sample.

For ``y[o] = rows[o] · patch``, the layer's output error from a weight change ``d`` is ``d · patch``;
over calibration data its mean is ``d · mean`` and its mean square ``d · gram · d``. Bias correction
needs ``mean``, rounding optimisation ``gram``: one forward pass of the float model gives both for
every layer at once, holding one sample's activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from lepton_cli.passes._quantize.sensitivity import tensor_runs
from lepton_cli.passes._quantize.weight_layers import WeightLayer, weight_layers

from lepton_cli.model.op_traits import attr


@dataclass
class LayerStats:
    mean: np.ndarray  # [groups, in_per_group]: mean input patch
    gram: np.ndarray  # [groups, in_per_group, in_per_group]: mean outer product of patches
    positions: int  # patches averaged for ``mean``
    absmax: np.ndarray  # [groups, in_per_group]: largest magnitude seen (SmoothQuant's activation range)


def patches(layer: WeightLayer, x: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
    """The layer's input as [groups, in_per_group, positions] columns (im2col for Conv)."""
    if layer.kind != "conv":
        return x.reshape(-1, x.shape[-1]).T[None].astype(np.float64)
    if x.ndim != 4:
        raise ValueError("only 2-D convolutions")
    kh, kw = weight_shape[2:]
    pads = list(attr(layer.node, "pads", [0, 0, 0, 0]))
    sh, sw = list(attr(layer.node, "strides", [1, 1]))
    dh, dw = list(attr(layer.node, "dilations", [1, 1]))
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = np.lib.stride_tricks.sliding_window_view(x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = windows.shape[:4]
    g = layer.groups
    cols = windows.reshape(n, g, c // g, ho, wo, kh, kw).transpose(1, 2, 5, 6, 0, 3, 4)
    return cols.reshape(g, (c // g) * kh * kw, n * ho * wo).astype(np.float64)


def collect(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    layers: list[WeightLayer] | None = None,
    *,
    max_positions: int = 2048,
    seed: int = 0,
    gram: bool = True,
) -> dict[str, LayerStats]:
    """Per layer name: input statistics of the float ``model`` over ``feeds``.

    ``gram`` uses at most ``max_positions`` random patches per sample (a wide first layer has thousands;
    the Gram matrix converges long before), ``mean`` every patch. ``gram=False`` (SmoothQuant reads only
    ``absmax``): no Gram matrices, which for a transformer's 1536-wide FFN inputs are 19 MB each."""
    layers = weight_layers(model) if layers is None else layers
    inits = {i.name: i for i in model.graph.initializer}
    names = [layer.node.input[0] for layer in layers]
    rng = np.random.default_rng(seed)
    sums: dict[str, list] = {}
    for values in tensor_runs(model, names, list(feeds), graph_outputs=True):
        for layer in layers:
            if layer.node.input[0] not in values:  # not a float tensor of this model: no statistics
                continue
            cols = patches(layer, np.asarray(values[layer.node.input[0]]), tuple(inits[layer.weight].dims))
            sub = (
                cols
                if cols.shape[2] <= max_positions
                else cols[:, :, rng.choice(cols.shape[2], max_positions, replace=False)]
            )
            acc = sums.setdefault(layer.name, [0.0, 0.0, 0, 0, 0.0])
            acc[0] = acc[0] + cols.sum(axis=2)
            if gram:
                acc[1] = acc[1] + np.matmul(sub, sub.transpose(0, 2, 1))
            else:  # [groups, 0, 0]: the statistics keep their shape, with nothing in the matrix nobody reads
                acc[1] = np.zeros((cols.shape[0], 0, 0))
            acc[2] += cols.shape[2]
            acc[3] += sub.shape[2]
            acc[4] = np.maximum(acc[4], np.abs(cols).max(axis=2))
    return {
        name: LayerStats(total / max(count, 1), gram / max(gram_count, 1), count, absmax)
        for name, (total, gram, count, gram_count, absmax) in sums.items()
    }
