"""Empirical bias correction per output channel (Nagel et al. 2019; NNCF's fast bias correction).

Rounding a layer's weights shifts the mean of its outputs: ``E[(W_q - W) · patch] = (W_q - W) ·
mean_patch``, per output channel, measured on the calibration data (ReLU-gated inputs have a
non-zero mean, so rounding errors that cancel on average over weights do not over activations).
Subtracting it from the bias removes that systematic error; the noise around it remains.
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._quantize.layer_stats import LayerStats
from lepton_cli.passes._quantize.weight_layers import Grid, WeightLayer, load, store, to_rows


def output_shift(rows: np.ndarray, quantized_rows: np.ndarray, stats: LayerStats) -> np.ndarray:
    """Mean output error per output channel of the quantized weights on the data ``stats`` came from."""
    groups = stats.mean.shape[0]
    delta = (quantized_rows - rows).astype(np.float64).reshape(groups, -1, rows.shape[1])
    return np.einsum("goi,gi->go", delta, stats.mean).reshape(-1)


def correct(
    model: onnx.ModelProto, layer: WeightLayer, reference_rows: np.ndarray, grid: Grid, stats: LayerStats
) -> float | None:
    """Fold the mean output error of the weights ORT will store into the layer's bias (added when
    missing); returns the largest shift relative to the channel's output scale, None when skipped."""
    weight = load(model, layer.weight)
    quantized = grid.quantize(to_rows(layer, weight).astype(np.float64))
    shift = output_shift(reference_rows, quantized, stats)
    if layer.bias is None:
        if layer.kind == "matmul":
            return None  # no Add to fold into; a new one would be an op ORT does not fuse
        name = layer.weight + "_corrected_bias"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(len(shift), np.float32), name))
        if len(layer.node.input) < 3:
            layer.node.input.append("")  # Gemm's C is optional: the slot exists only when given
        layer.node.input[2] = name
        layer.bias = name
    bias = load(model, layer.bias).astype(np.float64)
    store(model, layer.bias, bias - shift)
    scale = np.sqrt(
        np.maximum(np.einsum("oi,oi->o", reference_rows, reference_rows), 1e-30)
        * max(float(np.mean(np.diagonal(stats.gram, axis1=1, axis2=2))), 1e-30)
    )
    return float(np.max(np.abs(shift) / scale))
