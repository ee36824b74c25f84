"""A model one opset past its runtime's, brought down where every op means the same there.

PyTorch's dynamo exporter writes opset 18; TFLite's converter and the DPU tool chain take 17. onnx's version
converter has no 18 -> 17 adapter for Pad, so it refuses such models outright. Between 17 and 18 only a few ops
changed, and most uses of them mean the same in both:
* Pad-18 adds an optional ``axes`` input: without it, Pad-13;
* Reduce*-18 take ``axes`` as an input: a constant one becomes Reduce*-13's attribute;
* Split-18 adds ``num_outputs``: with it equal to the outputs and a dimension it divides, Split-13 splits the same;
* ScatterElements-18 adds the reductions ``max``/``min``: without them, ScatterElements-16.
Any other op that changed, or such an op used otherwise, leaves the model as it is (the caller refuses it).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper

from lepton_cli.model.graph_edit import node_subgraphs
from lepton_cli.model.op_traits import DEFAULT_DOMAINS, attr, attrs

REDUCE_AXES_INPUT = {"ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum"}
REDUCE_AXES_INPUT |= {"ReduceLogSumExp", "ReduceSumSquare"}  # ReduceSum took axes as an input already at 13


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every If/Loop/Scan body inside it, at any depth."""
    return [graph, *(inner for node in graph.node for sub in node_subgraphs(node) for inner in _graphs(sub))]


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant outputs of every graph (a branch reads its parents' by name)."""
    graphs = _graphs(model.graph)
    found = {init.name: numpy_helper.to_array(init) for graph in graphs for init in graph.initializer}
    for graph in graphs:
        for node in graph.node:
            value = attr(node, "value")
            if node.op_type == "Constant" and value is not None:
                found[node.output[0]] = numpy_helper.to_array(value)
    return found


def _dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's inferred dims, If/Loop branches included (None where a dim is not a number)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    values = [v for g in _graphs(inferred.graph) for v in (*g.input, *g.value_info, *g.output)]
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim] for v in values
    }


def _rewrite(node: onnx.NodeProto, constants: dict[str, np.ndarray], dims: dict[str, list[int | None]]) -> str | None:
    """Rewrite one opset-18 node as its opset-17 twin in place; the reason it cannot be, else None."""
    values = attrs(node)
    if node.op_type == "Pad":
        return None if len(node.input) < 4 or not node.input[3] else "Pad with an axes input"
    if node.op_type in REDUCE_AXES_INPUT:
        if values.get("noop_with_empty_axes", 0):
            return f"{node.op_type} with noop_with_empty_axes"
        for attribute in [a for a in node.attribute if a.name == "noop_with_empty_axes"]:  # 0: opset 17's behaviour
            node.attribute.remove(attribute)
        if len(node.input) > 1 and node.input[1]:
            axes = constants.get(node.input[1])
            if axes is None:
                return f"{node.op_type} with computed axes"
            del node.input[1:]
            if axes.size:  # an empty axes input reduces every axis, as no axes attribute does
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
        return None
    if node.op_type == "Split":
        if "num_outputs" not in values:
            return None
        shape, axis = dims.get(node.input[0]), values.get("axis", 0)
        size = shape[axis] if shape and -len(shape) <= axis < len(shape) else None
        if values["num_outputs"] != len(node.output) or size is None or size % len(node.output):
            return "Split into uneven parts"
        node.attribute.remove(next(a for a in node.attribute if a.name == "num_outputs"))
        return None
    if node.op_type == "ScatterElements":
        reduction = values.get("reduction", b"none")
        return None if reduction in (b"none", b"add", b"mul") else "ScatterElements with a max/min reduction"
    return f"{node.op_type} (changed at opset {defs.get_schema(node.op_type, 18).since_version})"


def down_to_17(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """(the model at opset 17, what was rewritten) from an opset-18 model, or (None, why not)."""
    lowered = copy.deepcopy(model)
    dims, constants = _dims(model), _constants(model)
    rewritten: dict[str, int] = {}
    for node in (node for graph in _graphs(lowered.graph) for node in graph.node):
        if node.domain not in DEFAULT_DOMAINS or defs.get_schema(node.op_type, 18).since_version < 18:
            continue
        why = _rewrite(node, constants, dims)
        if why is not None:
            return None, why
        rewritten[node.op_type] = rewritten.get(node.op_type, 0) + 1
    for opset in lowered.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            opset.version = 17
    return lowered, ", ".join(f"{count} {op}" for op, count in sorted(rewritten.items())) or "no op changed"
