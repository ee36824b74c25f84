"""The prune parameters the machinery reads; ``prune.PruneParams`` has them all (a Protocol, so that the
machinery does not import the entry file that imports it)."""

from __future__ import annotations

from typing import Protocol


class PruneOptions(Protocol):
    mode: str
    ratios: list[float]
    max_ratio: dict[str, float]
    op_types: list[str]
    search: bool
    budget_confidence: float
    max_samples: int
    min_channels: int
    importance: str
    min_params: int
    remove_dead: bool
    refine: bool
    time_limit_s: float
    nm_out_multiple: int
    nm_in_multiple: int
