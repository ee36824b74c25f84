"""Non-overlapping ConvTranspose chains (kernel = stride) as 1×1 Convs at the input resolution, one DepthToSpace after.

A ConvTranspose whose kernel equals its stride (no padding, one group) writes each input pixel's k×k output block
from that pixel alone: it is a 1×1 Conv to C·k² channels followed by DepthToSpace(k). Element-wise ops after it
(Relu, Sigmoid, ...) commute with that rearrangement, and a second such ConvTranspose is again a 1×1 Conv on the
rearranged channels, so a DBNet head (ConvTranspose, ReLU, ConvTranspose, Sigmoid) runs at the input resolution
and rearranges once, at the end: PP-OCRv4 det's 160×160×24 intermediate and ORT's col2im disappear, and the Convs
quantize like any other (docs/decisions.md, "The DBNet head and neck without float copies").

Channels in the depth form are in DepthToSpace's CRD order, ``o·K² + p·K + q`` for output channel o and block offset
(p, q) in a K×K block. A later ConvTranspose becomes a dense 1×1 Conv over every block offset (zeros across offsets),
so it is taken only while that weight stays small (``MAX_DENSE_WEIGHTS``); the chain ends before it otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers, drop_value_info
from lepton_cli.model.op_traits import attrs

# Element-wise, one tensor in and out, no per-channel parameter: the same on either side of DepthToSpace.
ELEMENTWISE_UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip", "Elu", "Softsign"})
MAX_DENSE_WEIGHTS = 1 << 16  # a later ConvTranspose's dense weight (a DBNet head's second one: 16 × 96)


def _block(g: GraphIndex, node: onnx.NodeProto) -> int | None:
    """k when ``node`` is a 2-D ConvTranspose with constant weights, kernel = stride = k×k, no padding, one group."""
    if node.op_type != "ConvTranspose" or len(node.input) < 2:
        return None
    weight = g.const(node.input[1])
    if weight is None or weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        return None
    k = int(weight.shape[2])
    a = attrs(node)
    if len(node.input) > 2 and node.input[2] and g.const(node.input[2]) is None:
        return None
    plain = (
        list(a.get("strides", [1, 1])) == [k, k]
        and int(a.get("group", 1)) == 1
        and not any(a.get("pads", [0]))
        and not any(a.get("output_padding", [0]))
        and all(d == 1 for d in a.get("dilations", [1, 1]))
        and "output_shape" not in a
        and a.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID")
    )
    return k if plain and k > 1 else None


def _depth_weight(weight: np.ndarray, block: int, k: int) -> np.ndarray:
    """The 1×1 Conv weight [Cout·(K·k)², Cin·K², 1, 1] that maps depth form (Cin, K=block) through the
    ConvTranspose ``weight`` [Cin, Cout, k, k] to depth form (Cout, K·k)."""
    cin, cout = weight.shape[:2]
    outer = block * k
    dense = np.zeros((cout, outer, outer, cin, block, block), dtype=weight.dtype)
    for p in range(block):
        for q in range(block):
            for a in range(k):
                for b in range(k):
                    dense[:, p * k + a, q * k + b, :, p, q] = weight[:, :, a, b].T
    return dense.reshape(cout * outer * outer, cin * block * block, 1, 1)


def _chain(g: GraphIndex, first: onnx.NodeProto, k: int) -> list[tuple[onnx.NodeProto, int]]:
    """(node, k) from ``first`` on: ConvTransposes with their k, element-wise ops with 0; each node the sole reader
    of the one before, no intermediate a graph output."""
    chain, block, current = [(first, k)], k, first.output[0]
    while current not in g.outputs and g.sole_use(current):
        reader = g.only_reader(current)
        if reader is None or reader.input[0] != current:
            break
        step = _block(g, reader)
        if reader.op_type in ELEMENTWISE_UNARY and all(g.const(i) is not None for i in reader.input[1:] if i):
            chain.append((reader, 0))
        elif step is not None and _dense_size(g.const(reader.input[1]), block, step) <= MAX_DENSE_WEIGHTS:
            chain.append((reader, step))
            block *= step
        else:
            break
        current = reader.output[0]
    return chain


def _dense_size(weight: np.ndarray, block: int, k: int) -> int:
    cin, cout = weight.shape[:2]
    return cout * (block * k) ** 2 * cin * block * block


def _rewrite(g: GraphIndex, names: FreshNames, chain: list[tuple[onnx.NodeProto, int]]) -> None:
    block, last = 1, chain[-1][0]
    for node, k in chain:
        if not k:
            continue
        weight = g.const(node.input[1])
        inputs = [
            node.input[0],
            g.add_initializer(names.fresh(node.name + "_depth_w"), _depth_weight(weight, block, k)),
        ]
        if len(node.input) > 2 and node.input[2]:
            bias = np.repeat(g.const(node.input[2]), (block * k) ** 2)
            inputs.append(g.add_initializer(names.fresh(node.name + "_depth_b"), bias))
        conv = helper.make_node("Conv", inputs, list(node.output), name=node.name, kernel_shape=[1, 1])
        position = g.position(node)
        g.remove(node)
        held = g.insert(position, conv)
        last = held if node is last else last
        block *= k
    output = last.output[0]
    depth = names.fresh(output + "_depth")
    g.set_output(last, 0, depth)
    shuffle = helper.make_node("DepthToSpace", [depth], [output], name=names.fresh(last.name + "_d2s"), blocksize=block)
    shuffle.attribute.append(helper.make_attribute("mode", "CRD"))
    g.insert(g.position(last) + 1, shuffle)


def deconvs_as_depth(model: onnx.ModelProto) -> int:
    """Rewrite every non-overlapping ConvTranspose chain in ``model``'s main graph in place; the ConvTransposes
    rewritten."""
    g, names = GraphIndex(model.graph), FreshNames(model)
    rewritten, done = 0, set()
    for node in list(model.graph.node):
        k = _block(g, node)
        if k is None or id(node) in done:
            continue
        chain = _chain(g, node, k)
        done.update(id(n) for n, _ in chain)
        drop_value_info(model.graph, {o for n, _ in chain for o in n.output})  # the chain's shapes change
        _rewrite(g, names, chain)
        rewritten += sum(1 for _, step in chain if step)
    if rewritten:
        drop_unused_initializers(model)
    return rewritten
