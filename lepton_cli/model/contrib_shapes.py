"""Standard stand-ins for ONNX Runtime contrib ops while ONNX shape inference runs (it knows no com.microsoft op).

Without them every tensor after a contrib Q/DQ or DynamicQuantizeLSTM has no shape, and the MACs and bytes that
follow are unknown. Each stand-in computes the same output shapes and types; the caller puts the originals back.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from lepton_cli.model.shapes import elem_types

CONTRIB_DOMAIN = "com.microsoft"
DYNAMIC_LSTM = "DynamicQuantizeLSTM"  # ORT's LSTM with int8 weights (passes/_quantize/recurrent.py)


def _stand_in(node: onnx.NodeProto, types: dict[str, int]) -> onnx.NodeProto | None:
    if node.op_type == "DequantizeLinear":  # 16-bit Q/DQ before opset 21: a Cast to the same type
        return helper.make_node("Cast", node.input[:1], node.output[:1], name=node.name, to=types.get(node.input[1], 1))
    if node.op_type == "QuantizeLinear":
        zero_point = node.input[2] if len(node.input) > 2 else ""
        to = types.get(zero_point, TensorProto.UINT8)
        return helper.make_node("Cast", node.input[:1], node.output[:1], name=node.name, to=to)
    if node.op_type == DYNAMIC_LSTM:  # LSTM's inference reads X, hidden_size and direction only
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return helper.make_node("LSTM", node.input[:8], node.output, name=node.name, **attributes)
    return None


def with_stand_ins(model: onnx.ModelProto) -> dict[int, onnx.NodeProto]:
    """Replace ``model``'s contrib Q/DQ and DynamicQuantizeLSTM nodes by standard ones, in place; returns the
    originals by node index (``restore``)."""
    types = elem_types(model)
    replaced: dict[int, onnx.NodeProto] = {}
    for index, node in enumerate(model.graph.node):
        if node.domain != CONTRIB_DOMAIN:
            continue
        stand_in = _stand_in(node, types)
        if stand_in is None:
            continue
        original = onnx.NodeProto()
        original.CopyFrom(node)
        replaced[index] = original
        node.CopyFrom(stand_in)
    return replaced


def restore(model: onnx.ModelProto, replaced: dict[int, onnx.NodeProto]) -> None:
    for index, node in replaced.items():
        model.graph.node[index].CopyFrom(node)
