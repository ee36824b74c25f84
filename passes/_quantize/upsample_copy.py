"""An integer nearest upsample by whole factors as channel-last copies: Transpose, Unsqueeze, Expand, Reshape.

ORT's NHWC transformer turns a uint8 Resize between QLinearConvs into its channel-last Resize, which computes a
source index per element: PP-OCRv4 det's six neck upsamples took 1.02 ms of a 12.9 ms int8 run, where the same
copies as an Expand of whole channel rows take 0.16 ms and the added Transposes cancel against the convs' own
(0.506x -> 0.458x fp32, the map bit for bit the same; benchmarks/results/det_stem_speed.md). Nearest with factor k
reads input row ``floor(y / k)``: with ``asymmetric`` + ``floor``, and with any half-pixel mode + rounding (its
source offsets stay within 0.5 of that row), so only those are rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._quantize.quantize_hoist import nearest_resize
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex
from lepton_cli.model.stats import shape_map

EXPANDED_SUFFIX = "_expanded_upsample"  # the Expand that replaced an integer Resize
_BLOCK_ROWS = {  # (coordinate_transformation_mode, nearest_mode) pairs that copy whole k×k blocks
    (b"asymmetric", b"floor"),
    *(
        (mode, rounding)
        for mode in (b"half_pixel", b"pytorch_half_pixel")
        for rounding in (b"round_prefer_floor", b"round_prefer_ceil")
    ),
}


def _attribute(node: onnx.NodeProto, name: str, default: bytes) -> bytes:
    return next((a.s for a in node.attribute if a.name == name), default)


def _factors(g: GraphIndex, node: onnx.NodeProto, dims: list[int | None]) -> tuple[int, int] | None:
    """(k_h, k_w) when ``node`` upsamples H and W of a static NCHW tensor by whole factors and nothing else."""
    if len(dims) != 4 or any(d is None for d in dims):
        return None
    mode = _attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if (mode, _attribute(node, "nearest_mode", b"round_prefer_floor")) not in _BLOCK_ROWS:
        return None
    scales = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if sizes is not None and sizes.size == 4:
        factors = np.asarray(sizes, np.float64) / np.asarray(dims, np.float64)
    elif scales is not None and scales.size == 4:
        factors = np.asarray(scales, np.float64)
    else:
        return None
    whole = np.all(factors[2:] >= 1) and np.all(factors[2:] == np.round(factors[2:]))
    if not (np.array_equal(factors[:2], [1, 1]) and whole) or factors[2] == factors[3] == 1:
        return None
    return int(factors[2]), int(factors[3])


def _channel_last_copies(
    g: GraphIndex, names: FreshNames, node: onnx.NodeProto, dims: list[int], k: tuple[int, int]
) -> list[onnx.NodeProto]:
    n, c, h, w = dims
    base = node.name or node.output[0]
    axes = g.add_initializer(names.fresh(f"{base}_rows_axes"), np.array([2, 4], np.int64))
    blocks = g.add_initializer(names.fresh(f"{base}_blocks"), np.array([1, 1, k[0], 1, k[1], 1], np.int64))
    shape = g.add_initializer(names.fresh(f"{base}_nhwc_shape"), np.array([n, h * k[0], w * k[1], c], np.int64))
    nhwc, rows, copies, joined = (
        names.fresh(f"{node.output[0]}_{part}") for part in ("nhwc", "rows", "copy", "rows_joined")
    )
    return [
        helper.make_node("Transpose", [node.input[0]], [nhwc], name=names.fresh(f"{base}_to_nhwc"), perm=[0, 2, 3, 1]),
        helper.make_node("Unsqueeze", [nhwc, axes], [rows], name=names.fresh(f"{base}_rows")),
        helper.make_node("Expand", [rows, blocks], [copies], name=names.fresh(f"{base}{EXPANDED_SUFFIX}")),
        helper.make_node("Reshape", [copies, shape], [joined], name=names.fresh(f"{base}_joined")),
        helper.make_node(
            "Transpose", [joined], [node.output[0]], name=names.fresh(f"{base}_to_nchw"), perm=[0, 3, 1, 2]
        ),
    ]


def integer_upsamples(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each nearest Resize of a quantized tensor (a QuantizeLinear's output, or such an upsample's)
    by whole factors into channel-last copies; how many were rewritten."""
    resizes = [n for n in model.graph.node if nearest_resize(n)]
    if not resizes:
        return 0
    g, names, shapes = GraphIndex(model.graph), FreshNames(model), shape_map(model)
    integer = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    rewritten = 0
    for node in resizes:
        dims = shapes.get(node.input[0], [])
        k = _factors(g, node, dims) if node.input[0] in integer else None
        if k is None:
            continue
        position = g.position(node)
        g.remove(node)
        for offset, added in enumerate(_channel_last_copies(g, names, node, [int(d) for d in dims], k)):
            g.insert(position + offset, added)
        integer.add(node.output[0])
        rewritten += 1
    return rewritten
