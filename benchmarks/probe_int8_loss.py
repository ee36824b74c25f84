"""Probe (issue 16): where a map detector's int8 model loses its worst page — weights or activations, which tensors.

Given the corpus model, its int8 QDQ model and the fused float model it was quantized from (Lepton's node and tensor
names in both), scores against the source on the corpus's evaluation frames (worst page's map F1 at 0.3 and 0.5, as
the yardstick) the int8 model; its weights alone (every activation Q/DQ pair bypassed); its activations alone (each
Conv reading the float model's weight); each activation's Q/DQ alone on float weights (``--per-tensor``); and the int8
model after bias correction on the quantized model (``passes/_quantize/quantized_bias.py``, 8 calibration frames).

    python -m benchmarks.corpus.compile_child --save-model INT8.onnx -- MODEL.onnx --target T --calib C \
        --input-shape x=1,3,320,320 -o OUT -q --no-bench --max-accuracy-drop 100
    python benchmarks/probe_int8_loss.py --model ppocrv5_det --int8 INT8.onnx --float FUSED.onnx [--per-tensor] \
        --out benchmarks/results/probe_int8_loss_ppocrv5_det

T: a target that extends cpu-avx with ``tune = false`` and ``integer_elementwise = false`` (plain Q/DQ pairs, each
removable; untuned, the Conv-only tier, so no Relu is folded into a quantize, which a plain bypass would drop where
``float_keep.keep_float`` restores it); FUSED.onnx: the same command with a target listing only the fuse pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.passes._quantize.quantized_bias import correct_quantized_biases  # noqa: E402

from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.ocr_textset import pixel_f1  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402

THRESHOLDS = (0.3, 0.5)


def maps(model: onnx.ModelProto | bytes, feeds: list[dict]) -> list[np.ndarray]:
    session = make_session(model)
    return [session.run(None, feed)[0] for feed in feeds]


def drops(references: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[float, float]:
    """(worst page, mean page) map-F1 drop against the source, points."""
    pages = [min(pixel_f1(r, o, t) for t in THRESHOLDS) for r, o in zip(references, outputs)]
    return round(100 * (1 - min(pages)), 2), round(100 * (1 - float(np.mean(pages))), 2)


def activation_quantizes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


def bypassed(model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """``model`` with every activation Q/DQ pair removed but those quantizing the tensors in ``keep``."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    drop = {q.output[0]: q.input[0] for q in activation_quantizes(result) if q.input[0] not in keep}
    rename = {
        n.output[0]: drop[n.input[0]]
        for n in result.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in drop
    }
    nodes = [n for n in result.graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in drop)]
    nodes = [n for n in nodes if n.output[0] not in rename]
    for node in nodes:
        node.input[:] = [rename.get(i, i) for i in node.input]
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    kept += [helper.make_node("Identity", [rename[o.name]], [o.name]) for o in result.graph.output if o.name in rename]
    del result.graph.node[:]
    result.graph.node.extend(kept)
    return result


def float_weights(model: onnx.ModelProto, fused: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each Conv reading the float weight of the fused model's Conv of the same name."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = {t.name: t for t in fused.graph.initializer}
    convs = {n.name: n for n in fused.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    for node in result.graph.node:
        source = convs.get(node.name)
        if node.op_type in ("Conv", "ConvTranspose") and source is not None and source.input[1] in weights:
            value = numpy_helper.to_array(weights[source.input[1]])
            result.graph.initializer.append(numpy_helper.from_array(value, f"{node.name}_float_weight"))
            node.input[1] = f"{node.name}_float_weight"
    return result


def probe_arguments(description: str, out: str) -> argparse.ArgumentParser:
    """The corpus model, its int8 QDQ model and the fused float model it came from, and where results go."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--int8", required=True)
    parser.add_argument("--float", required=True, dest="fused")
    parser.add_argument("--out", default=out)
    return parser


def main(argv: list[str]) -> None:
    parser = probe_arguments(__doc__.split("\n")[0], "benchmarks/results/probe_int8_loss")
    parser.add_argument("--per-tensor", action="store_true")
    args = parser.parse_args(argv)
    corpus = by_name(args.model)
    calib_path, eval_path = ensure_data(corpus)
    feeds = [{"x": page[None]} for page in np.load(eval_path)["x"]]
    calib = [{"x": page[None]} for page in np.load(calib_path)["x"][:8]]
    references = maps(ensure_model(corpus).read_bytes(), feeds)
    int8, fused = onnx.load(args.int8), onnx.load(args.fused)
    acts = float_weights(int8, fused)
    rows = [("int8", int8), ("weights int8 only", bypassed(int8, set())), ("activations int8 only", acts)]
    corrected = onnx.ModelProto.FromString(int8.SerializeToString())
    layers = len(correct_quantized_biases(corrected, fused, calib))
    rows.append((f"int8, bias correction on the int8 model ({layers} layers)", corrected))
    if args.per_tensor:
        rows += [
            (f"only {q.input[0]} (float weights)", bypassed(acts, {q.input[0]})) for q in activation_quantizes(acts)
        ]
    table = []
    for label, model in rows:
        worst, mean = drops(references, maps(model, feeds))
        table.append({"model": args.model, "what": label, "worst_page_drop": worst, "mean_page_drop": mean})
        print(f"{label:<60} worst {worst:6.2f}  mean {mean:6.2f}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    header = ["model", "what is int8", "worst page drop", "mean page drop"]
    lines = markdown_table(header, [[r["model"], r["what"], r["worst_page_drop"], r["mean_page_drop"]] for r in table])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
