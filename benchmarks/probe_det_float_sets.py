"""Probe: which float-kept sets of a map detector's int8 tiers are fast, and what they keep on the worst page.

Builds the target's quantize tiers in process (as the pass does: fused model, the gate's split of the corpus
calibration pages) and, per tier and float-kept set, measures the latency against the source model (one thread,
interleaved rounds, medians) and the worst page's map F1 against the source on the gate's held-out calibration pages
and on the corpus's evaluation pages. Float-kept sets: nothing, the leading k quantized nodes, the leading k convs
only, and the leading k nodes plus the trailing t (the head).

    python benchmarks/probe_det_float_sets.py --model ppocrv4_det --target cpu-avx --out benchmarks/results/det_float_sets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.passes._quantize.sensitivity import quantized_nodes  # noqa: E402

from benchmarks.bench_map_pages import page_f1, quantize_setup  # noqa: E402
from benchmarks.corpus.store import ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402


def one_thread(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def latency_ratios(source: bytes, models: list[onnx.ModelProto | bytes], feed: dict, rounds: int) -> list[float]:
    """Median latency of each model over the source's, rounds interleaved (this host is shared and noisy)."""
    sessions = [one_thread(source)] + [one_thread(m) for m in models]
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - start)
    base = float(np.median(times[0]))
    return [float(np.median(t)) / base for t in times[1:]]


def float_sets(order: list[str], convs: list[str]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {"nothing": []}
    for k in (16, 32, 40, 48, 56, 64):
        sets[f"leading {k}"] = order[:k]
    for k in (8, 16, 21):
        sets[f"leading {k} convs"] = convs[:k]
    for t in (8, 24):
        sets[f"leading 48 + trailing {t}"] = order[:48] + order[-t:]
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocrv4_det")
    parser.add_argument("--target", default="cpu-avx")
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "det_float_sets")
    args = parser.parse_args(argv)

    setup = quantize_setup(args.model, args.target, methods=[args.method], recovery_tier=[])
    space = setup.space
    pages = {"gate": list(setup.held.feeds()), "eval": list(setup.evaluation.feeds())}
    reference = make_session(setup.fused)
    refs = {k: [reference.run(None, f)[0] for f in v] for k, v in pages.items()}
    source = ensure_model(setup.corpus).read_bytes()
    rows = []
    for tier, build in enumerate(space.builds):
        if space.transform(tier):
            continue
        ops = ", ".join(space.tiers[tier] if space.tiers else []) or "every op"
        full = build(args.method, [])
        order = quantized_nodes(full)
        kinds = {n.name: n.op_type for n in full.graph.node}
        sets = float_sets(order, [n for n in order if kinds.get(n) == "Conv"])
        models = {name: build(args.method, keep) for name, keep in sets.items()}
        ratios = latency_ratios(source, list(models.values()), pages["eval"][0], args.rounds)
        for (name, candidate), ratio in zip(models.items(), ratios):
            session = make_session(candidate)
            worst = {k: min(page_f1(r, session.run(None, f)[0]) for r, f in zip(refs[k], pages[k])) for k in pages}
            row = {"tier": ops, "float_kept": name, "nodes": len(sets[name]), "latency_x_fp32": round(ratio, 3)}
            rows.append(row | {"gate_worst_page": worst["gate"], "eval_worst_page": worst["eval"]})
            print(f"{ops:<20} {name:<26} {ratio:6.3f}x  gate {worst['gate']:6.2f}  held out {worst['eval']:6.2f}")
    command = f"python benchmarks/probe_det_float_sets.py --model {args.model} --target {args.target}"
    result = {"command": command, "method": args.method, "gate_pages": len(pages["gate"]), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"`{command}` ({args.method}; worst page's map F1 against the source, points)", ""]
    header = ["tier", "float-kept", "latency ×fp32 (1 thread)", "gate pages worst", "held-out worst"]
    keys = ["tier", "float_kept", "latency_x_fp32", "gate_worst_page", "eval_worst_page"]
    lines += markdown_table(header, [[r[k] for k in keys] for r in rows])
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
