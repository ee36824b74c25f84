"""Compile corpus models for builtin targets in child processes: exit code, wall time, peak RSS, last error line.

    python -m benchmarks.corpus.sweep [--models NAME ...] [--targets T ...] [--fast] [--timeout S]
                                      [--json runs.jsonl] [--markdown benchmarks/results/corpus_sweep.md]
    python -m benchmarks.corpus.sweep --render old.jsonl runs.jsonl --markdown benchmarks/results/corpus_sweep.md

The test (tests/compile/test_corpus_sweep.py) and the yardstick use ``run_compile``; run as a script it prints
and records the model × target table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .manifest import MODELS, REPO, CorpusModel, by_name
from .store import ensure_data, ensure_model, without_labels

TARGETS = ["cpu-avx", "cuda", "edge-arm", "fpga", "mobile", "tpu"]
TIMEOUT_CODE = 124


@dataclass
class CompileRun:
    model: str
    target: str
    code: int
    seconds: float
    peak_rss_mb: float
    message: str  # the last stderr line (the one-line error for a non-zero exit)
    traceback: bool  # "Traceback" anywhere in the output: never acceptable
    stderr: str = ""
    out_files: list[str] | None = None  # what the compile left in its output folder (a refusal must leave nothing)
    error_lines: int | None = None  # lines starting "error:" (a refusal prints exactly one)


def _error_line(text: str) -> str:
    """The CLI's one-line error ("error: ..." or "internal error: ..."), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "internal error:"))]
    return errors[0] if errors else lines[-1] if lines else ""


def compile_args(
    model: CorpusModel, target: str, out_dir: Path, *, bench: bool = False, calib: bool = True
) -> list[str]:
    path = ensure_model(model)
    args = [str(path), "--target", target, "-o", str(out_dir), "--quiet"]
    for spec in model.shape_args():
        args += ["--input-shape", spec]
    if calib:
        calib_path, _ = ensure_data(model)
        args += ["--calib", str(without_labels(calib_path, out_dir / "calib.npz"))]
    if not bench:
        args.append("--no-bench")
    return args


def run_compile(
    model: CorpusModel,
    target: str,
    out_dir: Path,
    *,
    timeout: float = 1800,
    bench: bool = False,
    save_model: Path | None = None,
    extra: list[str] | None = None,
    threads: int | None = None,
) -> CompileRun:
    """One ``lepton compile`` in a child process; peak RSS is the child's own (``wait_with_peak_rss``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    child = [sys.executable, "-m", "benchmarks.corpus.compile_child"]
    if save_model is not None:
        child += ["--save-model", str(save_model)]
    argv = [*child, "--", *compile_args(model, target, out_dir, bench=bench), *(extra or [])]
    env = dict(os.environ, NO_COLOR="1", COLUMNS="400")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
        code, peak_mb = wait_with_peak_rss(proc, timeout)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        text = out.read().decode("utf-8", "replace") + err.read().decode("utf-8", "replace")
    message = f"timed out after {timeout:.0f} s" if code == TIMEOUT_CODE and peak_mb is None else _error_line(text)
    rss = peak_mb if peak_mb is not None else float("nan")
    return CompileRun(
        model.name,
        target,
        code,
        round(seconds, 1),
        round(rss, 1),
        message[:2000],  # the whole tried-list: tables cut it
        "Traceback" in text,
        text[-4000:],
        _output_files(out_dir),
        sum(line.startswith("error:") for line in text.splitlines()),
    )


def _output_files(out_dir: Path) -> list[str]:
    """Paths the compile wrote under ``out_dir``, less the calibration file the sweep itself put there."""
    found = (p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return sorted(name for name in found if name != "calib.npz")


def _high_water_mb(pid: int) -> float | None:
    """The process's own peak RSS so far (VmHWM), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next((row for row in status if row.startswith("VmHWM:")), "")
        return int(line.split()[1]) / 1024 if line else None
    except OSError:
        return None


