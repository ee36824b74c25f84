"""LayerNorm as the ops an integer chip runs: ReduceMean, Sub, LpNormalization (L2), Mul, Add.

The Edge TPU has no LAYER_NORM; its table lists MEAN, SUB, L2_NORMALIZATION, MUL and ADD, and its compiler hands the
first op it cannot map and every op after it to the host. A LayerNorm left float ended PP-OCRv4 rec's Edge TPU run at
op 161 of 314. Written out with the variance on int8 grids (``mean((x − mean)²)``), the small variances quantize to 0
(Magika, session 34). L2_NORMALIZATION sums the squares in int32 inside the op, and

    LayerNorm(x) = (x − mean) / sqrt(var + eps) · γ + β ≈ L2(x − mean) · (sqrt(N) · γ) + β,

exact but for ``eps``: the relative difference is ``1 − sqrt(var / (var + eps))``. A norm whose smallest row variance on
the calibration data is under ``MIN_VARIANCE_OVER_EPS`` times its eps (a near-constant row) is left as it was.
TFLite fixes the L2 output's grid at 1/128 with zero point 0 (int8) or 128 (uint8); ``l2_overrides`` gives the
quantizer that grid, so ONNX Runtime's emulation rounds where the chip does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.sensitivity import tensor_runs
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, refill_nodes
from lepton_cli.model.op_traits import attrs, opset
from lepton_cli.model.stats import shape_map

MIN_VARIANCE_OVER_EPS = 100.0  # eps ≤ 1 % of every row's variance: the rewrite moves outputs by under 0.5 %
L2_SUFFIX = "_l2"  # the name of the LpNormalization a norm became
CHIP_NORM_OPS = ("ReduceMean", "LpNormalization")  # ORT's quantizer lists neither: named for it
L2_STEP = 1.0 / 128.0  # TFLite's L2_NORMALIZATION output scale (int8 zero point 0, uint8 128)


@dataclass
class ChipNorms:
    rewritten: list[str]  # LayerNormalization nodes now written as L2 normalisations
    kept: dict[str, str]  # LayerNormalization node -> why it stayed


def _last_axis(node: onnx.NodeProto, rank: int | None) -> bool:
    axis = int(attrs(node).get("axis", -1))
    return rank is not None and axis % rank == rank - 1


def _row_variances(model: onnx.ModelProto, norms: list[onnx.NodeProto], feeds: list[dict]) -> dict[str, float]:
    """Each norm's smallest row variance (over its last axis) on ``feeds``; inf where none was read."""
    inputs = list(dict.fromkeys(n.input[0] for n in norms))
    least = dict.fromkeys(inputs, np.inf)
    for values in tensor_runs(model, inputs, feeds, graph_outputs=True):
        for name, value in values.items():
            least[name] = min(least[name], float(np.var(value.astype(np.float64), axis=-1).min()))
    return {n.name: least[n.input[0]] for n in norms}


def _written(names: FreshNames, g: GraphIndex, node: onnx.NodeProto, width: int, version: int) -> list[onnx.NodeProto]:
    x, base = node.input[0], node.name
    mean, centered, unit = (names.fresh(f"{base}_{part}") for part in ("mean", "centered", "unit"))
    gamma = g.const(node.input[1]).astype(np.float64) * np.sqrt(width)
    if version >= 18:
        axes = g.add_initializer(names.fresh(base + "_axes"), np.array([-1], np.int64))
        reduce = helper.make_node("ReduceMean", [x, axes], [mean], name=names.fresh(base + "_mean"), keepdims=1)
    else:
        reduce = helper.make_node("ReduceMean", [x], [mean], name=names.fresh(base + "_mean"), axes=[-1], keepdims=1)
    has_beta = len(node.input) > 2 and bool(node.input[2])
    scaled = names.fresh(base + "_scaled") if has_beta else node.output[0]
    nodes = [
        reduce,
        helper.make_node("Sub", [x, mean], [centered], name=names.fresh(base + "_center")),
        helper.make_node("LpNormalization", [centered], [unit], name=names.fresh(base + L2_SUFFIX), axis=-1, p=2),
        helper.make_node(
            "Mul",
            [unit, g.add_initializer(names.fresh(base + "_gamma"), gamma.astype(np.float32))],
            [scaled],
            name=names.fresh(base + "_scale"),
        ),
    ]
    if has_beta:
        nodes.append(
            helper.make_node("Add", [scaled, node.input[2]], [node.output[0]], name=names.fresh(base + "_shift"))
        )
    return nodes


def norms_as_l2(model: onnx.ModelProto, feeds: list[dict]) -> tuple[onnx.ModelProto, ChipNorms]:
    """``model`` (a copy) with each last-axis LayerNormalization (one output, constant γ) written as an L2
    normalisation, except where a calibration row is too flat for its eps."""
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    if not norms:
        return model, ChipNorms([], {})
    g, shapes = GraphIndex(model.graph), shape_map(model)
    kept: dict[str, str] = {}
    for node in norms:
        shape = shapes.get(node.input[0])
        if len([o for o in node.output if o]) > 1 or g.const(node.input[1]) is None:
            kept[node.name] = "mean/inv-std outputs or a computed scale"
        elif not shape or not _last_axis(node, len(shape)) or not isinstance(shape[-1], int) or shape[-1] <= 0:
            kept[node.name] = "not over a known last axis"
    candidates = [n for n in norms if n.name not in kept]
    least = _row_variances(model, candidates, feeds) if candidates and feeds else {}
    for node in candidates:
        eps = float(attrs(node).get("epsilon", 1e-5))
        if not np.isfinite(least.get(node.name, np.inf)):
            kept[node.name] = "no calibration rows to check its eps against"
        elif least[node.name] < MIN_VARIANCE_OVER_EPS * eps:
            kept[node.name] = f"a calibration row's variance {least[node.name]:.3g} is within 100x its eps"
    if len(kept) == len(norms):
        return model, ChipNorms([], kept)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g, names, version = GraphIndex(result.graph), FreshNames(result), opset(result)
    nodes: list[onnx.NodeProto] = []
    for node in result.graph.node:
        if node.op_type == "LayerNormalization" and node.name not in kept:
            nodes.extend(_written(names, g, node, int(shapes[node.input[0]][-1]), version))
        else:
            nodes.append(node)
    refill_nodes(result, nodes)
    return result, ChipNorms([n.name for n in norms if n.name not in kept], kept)


def l2_overrides(model: onnx.ModelProto, activation_type: str) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving every L2 normalisation's output TFLite's fixed grid."""
    zero = np.array(0, np.int8) if activation_type == "s8" else np.array(128, np.uint8)
    return {
        n.output[0]: [{"scale": np.array(L2_STEP, np.float32), "zero_point": zero}]
        for n in model.graph.node
        if n.op_type == "LpNormalization"
    }
