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
from lepton_cli.passes._quantize.integer_gates import QRANGE
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
        constant = g.const(other)
        producer = g.producer.get(inner)
        if constant is not None and constant.size == 1 and producer is not None:
            c = float(constant.reshape(()))
            if producer.op_type in ("HardSigmoid", "Sigmoid") and c >= 0:
                return 1.0 + c
    return None


def _per_tensor_dequantize(g: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    node = g.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    scale, zero = g.const(node.input[1]), g.const(node.input[2])
    return node if scale is not None and zero is not None and scale.size == zero.size == 1 else None


def _gated_product(g: GraphIndex, add: onnx.NodeProto, tensor: str) -> tuple[onnx.NodeProto, str, float] | None:
    """(Mul, its gate, the gate's top) when ``tensor`` is Mul(DQ(x), gate), read by ``add`` alone."""
    mul = g.producer.get(tensor)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2 or g.only_reader(tensor) is not add:
        return None
    for x, gate in (mul.input, tuple(reversed(mul.input))):
        top = _gate_top(g, gate)
        if top is not None and _per_tensor_dequantize(g, x) is not None:
            return mul, gate, top
    return None


def _dequantized_side(g: GraphIndex, add: onnx.NodeProto, tensor: str) -> bool:
    """Whether ``tensor`` is DQ(q) or a nearest Resize of DQ(q) that only ``add`` reads."""
    node = g.producer.get(tensor)
    if node is not None and nearest_resize(node) and g.only_reader(tensor) is add:
        return _per_tensor_dequantize(g, node.input[0]) is not None
    return _per_tensor_dequantize(g, tensor) is not None


def _quantize_pair(
    g: GraphIndex, names: FreshNames, tensor: str, scale: float, zero: np.ndarray, before: onnx.NodeProto
) -> str:
    """Q then DQ of ``tensor`` at (scale, zero), inserted before ``before``; the DQ output's name."""
    s = g.add_initializer(names.fresh(f"{tensor}_s"), np.array(scale, np.float32))
    z = g.add_initializer(names.fresh(f"{tensor}_z"), zero)
    q = helper.make_node("QuantizeLinear", [tensor, s, z], [names.fresh(f"{tensor}_q")])
    q.name = names.fresh(f"{tensor}{GATED_SUM_SUFFIX}")
    dq = helper.make_node("DequantizeLinear", [q.output[0], s, z], [names.fresh(f"{tensor}_dq")], name=q.name + "_dq")
    position = list(g.graph.node).index(before)
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
    g.insert(list(g.graph.node).index(resize) + 1, after)


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
            mul, gate, top = found
            x = next(i for i in mul.input if i != gate)
            dequantize = g.producer[x]
            scale, zero = float(g.const(dequantize.input[1]).reshape(())), g.const(dequantize.input[2])
            low, high = QRANGE[helper.np_dtype_to_tensor_dtype(zero.dtype)]
            gate_zero = np.array(low, dtype=zero.dtype)
            g.replace_input(mul, gate, _quantize_pair(g, names, gate, top / (high - low), gate_zero, mul))
            g.replace_input(add, product, _quantize_pair(g, names, product, top * scale, zero.reshape(()), add))
            side = g.producer.get(other)
            if side is not None and nearest_resize(side):
                _upsample_integers(g, names, side)
            lowered += 1
            break
    return lowered
