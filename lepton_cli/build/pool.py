"""The local engine: a process pool whose workers each own a disjoint share of the CPU cores.

Each worker pins itself (``os.sched_setaffinity``) to its share and compiles with that many ONNX
Runtime threads (ORT's default pool follows the affinity mask; the latency measurement is told
explicitly), so N workers on C cores run C threads in all, not N x C. Workers are spawned, not
forked: the driver runs a live display thread, and forking a threaded process can deadlock.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from typing import Any, Iterator

from lepton_cli.build.worker import Outcome, run_compile
from lepton_cli.host.parallel import available_cores

_SHARE: int | None = None  # this worker's core count, set by _pin


def core_shares(cores: list[int], workers: int) -> list[list[int]]:
    """``cores`` split into ``workers`` contiguous, disjoint shares (shared round-robin when workers > cores)."""
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    base, extra = divmod(len(cores), workers)
    shares, start = [], 0
    for i in range(workers):
        size = base + (1 if i < extra else 0)
        shares.append(cores[start : start + size])
        start += size
    return shares


def _pin(counter: Any, shares: list[list[int]]) -> None:
    global _SHARE
    with counter.get_lock():
        slot = counter.value % len(shares)
        counter.value += 1
    share = shares[slot]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, share)
    _SHARE = len(share)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(len(share))


def _pinned_compile(index: int, options: Any, target: Any) -> Outcome:
    return run_compile(index, options, target, _SHARE)


class LocalPool:
    """``submit`` compiles, ``done`` yields outcomes as they finish, ``running`` says which have started."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        context = multiprocessing.get_context("spawn")
        self.shares = core_shares(available_cores(), self.workers)
        self._executor = cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=context,
            initializer=_pin,
            initargs=(context.Value("i", 0), self.shares),
        )
        self._futures: dict[cf.Future, int] = {}
        self.slots = 2 * self.workers

    def describe(self) -> str:
        return f"{self.workers} local worker(s), cores {' | '.join(','.join(map(str, s)) for s in self.shares)}"

    def submit(self, index: int, options: Any, target: Any) -> None:
        self._futures[self._executor.submit(_pinned_compile, index, options, target)] = index

    def running(self) -> set[int]:
        return {i for f, i in self._futures.items() if f.running()}

    def done(self, timeout: float = 0.25) -> Iterator[Outcome]:
        finished, _ = cf.wait(list(self._futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        for future in finished:
            index = self._futures.pop(future)
            try:
                yield future.result()
            except (
                Exception
            ) as exc:  # the worker process died (killed, out of memory): this compile fails, not the build
                yield Outcome(index, 1, f"worker process failed: {exc.__class__.__name__}: {exc}")

    @property
    def pending(self) -> int:
        return len(self._futures)

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for future in self._futures:
                future.cancel()
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.terminate()  # a cancelled build must not leave compiles running
        self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
