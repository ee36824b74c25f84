"""Gates on quantized data in integer kernels: hard-swish/SE HardSigmoid and SiLU Sigmoid, which ORT's CPU EP
quantizes neither of and so runs in float between int8 layers.

ORT quantizes no HardSigmoid, so each hard-swish between int8 convs runs as DequantizeLinear, float
HardSigmoid, float Mul and QuantizeLinear over the whole feature map (PP-OCRv4 det 320x320 on cpu-avx:
3.7 of its 15.2 ms; docs/decisions.md, "Integer element-wise between int8 layers").
HardSigmoid(x) = clip(alpha * x + beta, 0, 1): ``alpha *`` goes into the input's dequantize scale, ``+ beta`` is
a quantized Add, and the clip is the saturation of a quantize whose range is [0, 1]. ORT fuses that DQ -> Add -> Q
into QLinearAdd and the gated DQ -> Mul -> Q into QLinearMul, so the block runs on one byte per element. A Sigmoid
gate (YOLOX's SiLU, ``x * Sigmoid(x)``) only needs its own quantize over [0, 1]: ORT then runs QLinearSigmoid (a
256-entry table) and QLinearMul.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from lepton_cli.passes._quantize.qparams import per_tensor
from onnx import helper

from lepton_cli.model.graph_edit import GraphIndex, remove_unread_nodes

# Slack on the [0, 1] check of an existing quantize's range: its scale is a float32 rounding of rmax / 255.
RANGE_SLACK = 1e-6
ADDED_SUFFIX = "_hardsigmoid_as_add"  # the Add that replaces a HardSigmoid
GATE_SUFFIX = "_gate_q"  # the quantize of a gate a Mul reads


class _Dequantized(NamedTuple):
    tensor: str  # the quantized tensor a per-tensor DequantizeLinear reads
    scale: float
    zero: np.ndarray  # 0-d, of the quantized type
    qrange: tuple[int, int]  # of an 8-bit type (_dequantized refuses others)


def integer_gates(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each HardSigmoid or Sigmoid that reads a per-tensor dequantized tensor and whose result is
    quantized, directly or as the gate of a quantized Mul, computed by integer kernels."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    rewriter = _Rewriter(result.graph)
    for node in [n for n in result.graph.node if n.op_type in ("HardSigmoid", "Sigmoid")]:
        rewriter.rewrite(node)
    remove_unread_nodes(rewriter.g)  # an SE gate's old dequantize, now unread: ORT would still run it
    return result


class _Rewriter:
    def __init__(self, graph: onnx.GraphProto):
        self.g = GraphIndex(graph)

    def rewrite(self, node: onnx.NodeProto) -> None:
        source = self._dequantized(node.input[0])
        readers = self.g.readers(node.output[0])
        if source is None or node.output[0] in self.g.outputs or len(readers) != 1:
            return
        reader = readers[0]
        gated = reader.op_type == "Mul" and self._gates_quantized(reader, node.output[0])
        if node.op_type == "Sigmoid":  # ORT fuses DQ -> Sigmoid -> Q itself once the gate has its quantize
            if gated:
                self._insert(self.g.position(node) + 1, self._gate(node, node.output[0], source))
            return
        alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
        if alpha > 0 and beta > 0 and (gated or reader.op_type == "QuantizeLinear" and self._covers_unit_range(reader)):
            self._replace(node, source, alpha, beta, gated)

    def _dequantized(self, name: str) -> _Dequantized | None:
        dq = self.g.producer.get(name)
        params = per_tensor(self.g, dq) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if params is None or params.qrange is None:
            return None
        return _Dequantized(dq.input[0], params.scale, params.zero, params.qrange)

    def _covers_unit_range(self, quantize: onnx.NodeProto) -> bool:
        """Whether the quantize's representable range lies in [0, 1]: its saturation then is HardSigmoid's clip."""
        params = per_tensor(self.g, quantize)
        if params is None or params.qrange is None:
            return False
        (low, high), s, z = params.qrange, params.scale, int(params.zero)
        return s * (low - z) >= -RANGE_SLACK and 0 < s * (high - z) <= 1 + RANGE_SLACK

    def _gates_quantized(self, mul: onnx.NodeProto, gate: str) -> bool:
        """The Mul's other input is dequantized and the product's only reader is a QuantizeLinear."""
        other = mul.input[1] if mul.input[0] == gate else mul.input[0]
        product_reader = self.g.only_reader(mul.output[0])
        return (
            other != gate
            and self._dequantized(other) is not None
            and product_reader is not None
            and product_reader.op_type == "QuantizeLinear"
        )

    def _replace(self, node: onnx.NodeProto, source: _Dequantized, alpha: float, beta: float, gated: bool) -> None:
        """HardSigmoid -> DQ(x_q at alpha * scale) + DQ(beta); a Mul's gate is quantized over [0, 1] after it."""
        high = source.qrange[1]
        name, out = node.name, node.output[0]
        add = self.g.add_initializer
        scale = add(f"{name}_x_scale", np.array(alpha * source.scale, np.float32))
        zero = add(f"{name}_x_zero", source.zero)
        beta_q = add(f"{name}_beta_q", np.array(high, source.zero.dtype))
        beta_scale = add(f"{name}_beta_scale", np.array(beta / high, np.float32))
        beta_zero = add(f"{name}_beta_zero", np.zeros((), source.zero.dtype))
        added_out = f"{out}_affine" if gated else out
        added = [
            helper.make_node("DequantizeLinear", [source.tensor, scale, zero], [f"{name}_ax"], name=f"{name}_ax_dq"),
            helper.make_node("DequantizeLinear", [beta_q, beta_scale, beta_zero], [f"{name}_b"], name=f"{name}_b_dq"),
            helper.make_node("Add", [f"{name}_ax", f"{name}_b"], [added_out], name=f"{name}{ADDED_SUFFIX}"),
        ]
        position = self.g.position(node)
        self.g.remove(node)
        self._insert(position, added + (self._gate(node, added_out, source) if gated else []))

    def _gate(self, node: onnx.NodeProto, gate: str, source: _Dequantized) -> list[onnx.NodeProto]:
        """Quantize -> dequantize ``gate`` over [0, 1] at 1 / (high - low), so that the Mul's ``node.output[0]``
        input is dequantized; the quantize's saturation is HardSigmoid's clip. Renames ``gate`` where it is the
        node's own output."""
        low, high = source.qrange
        name, out = node.name, node.output[0]
        if gate == out:
            gate = f"{out}_float"
            self.g.set_output(node, 0, gate)
        scale = self.g.add_initializer(f"{name}_gate_scale", np.array(1.0 / (high - low), np.float32))
        zero = self.g.add_initializer(f"{name}_gate_zero", np.array(low, source.zero.dtype))
        return [
            helper.make_node("QuantizeLinear", [gate, scale, zero], [f"{out}_q"], name=f"{name}{GATE_SUFFIX}"),
            helper.make_node("DequantizeLinear", [f"{out}_q", scale, zero], [out], name=f"{name}_gate_dq"),
        ]

    def _insert(self, position: int, nodes: list[onnx.NodeProto]) -> None:
        for offset, new in enumerate(nodes):
            self.g.insert(position + offset, new)


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((float(helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)
