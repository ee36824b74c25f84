"""Where a compiled model's time goes: ONNX Runtime's per-node profile, summed by op type, beside a baseline.

The question behind it (issue 16): PP-OCRv4 det's int8 model runs at ~0.56x the fp32 source on one thread and
the bar is 0.5x; which kernels are left (float-kept convs, Q/DQ, layout reorders, float element-wise ops)?
Each model runs in its own CPU-EP session (graph optimizations as deployed, 1 intra-op thread), the sessions
take turns round by round so that load from other processes hits them alike, and ORT's profiler records each
kernel. Per model: wall time per run (median over rounds) and the kernel time per op type per run.

    .venv/bin/python benchmarks/profile_ops.py BASELINE.onnx MODEL.onnx [...] --data pages.npz [--rounds 20]
        [--out benchmarks/results/profile_ops]

``--data``: an .npz whose arrays are named after the inputs (first sample used). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _session(path: Path, folder: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / path.stem)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kernel_ms(profile: Path, runs: int) -> tuple[dict[str, float], dict[str, int]]:
    """Per op type: kernel milliseconds per run, and nodes of that type."""
    spent: Counter[str] = Counter()
    nodes: dict[str, set[str]] = {}
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            spent[op] += event["dur"]
            nodes.setdefault(op, set()).add(event["name"])
    return {op: us / runs / 1000.0 for op, us in spent.items()}, {op: len(v) for op, v in nodes.items()}


def profile(paths: list[Path], feeds: dict[str, np.ndarray], rounds: int, warmup: int = 3) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        sessions = [_session(p, folder) for p in paths]
        inputs = [{i.name: feeds[i.name][:1] for i in s.get_inputs()} for s in sessions]
        walls: list[list[float]] = [[] for _ in paths]
        for step in range(warmup + rounds):
            for k, session in enumerate(sessions):
                started = time.perf_counter()
                session.run(None, inputs[k])
                if step >= warmup:
                    walls[k].append((time.perf_counter() - started) * 1000.0)
        rows = []
        for path, session, wall in zip(paths, sessions, walls):
            per_op, counts = _kernel_ms(Path(session.end_profiling()), warmup + rounds)
            rows.append({"model": str(path), "wall_ms": statistics.median(wall), "kernel_ms": per_op, "nodes": counts})
    return rows


def render(rows: list[dict]) -> str:
    ops = sorted(
        {op for r in rows for op in r["kernel_ms"]}, key=lambda op: -max(r["kernel_ms"].get(op, 0) for r in rows)
    )
    base = rows[0]["wall_ms"]
    head = "| op type | " + " | ".join(f"{Path(r['model']).name} ms (nodes)" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    lines.append(
        "| **wall per run** | "
        + " | ".join(f"**{r['wall_ms']:.2f}** ({r['wall_ms'] / base:.3f}x)" for r in rows)
        + " |"
    )
    for op in ops:
        cells = [f"{r['kernel_ms'].get(op, 0.0):.2f} ({r['nodes'].get(op, 0)})" for r in rows]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="the baseline first")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_ops"))
    args = parser.parse_args()
    rows = profile(args.models, dict(np.load(args.data)), args.rounds)
    table = render(rows)
    print(table)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": {
                    **vars(args),
                    "models": [str(m) for m in args.models],
                    "data": str(args.data),
                    "out": str(args.out),
                },
                "rows": rows,
            },
            indent=2,
        )
    )
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
