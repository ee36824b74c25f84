"""Power-of-two int8 scales (the DPU's fix-point positions): the clip-free one and the finer ones below it.

Both the weights' scale (``schemes.pow2_weight_scale``) and ``mse`` calibration for a power-of-two target
(``mse_ranges.pow2_mse_range``) choose among these by int8 error; they sit below both so neither imports
the other (schemes imports calibration, which imports mse_ranges).
"""

from __future__ import annotations

import math


def clip_free_scale(absmax: float, qmax: int = 127) -> float:
    """The smallest power of two s with absmax / s <= qmax (1.0 for an empty or non-finite range)."""
    if not absmax > 0 or not math.isfinite(absmax):
        return 1.0
    return float(2.0 ** math.ceil(math.log2(absmax / qmax)))


def candidate_scales(absmax: float, finer: int, qmax: int = 127) -> list[float]:
    """The clip-free power-of-two scale for ``absmax`` and the ``finer`` ones below it, coarsest first."""
    coarsest = clip_free_scale(absmax, qmax)
    return [coarsest / 2**step for step in range(finer + 1)]
