"""Weight blocks for Gemm and 2-D MatMul layers: the fully connected counterpart of a Conv's (weight_blocks.py).

A DPU runs a fully connected layer on one per-tensor power-of-two weight scale as it runs a Conv. PP-OCRv5 rec's CTC
classifier (120 x 18385) holds output columns whose largest weights lie 11x apart, so most columns keep a seventh of
the int8 grid; ddddocr's classifier likewise. Here the layer becomes one Gemm per run of columns whose scales agree,
joined by a Concat on the channel axis. Where the columns may be reordered (the channel analysis moves every reader's
rows with them) the blocks follow the order weight_blocks.py chose; a layer whose output reaches the graph's outputs
with no other weighted layer after it (a classifier: its channels are the outputs, never reordered) keeps its column
order by a Gather after the Concat: an int8 copy, on the host that runs the outputs' tail (a Softmax) anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex
from lepton_cli.model.op_traits import WEIGHT_OPS
from lepton_cli.model.stats import RECURRENT_OPS

DENSE = ("Gemm", "MatMul")
# layers with weights of their own: a Gather in front of one would sit inside the graph, not in its tail
WEIGHTED = {*WEIGHT_OPS, "Einsum", *RECURRENT_OPS}


def dense_weight(index: GraphIndex, node: onnx.NodeProto, out_axis: int) -> np.ndarray | None:
    """A Gemm's or 2-D MatMul's constant weight with its output channels on axis 0, or None when it has none."""
    if node.op_type not in DENSE or len(node.input) < 2:
        return None
    weight = index.const(node.input[1])
    if weight is None or weight.ndim != 2:
        return None
    return np.moveaxis(weight, out_axis, 0)


def ends_the_graph(index: GraphIndex, tensor: str) -> bool:
    """Whether no weighted layer reads ``tensor`` or anything computed from it: what follows is the outputs' tail."""
    seen, todo = set(), [tensor]
    while todo:
        name = todo.pop()
        for reader in index.readers(name):
            if reader.op_type in WEIGHTED:
                return False
            for out in reader.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return True


def split_dense(
    index: GraphIndex,
    names: FreshNames,
    node: onnx.NodeProto,
    out_axis: int,
    bounds: list[int],
    columns: np.ndarray | None = None,
) -> None:
    """Replace ``node`` by one layer per block ``bounds`` of output channels and a Concat on axis 1 (the outputs are
    2-D). With ``columns`` (a permutation), block k takes channels ``columns[bounds[k]:bounds[k+1]]`` and a Gather
    puts the joined channels back in their own order."""
    weight = index.const(node.input[1])
    bias = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    per_channel_bias = bias is not None and bias.ndim > 0 and bias.shape[-1] == weight.shape[out_axis] > 1
    picks = np.arange(weight.shape[out_axis]) if columns is None else np.asarray(columns, np.int64)
    outputs = []
    for number, (start, end) in enumerate(zip(bounds, bounds[1:])):
        taken = picks[start:end]
        block_weight = np.ascontiguousarray(np.take(weight, taken, axis=out_axis))
        inputs = [node.input[0], index.add_initializer(names.fresh(f"{node.input[1]}_b{number}"), block_weight)]
        if bias is not None:
            block_bias = np.take(bias, taken, axis=-1) if per_channel_bias else bias
            inputs.append(index.add_initializer(names.fresh(f"{node.input[2]}_b{number}"), block_bias))
        outputs.append(names.fresh(f"{node.output[0]}_b{number}"))
        block = helper.make_node(node.op_type, inputs, [outputs[-1]], names.fresh(f"{node.name}_b{number}"))
        block.attribute.extend(node.attribute)
        index.insert(index.position(node), block)
    joined = node.output[0] if columns is None else names.fresh(f"{node.output[0]}_blocks")
    concat = helper.make_node("Concat", outputs, [joined], names.fresh(f"{node.name}_blocks"), axis=1)
    index.insert(index.position(node), concat)
    if columns is not None:
        back = index.add_initializer(names.fresh(f"{node.name}_columns"), np.argsort(picks).astype(np.int64))
        restore = helper.make_node(
            "Gather", [joined, back], [node.output[0]], names.fresh(f"{node.name}_order"), axis=1
        )
        index.insert(index.position(node), restore)
    index.remove(node)
