"""Weight rounding optimised against each layer's float output (AdaRound, Nagel et al. 2020), in numpy.

Round-to-nearest minimises each weight's own error, not the layer's output error: with
``d = s (floor(w/s) + h) - w`` and the input Gram matrix ``G`` from calibration data, the output's
mean squared error is ``d G dᵀ`` per output channel, and choosing ``h ∈ {0, 1}`` per weight to lower
it is AdaRound's problem. Solved as the paper does: ``h = clip(sigmoid(v)(ζ-γ)+γ, 0, 1)``
relaxed, Adam on ``v`` against ``d G dᵀ + λ Σ(1 - |2h-1|^β)`` with β annealed so every ``h`` ends
at 0 or 1. The gradient of the quadratic is ``2 d G``: no torch, no activations kept, a few
hundred small matrix products per layer. Rows whose result is not better than round-to-nearest
keep round-to-nearest, so a layer's reconstruction error never rises.

The chosen values are written back as float weights already on ORT's grid (same per-channel
scale, the channel's largest weight pinned), so ORT's quantizer stores exactly this rounding.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from lepton_cli.passes._quantize.layer_stats import LayerStats
from lepton_cli.passes._quantize.weight_layers import Grid

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSettings:
    iterations: int = 300
    reg_weight: float = 0.01  # λ: the rounding regulariser against the (normalised) reconstruction error
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # share of iterations without the regulariser
    learning_rate: float = 0.05


def reconstruction_error(
    rows: np.ndarray, candidate: np.ndarray, stats: LayerStats, cross: np.ndarray | None = None
) -> np.ndarray:
    """Mean squared output error per output channel of ``candidate`` weights vs ``rows`` (``d G dᵀ``). With
    ``cross`` (``E[x_q x_fᵀ]``, ``stats.gram`` then ``E[x_q x_qᵀ]``): ``c G cᵀ - 2 c E[x_q x_fᵀ] rowsᵀ``, the error of
    ``candidate`` on quantized inputs against ``rows`` on float ones, less a constant per row."""
    groups = stats.gram.shape[0]
    if cross is None:
        delta = (candidate - rows).reshape(groups, -1, rows.shape[1])
        return np.sum(np.matmul(delta, stats.gram) * delta, axis=2).reshape(-1)
    c = candidate.reshape(groups, -1, rows.shape[1])
    quadratic = np.sum(np.matmul(c, stats.gram) * c, axis=2)
    return (quadratic - 2 * np.sum(c * _anchor(rows, cross), axis=2)).reshape(-1)


def _anchor(rows: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """``rows E[x_f x_qᵀ]`` per group: what ``candidate G`` is pulled towards (``rows G`` on float inputs)."""
    groups = cross.shape[0]
    return np.matmul(rows.reshape(groups, -1, rows.shape[1]), cross.transpose(0, 2, 1))


def _soft(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _single_thread_blas() -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread: the products here are small (at most a few thousand wide), and OpenBLAS's
    threads on a busy 2-core host made a 128x128 product 20x slower than one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a dependency: BLAS keeps its default threads
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def optimise_rounding(
    rows: np.ndarray,
    grid: Grid,
    stats: LayerStats,
    settings: AdaRoundSettings,
    deadline: float | None = None,
    *,
    cross: np.ndarray | None = None,
    pin: bool = True,
) -> np.ndarray:
    """Weights on ``grid`` (float values, [out, in]) with the rounding that lowers the layer's output error.
    ``cross``: fit on quantized inputs (``reconstruction_error``); ``pin``: each row's largest weight rounds to
    nearest, so ORT's quantizer derives the same scale from the result."""
    with _single_thread_blas():
        return _optimise(rows, grid, stats, settings, deadline, cross, pin)


def _optimise(
    rows: np.ndarray,
    grid: Grid,
    stats: LayerStats,
    settings: AdaRoundSettings,
    deadline: float | None,
    cross: np.ndarray | None,
    pin: bool,
) -> np.ndarray:
    rows = rows.astype(np.float64)
    scale = grid.scale[:, None]
    floor = np.floor(rows / scale)
    rest = np.clip(rows / scale - floor, 1e-4, 1 - 1e-4)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)  # h(v) = rest: start at the float weights
    groups = stats.gram.shape[0]
    gram = stats.gram
    anchor = None if cross is None else _anchor(rows, cross)  # None: (values - rows) G, as rounded before the cross
    # Normalise the quadratic so λ means the same for every layer: d G dᵀ per unit of s² and input power.
    norm = (scale.reshape(groups, -1, 1) ** 2) * max(float(np.mean(np.diagonal(gram, axis1=1, axis2=2))), 1e-30)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    warm = int(settings.iterations * settings.warmup)
    for step in range(settings.iterations):
        if deadline is not None and time.perf_counter() > deadline:
            break
        h = _soft(v)
        values = np.clip(floor + h, grid.qmin, grid.qmax) * scale
        if anchor is None:
            pulled = np.matmul((values - rows).reshape(groups, -1, rows.shape[1]), gram)  # matmul: BLAS (not einsum)
        else:
            pulled = np.matmul(values.reshape(groups, -1, rows.shape[1]), gram) - anchor
        grad_w = (2.0 * pulled / norm).reshape(rows.shape)
        grad_h = grad_w * scale
        if step >= warm:
            progress = (step - warm) / max(1, settings.iterations - warm)
            beta = settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + np.cos(np.pi * progress))
            centred = 2 * h - 1
            grad_h = grad_h - settings.reg_weight * beta * np.abs(centred) ** (beta - 1) * np.sign(centred) * 2
        sig = 1.0 / (1.0 + np.exp(-v))
        inside = (h > 0) & (h < 1)
        grad_v = grad_h * sig * (1 - sig) * (ZETA - GAMMA) * inside
        m = 0.9 * m + 0.1 * grad_v
        s2 = 0.999 * s2 + 0.001 * grad_v**2
        v -= settings.learning_rate * (m / (1 - 0.9 ** (step + 1))) / (np.sqrt(s2 / (1 - 0.999 ** (step + 1))) + 1e-8)
    chosen = np.clip(floor + (_soft(v) >= 0.5), grid.qmin, grid.qmax) * scale
    nearest = grid.quantize(rows)
    if pin:
        _pin_extremes(rows, chosen, nearest)
    better = reconstruction_error(rows, chosen, stats, cross) < reconstruction_error(rows, nearest, stats, cross)
    return np.where(better[:, None], chosen, nearest)


def _pin_extremes(rows: np.ndarray, chosen: np.ndarray, nearest: np.ndarray) -> None:
    """Each row's largest weight keeps its nearest grid value: ORT derives the scale from it."""
    top = np.abs(rows).argmax(axis=1)
    index = np.arange(len(rows))
    chosen[index, top] = nearest[index, top]
