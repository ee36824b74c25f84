"""``lepton build``'s driver: cache look-ups, dispatch to an engine, sealing and writing every bundle.

Only the driver holds the signing key and writes outputs: each bundle appears by one rename
(``bundle.writer``), so Ctrl-C or kill -9 leaves finished bundles and cache entries, never a
partial one, and a rerun serves what finished from the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from lepton_cli.build.buildfile import BuildPlan, Job
from lepton_cli.build.cache import BuildCache, CacheHit
from lepton_cli.build.summary import JobResult, worst_exit
from lepton_cli.build.worker import Outcome
from lepton_cli.bundle.archive import ARCHIVE_SUFFIX, write_archive
from lepton_cli.bundle.keys import key_id
from lepton_cli.bundle.provenance import inputs_key
from lepton_cli.bundle.writer import install_files
from lepton_cli.compile.compiler import _check_output_dir, bundle_name
from lepton_cli.compile.inputs import compile_inputs
from lepton_cli.compile.output import CompileKeys, resolve_compile_keys, write_compile_output
from lepton_cli.errors import ExitCode, LeptonError


class Engine(Protocol):
    name: str

    slots: int  # compiles to keep in flight (twice the parallel capacity: the next one is ready when a worker frees up)

    def describe(self) -> str: ...
    def submit(self, index: int, options: Any, target: Any) -> None: ...
    def running(self) -> set[int]: ...
    def done(self, timeout: float = 0.25) -> Any: ...
    @property
    def pending(self) -> int: ...
    def shutdown(self, cancel: bool = False) -> None: ...


@dataclass
class BuildRun:
    plan: BuildPlan
    output_dir: Path
    cache: BuildCache | None
    fail_fast: bool = False
    on_update: Callable[[list[JobResult]], None] = lambda results: None
    on_note: Callable[[str], None] = lambda text: None
    on_warn: Callable[[str], None] = lambda text: None  # shown even with --quiet/--json: a corrupt cache entry
    results: list[JobResult] = field(default_factory=list)
    keys: CompileKeys | None = None
    _seal: dict[str, Any] = field(default_factory=dict)
    _cache_keys: dict[int, str | None] = field(default_factory=dict)

    def exit_code(self) -> int:
        return worst_exit([r.exit_code for r in self.results])

    def prepare(self) -> None:
        """Keys and output folder checked once, before any compile (exit 2)."""
        plan = self.plan
        self.keys = resolve_compile_keys(
            plan.sign_key, plan.recipients, plan.bundle_version, plan.expires, self.on_note
        )
        _check_output_dir(self.output_dir)
        if self.cache is not None:
            self.cache.cache_key()  # a malformed $LEPTON_CACHE_KEY is exit 2 now, not after the compiles
        signing, recipients = self.keys.complete()
        self._seal = {
            "signer": key_id(signing),
            "recipients": sorted(key_id(r) for r in recipients),
            "version": plan.bundle_version,
            "expires": plan.expires,
        }
        self.results = [JobResult(job.options.model.name, job.target.name) for job in plan.jobs]

    def run(self, engine_factory: Callable[[int], Engine]) -> int:
        """Serve what the cache has, compile the rest on ``engine_factory(number of compiles)``; returns the exit code."""
        self.prepare()
        todo = [job for job in self.plan.jobs if not self._serve_cached(job)]
        self.on_update(self.results)
        if not todo or (self.fail_fast and self.exit_code() != 0):
            return self._finish(todo)
        engine = engine_factory(len(todo))
        self.on_note(f"compiling {len(todo)} of {len(self.plan.jobs)} on {engine.describe()}")
        queue = list(todo)
        try:
            while queue or engine.pending:
                while (
                    queue and engine.pending < engine.slots
                ):  # bounded: inputs and results in flight stay a few per slot
                    job = queue.pop(0)
                    engine.submit(job.index, job.options, job.target)
                for index in engine.running():
                    if self.results[index].state == "queued":
                        self.results[index].state = "running"
                for outcome in engine.done():
                    self._finished(self.plan.jobs[outcome.index], outcome)
                    if self.fail_fast and outcome.exit_code != 0:
                        engine.shutdown(cancel=True)
                        return self._finish(todo)
                self.on_update(self.results)
        except BaseException:
            engine.shutdown(cancel=True)
            raise
        engine.shutdown()
        return self._finish(todo)

    def _finish(self, todo: list[Job]) -> int:
        for job in todo:
            if self.results[job.index].exit_code is None:
                self.results[job.index].state = "skipped"
        self.on_update(self.results)
        return self.exit_code()

    def _key(self, job: Job) -> str | None:
        if job.index not in self._cache_keys:
            try:
                self._cache_keys[job.index] = inputs_key(compile_inputs(job.options, job.target))
            except (OSError, ValueError, LeptonError):  # unreadable inputs: the compile itself reports them
                self._cache_keys[job.index] = None
        return self._cache_keys[job.index]

    def _serve_cached(self, job: Job) -> bool:
        if self.cache is None:
            return False
        key = self._key(job)
        started = time.perf_counter()
        hit = self.cache.lookup(key) if key else None
        for text in self.cache.notes:
            self.on_warn(text)
        self.cache.notes.clear()
        if hit is None:
            return False
        try:
            bundle_dir = self._install_hit(job, hit)
        except LeptonError as exc:  # e.g. the cache key changed: the entry cannot be re-sealed, so rebuild it
            if exc.exit_code == ExitCode.BAD_INPUT:
                raise
            self.on_warn(f"cache entry {key[:12] if key else ''} not usable ({exc.message}): rebuilt")
            self.cache.discard(hit)
            return False
        result = self.results[job.index]
        result.state, result.exit_code, result.cached = "cached", 0, True
        result.bundle = str(bundle_dir)
        result.take_report(hit.entry["report"])
        result.seconds = time.perf_counter() - started
        return True

    def _install_hit(self, job: Job, hit: CacheHit) -> Path:
        """The stored bundle as is when the keys and versions are the same; else re-sealed for the current ones."""
        bundle_dir = self.output_dir / bundle_name(job.options.model, job.target)
        if hit.entry["seal"] == self._seal:
            install_files(bundle_dir, hit.bundle_files)
            if job.options.archive:
                write_archive(bundle_dir, bundle_dir.with_name(bundle_dir.name + ARCHIVE_SUFFIX))
            return bundle_dir
        assert self.keys is not None
        write_compile_output(
            bundle_dir,
            hit.models(self.cache.cache_key()),
            hit.entry["report"],
            self.keys,  # type: ignore[union-attr]
            version=self.plan.bundle_version,
            expires=self.plan.expires,
            archive=job.options.archive,
            extra_fields=hit.entry["manifest_fields"],
            provenance=hit.entry["inputs"],
            extra_plain_files=_device_plain_files(hit),
        )
        return bundle_dir

    def _finished(self, job: Job, outcome: Outcome) -> None:
        result = self.results[job.index]
        result.seconds, result.exit_code, result.message = outcome.seconds, outcome.exit_code, outcome.message
        result.worker = outcome.worker
        if outcome.exit_code != 0:
            result.state = "failed"
            self.on_note(
                f"[red]{job.key_path}[/red] {result.model} → {result.target}: exit {outcome.exit_code}: {outcome.message}"
            )
            return
        assert self.keys is not None and outcome.report is not None
        bundle_dir = self.output_dir / bundle_name(job.options.model, job.target)
        write_compile_output(
            bundle_dir,
            outcome.models,
            outcome.report,
            self.keys,
            version=self.plan.bundle_version,
            expires=self.plan.expires,
            archive=job.options.archive,
            extra_fields=outcome.manifest_fields,
            provenance=outcome.inputs,
            extra_plain_files=outcome.plain_files,
        )
        result.state, result.bundle = "done", str(bundle_dir)
        result.take_report(outcome.report)
        key = self._key(job)
        if key is not None and inputs_key(outcome.inputs) != key:  # e.g. a Ray node with other library versions
            self.on_warn(
                f"{result.model} → {result.target}: the worker's inputs or versions differ from the driver's; not cached"
            )
            key = None
        if key is not None and any(not isinstance(m, bytes) for m in outcome.models.values()):
            key = None  # a model with external data stays in its bundle only: the cache holds whole models in memory
        if self.cache is not None and key is not None:
            try:
                self.cache.store(
                    key,
                    bundle_dir=bundle_dir,
                    models=outcome.models,
                    report=outcome.report,
                    manifest_fields=outcome.manifest_fields,
                    inputs=outcome.inputs,
                    seal=self._seal,
                )
            except OSError as exc:  # a full or read-only cache must not fail the build
                self.on_note(f"could not store {result.model} → {result.target} in the cache: {exc}")


def _device_plain_files(hit: CacheHit) -> dict[str, bytes]:
    """The signed plaintext files a cached bundle's device artifacts name (a mobile operator config), to re-seal with."""
    wanted = {a.get("ops_config") for a in hit.entry["manifest_fields"].get("device_artifacts") or []} - {None}
    return {path: data for path, data in hit.bundle_files.items() if path in wanted}
