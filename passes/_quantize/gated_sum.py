"""A quantized sum of a gated map and a dequantized (or nearest-upsampled) one, in integer kernels.

An FPN's top-down step in PP-OCRv4 det's neck is ``Q(x * (1 + g) + Resize(y))``: a squeeze-excited lateral map plus
the upsampled coarser one. With only convs quantized both the Mul and the Add run in float over the map. A gate
from a HardSigmoid or Sigmoid (plus a constant c >= 0) lies in [0, 1 + c], so ``x * g`` lies within (1 + c) times
x's quantized range: quantized at (1 + c) times x's scale and x's zero point it is never clipped, and the gate
itself gets a quantize over [0, 1 + c]. A nearest Resize copies the integers as well as the floats, so it moves
before its input's dequantize. ORT then runs QLinearMul and QLinearAdd (PP-OCRv4 det: 0.528 → 0.495x fp32 in one
run, held-out worst page 97.13 → 97.06; benchmarks/results/det_neck_head.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._quantize.qparams import QParams, one_element, per_tensor
from lepton_cli.passes._quantize.quantize_hoist import nearest_resize
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex

GATED_SUM_SUFFIX = "_gated_sum"  # the quantize given to a gated product


def _gate_top(g: GraphIndex, gate: str) -> float | None:
    """The gate's upper bound when it is a HardSigmoid or Sigmoid, or one plus a constant c >= 0 (lower bound 0)."""
    node = g.producer.get(gate)
    if node is None:
        return None
    if node.op_type in ("HardSigmoid", "Sigmoid"):
        return 1.0
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for inner, other in (node.input, tuple(reversed(node.input))):
        constant, producer = one_element(g, other), g.producer.get(inner)
        if constant is not None and producer is not None and producer.op_type in ("HardSigmoid", "Sigmoid"):
            return 1.0 + float(constant) if float(constant) >= 0 else None
    return None


def _dequantized(g: GraphIndex, tensor: str) -> QParams | None:
    """The 8-bit per-tensor parameters of the DequantizeLinear that produces ``tensor``."""
    node = g.producer.get(tensor)
    params = per_tensor(g, node) if node is not None and node.op_type == "DequantizeLinear" else None
    return params if params is not None and params.qrange is not None else None


def _gated_product(
    g: GraphIndex, add: onnx.NodeProto, tensor: str
) -> tuple[onnx.NodeProto, str, float, QParams] | None:
    """(Mul, its gate, the gate's top, x's parameters) when ``tensor`` is Mul(DQ(x), gate), read by ``add`` alone."""
    mul = g.producer.get(tensor)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2 or g.only_reader(tensor) is not add:
        return None
    for x, gate in (mul.input, tuple(reversed(mul.input))):
        top, params = _gate_top(g, gate), _dequantized(g, x)
        if top is not None and params is not None:
            return mul, gate, top, params
    return None


def _dequantized_side(g: GraphIndex, add: onnx.NodeProto, tensor: str) -> bool:
    """Whether ``tensor`` is DQ(q) or a nearest Resize of DQ(q) that only ``add`` reads."""
    node = g.producer.get(tensor)
    if node is not None and nearest_resize(node) and g.only_reader(tensor) is add:
        return _dequantized(g, node.input[0]) is not None
    return _dequantized(g, tensor) is not None


def _quantize_pair(
    g: GraphIndex, names: FreshNames, tensor: str, scale: float, zero: np.ndarray, before: onnx.NodeProto
) -> str:
    """Q then DQ of ``tensor`` at (scale, zero), inserted before ``before``; the DQ output's name."""
    s = g.add_initializer(names.fresh(f"{tensor}_s"), np.array(scale, np.float32))
    z = g.add_initializer(names.fresh(f"{tensor}_z"), zero)
    q = helper.make_node("QuantizeLinear", [tensor, s, z], [names.fresh(f"{tensor}_q")])
    q.name = names.fresh(f"{tensor}{GATED_SUM_SUFFIX}")
    dq = helper.make_node("DequantizeLinear", [q.output[0], s, z], [names.fresh(f"{tensor}_dq")], name=q.name + "_dq")
    position = g.position(before)
    g.insert(position, q)
    g.insert(position + 1, dq)
    return dq.output[0]


def _upsample_integers(g: GraphIndex, names: FreshNames, resize: onnx.NodeProto) -> None:
    """Resize(DQ(q)) -> DQ(Resize(q)): a nearest Resize copies integers as it copies floats."""
    dequantize = g.producer[resize.input[0]]
    output = resize.output[0]
    g.set_input(resize, 0, dequantize.input[0])
    g.set_output(resize, 0, names.fresh(f"{output}_int"))
    after = helper.make_node("DequantizeLinear", [resize.output[0], *dequantize.input[1:]], [output])
    after.name = names.fresh(f"{resize.name}_dq")
    g.insert(g.position(resize) + 1, after)


def integer_gated_sums(model: onnx.ModelProto) -> int:
    """Lower, in place, each quantized Add of a gated product and a dequantized or upsampled map; how many."""
    g, names = GraphIndex(model.graph), FreshNames(model)
    lowered = 0
    for add in [n for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2]:
        quantize = g.only_reader(add.output[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        for product, other in (add.input, tuple(reversed(add.input))):
            found = _gated_product(g, add, product)
            if found is None or not _dequantized_side(g, add, other):
                continue
            mul, gate, top, x = found
            low, high = x.qrange
            gate_zero = np.array(low, dtype=x.zero.dtype)
            g.replace_input(mul, gate, _quantize_pair(g, names, gate, top / (high - low), gate_zero, mul))
            g.replace_input(add, product, _quantize_pair(g, names, product, top * x.scale, x.zero, add))
            side = g.producer.get(other)
            if side is not None and nearest_resize(side):
                _upsample_integers(g, names, side)
            lowered += 1
            break
    return lowered
