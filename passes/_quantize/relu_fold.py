"""A Relu (or Clip from 0) between two quantizes folded into the second: its zero point at the type's minimum clips.

When only Convs are quantized, a Conv's output is quantized, dequantized, rectified in float and quantized again for
the next Conv: ``Q1 -> DQ1 -> Relu -> Q2``. A quantize whose zero point is the integer minimum already maps every
negative to zero, so ``Q2(x)`` is ``Q2(Relu(x))``; a Clip from 0 to M is the same when Q2's largest value is at most
M. Reading ``x`` directly, Q2 joins the Conv's QLinearConv and the float pass over the map and one rounding go
(PP-OCRv4 det's head after its ConvTransposes became 1×1 Convs: 80×80×96). A small tensor (a squeeze-excite's
[1, C, 1, 1]) costs nothing to rectify in float and keeps its rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._quantize.qparams import one_element, per_tensor

from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.model.stats import shape_map

RELU_FOLDED_SUFFIX = "_relu_folded"  # the quantize that absorbed a Relu or Clip
MIN_ELEMENTS = 4096  # below this a float pass is under a microsecond: not worth a changed rounding


def _clip_top(g: GraphIndex, node: onnx.NodeProto) -> float | None:
    """Clip's upper bound when its lower bound is 0 (Relu: inf); None for anything else."""
    if node.op_type == "Relu":
        return np.inf
    if node.op_type != "Clip" or len(node.input) < 2 or not node.input[1]:
        return None
    low = one_element(g, node.input[1])
    high = one_element(g, node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(np.inf)
    if low is None or high is None or float(low) != 0.0:
        return None
    return float(high)


def _largest(g: GraphIndex, quantize: onnx.NodeProto) -> float | None:
    """The largest value ``quantize`` represents when its zero point is its type's minimum (per tensor)."""
    params = per_tensor(g, quantize)
    if params is None or params.qrange is None or int(params.zero) != params.qrange[0]:
        return None
    low, high = params.qrange
    return params.scale * (high - low)


def _requantized_input(g: GraphIndex, rectifier: onnx.NodeProto) -> str | None:
    """``x`` where the rectifier reads DQ(Q(x)) and nothing else reads that pair."""
    dequantize = g.producer.get(rectifier.input[0])
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    quantize = g.producer.get(dequantize.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return None
    if g.only_reader(dequantize.output[0]) is not rectifier or g.only_reader(quantize.output[0]) is not dequantize:
        return None
    return quantize.input[0]


def _element_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Elements per tensor where shape inference knows every dimension."""
    return {name: int(np.prod(dims)) for name, dims in shape_map(model).items() if None not in dims}


def fold_rectifiers(model: onnx.ModelProto) -> int:
    """Fold every such Relu / Clip over a large tensor in ``model`` (in place) into the quantize after it; how many
    were folded."""
    g = GraphIndex(model.graph)
    sizes: dict[str, int] | None = None  # inferred at the first match, before anything is folded
    folded = 0
    for rectifier in [n for n in model.graph.node if n.op_type in ("Relu", "Clip")]:
        top = _clip_top(g, rectifier)
        after = g.only_reader(rectifier.output[0]) if top is not None else None
        if after is None or after.op_type != "QuantizeLinear" or after.input[0] != rectifier.output[0]:
            continue
        largest = _largest(g, after)
        source = _requantized_input(g, rectifier)
        if largest is None or source is None or largest > top:
            continue
        sizes = _element_counts(model) if sizes is None else sizes
        if sizes.get(rectifier.output[0], MIN_ELEMENTS) < MIN_ELEMENTS:
            continue
        dequantize = g.producer[rectifier.input[0]]
        quantize = g.producer[dequantize.input[0]]
        g.set_input(after, 0, source)
        for node in (rectifier, dequantize, quantize):
            g.remove(node)
        after.name = f"{after.name}{RELU_FOLDED_SUFFIX}"
        folded += 1
    return folded
