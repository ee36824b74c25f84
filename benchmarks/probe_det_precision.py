"""Probe (issue 16): would more than 8 bits on a map detector's activations, or on its weights, bring its fully int8
model within the budget? Scores against the source on the corpus's evaluation frames (worst page's map F1 at 0.3 and
0.5, as the yardstick):

* the int8 model;
* activations at 16 bits: the chosen Q/DQ pairs at scale/256 and zero point*256 (the same range, 256 times finer;
  ONNX Runtime's com.microsoft 16-bit Q/DQ), for every activation, for none but one producer op type, for all but
  one, and for the inputs of pointwise, depthwise or all convs;
* weights in float: every Conv, or only the pointwise, depthwise or kxk ones, reading the fused model's weight.

    python -m benchmarks.corpus.compile_child --save-model INT8.onnx -- MODEL.onnx --target T --calib C \
        --input-shape x=1,3,320,320 -o OUT -q --no-bench --max-accuracy-drop 100
    python benchmarks/probe_det_precision.py --model ppocrv4_det --int8 INT8.onnx --float FUSED.onnx \
        --out benchmarks/results/probe_det_precision

T: a target that extends cpu-avx with ``[pass_params.quantize]`` ``tune = false`` and ``integer_elementwise = false``
(plain Q/DQ pairs); FUSED.onnx: a target listing only fuse and prune (``mode = "dead"``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.probe_int8_loss import activation_quantizes, drops, maps, probe_arguments  # noqa: E402


def widened(model: onnx.ModelProto, tensors: set[str]) -> onnx.ModelProto:
    """``model`` with the Q/DQ pairs on ``tensors`` at 16 bits over the same range (com.microsoft Q/DQ, any opset)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {t.name: t for t in result.graph.initializer}
    quantized = {n.output[0] for n in result.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in tensors}
    made: dict[tuple[str, str], tuple[str, str]] = {}
    for node in result.graph.node:
        pair = (node.op_type == "QuantizeLinear" and node.output[0] in quantized) or (
            node.op_type == "DequantizeLinear" and node.input[0] in quantized
        )
        if not pair:
            continue
        key = (node.input[1], node.input[2])
        if key not in made:
            scale = numpy_helper.to_array(inits[key[0]]).astype(np.float32) / 256
            zero = numpy_helper.to_array(inits[key[1]]).astype(np.int64) * 256
            wide = np.uint16 if inits[key[1]].data_type == onnx.TensorProto.UINT8 else np.int16
            made[key] = (f"{key[0]}~16s", f"{key[1]}~16z")
            result.graph.initializer.extend(
                [numpy_helper.from_array(scale, made[key][0]), numpy_helper.from_array(zero.astype(wide), made[key][1])]
            )
        node.input[1], node.input[2] = made[key]
        node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return result


def with_float_weights(model: onnx.ModelProto, fused: onnx.ModelProto, convs: set[str]) -> onnx.ModelProto:
    """``model`` with the Convs named in ``convs`` reading the fused model's float weight of the same Conv."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = {t.name: t for t in fused.graph.initializer}
    sources = {n.name: n for n in fused.graph.node if n.op_type == "Conv"}
    for node in result.graph.node:
        if node.name in convs:
            value = numpy_helper.to_array(weights[sources[node.name].input[1]])
            result.graph.initializer.append(numpy_helper.from_array(value, f"{node.name}~float_weight"))
            node.input[1] = f"{node.name}~float_weight"
    return result


def conv_kinds(model: onnx.ModelProto, fused: onnx.ModelProto) -> dict[str, str]:
    """Conv name -> "pw" (1x1), "dw" (grouped) or "kxk", for the Convs both models hold."""
    weights = {t.name: t for t in fused.graph.initializer}
    shared = {n.name for n in model.graph.node if n.op_type == "Conv"}
    kinds = {}
    for node in fused.graph.node:
        if node.op_type == "Conv" and node.name in shared:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kinds[node.name] = "dw" if group > 1 else ("pw" if weights[node.input[1]].dims[2] == 1 else "kxk")
    return kinds


def quantized_input(model: onnx.ModelProto, tensor: str) -> str | None:
    """The float tensor whose Q/DQ pair feeds ``tensor``, if one does."""
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer.get(tensor)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def variants(model: onnx.ModelProto, fused: onnx.ModelProto) -> list[tuple[str, onnx.ModelProto]]:
    producer = {o: n for n in model.graph.node for o in n.output}
    by_op: dict[str, set[str]] = defaultdict(set)
    for q in activation_quantizes(model):
        by_op[producer[q.input[0]].op_type if q.input[0] in producer else "graph input"].add(q.input[0])
    every = set().union(*by_op.values())
    kinds = conv_kinds(model, fused)
    convs = {n.name: n for n in model.graph.node if n.name in kinds}
    rows = [("int8", model), ("every activation 16-bit", widened(model, every))]
    for op, tensors in sorted(by_op.items(), key=lambda kv: -len(kv[1])):
        rows.append((f"{op} outputs 16-bit ({len(tensors)})", widened(model, tensors)))
        rows.append((f"every activation 16-bit but {op} outputs", widened(model, every - tensors)))
    for kind in ("pw", "dw", "kxk"):
        inputs = {quantized_input(model, convs[c].input[0]) for c in kinds if kinds[c] == kind} - {None}
        rows.append((f"{kind} conv inputs 16-bit ({len(inputs)})", widened(model, inputs)))
    rows.append(("every weight float", with_float_weights(model, fused, set(kinds))))
    for kind in ("pw", "dw", "kxk"):
        chosen = {c for c in kinds if kinds[c] == kind}
        rows.append((f"{kind} weights float ({len(chosen)})", with_float_weights(model, fused, chosen)))
    return rows


def main(argv: list[str]) -> None:
    args = probe_arguments(__doc__.split("\n")[0], "benchmarks/results/probe_det_precision").parse_args(argv)
    corpus = by_name(args.model)
    _, eval_path = ensure_data(corpus)
    feeds = [{"x": page[None]} for page in np.load(eval_path)["x"]]
    references = maps(ensure_model(corpus).read_bytes(), feeds)
    table = []
    for label, model in variants(onnx.load(args.int8), onnx.load(args.fused)):
        worst, mean = drops(references, maps(model, feeds))
        table.append(
            {"model": args.model, "int8": args.int8, "what": label, "worst_page_drop": worst, "mean_page_drop": mean}
        )
        print(f"{label:<50} worst {worst:6.2f}  mean {mean:6.2f}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    header = ["model", "int8 model", "variant", "worst page drop", "mean page drop"]
    rows = [[r["model"], Path(r["int8"]).name, r["what"], r["worst_page_drop"], r["mean_page_drop"]] for r in table]
    out.with_suffix(".md").write_text("\n".join(markdown_table(header, rows)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
