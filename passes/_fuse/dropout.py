"""Drop inference-mode Dropouts that onnxsim keeps because they declare a mask output nobody reads."""

from __future__ import annotations

import onnx

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers, subgraph_names
from lepton_cli.model.op_traits import DEFAULT_DOMAINS


def _removable(node: onnx.NodeProto, g: GraphIndex) -> bool:
    if node.op_type != "Dropout" or node.domain not in DEFAULT_DOMAINS:
        return False
    training = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if training is not None and (g.const(training) is None or bool(g.const(training))):
        return False
    mask = node.output[1] if len(node.output) > 1 else ""
    return not (mask and g.uses[mask] + (mask in g.outputs) > 0)


def remove_inference_dropouts(model: onnx.ModelProto) -> int:
    """Drop inference-mode Dropouts whose mask output nobody reads; returns how many."""
    graph = model.graph
    g = GraphIndex(graph)
    removed = 0
    for node in list(graph.node):
        if not _removable(node, g):
            continue
        out, source = node.output[0], node.input[0]
        if out in g.outputs or out in subgraph_names(graph):  # the name must stay: an Identity writes it
            identity = onnx.helper.make_node("Identity", [source], [out], name=node.name)
            g.insert(g.position(node), identity)
        else:
            g.replace_uses(out, source)
        g.remove(node)
        removed += 1
    if removed:
        drop_unused_initializers(model)
    return removed
