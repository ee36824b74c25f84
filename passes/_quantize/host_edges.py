"""Float between float nodes: a host op reads another host op's output as it is, not through an int8 round trip.

ONNX Runtime's quantizer puts one QuantizeLinear/DequantizeLinear pair on a tensor an int8 node reads, and the nodes
left float may read the dequantized copy too (where the int8 reader takes the tensor directly; not where a Reshape
comes first). On an integer accelerator the float nodes run on the host, which already holds the float tensor: only
the chip needs the int8 copy. A residual sum beside its host LayerNorms (residual_scaling.py) reads the previous
norm's output this way.
"""

from __future__ import annotations

import onnx

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers, remove_unread_nodes


def float_reads(model: onnx.ModelProto, float_nodes: list[str]) -> int:
    """Rewire, in place, each of ``float_nodes`` reading ``DequantizeLinear(QuantizeLinear(t))`` where another of
    them writes ``t`` to read ``t``; how many inputs were rewired."""
    names = set(float_nodes)
    g = GraphIndex(model.graph)
    rewired = 0
    for node in [n for n in model.graph.node if n.name in names]:
        for k, tensor in enumerate(node.input):
            dq = g.producer.get(tensor)
            q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            writer = g.producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if writer is not None and writer.name in names:
                g.set_input(node, k, q.input[0])
                rewired += 1
    if rewired:
        remove_unread_nodes(g)
        drop_unused_initializers(model)
    return rewired
