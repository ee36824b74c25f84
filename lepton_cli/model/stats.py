"""Model statistics: op histogram, parameter count, MACs, serialized size.

Used by ``lepton inspect``, by the pipeline before/after each pass, and by the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.model.contrib_shapes import DYNAMIC_LSTM, with_stand_ins
from lepton_cli.model.external_data import external_bytes, shapes_only_copy, tensor_array
from lepton_cli.model.shapes import graph_inputs, graph_outputs


@dataclass
class ModelStats:
    nodes: int
    ops: dict[str, int]
    params: int
    param_bytes: int
    macs: int | None  # None when some MAC-carrying node has unknown shapes
    size_bytes: int
    opset: int
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _constant_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    tensors = list(graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            tensors.extend(a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR)
    return tensors


def _constant_of_shape_params(graph: onnx.GraphProto) -> int:
    """Elements produced by ConstantOfShape from a constant shape: the onnx "light" model zoo stores
    its weights this way, and a parameter count of zero would misdescribe those models."""
    shape_values = {t.name: tensor_array(t) for t in _constant_tensors(graph) if len(t.dims) == 1 and t.dims[0] <= 16}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and len(attr.t.dims) == 1:
                    shape_values[node.output[0]] = numpy_helper.to_array(attr.t)
    total = 0
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in shape_values:
            elems = int(np.prod(shape_values[node.input[0]])) if shape_values[node.input[0]].size else 1
            total += elems if elems > 1 else 0
    return total


def _tensor_elems(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def inferred_values(model: onnx.ModelProto, data_prop: bool = False) -> list[onnx.ValueInfoProto]:
    """The graph's inputs, value_info and outputs after shape inference (the model's own where inference fails);
    ``data_prop`` also follows shapes computed in the graph (Shape -> Slice -> Concat -> Reshape)."""
    try:
        copy = shapes_only_copy(model)
        with_stand_ins(copy)  # only value infos are read back: the stand-in nodes need not be restored
        graph = onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=data_prop).graph
    except Exception:  # shape inference fails on some exotic graphs; MACs then stay unknown
        graph = model.graph
    return [*graph.input, *graph.value_info, *graph.output]


def shape_map(model: onnx.ModelProto, data_prop: bool = False) -> dict[str, list[int | None]]:
    """Every tensor's inferred shape (None for an unknown dim), constants included: what MAC counts read."""
    shapes: dict[str, list[int | None]] = {}
    graph = model.graph
    for value in inferred_values(model, data_prop):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    for tensor in _constant_tensors(graph):
        shapes[tensor.name] = list(tensor.dims)
    for node in graph.node:  # Constant outputs
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


# Recurrent layers (and ORT's int8 LSTM): W and R hold every gate's rows, whatever their layout.
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN", DYNAMIC_LSTM})


def _prod(values: list[int | None]) -> int | None:
    if any(v is None for v in values):
        return None
    return int(np.prod(values)) if values else 1


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    """Multiply-accumulates of one node (Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU/RNN and their quantized forms);
    0 for others."""
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_index = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}[op]
        out, weight = shapes.get(node.output[0]), shapes.get(node.input[w_index])
        if not out or not weight:
            return None
        # each output element needs (C_in/group × kernel) MACs; weight is [M, C/group, k...]
        return _prod([*out, *weight[1:]])
    if op == "ConvTranspose":
        inp, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not inp or not weight:
            return None
        return _prod([*inp, *weight[1:]])
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        out, a = shapes.get(node.output[0]), shapes.get(node.input[0])  # K comes from A: B's index varies by op
        if not out or not a:
            return None
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        k = a[-2] if (op == "Gemm" and trans_a) else a[-1]
        return _prod([*out, k])
    if op in RECURRENT_OPS:
        # every step multiplies its input by W and its state by R; X's first two dims are steps and batch (either layout)
        data, w, r = (shapes.get(name) for name in node.input[:3])
        if len(node.input) < 3 or not data or len(data) < 2 or not w or not r:
            return None
        sizes = [_prod(data[:2]), _prod(w), _prod(r)]
        return None if None in sizes else sizes[0] * (sizes[1] + sizes[2])
    return 0


def _total_macs(model: onnx.ModelProto) -> int | None:
    shapes = shape_map(model)
    total = 0
    for node in model.graph.node:
        macs = node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


def model_macs(model: onnx.ModelProto) -> int | None:
    """MACs of one run; a symbolic batch dim (axis 0 of an input) counts as 1, i.e. MACs per sample."""
    total = _total_macs(model)
    if total is not None:
        return total
    batched = onnx.ModelProto()
    batched.CopyFrom(model)
    bound = False
    for value in batched.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_value = 1
            bound = True
    return _total_macs(batched) if bound else None


def collect_stats(model: onnx.ModelProto, *, with_macs: bool = True) -> ModelStats:
    graph = model.graph
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node)
    tensors = _constant_tensors(graph)
    params = sum(_tensor_elems(t) for t in tensors if len(t.dims) >= 1 and _tensor_elems(t) > 1)
    params += _constant_of_shape_params(graph)
    param_bytes = sum(
        _tensor_elems(t) * numpy_helper.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in tensors
        if t.data_type != onnx.TensorProto.STRING
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelStats(
        nodes=len(graph.node),
        ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        params=params,
        param_bytes=param_bytes,
        macs=model_macs(model) if with_macs else None,
        size_bytes=model.ByteSize() + external_bytes(model),  # external data counted, never serialized
        opset=opset,
        inputs=[s.to_dict() for s in graph_inputs(model)],
        outputs=[s.to_dict() for s in graph_outputs(model)],
    )
