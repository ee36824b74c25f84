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
import sys
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
from benchmarks.probe_det_float_sets import latency_ratios  # noqa: E402


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
    rows, models = [], {}
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
    feed = {k: v[:1] for k, v in evaluation.items() if k != "labels"}
    names = [row["candidate"] for row in rows]
    ratios = latency_ratios(source, [models[name] for name in names], feed, args.rounds)
    for row, ratio in zip(rows, ratios):
        row["latency ×source (1 thread)"] = round(ratio, 3)
    args.out.with_suffix(".json").write_text(json.dumps({"model": corpus.name, "target": args.target, "rows": rows}))
    columns = ["candidate", "held out Δ", "latency ×source (1 thread)"]
    table = "\n".join(markdown_table(columns, [[r[c] for c in columns] for r in rows]))
    args.out.with_suffix(".md").write_text(f"{corpus.name} on {args.target} ({args.method})\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
