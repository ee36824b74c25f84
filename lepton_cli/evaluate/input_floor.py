"""How far the source model's own score moves when its input moves by less than one of its value steps.

An image decoded from 8 bits and normalised per channel takes at most 256 values per channel, one step apart.
Uniform noise of under half a step, rounded back to 8 bits, gives the same image; a model whose score against
itself moves by D points under that noise cannot be held to a budget under D on this metric: a candidate's drop
below D is input noise, not quantization (benchmarks/results/map_noise_floor.md: PP-OCRv5 det's worst page moves
40 points). Inputs that are not on such a grid (token ids, features, audio) are left as they are; with none on a
grid there is no floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DITHER_FRACTION = 0.49  # of one step: the noisy input still rounds to the same 8-bit value
MAX_LEVELS = 256  # an 8-bit channel
SEED = 0  # the floor is deterministic


@dataclass(frozen=True)
class ValueGrid:
    """One input's per-channel step: ``steps`` broadcast along ``axis`` of a sample."""

    name: str
    axis: int
    steps: np.ndarray


@dataclass(frozen=True)
class InputFloor:
    drop_pct: float  # the source against itself with its grid inputs dithered
    inputs: list[str]

    def to_dict(self) -> dict:
        return {"drop_pct": round(self.drop_pct, 4), "inputs": self.inputs, "dither_steps": DITHER_FRACTION}


def _channel_steps(values: np.ndarray, axis: int) -> np.ndarray | None:
    """Per channel along ``axis``: the smallest gap between its distinct values, when each has 2..256 of them and
    they span at most 255 such gaps (an 8-bit grid; 256 continuous values span far more)."""
    steps = []
    for channel in np.moveaxis(values, axis, 0):
        distinct = np.unique(channel)
        if not 2 <= len(distinct) <= MAX_LEVELS:
            return None
        step = float(np.min(np.diff(distinct)))
        if (distinct[-1] - distinct[0]) / step > MAX_LEVELS - 0.5:
            return None
        steps.append(step)
    return np.asarray(steps, dtype=np.float32)


def value_grids(feeds: list[dict[str, np.ndarray]]) -> list[ValueGrid]:
    """The float inputs whose channels (axis 1 for NCHW, the last axis for NHWC, up to 4 channels) lie on a
    grid of at most 256 values over ``feeds``."""
    grids = []
    for name in feeds[0] if feeds else {}:
        arrays = [np.asarray(feed[name]) for feed in feeds]
        if arrays[0].dtype.kind != "f" or arrays[0].ndim != 4:
            continue
        stacked = np.concatenate(arrays)
        for axis in (1, 3):
            if stacked.shape[axis] <= 4:
                steps = _channel_steps(stacked, axis)
                if steps is not None:
                    grids.append(ValueGrid(name, axis, steps))
                    break
    return grids


def dithered(
    feed: dict[str, np.ndarray], grids: list[ValueGrid], index: int, fraction: float = DITHER_FRACTION
) -> dict[str, np.ndarray]:
    """``feed`` (sample ``index``) with uniform noise of ±``fraction`` of a step on each grid input; the noise is
    seeded by the index, so a sample gets the same noise whichever worker runs it."""
    rng = np.random.default_rng([SEED, index])
    out = dict(feed)
    for grid in grids:
        value = np.asarray(feed[grid.name])
        shape = [1] * value.ndim
        shape[grid.axis] = len(grid.steps)
        noise = rng.uniform(-fraction, fraction, value.shape).astype(value.dtype)
        out[grid.name] = value + noise * grid.steps.reshape(shape).astype(value.dtype)
    return out


def noise_clause(floor: dict) -> str:
    """The floor (``InputFloor.to_dict()``, as the report keeps it) in words, for messages and warnings."""
    inputs = ", ".join(floor.get("inputs") or ["its inputs"])
    return f"the source itself reads a drop of {floor['drop_pct']:.2f} when {inputs} moves by under half a step of its 8-bit values"
