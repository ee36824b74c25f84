"""fuse: node count and host latency before/after, on PP-OCRv4 det/rec and the onnx light zoo.

Claim (issue 3): fuse never makes a model slower beyond noise (latency ratio after/before <= 1.02).
Both models run in ONNX Runtime's CPU EP with the same settings (graph optimizations as deployed,
``--opt-level all`` by default, ``--threads`` intra-op threads, one inter-op thread), in
interleaved rounds (A, B, A, B, ...) so that load from other processes hits both alike. Per model:
median latency of each, the median of the per-round ratios B/A and a bootstrap 95% interval of it.
A model fails the claim only when the interval's lower end is above 1.02 (slower beyond noise).

``--ort-offline`` instead compares fuse against fuse + ORT's offline graph (the cpu-avx option):
latency and session-creation time; the number behind the default in targets/cpu-avx.toml.

    .venv/bin/python benchmarks/bench_fuse.py [--budget-s 10] [--threads 1] [--models det rec squeezenet ...]

Writes benchmarks/results/bench_fuse.json (or bench_fuse_ort_offline.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import DIGITS, LIGHT_MODELS, OCR_DET, OCR_REC  # noqa: E402

from lepton_cli.model.load import load_model, upgrade_opset  # noqa: E402
from lepton_cli.model.sessions import make_session, random_feed  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402

LIMIT = 1.02
SHAPES = {"ch_PP-OCRv4_det_infer": {"x": [1, 3, 640, 640]}, "ch_PP-OCRv4_rec_infer": {"x": [1, 3, 48, 320]}}


def _models(names: list[str] | None) -> list[Path]:
    paths = (
        [p for p in (OCR_DET, OCR_REC) if p is not None and p.exists()]
        + list(LIGHT_MODELS)
        + [DIGITS / "digits_cnn.onnx"]
    )
    if names:
        paths = [p for p in paths if any(n in p.stem for n in names)]
    return paths


def _prepare(path: Path, target_name: str) -> onnx.ModelProto:
    target = load_target(target_name)
    model, _ = upgrade_opset(load_model(path).model, target.runtime.opset_min, target.runtime.opset_max)
    return bind_input_shapes(model, SHAPES[path.stem]) if path.stem in SHAPES else model


def _fuse(model: onnx.ModelProto, target_name: str, work: Path, **overrides) -> tuple[onnx.ModelProto, float]:
    import dataclasses

    target = load_target(target_name)
    params = next(s.params for s in target.passes if s.name == "fuse")
    params = dataclasses.replace(params, **overrides)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    started = time.perf_counter()
    fused = get_pass("fuse").fn(copy, PassContext(target=target, work_dir=work), params).model
    return fused, time.perf_counter() - started


def _bootstrap_ci(ratios: list[float], rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    data = np.asarray(ratios)
    medians = np.median(rng.choice(data, size=(n, data.size), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def interleaved(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    opt_level: str,
    threads: int,
    budget_s: float,
    min_rounds: int = 7,
    max_rounds: int = 60,
) -> dict:
    """Alternate A and B runs on the same feed until the time budget is spent; per-round ratio B/A."""
    feed = random_feed(graph_inputs(a), np.random.default_rng(0))
    created = []
    sessions = []
    for model in (a, b):
        started = time.perf_counter()
        sessions.append(make_session(model, opt_level=opt_level, threads=threads))
        created.append(time.perf_counter() - started)
    for session in sessions:  # warm-up: first runs allocate
        for _ in range(2):
            session.run(None, feed)
    t0 = time.perf_counter()
    sessions[0].run(None, feed)
    reps = max(1, int(0.005 / max(time.perf_counter() - t0, 1e-6)))  # >= ~5 ms per sample: timer noise
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < budget_s):
        order = (0, 1) if rounds % 2 == 0 else (1, 0)  # alternate who goes first, too
        for which in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                sessions[which].run(None, feed)
            times[which].append((time.perf_counter() - t0) / reps)
        rounds += 1
    ratios = [tb / ta for ta, tb in zip(*times)]
    low, high = _bootstrap_ci(ratios, np.random.default_rng(1))
    return {
        "rounds": rounds,
        "runs_per_sample": reps,
        "a_ms": statistics.median(times[0]) * 1e3,
        "b_ms": statistics.median(times[1]) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_ci95": [low, high],
        "a_session_s": created[0],
        "b_session_s": created[1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="substrings of model names (default: all)")
    parser.add_argument("--target", default="cpu-avx", help="target whose fuse parameters are used")
    parser.add_argument("--opt-level", default="all", choices=["disable", "basic", "extended", "all"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=8.0, help="timing budget per model (seconds)")
    parser.add_argument("--ort-offline", action="store_true", help="compare fuse vs fuse + ORT offline graph")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fuse-") as tmp:
        for path in _models(args.models):
            source = _prepare(path, args.target)
            fused, fuse_s = _fuse(source, args.target, Path(tmp), ort_offline=False)
            if args.ort_offline:
                a, (b, _) = fused, _fuse(source, args.target, Path(tmp), ort_offline=True)
            else:
                a, b = source, fused
            timing = interleaved(a, b, args.opt_level, args.threads, args.budget_s)
            row = {
                "model": path.stem,
                "nodes_before": len(a.graph.node),
                "nodes_after": len(b.graph.node),
                "fuse_s": round(fuse_s, 3),
                **timing,
            }
            row["verdict"] = "ok" if row["ratio_ci95"][0] <= LIMIT else "SLOWER"
            rows.append(row)
            print(
                f"{row['model']:28s} nodes {row['nodes_before']:5d} → {row['nodes_after']:5d}  "
                f"{row['a_ms']:9.2f} ms → {row['b_ms']:9.2f} ms  ratio {row['ratio']:.3f} "
                f"[{row['ratio_ci95'][0]:.3f}, {row['ratio_ci95'][1]:.3f}]  session {row['a_session_s']:.2f}s → "
                f"{row['b_session_s']:.2f}s  {row['rounds']:3d} rounds  {row['verdict']}",
                flush=True,
            )
    what = "fuse vs fuse+ort_offline" if args.ort_offline else "source vs fuse"
    print(
        f"\n{what}: opt_level={args.opt_level} threads={args.threads}; ratio = B/A per interleaved round "
        f"(median, bootstrap 95% CI); claim: lower CI end <= {LIMIT}"
    )
    failed = [r["model"] for r in rows if r["verdict"] != "ok"]
    print("all within the claim" if not failed else f"slower beyond noise: {', '.join(failed)}")
    out = REPO / "benchmarks" / "results" / ("bench_fuse_ort_offline.json" if args.ort_offline else "bench_fuse.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "comparison": what,
                "opt_level": args.opt_level,
                "threads": args.threads,
                "target": args.target,
                "limit": LIMIT,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
