"""Probe (issue 16): does per-channel smoothing *through* hard-swish help PP-OCRv4 det's int8 model?

DBNet's backbone (PP-LCNetV3) writes most conv inputs as ``Add(y * HardSigmoid(y), b)`` with channel maxima
60-70x apart; one per-tensor activation scale leaves the narrow channels a few levels, and cross-layer
equalisation cannot cross hard-swish. This rewrite makes the scaling exact anyway: the producing conv writes
``u = relu(y + beta/alpha) / s`` (the Relu is the hard-swish's own floor, fused into QLinearConv, so no range is
spent below it), the gate reads ``HardSigmoid(u * alpha * s)`` with alpha 1 and beta 0, the product reads
``u - beta / (alpha s)``, the shift ``b`` becomes ``b / s`` and the reading convs' input channels take ``s``
(SmoothQuant's rule, ``s = r^a / w^(1-a)``; a = 0 leaves s = 1: only the Relu floor). The per-channel Mul/Add
stay float. Then ORT ``quantize_static`` (U8S8 per-channel, MinMax, every op and Conv only) and the output SNR /
worst-page mask F1 (0.3 and 0.5) against the float model on held-out pages.

    .venv/bin/python benchmarks/probe_hardswish_smoothing.py FUSED.onnx --calib calib.npz --eval eval.npz \
        [--alphas 0 0.5 1.0] [--out benchmarks/results/probe_hardswish_smoothing]

FUSED.onnx: Lepton's fused float model (``python -m benchmarks.corpus.compile_child --save-model FUSED.onnx --
ppocrv4_det.onnx --target T --input-shape x=1,3,320,320 --calib calib.npz`` with a target T that extends cpu-avx
and lists only the fuse and prune passes).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from lepton_cli.passes._quantize import conv_smoothing
from lepton_cli.passes._quantize.weight_layers import WeightLayer, load, store, weight_layers
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from lepton_cli.model.graph_edit import GraphIndex

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.md_table import markdown_table  # noqa: E402


@dataclass
class Site:
    tensor: str  # the conv input rescaled: Add(y * HardSigmoid(y), b) or y * HardSigmoid(y)
    producer: WeightLayer  # the conv writing y
    gate: onnx.NodeProto  # the HardSigmoid
    product: onnx.NodeProto  # the Mul
    shift: list[str]  # the Add's constant, if any
    readers: list[WeightLayer]  # the convs reading the tensor (input 0), nothing else


def hardswish_sites(model: onnx.ModelProto) -> list[Site]:
    index = GraphIndex(model.graph)
    producer, readers, inits = index.producer, index.consumers, index.inits
    convs = {layer.node.name: layer for layer in weight_layers(model) if layer.kind == "conv"}
    sites = []
    for tensor, nodes in readers.items():
        layers = [convs.get(n.name) for n in nodes]
        if tensor not in producer or any(c is None or c.node.input[0] != tensor for c in layers):
            continue
        node, shift = producer[tensor], []
        if node.op_type == "Add" and sum(i in inits for i in node.input) == 1:
            data = next(i for i in node.input if i not in inits)
            if len(readers.get(data, [])) != 1 or data not in producer:
                continue
            shift, node = [next(i for i in node.input if i in inits)], producer[data]
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for y, gated in (tuple(node.input), tuple(reversed(node.input))):
            gate, conv = producer.get(gated), producer.get(y)
            if gate is None or gate.op_type != "HardSigmoid" or gate.input[0] != y or conv is None:
                continue
            if conv.name in convs and {n.name for n in readers[y]} == {gate.name, node.name}:
                sites.append(Site(tensor, convs[conv.name], gate, node, shift, layers))
    return sites


def smooth_through_hardswish(model: onnx.ModelProto, feeds: list[dict], alpha: float | None) -> list[str]:
    """Rewrite every hard-swish site in place (outputs unchanged); the nodes added, to be left float."""
    sites = hardswish_sites(model)
    ranges = conv_smoothing.channel_absmax(model, [s.tensor for s in sites], feeds)
    graph, left_float = model.graph, []
    for site in sites:
        r = np.maximum(ranges[site.tensor].astype(np.float64), ranges[site.tensor].max() / 1e3)
        dense = [load(model, c.weight) for c in site.readers if c.groups == 1]
        wmax = np.max([np.abs(w).max(axis=(0, 2, 3)) for w in dense], axis=0) if dense else None
        if alpha is None:
            s = np.ones_like(r)
        else:
            s = r if wmax is None else r**alpha / np.maximum(wmax, wmax.max() / 1e3) ** (1 - alpha)
            s = np.clip(s / s.max(), 1e-3, 1.0)
        gate, product, y = site.gate, site.product, site.gate.input[0]
        a = next((x.f for x in gate.attribute if x.name == "alpha"), 0.2)
        b = next((x.f for x in gate.attribute if x.name == "beta"), 0.5)
        shift = b / a  # the gate is 0 below y = -shift
        conv = site.producer
        store(model, conv.weight, load(model, conv.weight) / s.reshape(-1, 1, 1, 1))
        bias = load(model, conv.bias) if conv.bias else np.zeros(len(s))
        store(model, conv.bias, (bias + shift) / s)
        u = f"{y}_u"
        graph.initializer.extend(
            [
                numpy_helper.from_array((a * s).astype(np.float32).reshape(-1, 1, 1), f"{u}_gain"),
                numpy_helper.from_array((-shift / s).astype(np.float32).reshape(-1, 1, 1), f"{u}_offset"),
            ]
        )
        added = [
            helper.make_node("Relu", [y], [u], name=f"{conv.node.name}_floor"),
            helper.make_node("Mul", [u, f"{u}_gain"], [f"{u}_g"], name=f"{gate.name}_rescale"),
            helper.make_node("Add", [u, f"{u}_offset"], [f"{u}_y"], name=f"{product.name}_unshift"),
        ]
        position = list(graph.node).index(gate)
        for k, node in enumerate(added):
            graph.node.insert(position + k, node)
        gate.input[0] = f"{u}_g"
        for attribute in [x for x in gate.attribute if x.name in ("alpha", "beta")]:
            gate.attribute.remove(attribute)
        gate.attribute.extend([helper.make_attribute("alpha", 1.0), helper.make_attribute("beta", 0.0)])
        product.input[list(product.input).index(y)] = f"{u}_y"
        for name in site.shift:
            value = load(model, name).reshape(-1).astype(np.float64)
            store(model, name, (value / s).reshape(-1, 1, 1))
            conv_smoothing._drop_shape_notes(graph, name)  # its recorded shape no longer holds
        for reader in site.readers:
            weight = load(model, reader.weight)
            per_row = s if reader.groups == 1 else np.repeat(s, weight.shape[0] // len(s))
            shape = (1, -1, 1, 1) if reader.groups == 1 else (-1, 1, 1, 1)
            store(model, reader.weight, weight * per_row.reshape(shape))
        left_float += [added[1].name, added[2].name]
        left_float += [n.name for n in graph.node if set(site.shift) & set(n.input)]
    return left_float


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _run(model: onnx.ModelProto | str, feeds: list[dict]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _worst_page_f1(ref: np.ndarray, got: np.ndarray) -> float:
    worst = 1.0
    for threshold in (0.3, 0.5):
        a, b = ref > threshold, got > threshold
        tp = (a & b).sum(axis=(1, 2, 3))
        worst = min(worst, float((2 * tp / np.maximum(a.sum(axis=(1, 2, 3)) + b.sum(axis=(1, 2, 3)), 1)).min()))
    return 100.0 * worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--calib-count", type=int, default=16)
    parser.add_argument("--eval-count", type=int, default=8)
    parser.add_argument("--alphas", nargs="*", default=["none", "0", "0.5", "1.0"], help="none: no rewrite")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_hardswish_smoothing"))
    args = parser.parse_args()
    base = onnx.load(args.model)
    name = base.graph.input[0].name
    calib = [{name: x[None]} for x in np.load(args.calib)[name][: args.calib_count]]
    held = [{name: x[None]} for x in np.load(args.eval)[name][: args.eval_count]]
    reference = _run(base, held)
    rows = []
    for tag in args.alphas:
        model, left = copy.deepcopy(base), []
        if tag != "none":
            left = smooth_through_hardswish(model, calib, None if float(tag) == 0 else float(tag))
        exact = float(np.abs(_run(model, held[:2]) - reference[:2]).max())
        with tempfile.TemporaryDirectory() as folder:
            source, target = str(Path(folder) / "m.onnx"), str(Path(folder) / "q.onnx")
            onnx.save(model, source)
            for ops in (None, ["Conv"]):
                quantize_static(
                    source,
                    target,
                    _Reader(calib),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=left,
                    op_types_to_quantize=ops,
                    calibrate_method=CalibrationMethod.MinMax,
                )
                got = _run(target, held)
                snr = 10 * np.log10(float((reference**2).sum() / ((reference - got) ** 2).sum()))
                rows.append(
                    {
                        "rewrite": tag,
                        "ops": "every op" if ops is None else "Conv",
                        "float_max_abs": exact,
                        "snr_db": round(snr, 2),
                        "worst_page_f1": round(_worst_page_f1(reference, got), 2),
                    }
                )
                print(
                    f"{tag:>5} {rows[-1]['ops']:8} exact {exact:.1e}  SNR {snr:6.2f} dB  worst page F1 "
                    f"{rows[-1]['worst_page_f1']:6.2f}",
                    flush=True,
                )
    header = ["rewrite (a)", "quantized", "float max abs diff", "output SNR dB", "worst-page F1"]
    table = markdown_table(
        header,
        [[r["rewrite"], r["ops"], f"{r['float_max_abs']:.1e}", r["snr_db"], r["worst_page_f1"]] for r in rows],
    )
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
