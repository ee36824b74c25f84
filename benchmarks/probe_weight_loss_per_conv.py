"""Probe (issue 16): how much of a map detector's weights-only int8 loss each conv carries.

The int8 model with every activation Q/DQ pair bypassed keeps only its int8 weights; each Conv's weight is then put back
to the fused float model's, one conv at a time, and the worst and mean page's map-F1 drop against the source are scored
on the corpus's evaluation frames (as ``probe_int8_loss.py``, whose INT8/FUSED models this takes):

    python benchmarks/probe_weight_loss_per_conv.py --model ppocrv4_det --int8 INT8.onnx --float FUSED.onnx \
        --out benchmarks/results/probe_weight_loss_ppocrv4_det
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.probe_int8_loss import bypassed, drops, maps, probe_arguments  # noqa: E402
from lepton_cli.model.stats import node_macs, shape_map  # noqa: E402


def with_float_weight(model: onnx.ModelProto, conv: str, weight: np.ndarray) -> onnx.ModelProto:
    """``model`` with Conv ``conv`` reading ``weight`` instead of its dequantized int8 weight."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.initializer.append(numpy_helper.from_array(weight, f"{conv}_float_weight"))
    next(n for n in result.graph.node if n.name == conv).input[1] = f"{conv}_float_weight"
    return result


def main(argv: list[str]) -> None:
    args = probe_arguments(__doc__.split("\n")[0], "benchmarks/results/probe_weight_loss").parse_args(argv)
    corpus = by_name(args.model)
    feeds = [{"x": page[None]} for page in np.load(ensure_data(corpus)[1])["x"]]
    references = maps(ensure_model(corpus).read_bytes(), feeds)
    weights_only, fused = bypassed(onnx.load(args.int8), set()), onnx.load(args.fused)
    initializers = {t.name: t for t in fused.graph.initializer}
    convs = {n.name: n for n in fused.graph.node if n.op_type == "Conv"}
    shapes = shape_map(fused)
    total = sum(node_macs(n, shapes) or 0 for n in convs.values())
    worst, mean = drops(references, maps(weights_only, feeds))
    rows = [{"conv": "none (all int8 weights)", "mac_pct": 0.0, "worst_page_drop": worst, "mean_page_drop": mean}]
    for node in (n for n in weights_only.graph.node if n.op_type == "Conv" and n.name in convs):
        weight = numpy_helper.to_array(initializers[convs[node.name].input[1]])
        worst, mean = drops(references, maps(with_float_weight(weights_only, node.name, weight), feeds))
        share = round(100 * (node_macs(convs[node.name], shapes) or 0) / total, 2)
        rows.append({"conv": node.name, "mac_pct": share, "worst_page_drop": worst, "mean_page_drop": mean})
        print(f"{node.name:<30} {share:6.2f} % MACs  worst {worst:6.2f}  mean {mean:6.2f}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    header = ["conv with float weights", "MACs %", "worst page drop", "mean page drop"]
    table = [[r["conv"], r["mac_pct"], r["worst_page_drop"], r["mean_page_drop"]] for r in rows]
    out.with_suffix(".md").write_text("\n".join(markdown_table(header, table)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
