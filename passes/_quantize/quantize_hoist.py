"""A quantize moved above the Concat and nearest-neighbour Resize it follows: they then copy bytes, not floats.

PP-OCRv4 det's neck upsamples three maps (nearest Resize) and concatenates them with a fourth, in float, then
quantizes the 80×80×96 result for the next QLinearConv. Quantizing is element-wise and those ops only copy
elements, so ``Q(Concat(Resize(a), b)) = Concat(Resize(Q(a)), Q(b))`` bit for bit: each input is quantized at the
output's scale before it is upsampled, and the copies move a quarter of the bytes (A/B on PP-OCRv4 det:
0.543 → 0.510x fp32, benchmarks/results/det_neck_head.md).
"""

from __future__ import annotations

import onnx
from lepton_cli.passes._quantize.qparams import per_tensor
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_value_info

HOISTED_SUFFIX = "_hoisted_q"  # a quantize moved above a Concat or Resize


def nearest_resize(node: onnx.NodeProto) -> bool:
    """A Resize that only copies elements: mode nearest (the default)."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return node.op_type == "Resize" and mode == b"nearest"


def _quantize_into(
    g: GraphIndex, names: FreshNames, quantize: onnx.NodeProto, node: onnx.NodeProto, k: int, retyped: set[str]
) -> None:
    """Make input ``k`` of ``node`` quantized at ``quantize``'s scale: through a nearest Resize read only by ``node``
    (its output joins ``retyped``: now integer), else right before ``node``."""
    tensor = node.input[k]
    source = g.producer.get(tensor)
    if source is not None and nearest_resize(source) and g.only_reader(tensor) is node:
        retyped.add(tensor)
        _quantize_into(g, names, quantize, source, 0, retyped)
        return
    added = helper.make_node(
        "QuantizeLinear",
        [tensor, quantize.input[1], quantize.input[2]],
        [names.fresh(f"{tensor}_q")],
        name=names.fresh(f"{quantize.name}{HOISTED_SUFFIX}"),
    )
    g.insert(g.position(node), added)
    g.set_input(node, k, added.output[0])


def hoist_quantizes(model: onnx.ModelProto) -> int:
    """Move, in place, each per-tensor quantize whose input is a Concat or nearest Resize read by nothing else above
    it; how many were moved."""
    g, names = GraphIndex(model.graph), FreshNames(model)
    moved, retyped = 0, set()
    for quantize in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        source = g.producer.get(quantize.input[0])
        if source is None or per_tensor(g, quantize) is None or g.only_reader(quantize.input[0]) is not quantize:
            continue
        if not (source.op_type == "Concat" or nearest_resize(source)):
            continue
        for k in range(len(source.input) if source.op_type == "Concat" else 1):
            _quantize_into(g, names, quantize, source, k, retyped)
        output = quantize.output[0]
        retyped.add(source.output[0])  # gone: the quantize's output takes its place
        g.remove(quantize)
        g.set_output(source, 0, output)
        moved += 1
    drop_value_info(model.graph, retyped)  # their float types no longer hold
    return moved
