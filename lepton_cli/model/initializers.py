"""Where a model keeps its constants, as three named moves (each exact: the bytes stay the same).

ONNX allows a weight as a ``Constant`` node or an initializer, and before IR 4 every initializer must also be
listed as a graph input. Rewrites want one form: initializers, not listed as inputs unless the IR needs it.
"""

from __future__ import annotations

import onnx

from lepton_cli.model.op_traits import DEFAULT_DOMAINS


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn main-graph ``Constant(value=tensor)`` nodes into initializers of the same name; returns how many."""
    graph = model.graph
    moved, kept = 0, []
    for node in graph.node:
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if (
            value is not None
            and node.domain in DEFAULT_DOMAINS
            and value.name == "value"
            and value.type == onnx.AttributeProto.TENSOR
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
        list_initializers_as_inputs(model)
    return moved


def list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too (old PyTorch exports are IR 3)."""
    if model.ir_version >= 4:
        return
    listed = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.name not in listed:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )


def unlist_initializers_from_inputs(model: onnx.ModelProto) -> None:
    """Stop listing initializers as graph inputs (raising the IR to 4, which allows that), so a rewrite that
    reshapes a weight leaves no input declared with its old shape."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    real_inputs = [v for v in graph.input if v.name not in inits]
    if len(real_inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(real_inputs)
        model.ir_version = max(model.ir_version, 4)
