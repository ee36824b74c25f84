"""Peak memory and wall time of whole `lepton compile` runs, per pass, on PP-OCRv4 rec and det.

Each compile runs as a child process (``python -m lepton_cli compile ... --calib DATA.npz``). While
it runs, this script samples the child's resident memory (``/proc/PID/status`` VmRSS, every 50 ms)
and reads its progress lines on stderr (``→ quantize …`` / ``✓ quantize  12.3s``) to attribute each
sample to the pass running then: per pass, the wall time and the peak RSS seen during it. The
whole run's peak is the kernel's own (``ru_maxrss`` of the child, what ``/usr/bin/time -v``
reports as "Maximum resident set size"). The budget is tight (0.5 points: the tuning search runs
and ranks nodes, which is what used to hold every compared tensor at once).

    .venv/bin/python benchmarks/bench_compile_memory.py [--cases rec160,det320] [--samples 32] [--target cpu-avx]

Writes benchmarks/results/bench_compile_memory.json (and prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import ocr_textset as textset  # noqa: E402
from conftest import OCR_DET, OCR_REC  # noqa: E402

# case -> (model, input shape, data builder)
CASES = {
    "rec160": (OCR_REC, [1, 3, 48, 160], lambda n: textset.make_set(n, 3, "calib", width=160)[0]),
    "rec320": (OCR_REC, [1, 3, 48, 320], lambda n: textset.make_set(n, 3, "calib", width=320)[0]),
    "det320": (OCR_DET, [1, 3, 320, 320], lambda n: textset.make_pages(n, 3, "calib", size=320)),
    "det640": (OCR_DET, [1, 3, 640, 640], lambda n: textset.make_pages(n, 3, "calib", size=640)),
}
# PP-OCRv4 det: fuse's exactness check stops these compiles (exit 1: max abs error 1.4e-4 on the
# probability map at 640x640, 3.3e-4 at 320x320, over its 1.1e-4 bound), so the det cases run the
# cpu-avx target with fuse disabled; the quantize search, whose memory this measures, is unchanged.
NO_FUSE = {"det320", "det640"}
PASS_LINE = re.compile(r"^[→✓]\s+(\S+)")
PASS_SECONDS = re.compile(r"^✓\s+\S+\s+([0-9.]+)s")


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _without_fuse(target: str, work: Path) -> Path:
    """A copy of the builtin target file with its fuse pass disabled."""
    text = (ROOT / "targets" / f"{target}.toml").read_text(encoding="utf-8")
    text = text.replace(f'name = "{target}"', f'name = "{target}-nofuse"', 1)
    text = text.replace('name = "fuse"\n', 'name = "fuse"\nenabled = false\n', 1)
    path = work / f"{target}-nofuse.toml"
    path.write_text(text, encoding="utf-8")
    return path


def compile_case(case: str, target: str, samples: int, budget: float, work: Path, max_rss_mb: float) -> dict:
    model, shape, build = CASES[case]
    data = work / f"{case}.npz"
    np.savez(data, x=build(samples).astype(np.float32))
    if case in NO_FUSE:
        target = str(_without_fuse(target, work))
    cmd = [
        sys.executable,
        "-m",
        "lepton_cli",
        "compile",
        str(model),
        "--target",
        target,
        "--input-shape",
        "x=" + ",".join(map(str, shape)),
        "--calib",
        str(data),
        "--max-accuracy-drop",
        str(budget),
        "--no-bench",
        "-o",
        str(work / f"out-{case}"),
    ]
    env = {**os.environ, "LEPTON_HOME": str(work / "home"), "NO_COLOR": "1", "COLUMNS": "200"}
    current = ["load"]
    per_pass: dict[str, dict] = {}
    lines: list[str] = []
    killed: list[float] = []
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            lines.append(line.rstrip())
            found = PASS_LINE.match(line.strip())
            if found:
                name = found.group(1)
                if line.strip().startswith("→"):
                    current[0] = name
                    per_pass.setdefault(name, {"started": time.perf_counter(), "peak_rss_mb": 0.0})
                else:  # the pipeline's own timing of the pass: "✓ fuse   1.35s  nodes ..."
                    entry = per_pass.setdefault(name, {"started": time.perf_counter(), "peak_rss_mb": 0.0})
                    timed = PASS_SECONDS.search(line.strip())
                    entry["seconds"] = (
                        float(timed.group(1)) if timed else round(time.perf_counter() - entry["started"], 1)
                    )
                    current[0] = "after " + name

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while True:  # wait4, not poll(): the kernel's peak RSS of the child comes with the reaping
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            break
        rss = _rss_mb(child.pid)
        if rss is not None:
            entry = per_pass.setdefault(current[0], {"started": time.perf_counter(), "peak_rss_mb": 0.0})
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(rss, 1))
            if rss > max_rss_mb and not killed:  # a shared machine: stop a runaway compile, and say so
                killed.append(round(rss, 1))
                child.kill()
        time.sleep(0.05)
    reader.join(timeout=5)
    for name, entry in per_pass.items():  # a pass the compile stopped in (exit 2/3): its time until the exit
        if name != "load" and not name.startswith("after "):
            entry.setdefault("seconds", round(time.perf_counter() - entry["started"], 1))
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss / 1024
    for entry in per_pass.values():
        entry.pop("started", None)
    return {
        "case": case,
        "model": Path(model).name,
        "input_shape": shape,
        "target": target,
        "samples": samples,
        "budget": budget,
        "exit": child.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak, 1),
        "passes": per_pass,
        "stderr_tail": lines[-3:],
        "killed_over_mb": max_rss_mb if killed else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="rec160,det320")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--target", default="cpu-avx")
    ap.add_argument("--budget", type=float, default=0.5, help="--max-accuracy-drop (tight: the tuning search runs)")
    ap.add_argument("--max-rss-mb", type=float, default=8000, help="kill a compile whose RSS passes this (recorded)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_compile_memory.json"))
    args = ap.parse_args()
    if OCR_REC is None or not Path(OCR_REC).exists():
        print("skipped: rapidocr_onnxruntime models not installed")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-compile-mem-"))
    rows = []
    for case in args.cases.split(","):
        row = compile_case(case, args.target, args.samples, args.budget, work, args.max_rss_mb)
        rows.append(row)
        print(f"{case}: exit {row['exit']}, {row['seconds']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| case | target | samples | exit | wall s | peak RSS MB | per pass: seconds / peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        passes = ", ".join(
            f"{name} {entry.get('seconds', '-')} s / {entry['peak_rss_mb']:.0f}"
            for name, entry in row["passes"].items()
        )
        print(
            f"| {row['case']} {'x'.join(map(str, row['input_shape']))} | {row['target']} | {row['samples']} | {row['exit']} "
            f"| {row['seconds']:.0f} | {row['peak_rss_mb']:.0f} | {passes} |"
        )
        if row["killed_over_mb"]:
            print(f"    killed: RSS passed {row['killed_over_mb']:.0f} MB")
        elif row["exit"] != 0:
            print("    " + row["stderr_tail"][-1][:300] if row["stderr_tail"] else "    (no output)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
