"""Probe (issue 16): where any corpus model's int8 model loses its accuracy — weights or activations, which tensors.

The yardstick's metric on the corpus's evaluation set, against the source, for: the int8 model; its weights alone
(every activation Q/DQ pair bypassed); its activations alone (each quantized weight read back from the float model
the int8 one was quantized from, matched by node name: meaningless where the int8 model's layers were rewritten,
as fpga's weight blocks rewrite them); and with ``--per-tensor`` the int8 model with one
activation Q/DQ pair kept at a time, on its int8 weights (what each tensor's quantization costs alone).
``probe_int8_loss.py`` is the map detectors' version (worst page); this one reads any corpus metric.

    python -m benchmarks.corpus.compile_child --save-model INT8.onnx -- MODEL.onnx --target T --calib C \
        [--input-shape ...] -o OUT -q --no-bench --max-accuracy-drop 100
    (FUSED.onnx: the same with a target that extends T and lists only its fuse pass)
    python benchmarks/probe_int8_split.py --model minilm_l6 --int8 INT8.onnx --float FUSED.onnx [--per-tensor] --out F
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
from benchmarks.corpus.metrics import METRICS  # noqa: E402
from benchmarks.corpus.runner import compiled_outputs, feeds, run_all, session  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.probe_int8_loss import activation_quantizes, bypassed, probe_arguments  # noqa: E402


def float_weights(model: onnx.ModelProto, fused: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every input read through a DequantizeLinear of an initializer replaced by the float initializer
    the fused model's node of the same name reads at that position."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {t.name for t in result.graph.initializer}
    weight_dq = {n.output[0] for n in result.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    fused_inits = {t.name: t for t in fused.graph.initializer}
    fused_nodes = {n.name: n for n in fused.graph.node}
    for node in result.graph.node:
        source = fused_nodes.get(node.name)
        for index, name in enumerate(node.input):
            if name in weight_dq and source is not None and index < len(source.input):
                weight = fused_inits.get(source.input[index])
                if weight is not None:
                    value = numpy_helper.to_array(weight)
                    copy = numpy_helper.from_array(value, f"{node.name}_float_{index}")
                    result.graph.initializer.append(copy)
                    node.input[index] = copy.name
    return result


def _source_run(name: str) -> tuple:
    """(corpus model, evaluation arrays, the source's feeds, its outputs, the corpus metric)."""
    corpus = by_name(name)
    evaluation = dict(np.load(ensure_data(corpus)[1]))
    source = ensure_model(corpus).read_bytes()
    reference = run_all(session(source), evaluation)
    metric = METRICS[corpus.metric]
    return corpus, evaluation, feeds(session(source), evaluation), reference, metric


def main(argv: list[str]) -> None:
    arguments = probe_arguments(__doc__.split("\n")[0], "benchmarks/results/probe_int8_split")
    arguments.add_argument("--per-tensor", action="store_true")
    args = arguments.parse_args(argv)
    corpus, evaluation, source_feeds, reference, metric = _source_run(args.model)
    fp32 = metric(corpus, evaluation, reference, reference)
    int8, fused = onnx.load(args.int8), onnx.load(args.fused)
    rows = [
        ("int8", int8),
        ("weights int8 only", bypassed(int8, set())),
        ("activations int8 only", float_weights(int8, fused)),
    ]
    if args.per_tensor:
        every = {q.input[0] for q in activation_quantizes(int8)}
        rows += [(f"only {name} (int8 weights)", bypassed(int8, {name})) for name in sorted(every)]
    table = []
    for label, model in rows:
        outputs, _ = compiled_outputs(model.SerializeToString(), source_feeds)
        drop = round(fp32 - metric(corpus, evaluation, reference, outputs), 3)
        table.append({"model": args.model, "what": label, "drop": drop})
        print(f"{label:<70} drop {drop:7.3f}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    lines = markdown_table(["model", "what is int8", "drop"], [[r["model"], r["what"], r["drop"]] for r in table])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
