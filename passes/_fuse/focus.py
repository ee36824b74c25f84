"""YOLO's Focus (four stride-2 slices of the image, concatenated on channels) as one SpaceToDepth.

``Concat(x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2])`` holds the same values
as ``SpaceToDepth(x, 2)`` in another channel order: slice j with offsets (p, q) puts channel c at ``j·C + c``,
SpaceToDepth at ``(2p + q)·C + c``. When only Convs (one group) read the Concat, their weights take that permutation
on the input axis and read SpaceToDepth directly: the same sums, in another order. ONNX Runtime's optimizer makes
the same SpaceToDepth but keeps the permutation as a channel Gather, which the Edge TPU does not run: YOLOX's
whole graph after it then fell back to the host CPU (docs/status.md, issue 19).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import GraphIndex, RewriteScope, rewrite_each
from lepton_cli.model.op_traits import attrs

BLOCK = 2


def _offsets(g: GraphIndex, node: onnx.NodeProto | None, dims: list[int]) -> tuple[int, int] | None:
    """(p, q) when ``node`` is ``x[..., p::2, q::2]`` of ``x`` (NCHW ``dims``), N and C whole."""
    if node is None or node.op_type != "Slice" or len(node.input) != 5:
        return None
    starts, ends, axes, steps = (g.const(name) for name in node.input[1:])
    if starts is None or ends is None or axes is None or steps is None:
        return None
    spec = {int(a) % 4: (int(s), int(e), int(t)) for a, s, e, t in zip(axes, starts, ends, steps)}
    if set(spec) != {2, 3} or any(t != BLOCK or s not in (0, 1) or e < dims[a] for a, (s, e, t) in spec.items()):
        return None
    return spec[2][0], spec[3][0]


def _focus(scope: RewriteScope, concat: onnx.NodeProto) -> tuple[str, int, list[tuple[int, int]]] | None:
    """(x, channels, offsets per slice) for a Focus Concat read only by one-group Convs with constant weights."""
    g, shapes = scope.graph, scope.shapes
    if concat.op_type != "Concat" or len(concat.input) != BLOCK * BLOCK or int(attrs(concat).get("axis", 0)) != 1:
        return None
    slices = [g.producer.get(name) for name in concat.input]
    sources = {s.input[0] if s is not None and g.sole_use(s.output[0]) else "" for s in slices}
    x = sources.pop() if len(sources) == 1 else ""
    dims = shapes.get(x, []) if x else []
    if len(dims) != 4 or any(d is None for d in dims) or dims[2] % BLOCK or dims[3] % BLOCK:
        return None
    offsets = [o for o in (_offsets(g, s, dims) for s in slices) if o is not None]
    if len(set(offsets)) != BLOCK * BLOCK:
        return None
    readers = g.readers(concat.output[0])
    for conv in readers:
        weight = g.const(conv.input[1]) if conv.op_type == "Conv" and len(conv.input) > 1 else None
        if weight is None or conv.input[0] != concat.output[0] or int(attrs(conv).get("group", 1)) != 1:
            return None
    if not readers or concat.output[0] in g.outputs:
        return None
    return x, int(dims[1]), offsets


def _as_space_to_depth(scope: RewriteScope, concat: onnx.NodeProto, found: tuple[str, int, list]) -> None:
    g, (x, channels, offsets) = scope.graph, found
    # concat channel j·C + c sits at SpaceToDepth channel (2p + q)·C + c
    order = np.concatenate([(BLOCK * p + q) * channels + np.arange(channels) for p, q in offsets])
    names = scope.names
    depth = helper.make_node(
        "SpaceToDepth", [x], [names.fresh(f"{x}_space_to_depth")], name=names.fresh("focus"), blocksize=BLOCK
    )
    for conv in list(g.readers(concat.output[0])):
        weight = g.const(conv.input[1])
        assert weight is not None
        permuted = np.empty_like(weight)
        permuted[:, order] = weight
        g.set_input(conv, 1, g.set_const(conv.input[1], permuted))
        g.set_input(conv, 0, depth.output[0])
    g.insert(g.position(concat), depth)
    for node in [g.producer[name] for name in concat.input] + [concat]:
        g.remove(node)


def focus_as_space_to_depth(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each Focus read only by Convs as SpaceToDepth with permuted Conv weights; how many."""
    concats = [n for n in model.graph.node if n.op_type == "Concat" and len(n.input) == BLOCK * BLOCK]
    return rewrite_each(model, concats, _focus, _as_space_to_depth)
