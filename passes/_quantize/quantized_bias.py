"""Bias correction measured on the quantized model, layer by layer in graph order (empirical bias correction).

``bias_correction.py`` removes the mean output shift of each layer's own weight rounding, on float inputs. The int8
model shifts means for other reasons too: its activation ranges clip and round asymmetrically, and every shift
reaches the layers after it. Here each weight layer's per-channel output mean in the quantized model is measured on
calibration data and matched to the float reference's by its bias, in graph order, so a layer is corrected with
the layers before it already corrected (AIMET's empirical bias correction, NNCF's BiasCorrection; correcting all
layers from one run overshoots, each counting the shift its predecessors already remove). PP-OCRv5 det, every op
int8 on cpu-avx (MinMax), 32 held-out camera frames: worst page 15.8 -> 7.5 points, mean page 8.8 -> 3.0. Models
already close to their source read worse with it (PP-OCRv5 rec on tpu 1.28 -> 1.87): opt-in
(benchmarks/results/quantized_bias.md).

The biases are graph inputs of one session while measuring (an initializer listed as an input can be fed), so the
model is loaded once; each layer costs one run per sample. A bias ORT stored as int32 (scale = input x weight
scale) is corrected in its integer steps. Layers are matched to the reference by node name, not output name: ORT's
quantizer folds a Relu into the quantize after a conv and gives the conv the Relu's output name, and comparing that
pre-Relu mean with the reference's post-Relu one took the model above from 15.8 to 30.7 points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.qparams import int32_values
from lepton_cli.passes._quantize.sensitivity import tensor_runs, with_outputs
from onnx import helper, numpy_helper

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.model.sessions import make_session

CONV_OPS = ("Conv", "ConvTranspose")


@dataclass
class BiasSite:
    output: str  # the layer's output in the quantized model
    reference_output: str  # the same node's output in the float reference
    bias: str  # the initializer that holds its bias: float, or int32 behind a DequantizeLinear
    axis: int  # the channel axis of ``output``
    step: np.ndarray | None  # an int32 bias's scale per channel; None for a float bias


def bias_sites(model: onnx.ModelProto, reference_nodes: dict[str, onnx.NodeProto]) -> list[BiasSite]:
    """The weight layers of ``model`` (Conv, ConvTranspose, Gemm, a MatMul's bias Add) that the reference has too
    (``reference_nodes``: by node name, the same op), with their bias initializer, in graph order. Matched by node
    name: ORT's quantizer folds a Relu into the quantize after a conv and gives the conv the Relu's output name."""
    g = GraphIndex(model.graph)
    sites = []
    for node in model.graph.node:
        twin = reference_nodes.get(node.name)
        if not node.name or twin is None or twin.op_type != node.op_type:
            continue
        if node.op_type in CONV_OPS + ("Gemm",) and len(node.input) > 2 and node.input[2]:
            bias, axis = node.input[2], 1 if node.op_type in CONV_OPS else -1
        elif node.op_type == "Add" and _reads_matmul(g, node):
            bias, axis = next(i for i in node.input if i in g.inits), -1
        else:
            continue
        site = _site(g, node.output[0], twin.output[0], bias, axis)
        if site is not None:
            sites.append(site)
    return sites


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.name}


def _reads_matmul(g: GraphIndex, add: onnx.NodeProto) -> bool:
    """``add`` adds a 1-D constant to a MatMul's output."""
    consts = [i for i in add.input if i in g.inits]
    data = [i for i in add.input if i not in g.inits]
    if len(consts) != 1 or len(data) != 1 or len(g.inits[consts[0]].dims) != 1:
        return False
    producer = g.producer.get(data[0])
    return producer is not None and producer.op_type == "MatMul"


def _site(g: GraphIndex, output: str, reference_output: str, bias: str, axis: int) -> BiasSite | None:
    if bias in g.inits:
        is_float = g.inits[bias].data_type == onnx.TensorProto.FLOAT
        return BiasSite(output, reference_output, bias, axis, None) if is_float else None
    dequantize = g.producer.get(bias)
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in g.inits:
        return None
    stored, scale = g.inits[dequantize.input[0]], g.const(dequantize.input[1])
    if stored.data_type != onnx.TensorProto.INT32 or scale is None or len(g.readers(dequantize.input[0])) != 1:
        return None
    return BiasSite(output, reference_output, dequantize.input[0], axis, scale.astype(np.float64).reshape(-1))


class _ChannelMean:
    """A running per-channel mean over runs, each run's tensor reduced as it arrives."""

    def __init__(self, axis: int) -> None:
        self.axis, self.total, self.count = axis, 0.0, 0

    def add(self, value: np.ndarray) -> None:
        rows = np.moveaxis(value, self.axis, -1).reshape(-1, value.shape[self.axis])
        self.total = self.total + rows.astype(np.float64).sum(axis=0)
        self.count += len(rows)

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def _measuring_copy(model: onnx.ModelProto, sites: list[BiasSite]) -> tuple[onnx.ModelProto, list[BiasSite]]:
    """(``model`` returning every site's output, its biases fed as inputs (defaults: their initializers); the sites
    whose output it returns)."""
    copy, returned = with_outputs(model, [s.output for s in sites])
    returned = set(returned) | {o.name for o in model.graph.output}
    sites = [s for s in sites if s.output in returned]
    feed_initializers(copy, [s.bias for s in sites])
    return copy, sites


def feed_initializers(model: onnx.ModelProto, names: list[str]) -> None:
    """List the initializers ``names`` as graph inputs too, so a session can be fed other values for them (their
    stored values stay the defaults): one session measures every corrected or refitted value."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    model.graph.input.extend(
        helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims))
        for name in dict.fromkeys(names)
        if name not in inputs
    )


def correct_quantized_biases(
    model: onnx.ModelProto, reference: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Correct ``model``'s biases in place so each layer's per-channel output mean on ``feeds`` matches
    ``reference``'s (the float model it was quantized from, same node names); returns the corrected biases by
    initializer name (``write_initializers`` puts them into the same quantized model built again)."""
    measuring, sites = _measuring_copy(model, bias_sites(model, nodes_by_name(reference)))
    if not sites or not feeds:
        return {}
    target = _reference_means(reference, sites, feeds)
    inits = {t.name: t for t in model.graph.initializer}
    biases = {s.bias: tensor_array(inits[s.bias]).copy() for s in sites}
    session = make_session(measuring, arena=False)
    corrected: dict[str, np.ndarray] = {}
    for site in sites:
        measured = _ChannelMean(site.axis)
        for feed in feeds:
            measured.add(session.run([site.output], adapt_feed(model, feed) | biases)[0])
        shift = measured.mean() - target[site.reference_output]
        if shift.shape != biases[site.bias].shape or not np.all(np.isfinite(shift)):
            continue
        if site.step is None:
            biases[site.bias] = (biases[site.bias] - shift).astype(np.float32)
        else:
            step = np.broadcast_to(site.step, shift.shape)
            # a zero step has no weights to correct; a block of dead channels (step ~1e-19) overflows int32
            steps = np.where(step > 0, np.round(shift / np.where(step > 0, step, 1.0)), 0.0)
            biases[site.bias] = int32_values(biases[site.bias] - steps)
        corrected[site.bias] = biases[site.bias]
    write_initializers(model, corrected)
    return corrected


def write_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Set the initializers named in ``values`` (each keeps its name and takes the value's dtype)."""
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))


def _reference_means(
    reference: onnx.ModelProto, sites: list[BiasSite], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    axes = {s.reference_output: s.axis for s in sites}
    means = {name: _ChannelMean(axis) for name, axis in axes.items()}
    for values in tensor_runs(reference, list(axes), feeds, graph_outputs=True):
        for name, value in values.items():
            means[name].add(value)
    return {name: mean.mean() for name, mean in means.items()}
