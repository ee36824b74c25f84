"""One model x target compile inside a build worker (pool process or Ray task): ``compile_unsealed``, no keys, no disk output.

The driver seals and writes what this returns, so private keys never leave the driver and an
interrupted build leaves no partial bundle.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from lepton_cli import console
from lepton_cli.compile.compiler import CompileOptions, compile_unsealed
from lepton_cli.errors import LeptonError
from lepton_cli.host.detect import detect_host
from lepton_cli.pipeline.targets import Target


@dataclass
class Outcome:
    """What a worker sends back: the compile's models and report on success, the error line otherwise."""

    index: int
    exit_code: int
    message: str | None = None
    report: dict[str, Any] | None = None
    manifest_fields: dict[str, Any] = field(default_factory=dict)
    models: dict[str, bytes] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)
    plain_files: dict[str, bytes] = field(default_factory=dict)  # signed, not encrypted (a device's operator config)


def run_compile(index: int, options: CompileOptions, target: Target, cores: int | None) -> Outcome:
    """Compile with ``cores`` CPU threads for ONNX Runtime (None: the host's own choice); never raises."""
    os.environ.pop("GITHUB_STEP_SUMMARY", None)  # the driver writes one table for the whole build
    console.settings.quiet = True  # the driver's table is the progress display; passes' notes would tear it
    started = time.perf_counter()
    worker = {
        "pid": os.getpid(),
        "cores": cores,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        host = detect_host()
        if cores is not None:  # the latency measurement's thread count follows this worker's share of the cores
            limit = min(cores, host.cgroup_cpu_limit) if host.cgroup_cpu_limit is not None else cores
            host = dataclasses.replace(host, cgroup_cpu_limit=float(limit))
        result = compile_unsealed(options, target, host, on_warning=lambda text: None)
    except LeptonError as exc:
        return Outcome(index, int(exc.exit_code), exc.one_line(), seconds=time.perf_counter() - started, worker=worker)
    except Exception as exc:  # a bug: reported for this compile, the others go on
        detail = traceback.format_exc(limit=-3).strip().splitlines()[-1]
        return Outcome(
            index,
            1,
            f"internal error: {exc.__class__.__name__}: {exc} ({detail}; this is a bug in Lepton)",
            seconds=time.perf_counter() - started,
            worker=worker,
        )
    worker["peak_rss_mb"] = _peak_rss_mb()
    return Outcome(
        index,
        0,
        None,
        result.report,
        result.manifest_fields,
        result.models,
        result.inputs,
        time.perf_counter() - started,
        worker,
        result.plain_files,
    )


def _peak_rss_mb() -> float | None:
    """This worker process's peak resident memory so far (Linux reports KiB): what sizes a Ray task's memory request."""
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):
        return None