def wait_with_peak_rss(proc: subprocess.Popen, timeout: float) -> tuple[int, float | None]:
    """(exit code, the child's peak RSS in MiB); kills it after ``timeout`` s: (124, None).

    Linux carries a parent's peak RSS into a forked child's ``ru_maxrss`` (kept across exec), so a benchmark
    that has loaded models reports at least its own size for every child; the child's VmHWM, polled until it
    exits, is its own. ``ru_maxrss`` is the fallback where /proc is not readable.
    """
    deadline = time.monotonic() + timeout
    peak: float | None = None
    while time.monotonic() < deadline:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, peak if peak is not None else rusage.ru_maxrss / 1024
        now = _high_water_mb(proc.pid)
        if now is not None:  # VmHWM only rises: the last reading before exit is the peak
            peak = now
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    return TIMEOUT_CODE, None


def summary(runs: list[CompileRun]) -> str:
    """Compiles per exit code per target (124 is the sweep's own time-out), and the slowest/largest compile."""
    codes = sorted({r.code for r in runs})
    targets = sorted({r.target for r in runs})
    head = "| target | " + " | ".join(f"exit {c}" for c in codes) + " | compiles | max seconds | max peak RSS MB |"
    lines = [head, "|---" * (len(codes) + 4) + "|"]
    for target in [*targets, None]:
        rows = [r for r in runs if target is None or r.target == target]
        counts = " | ".join(str(sum(r.code == c for r in rows)) for c in codes)
        rss = max((r.peak_rss_mb for r in rows if r.peak_rss_mb == r.peak_rss_mb), default=float("nan"))
        label = target or "**all**"
        lines.append(f"| {label} | {counts} | {len(rows)} | {max(r.seconds for r in rows):.1f} | {rss:.0f} |")
    return "\n".join(lines) + "\n"


def markdown(runs: list[CompileRun]) -> str:
    lines = ["| model | target | exit | seconds | peak RSS MB | message |", "|---|---|---|---|---|---|"]
    for r in runs:
        message = "" if r.code == 0 else r.message.replace("|", "\\|")
        lines.append(f"| {r.model} | {r.target} | {r.code} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} | {message} |")
    return "\n".join(lines) + "\n"


def read_runs(paths: list[Path]) -> list[CompileRun]:
    """Rows of JSON-lines files in order; a later row for the same model × target replaces the earlier one."""
    merged: dict[tuple[str, str], CompileRun] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                run = CompileRun(**json.loads(line))
                merged.pop((run.model, run.target), None)
                merged[(run.model, run.target)] = run
    return list(merged.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--targets", nargs="*", default=TARGETS)
    parser.add_argument("--fast", action="store_true", help="only fast-set models")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="append one JSON line per compile to this file")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="compile nothing: write --markdown from these JSON-lines files (a later row replaces an earlier one)",
    )
    args = parser.parse_args(argv)
    if args.render:
        order = {m.name: i for i, m in enumerate(MODELS)}
        rows = sorted(read_runs(args.render), key=lambda r: (order.get(r.model, len(order)), r.target))
        args.markdown.write_text(summary(rows) + "\n" + markdown(rows), encoding="utf-8")
        return 0
    models = [by_name(n) for n in args.models] if args.models else [m for m in MODELS if m.fast or not args.fast]
    runs = []
    with tempfile.TemporaryDirectory(prefix="lepton-sweep-") as tmp:
        for model in models:
            for target in args.targets:
                run = run_compile(model, target, Path(tmp) / f"{model.name}-{target}", timeout=args.timeout)
                runs.append(run)
                print(
                    f"{run.model:<24} {run.target:<9} exit {run.code:<3} {run.seconds:7.1f}s {run.peak_rss_mb:7.0f} MB  "
                    f"{'' if run.code == 0 else run.message}",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({k: v for k, v in asdict(run).items() if k != "stderr"}) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(summary(runs) + "\n" + markdown(runs), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
