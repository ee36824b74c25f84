"""A channel shuffle (ShuffleNet's Reshape to ``[N, g, C/g, H, W]``, Transpose ``(0, 2, 1, 3, 4)``, Reshape back to
``[N, C, H, W]``) as one Gather of the channels in their shuffled order: the same values, one op.

Why: ONNX Runtime runs int8 convolutions in NHWC and merges its layout Transposes into the shuffle's, which leaves
one 5-D uint8 Transpose (``[1, H, W, g, C/g] -> [1, C/g, g, H, W]``) per shuffle on its generic kernel: ShuffleNet's
int8 model ran at 1.75x the time of its fp32 source, 0.84x with the Gather (benchmarks/results/channel_shuffle.md).
A target whose runtime has no Gather (the Edge TPU) keeps the Transpose.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import RewriteScope, rewrite_each
from lepton_cli.model.op_traits import attrs

SHUFFLE_PERM = [0, 2, 1, 3, 4]


def _reshaped(dims: list[int], shape: np.ndarray | None) -> list[int] | None:
    """The dims a Reshape of ``dims`` to ``shape`` gives (0 copies, -1 is inferred), None when it cannot be told."""
    if shape is None or shape.ndim != 1:
        return None
    out = [dims[i] if s == 0 and i < len(dims) else int(s) for i, s in enumerate(shape.tolist())]
    if out.count(-1) > 1 or any(d < -1 for d in out):
        return None
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0 or int(np.prod(dims)) % known:
            return None
        out[out.index(-1)] = int(np.prod(dims)) // known
    return out if int(np.prod(out)) == int(np.prod(dims)) else None


def _shuffle(scope: RewriteScope, transpose: onnx.NodeProto) -> tuple[str, str, int] | None:
    """(x, shuffled output, groups) when ``transpose`` (perm ``SHUFFLE_PERM``) is the middle of a channel shuffle of a
    known NCHW ``x``."""
    g, shapes = scope.graph, scope.shapes
    split, merge = g.producer.get(transpose.input[0]), g.only_reader(transpose.output[0])
    if split is None or merge is None or split.op_type != "Reshape" or merge.op_type != "Reshape":
        return None
    if not g.sole_use(split.output[0]) or transpose.output[0] in g.outputs or split.output[0] in g.outputs:
        return None
    dims = shapes.get(split.input[0]) or []
    if len(dims) != 4 or any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    grouped = _reshaped(dims, g.const(split.input[1]))
    if grouped is None or len(grouped) != 5 or [grouped[0], grouped[1] * grouped[2], *grouped[3:]] != dims:
        return None
    shuffled = [grouped[0], grouped[2], grouped[1], *grouped[3:]]
    if _reshaped(shuffled, g.const(merge.input[1])) != dims:
        return None
    return split.input[0], merge.output[0], grouped[1]


def _as_gather(scope: RewriteScope, transpose: onnx.NodeProto, found: tuple[str, str, int]) -> None:
    g, (x, shuffled, groups) = scope.graph, found
    channels = int(scope.shapes[x][1])
    # output channel i·g + j reads input channel j·(C/g) + i
    order = np.arange(channels, dtype=np.int64).reshape(groups, channels // groups).T.reshape(-1)
    split, merge = g.producer[transpose.input[0]], g.producer[shuffled]
    index = g.add_initializer(scope.names.fresh(f"{transpose.name or 'shuffle'}_order"), order)
    gather = helper.make_node("Gather", [x, index], [shuffled], name=scope.names.fresh("channel_shuffle"), axis=1)
    position = g.position(split)
    for node in (merge, transpose, split):
        g.remove(node)
    g.insert(position, gather)


def channel_shuffles_as_gather(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each channel shuffle of a known NCHW tensor as a channel Gather; how many."""
    # only the shuffle's own permutation: a model without one is not shape-inferred for nothing
    transposes = [n for n in model.graph.node if n.op_type == "Transpose" and attrs(n).get("perm") == SHUFFLE_PERM]
    return rewrite_each(model, transposes, _shuffle, _as_gather)
