"""How many model runs a compile makes at once, and an in-order map that makes them.

A compile's model runs (the scorer's samples, the sensitivity ranking's candidates) each use one ONNX
Runtime thread, so that results do not depend on the machine; independent runs then go side by side on
the cores this process may use. ONNX Runtime releases the GIL inside ``InferenceSession.run``, so threads
suffice and share one copy of the models. Results come back in input order: the same numbers as one at a time.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from lepton_cli.errors import BadInputError
from lepton_cli.host.detect import HostInfo

RUNS_ENV = "LEPTON_PARALLEL_RUNS"  # override: how many model runs at once (1: one at a time)
MEMORY_SHARE = 0.5  # of the usable memory, what side-by-side copies of a model's weights may take

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> list[int]:
    """The CPU ids this process may run on (its affinity: a ``lepton build`` worker is pinned to its share)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def parallel_runs(host: HostInfo, weights_mb: float = 0.0) -> int:
    """Runs at once: ``$LEPTON_PARALLEL_RUNS``, else the host's usable cores this process may run on (a
    ``lepton build`` worker is pinned to its share), fewer when each run's own weights would not fit."""
    text = os.environ.get(RUNS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise BadInputError(f"{RUNS_ENV}={text!r} is not a positive whole number", f"set {RUNS_ENV}=1, 2, ...")
        return int(text)
    runs = max(1, min(host.usable_cores, len(available_cores())))
    memory = host.usable_memory_mb
    if memory is not None and weights_mb > 0:
        runs = min(runs, max(1, int(memory * MEMORY_SHARE // weights_mb)))
    return runs


def ordered_map(fn: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """``map(fn, items)`` with up to ``workers`` calls at once, results in input order; items are drawn
    only as calls finish, so at most ``workers + 1`` results (a detector's maps, a model copy) are held."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Result]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
