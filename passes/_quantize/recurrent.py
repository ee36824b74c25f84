"""LSTM layers with int8 weights: ONNX Runtime's ``DynamicQuantizeLSTM`` (``dynamic_lstm``).

ORT's static quantizer leaves LSTM float, so a CRNN's recurrent layers ran at the fp32 rate between int8 convs.
The contrib op takes per-gate-row int8 weights (transposed to [directions, in, 4 x hidden]) and quantizes each
step's input and state at run time (u8), so it needs no calibration range and no Q/DQ around it. The node keeps
its name, so the search can keep it float like any other quantized node (``restore_float_lstm``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton_cli.model.contrib_shapes import CONTRIB_DOMAIN, DYNAMIC_LSTM
from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import drop_unused_initializers
from lepton_cli.model.op_traits import attr

# The float LSTM's inputs after X, W, R (B, sequence_lens, initial_h, initial_c, P): the contrib op's 3..7.
_TAIL_INPUTS = 5


def _weight(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = inits.get(name)
    if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 3:
        return None
    return tensor_array(tensor)


def _int8_rows(weight: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight as [directions, in, rows], per-row scale [directions, rows]) of a [directions, rows, in] weight,
    symmetric: ``limit`` 127, or 63 where u8 x s8 products must not saturate int16 pairs (no VNNI)."""
    absmax = np.abs(weight).max(axis=2)
    scale = np.where(absmax > 0, absmax / limit, 1.0).astype(np.float32)
    q = np.clip(np.round(weight / scale[..., None]), -limit, limit).astype(np.int8)
    return np.ascontiguousarray(q.transpose(0, 2, 1)), scale


def convertible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """An LSTM the contrib op runs: constant 3-D float W and R, sequence-first layout (the op has no ``layout``)."""
    return (
        node.op_type == "LSTM"
        and node.domain in ("", "ai.onnx")
        and attr(node, "layout", 0) == 0
        and len(node.input) > 2
        and _weight(inits, node.input[1]) is not None
        and _weight(inits, node.input[2]) is not None
    )


def dynamic_lstm(model: onnx.ModelProto, exclude: set[str], reduce_range: bool = False) -> list[str]:
    """Turn every convertible LSTM of ``model``'s main graph not named in ``exclude`` into DynamicQuantizeLSTM, in
    place; returns the names converted. Float W/R nothing else reads are dropped."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    limit = 63 if reduce_range else 127
    converted: list[str] = []
    for node in graph.node:
        if node.name in exclude or not convertible(node, inits):
            continue
        names = []
        for index in (1, 2):
            q, scale = _int8_rows(_weight(inits, node.input[index]), limit)
            base = f"{node.name}_{'W' if index == 1 else 'R'}_int8"
            graph.initializer.extend(
                [
                    numpy_helper.from_array(q, base),
                    numpy_helper.from_array(scale, base + "_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zero_point"),
                ]
            )
            names.append(base)
        tail = (list(node.input[3:]) + [""] * _TAIL_INPUTS)[:_TAIL_INPUTS]
        inputs = [node.input[0], names[0], names[1], *tail]
        inputs += [names[0] + "_scale", names[0] + "_zero_point", names[1] + "_scale", names[1] + "_zero_point"]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
        node.CopyFrom(
            helper.make_node(DYNAMIC_LSTM, inputs, list(node.output), node.name, domain=CONTRIB_DOMAIN, **attributes)
        )
        converted.append(node.name)
    if converted:
        if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        drop_unused_initializers(model)
    return converted


def restore_float_lstm(model: onnx.ModelProto, float_model: onnx.ModelProto, name: str) -> bool:
    """Put ``float_model``'s LSTM back in place of the DynamicQuantizeLSTM named ``name`` (in place, with the float
    weights it reads); False where ``model`` has no such node."""
    node = next((n for n in model.graph.node if n.name == name and n.op_type == DYNAMIC_LSTM), None)
    original = next((n for n in float_model.graph.node if n.name == name), None)
    if node is None or original is None:
        return False
    data = node.input[0]  # what the quantized graph feeds it (a DequantizeLinear the caller may bypass)
    node.CopyFrom(original)
    node.input[0] = data
    have = {t.name for t in model.graph.initializer}
    for tensor in float_model.graph.initializer:
        if tensor.name in original.input and tensor.name not in have:
            model.graph.initializer.append(tensor)
    return True


def float_recurrent_warning(model: onnx.ModelProto, dynamic: bool, kept: list[str]) -> str | None:
    """What to tell the user about recurrent layers ``model`` still runs in float that the search did not choose to
    keep float (``kept``), or None."""
    left = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN") and n.name not in kept]
    if not left:
        return None
    ops = sorted({n.op_type for n in left})
    if not dynamic:
        why = "this target runs standard ONNX, which has no int8 recurrent op (dynamic_lstm needs ONNX Runtime)"
    elif ops == ["LSTM"]:
        why = "DynamicQuantizeLSTM takes sequence-first LSTMs with constant weights only"
    else:
        why = "ONNX Runtime has no int8 kernel for GRU and RNN"
    return f"{len(left)} recurrent layer(s) ({', '.join(ops)}) stay float: {why}"
