"""Integer graph inputs and outputs for a QDQ model (full-integer accelerators, TFLite-style I/O).

A graph input read only by one per-tensor ``QuantizeLinear`` — directly or through data-movement ops
(the NHWC input's Transpose, a Reshape), which then move int8 instead — becomes an int8/uint8 input
(the Q node is removed); a graph output made by a per-tensor ``DequantizeLinear`` becomes that DQ's integer
input (the DQ node is removed, the output keeps its name). Each converted tensor's scale, zero point
and type go into the model metadata as ``lepton.io_quant.<name>`` (JSON), which
``lepton_cli.model.io_contract`` reads to feed float data and compare float results, and
which a device application reads to quantize its frames: ``q = clip(round(x / scale) + zero_point)``.

Libraries checked: ORT's quantizer has no integer-I/O option (its QDQ graphs keep float I/O; the
QOperator format also quantizes inside the graph), onnx has no such rewrite.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import onnx

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import drop_unused_initializers
from lepton_cli.model.io_contract import mark_integer

_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
_MOVES = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}  # any element type, values unchanged


def _per_tensor(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float, int, int] | None:
    """(scale, zero point, integer type) of a Q/DQ node with scalar initializer parameters, else None."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    scale = tensor_array(inits[node.input[1]])
    if scale.size != 1:
        return None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            return None
        zp_tensor = inits[node.input[2]]
        zero_point, dtype = int(tensor_array(zp_tensor).reshape(-1)[0]), zp_tensor.data_type
    else:
        zero_point, dtype = 0, onnx.TensorProto.UINT8  # the ONNX default
    if dtype not in _TYPES:
        return None
    return float(scale.reshape(-1)[0]), zero_point, dtype


@dataclass
class _Rewrite:
    """One graph's I/O conversion under way: its use-def facts, and what was converted, kept float and removed."""

    graph: onnx.GraphProto
    inits: dict[str, onnx.TensorProto]
    consumers: dict[str, list[onnx.NodeProto]]
    producers: dict[str, onnx.NodeProto]
    output_names: set[str]
    converted: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    removed: list[onnx.NodeProto] = field(default_factory=list)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _Rewrite:
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        producers: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
            for name in node.output:
                producers[name] = node
        inits = {i.name: i for i in graph.initializer}
        return cls(graph, inits, consumers, producers, {o.name for o in graph.output})

    def convert(self, value: onnx.ValueInfoProto, node: onnx.NodeProto, params: tuple[float, int, int]) -> None:
        self.removed.append(node)
        value.type.tensor_type.elem_type = params[2]
        self.converted[value.name] = {"scale": params[0], "zero_point": params[1], "dtype": _TYPES[params[2]]}


def _quantize_reader(rw: _Rewrite, name: str) -> onnx.NodeProto | None:
    """The one QuantizeLinear reading input ``name``, directly or through data moves (which then move integers)."""
    tensor, users = name, rw.consumers.get(name, [])
    while (
        len(users) == 1
        and users[0].op_type in _MOVES
        and users[0].input[0] == tensor
        and tensor not in rw.output_names
        and users[0].output[0] not in rw.output_names
    ):
        tensor = users[0].output[0]  # quantize before the move: same values, fewer bytes
        users = rw.consumers.get(tensor, [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or users[0].output[0] in rw.output_names:
        return None
    return users[0]


def _integer_inputs(rw: _Rewrite) -> None:
    for value in rw.graph.input:
        if value.name in rw.inits:
            continue
        q = _quantize_reader(rw, value.name)
        if q is None:
            rw.kept.append(
                f"input {value.name!r}: not read by exactly one QuantizeLinear (directly or through a Transpose/Reshape)"
            )
            continue
        params = _per_tensor(q, rw.inits)
        if params is None:
            rw.kept.append(f"input {value.name!r}: its QuantizeLinear is not per-tensor with constant parameters")
            continue
        carrier = q.input[0]  # the input itself, or the last data move, now carrying int8
        for node in rw.consumers.get(q.output[0], []):
            node.input[:] = [carrier if i == q.output[0] else i for i in node.input]
        rw.convert(value, q, params)


def _integer_outputs(rw: _Rewrite) -> None:
    graph_inputs = {i.name for i in rw.graph.input}
    for value in rw.graph.output:
        dq = rw.producers.get(value.name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in graph_inputs or dq.input[0] in rw.inits:
            rw.kept.append(f"output {value.name!r}: not made by a DequantizeLinear of a computed tensor")
            continue
        if rw.consumers.get(value.name) or rw.consumers.get(dq.input[0], []) != [dq]:
            # read inside the graph too, or its integer tensor feeds other nodes/outputs: renaming would retype them
            rw.kept.append(f"output {value.name!r}: also read inside the graph (it must stay float there)")
            continue
        params = _per_tensor(dq, rw.inits)
        if params is None:
            rw.kept.append(f"output {value.name!r}: its DequantizeLinear is not per-tensor with constant parameters")
            continue
        integer = dq.input[0]
        for node in rw.graph.node:  # the integer tensor takes the output's name, so callers keep theirs
            node.input[:] = [value.name if i == integer else i for i in node.input]
            node.output[:] = [value.name if o == integer else o for o in node.output]
        rw.convert(value, dq, params)


def make_integer_io(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, dict[str, Any]], list[str]]:
    """(model, {tensor name: quantization}, reasons for I/O left in float). Edits a copy."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    rw = _Rewrite.of(graph)
    _integer_inputs(rw)
    _integer_outputs(rw)
    keep = [n for n in graph.node if not any(n is r for r in rw.removed)]
    del graph.node[:]
    graph.node.extend(keep)
    drop_unused_initializers(result)
    del graph.value_info[:]  # stale types of renamed tensors; ORT re-infers
    for name, quant in rw.converted.items():
        mark_integer(result, name, quant)
    return result, rw.converted, rw.kept
