"""Probe: a corpus model's int8 candidates with and without ``integer_elementwise``, side by side in one process.

Builds the target's last plain tier in process (as the quantize pass does: fused model, the gate's split of the
corpus calibration set, ``integer_elementwise`` off), takes its fully quantized model and the ones with the leading
``--keep`` quantized nodes float, and lowers each (``passes/_quantize/integer_elementwise.py``). Per candidate: the
corpus metric's change from the source's on the evaluation set (held out; as ``bench_corpus.py`` scores it) and the
latency against the source (one thread, interleaved rounds, medians).

    python benchmarks/probe_integer_elementwise.py --model ddddocr_det --target cpu-avx --keep 0 32 \
        --out benchmarks/results/integer_elementwise_ddddocr_det
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.passes._quantize.integer_elementwise import integer_elementwise, rewritten  # noqa: E402
from lepton_cli.passes._quantize.sensitivity import quantized_nodes  # noqa: E402

from benchmarks.bench_map_pages import quantize_setup  # noqa: E402
from benchmarks.corpus.data import charset  # noqa: E402
from benchmarks.corpus.metrics import METRICS  # noqa: E402
from benchmarks.corpus.runner import run_all, session  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402


def _latencies(models: dict[str, bytes], feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median time of each model over the source's, one thread, the models taking turns each round."""
    sessions = {name: session(data) for name, data in models.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["source"])
    return {name: round(statistics.median(t) / base, 3) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ddddocr_det")
    parser.add_argument("--target", default="cpu-avx")
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--keep", type=int, nargs="*", default=[0, 32])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "integer_elementwise_probe")
    args = parser.parse_args(argv)

    setup = quantize_setup(args.model, args.target, integer_elementwise=False)
    corpus, metric = setup.corpus, METRICS[setup.corpus.metric]
    path = Path(ensure_model(corpus))
    source = path.read_bytes()
    chars = charset(corpus, path) if corpus.metric == "char_accuracy" else None
    evaluation = dict(np.load(ensure_data(corpus)[1]))  # labels stay: the text metrics read them
    reference = run_all(session(source), evaluation)
    source_value = metric(corpus, evaluation, reference, reference, chars)
    build = setup.space.builds[len(setup.plan.tiers) - 1]  # the last plain tier (cpu-avx: Conv, MatMul, Gemm)
    order = quantized_nodes(build(args.method, []))
    rows, models = [], {"source": source}
    for keep in args.keep:
        plain = build(args.method, order[:keep])
        for lowered, model in ((False, plain), (True, integer_elementwise(plain))):
            name = f"{'lowered' if lowered else 'plain'} {keep}"
            models[name] = model.SerializeToString()
            row = {"candidate": name, "float_kept": keep, "lowered": lowered} | (rewritten(model) if lowered else {})
            got = run_all(session(models[name]), evaluation)
            row["held out Δ"] = round(metric(corpus, evaluation, reference, got, chars) - source_value, 2)
            rows.append(row)
            print(row, flush=True)
    ratios = _latencies(models, {k: v[:1] for k, v in evaluation.items() if k != "labels"}, args.rounds)
    for row in rows:
        row["latency ×source (1 thread)"] = ratios[row["candidate"]]
    args.out.with_suffix(".json").write_text(json.dumps({"model": corpus.name, "target": args.target, "rows": rows}))
    columns = ["candidate", "held out Δ", "latency ×source (1 thread)"]
    table = "\n".join(markdown_table(columns, [[r[c] for c in columns] for r in rows]))
    args.out.with_suffix(".md").write_text(f"{corpus.name} on {args.target} ({args.method})\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
