"""Compile wall time with the search's model runs one at a time and side by side (``LEPTON_PARALLEL_RUNS``).

Each compile is a child ``lepton compile --no-bench`` on a corpus model with its corpus calibration set;
the run counts alternate A/B/B/A over the rounds (this host is shared). Besides time and the child's peak
RSS, it checks that the quantize search tried the same candidates with the same drops and chose the same
one: side-by-side runs must not change the result.

    python benchmarks/bench_parallel_runs.py --models ppocrv4_rec digits --target cpu-avx --rounds 2 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.sweep import run_compile  # noqa: E402
from lepton_cli.host.parallel import RUNS_ENV  # noqa: E402


def _quantize_summary(out_dir: Path) -> dict:
    report = json.loads(next(out_dir.glob("*.lepton/report.json")).read_text())
    return next((s.get("summary") or {} for s in report["pipeline"] if s.get("name") == "quantize"), {})


def _search(summary: dict) -> list[tuple]:
    """What the search tried, in order, and its choice: must not depend on the run count."""
    tried = [(t["method"], tuple(t["float_nodes"]), t["drop_pct"]) for t in summary.get("tried", [])]
    return [*tried, ("chosen", summary.get("method"), tuple(summary.get("float_kept") or ()))]


def measure(model_name: str, target: str, runs: list[int], rounds: int, timeout: float) -> dict:
    model = by_name(model_name)
    times: dict[int, list[float]] = {r: [] for r in runs}
    peaks: dict[int, list[float]] = {r: [] for r in runs}
    searches: dict[int, list] = {}
    codes = set()
    for round_index in range(rounds):
        order = runs if round_index % 2 == 0 else list(reversed(runs))  # A/B, then B/A
        for count in order:
            os.environ[RUNS_ENV] = str(count)
            with tempfile.TemporaryDirectory() as tmp:
                run = run_compile(model, target, Path(tmp) / "out", timeout=timeout)
                codes.add(run.code)
                if run.code == 0:
                    searches.setdefault(count, _search(_quantize_summary(Path(tmp) / "out")))
            times[count].append(run.seconds)
            peaks[count].append(run.peak_rss_mb)
            print(
                f"  {model_name} {target} runs={count}: exit {run.code}, {run.seconds:.1f} s, {run.peak_rss_mb:.0f} MB"
            )
    os.environ.pop(RUNS_ENV, None)
    same = len({json.dumps(s) for s in searches.values()}) <= 1
    base = statistics.median(times[runs[0]])
    return {
        "model": model_name,
        "target": target,
        "exit_codes": sorted(codes),
        "seconds": {str(r): times[r] for r in runs},
        "median_s": {str(r): statistics.median(times[r]) for r in runs},
        "speedup": {str(r): round(base / statistics.median(times[r]), 3) for r in runs},
        "peak_rss_mb": {str(r): max(peaks[r]) for r in runs},
        "trials": len(next(iter(searches.values()), [])) - 1,
        "same_search": same,
    }


def table(rows: list[dict], runs: list[int]) -> str:
    head = " | ".join(f"runs={r} median s" for r in runs)
    lines = [
        f"| model | target | exit | trials | {head} | speedup ×{runs[-1]} | peak RSS MB ({'/'.join(map(str, runs))}) "
        "| same search |",
        "|---|---|---|---|" + "---|" * len(runs) + "---|---|---|",
    ]
    for row in rows:
        medians = " | ".join(f"{row['median_s'][str(r)]:.1f}" for r in runs)
        rss = "/".join(f"{row['peak_rss_mb'][str(r)]:.0f}" for r in runs)
        lines.append(
            f"| {row['model']} | {row['target']} | {row['exit_codes']} | {row['trials']} | {medians} "
            f"| {row['speedup'][str(runs[-1])]:.2f} | {rss} | {row['same_search']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocrv4_rec", "digits"])
    parser.add_argument("--target", default="cpu-avx")
    parser.add_argument("--runs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parallel_runs.json")
    args = parser.parse_args(argv)
    rows = [measure(m, args.target, args.runs, args.rounds, args.timeout) for m in args.models]
    load = os.getloadavg()
    doc = {"host_cpus": len(os.sched_getaffinity(0)), "load_avg_at_end": load, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(rows, args.runs))
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0 if all(r["same_search"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
