"""Repeatability of `lepton bench`: the same pair measured three times, p50 ratios compared.

The pair: a model compiled for cpu-avx (its bundle, opened with a throw-away development key set)
against its source. Each repetition is a separate `lepton bench --json` process, so sessions,
thread pools and allocations are fresh every time, as a user re-running the command would see.

    .venv/bin/python benchmarks/bench_repeatability.py [--model squeezenet] [--repeats 3] [--seconds 10]

Prints a table and writes benchmarks/results/bench_repeatability.json. The issue's aim: the p50
ratios within ±5% of each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
OCR = ROOT / ".venv/lib/python3.11/site-packages/rapidocr_onnxruntime/models"
MODELS = {
    "squeezenet": (LIGHT / "light_squeezenet.onnx", []),
    "resnet50": (LIGHT / "light_resnet50.onnx", []),
    "ocr_rec": (OCR / "ch_PP-OCRv4_rec_infer.onnx", ["--input-shape", "x=1,3,48,320"]),
    "digits": (ROOT / "examples/digits/digits_cnn.onnx", []),
}


def lepton(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lepton_cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="squeezenet", choices=sorted(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="default: lepton bench's own (physical cores)")
    args = ap.parse_args()
    path, shape_args = MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="lepton-repeat-") as tmp:
        env = dict(os.environ, LEPTON_HOME=str(Path(tmp) / "home"), NO_COLOR="1")
        env.pop("GITHUB_STEP_SUMMARY", None)
        done = lepton(
            "compile", str(path), "--target", "cpu-avx", "-o", tmp, "--no-bench", "--json", *shape_args, env=env
        )
        if done.returncode != 0:
            sys.exit(f"compile failed: {done.stderr[-2000:]}")
        bundle = json.loads(done.stdout)["bundle"]
        rows = []
        for i in range(args.repeats):
            res = lepton(
                "bench",
                bundle,
                "--against",
                str(path),
                "--seconds",
                str(args.seconds),
                "--runs",
                str(args.runs),
                "--json",
                *shape_args,
                *(["--threads", str(args.threads)] if args.threads else []),
                env=env,
            )
            if res.returncode != 0:
                sys.exit(f"bench failed: {res.stderr[-2000:]}")
            doc = json.loads(res.stdout)
            lat = doc["host_latency"]
            ((label, ratio),) = lat["ratios"].items()
            base = lat["models"][lat["base"]]
            cand = lat["models"][label]
            a, b = np.array(base["samples_ms"]), np.array(cand["samples_ms"])
            rows.append(
                {
                    "repeat": i + 1,
                    "ratio": ratio["ratio"],
                    "ci_low": ratio["ci_low"],
                    "ci_high": ratio["ci_high"],
                    "median_paired_ratio": float(np.median(b / a)),
                    "min_ratio": float(b.min() / a.min()),
                    "runs": cand["runs"],
                    "base_p50_ms": base["p50_ms"],
                    "compiled_p50_ms": cand["p50_ms"],
                    "threads": lat["settings"]["threads"],
                }
            )
            print(
                f"repeat {i + 1}: ratio {ratio['ratio']:.4f} [{ratio['ci_low']:.4f}, {ratio['ci_high']:.4f}]  "
                f"source p50 {base['p50_ms']:.3f} ms  compiled p50 {cand['p50_ms']:.3f} ms  ({cand['runs']} rounds)",
                flush=True,
            )
    ratios = [r["ratio"] for r in rows]
    mean = sum(ratios) / len(ratios)
    spread = max(ratios) / min(ratios) - 1
    worst = max(abs(r / mean - 1) for r in ratios)
    print()
    print("| repeat | p50 ratio | 95% CI | source p50 ms | compiled p50 ms | rounds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['repeat']} | {r['ratio']:.4f} | {r['ci_low']:.4f}–{r['ci_high']:.4f} | {r['base_p50_ms']:.3f} | "
            f"{r['compiled_p50_ms']:.3f} | {r['runs']} |"
        )
    for key in ("median_paired_ratio", "min_ratio"):  # other estimators, for comparison
        vals = [r[key] for r in rows]
        print(f"{key}: {', '.join(f'{v:.4f}' for v in vals)}  spread {max(vals) / min(vals) - 1:.2%}")
    verdict = "PASS" if spread <= 0.05 else "FAIL"
    print(
        f"\n{args.model}: max/min ratio spread {spread:.2%}, worst deviation from the mean {worst:.2%} (aim: within ±5%) {verdict}"
    )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_repeatability_{args.model}.json").write_text(
        json.dumps({"model": args.model, "rows": rows, "spread": spread, "worst_deviation": worst}, indent=2),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
