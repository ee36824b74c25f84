"""MSE calibration: per tensor, the int8 range that minimises the expected quantization error.

Library checked: ONNX Runtime's calibrators offer MinMax, Percentile (one fixed percentile for every
tensor), Entropy (KL) and Distribution, not this. NVIDIA's pytorch-quantization has it
(``HistogramCalibrator.compute_amax(method="mse")``) but is a PyTorch library, not a dependency here.
The histograms come from ORT's own ``HistogramCollector`` (signed values, as for asymmetric
percentile); only the choice of range is ours.

For a histogram of a tensor's values and a candidate range [lo, hi] (always holding 0, as ORT's
scale/zero-point computation does), the expected squared error is
    sum over bins of count * (rounding noise step^2 / 12 inside, squared clipping distance outside),
with step = (hi - lo) / (levels - 1). The candidates shrink the observed minimum and maximum
independently by factors in ``SHRINK``; the pair with the smallest error wins. Post-ReLU tensors
(minimum >= 0) keep lo = 0. For a power-of-two target (the DPU) the candidates are the symmetric grids
±127·2^k from the clip-free one down three steps, so the range is one of its fix-points, not a range
the power-of-two rounding then widens by up to 2x.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lepton_cli.passes._quantize.pow2_grid import candidate_scales
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData

SHRINK = np.concatenate([np.linspace(1.0, 0.5, 26), np.linspace(0.48, 0.1, 20)])  # 1.0 = min/max (no clipping)
LEVELS = 256  # int8
FLOAT32_MAX = float(np.finfo(np.float32).max)


def mse_range(
    hist: np.ndarray, edges: np.ndarray, low: float, high: float, levels: int = LEVELS
) -> tuple[float, float]:
    """(lo, hi) minimising the expected int8 quantization MSE of values distributed as ``hist``."""
    counts = hist.astype(np.float64)
    if counts.sum() <= 0 or not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return float(min(low, 0.0)), float(max(high, 0.0))
    centres = (edges[:-1].astype(np.float64) + edges[1:]) / 2
    los = np.array([0.0]) if low >= 0 else min(low, 0.0) * SHRINK
    his = np.array([0.0]) if high <= 0 else max(high, 0.0) * SHRINK
    lo = np.repeat(los, len(his))[:, None]  # every (lo, hi) pair, one row each
    hi = np.tile(his, len(los))[:, None]
    step = (hi - lo) / (levels - 1)
    below, above = centres[None, :] < lo, centres[None, :] > hi
    error = np.where(below, (centres[None, :] - lo) ** 2, np.where(above, (centres[None, :] - hi) ** 2, step**2 / 12))
    best = int(np.argmin(error @ counts))
    return float(lo[best, 0]), float(hi[best, 0])


def pow2_mse_range(
    hist: np.ndarray, edges: np.ndarray, low: float, high: float, qmax: int = 127
) -> tuple[float, float]:
    """(-127 s, 127 s) for the power of two s with the least expected symmetric int8 error of ``hist``'s values."""
    absmax = max(abs(low), abs(high))
    counts = hist.astype(np.float64)
    if counts.sum() <= 0 or not np.isfinite(absmax) or absmax <= 0:
        return float(min(low, 0.0)), float(max(high, 0.0))
    centres = (edges[:-1].astype(np.float64) + edges[1:]) / 2
    scales = np.array(candidate_scales(absmax, 3, qmax))[:, None]
    outside = np.maximum(np.abs(centres)[None, :] - qmax * scales, 0.0)
    error = np.where(outside > 0, outside**2, scales**2 / 12) @ counts
    best = float(scales[int(np.argmin(error)), 0])
    return -qmax * best, qmax * best


def mse_tensors_data(histograms: dict[str, Any], levels: int = LEVELS, power_of_two: bool = False) -> TensorsData:
    """ORT ranges from ``HistogramCollector.histogram_dict`` entries of signed values (hist, edges, min,
    max, threshold), labelled Percentile: the histogram calibrator they came from, which
    ``quantize_static`` checks against its ``calibrate_method``."""
    ranges = {}
    for name, (hist, edges, low, high, *_rest) in histograms.items():
        args = (np.asarray(hist), np.asarray(edges), float(low), float(high))
        lo, hi = pow2_mse_range(*args) if power_of_two else mse_range(*args, levels)
        # an attention mask's -3.4e38 on a power-of-two grid: 127 * 2^121 lies past float32's largest value
        lo, hi = np.clip([lo, hi], -FLOAT32_MAX, FLOAT32_MAX)
        ranges[name] = TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
    return TensorsData(CalibrationMethod.Percentile, ranges)
