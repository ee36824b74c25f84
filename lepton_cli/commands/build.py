"""``lepton build BUILD.toml``: compile every model x target of a build file (lepton_cli/build)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.live import Live

from lepton_cli.build.buildfile import load_build_file
from lepton_cli.build.cache import BuildCache
from lepton_cli.build.driver import BuildRun
from lepton_cli.build.pool import LocalPool
from lepton_cli.build.summary import append_build_summary, json_document, live_table
from lepton_cli.console import emit_json, note, settings, stderr, stdout, warn
from lepton_cli.errors import BadInputError
from lepton_cli.host.parallel import available_cores


def _engine_factory(workers: int | None, ray_address: str | None, cpus_per_compile: int):
    if ray_address is not None:
        from lepton_cli.build.ray_engine import RayEngine, import_ray

        import_ray()  # exit 2 now, before any work, when ray is missing
        return lambda jobs: RayEngine(None if ray_address == "auto" else ray_address, cpus_per_compile)
    count = workers or len(available_cores())
    return lambda jobs: LocalPool(min(count, jobs))  # no idle workers to start


BuildFileArg = Annotated[Path, typer.Argument(help="The build file (TOML): \\[defaults] and \\[\\[model]] entries.")]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Output folder for every bundle (default: out/ beside the build file)."),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option(
        "--workers",
        "-j",
        help="Local worker processes (default: one per core); each is pinned to its share of the cores.",
    ),
]
RayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        help="Run each compile as a Ray task: a cluster ADDRESS, 'auto' (RAY_ADDRESS or the running cluster) or 'local' (start one here).",
    ),
]
CpusOpt = Annotated[
    int,
    typer.Option(
        "--cpus-per-compile", help="With --ray: CPUs each compile task declares (and its ONNX Runtime threads)."
    ),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Compile everything, neither reading nor writing the cache ($LEPTON_CACHE).")
]
FailFastOpt = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first failed compile (default: every compile runs).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (format lepton-build/1) on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No live table or notes.")]


def _check_counts(workers: int | None, cpus_per_compile: int) -> None:
    if workers is not None and workers < 1:
        raise BadInputError(f"--workers must be >= 1, got {workers}", "pass a positive number of workers")
    if cpus_per_compile < 1:
        raise BadInputError(f"--cpus-per-compile must be >= 1, got {cpus_per_compile}", "pass a positive number")


def _run_with_table(run: BuildRun, factory: Callable[[int], Any], title: str) -> int:
    """Run the build; a live table on an interactive stderr, else one table at the end (none with --quiet)."""
    if settings.quiet or not stderr.is_terminal:
        exit_code = run.run(factory)
        if not settings.quiet:
            stderr.print(live_table(run.results, title))
        return exit_code
    with Live(live_table([], title), console=stderr, refresh_per_second=4, transient=False) as live:
        run.on_update = lambda results: live.update(live_table(results, title))
        return run.run(factory)


def build_command(
    build_file: BuildFileArg,
    output: OutputOpt = None,
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    cpus_per_compile: CpusOpt = 1,
    no_cache: NoCacheOpt = False,
    fail_fast: FailFastOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compile every model x target of BUILD_FILE, each exactly as `lepton compile`; exit with the worst compile's code."""
    settings.quiet = quiet or json_out
    settings.json_mode = json_out
    _check_counts(workers, cpus_per_compile)
    ray_address = ray if ray is not None else (os.environ.get("RAY_ADDRESS") and "auto") or None
    factory = _engine_factory(workers, ray_address, cpus_per_compile)
    plan = load_build_file(build_file)
    output_dir = output or build_file.parent / "out"
    cache = None if no_cache else BuildCache()
    run = BuildRun(plan, output_dir, cache, fail_fast=fail_fast, on_note=note, on_warn=warn)
    exit_code = _run_with_table(run, factory, f"lepton build {build_file.name}: {len(plan.jobs)} compile(s)")
    append_build_summary(run.results, exit_code)
    if json_out:
        emit_json(json_document(run.results))
    elif not quiet:
        stdout.print(f"bundles: {output_dir}  (exit {exit_code})")
    if exit_code:
        raise SystemExit(exit_code)  # click, run with standalone_mode=False, would swallow typer.Exit's code


def register(app: typer.Typer) -> None:
    app.command("build")(build_command)
