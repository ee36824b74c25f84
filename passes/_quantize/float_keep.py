"""Keeping quantized nodes in float: bypass their input Q/DQ in the fully quantized model, no re-quantization.

A cheap stand-in for re-quantizing with ORT's ``nodes_to_exclude``: no calibration, no quantizer
run, just the edge rewiring, so every candidate the search proposes is exactly what it measured.
"""

from __future__ import annotations

import onnx
from lepton_cli.passes._quantize.recurrent import restore_float_lstm

from lepton_cli.model.graph_edit import drop_unused_initializers, subgraph_names

# A Mul that puts a quantize's input channels on their own grids (depthwise_scales.py): a float reader reads before it
SCALED_SUFFIX = "_channel_scaled"


def keep_float_nodes(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, names: list[str], float_weights: bool = True
) -> onnx.ModelProto:
    """``quantized`` with every node in ``names`` reading float inputs, and the Q/DQ nodes and int8
    weights that nothing reads any more removed (see ``keep_float`` for ``float_weights``)."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)  # the caller caches ``quantized``
    for name in names:
        model = keep_float(model, float_model, name, float_weights)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    _float_graph_outputs(graph, set(names), outputs)
    inner = subgraph_names(graph)  # what If/Loop bodies read from this graph (openWakeWord's verifier weights)
    while True:  # drop nodes whose outputs nobody reads (bypassed Q/DQ chains), then their initializers
        used = {i for n in graph.node for i in n.input} | outputs | inner
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    drop_unused_initializers(model)
    return model


def _float_graph_outputs(graph: onnx.GraphProto, kept: set[str], outputs: set[str]) -> None:
    """A float-kept node whose output reaches a graph output only through Q -> DQ writes the output
    itself: quantizing a graph output (digits' logits when every op is quantized) undoes keeping it float."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in kept:
            continue
        for index, out in enumerate(node.output):
            readers = consumers.get(out, [])
            if out in outputs or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
                continue
            dqs = consumers.get(readers[0].output[0], [])
            if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear" and dqs[0].output[0] in outputs:
                node.output[index] = dqs[0].output[0]
                dropped.append(dqs[0])
    for dq in dropped:  # their Qs are left unread and removed with the other dead nodes
        graph.node.remove(dq)


def keep_float(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, node_name: str, float_weights: bool = True
) -> onnx.ModelProto:
    """``quantized`` with node ``node_name`` reading float inputs again (its input Q/DQ bypassed).

    ``float_weights=False`` keeps its weights stored as int8 (their DequantizeLinear stays; the runtime
    folds it at load): the node still computes in float on float activations, and its weights stay
    a quarter of their float size.

    A cheap stand-in for re-quantizing with ``nodes_to_exclude=[node]``: no calibration, no
    quantizer run, just the edge rewiring, so every candidate's effect can be measured.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(quantized)
    restore_float_lstm(copy, float_model, node_name)
    producer = {o: n for n in copy.graph.node for o in n.output}
    float_node = next((n for n in float_model.graph.node if n.name == node_name), None)
    float_inits = {i.name: i for i in float_model.graph.initializer}
    have_inits = {i.name for i in copy.graph.initializer}
    restored: dict[str, onnx.NodeProto] = {}  # activations put back, inserted after the loop
    for node in copy.graph.node:
        if node.name != node_name:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                tensor = _unscaled(q.input[0], producer) if float_weights else q.input[0]
                source = _float_source(copy, float_model, tensor, producer, have_inits, restored)
                if source is not None:
                    node.input[index] = source
            elif (
                float_weights
                and float_node is not None
                and index < len(float_node.input)
                and float_node.input[index] in float_inits
            ):
                original = float_node.input[index]
                # ORT may name a weight's DequantizeLinear output after the float weight: rename the copy.
                fresh = original + "_float" if original in producer else original
                if fresh not in have_inits:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(float_inits[original])
                    tensor.name = fresh
                    copy.graph.initializer.append(tensor)
                    have_inits.add(fresh)
                node.input[index] = fresh
    if restored:
        nodes = list(copy.graph.node)
        for tensor, activation in restored.items():
            nodes.insert(next(i for i, n in enumerate(nodes) if tensor in n.output) + 1, activation)
        del copy.graph.node[:]
        copy.graph.node.extend(nodes)
    return copy


def _float_source(
    model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    tensor: str,
    producer: dict[str, onnx.NodeProto],
    have_inits: set[str],
    restored: dict[str, onnx.NodeProto],
) -> str | None:
    """The name of ``tensor``'s float value for a node bypassing its Q/DQ, or None to keep the Q/DQ.

    ORT's quantizer removes a Relu or Clip whose output is quantized (the Q clamps to the same range)
    and gives the producer the activation's output name: bypassing that Q/DQ would silently drop the
    activation.
    A copy of the float activation is queued in ``restored`` to go in front of the float node.
    """
    float_producer = next((n for n in float_model.graph.node if tensor in n.output), None)
    made_by = producer.get(tensor)
    if float_producer is None or made_by is None or float_producer.name == made_by.name:
        return tensor
    if tensor in restored:
        return restored[tensor].output[0]
    copied = tensor + "_float_" + float_producer.op_type.lower()
    if copied in producer:  # restored for a node kept float before this one: one copy serves both
        return copied
    float_inits = {i.name: i for i in float_model.graph.initializer}
    extra = [i for i in float_producer.input[1:] if i]
    if len(float_producer.output) != 1 or any(i not in float_inits for i in extra):
        return None  # e.g. Clip bounds computed at run time: keep the quantized (clamped) input
    for name in extra:
        if name not in have_inits:
            init = onnx.TensorProto()
            init.CopyFrom(float_inits[name])
            model.graph.initializer.append(init)
            have_inits.add(name)
    activation = onnx.NodeProto()
    activation.CopyFrom(float_producer)
    activation.name = float_producer.name + "_float"
    activation.input[0] = tensor
    activation.output[0] = copied
    restored[tensor] = activation
    return activation.output[0]


def _unscaled(tensor: str, producer: dict[str, onnx.NodeProto]) -> str:
    """A depthwise input scaled per channel for its quantize (depthwise_scales.py) read by the node on its float
    weights: the value before the scaling."""
    scaler = producer.get(tensor)
    return scaler.input[0] if scaler is not None and scaler.name.endswith(SCALED_SUFFIX) else tensor
