"""Every swept compile's peak RSS against issue 15's bar: 4 x (fp32 weights + activations) + 1 GiB, per model.

Weights and activations are Lepton's cost model's numbers for the source model at the corpus's bound input
shapes (``costmodel.estimate``: the weights' bytes as stored, the greedy arena of the activations, what one
inference holds). Rows are read from sweep JSON lines files (``sweep.py --json``); the last row of a
model x target pair wins, so list older files first.

    python -m benchmarks.corpus.memory_bar benchmarks/results/corpus_sweep.jsonl ... --out benchmarks/results/memory_bar
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .manifest import REPO, by_name
from .store import ensure_model

GIB_MB = 1024.0


def latest_rows(paths: list[Path]) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["model"], row["target"])] = row
    return rows


def model_bar_mb(name: str) -> dict[str, float]:
    """The model's weights and activation arena (MiB) and the bar they set."""
    import onnx

    from lepton_cli.evaluate import costmodel
    from lepton_cli.pipeline.targets import load_target

    model = by_name(name)
    doc = costmodel.estimate(
        onnx.load(ensure_model(model)), load_target("cpu-avx").hardware, input_shapes=model.input_shapes or None
    )
    weights = doc["weights_bytes"] / 2**20
    activations = doc["peak_activation_bytes"]["greedy_arena"] / 2**20
    return {"weights_mb": weights, "activations_mb": activations, "bar_mb": 4 * (weights + activations) + GIB_MB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", type=Path, help="sweep rows, oldest first")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    rows = latest_rows(args.jsonl)
    bars = {name: model_bar_mb(name) for name in sorted({model for model, _ in rows})}
    table = []
    for (name, target), row in sorted(rows.items()):
        peak = row.get("peak_rss_mb")
        within = peak is not None and peak == peak and peak <= bars[name]["bar_mb"]
        table.append(
            {"model": name, "target": target, "exit": row["code"], "peak_rss_mb": peak, **bars[name], "within": within}
        )
    over = [r for r in table if not r["within"]]
    command = "python -m benchmarks.corpus.memory_bar " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Compile peak RSS against issue 15's bar, 4 x (weights + activation arena) + 1 GiB\n\nCommand: `{command}`\n",
        f"{len(table)} compiles of {len(bars)} models; {len(table) - len(over)} within the bar, {len(over)} over or"
        " unmeasured.",
        "",
        "| model | target | exit | peak RSS MiB | weights MiB | activations MiB | bar MiB | peak / bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown = over + sorted((r for r in table if r["within"]), key=lambda r: -r["peak_rss_mb"] / r["bar_mb"])[:15]
    for r in shown:
        ratio = r["peak_rss_mb"] / r["bar_mb"] if r["peak_rss_mb"] else float("nan")
        lines.append(
            f"| {r['model']} | {r['target']} | {r['exit']} | {r['peak_rss_mb']:.0f} | {r['weights_mb']:.1f} | "
            f"{r['activations_mb']:.1f} | {r['bar_mb']:.0f} | {ratio:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text("[\n" + ",\n".join(json.dumps(row) for row in table) + "\n]\n")
        args.out.with_suffix(".md").write_text(text)
    return 0 if not over else 4


if __name__ == "__main__":
    raise SystemExit(main())
