"""Fold ``Add(constant)`` after a Conv that already has a bias, or after a Gemm, into that bias / C.

onnxsim folds an Add into a bias-less Conv only; after its BatchNorm folding most Convs have a bias.
"""

from __future__ import annotations

import numpy as np
import onnx

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers
from lepton_cli.model.op_traits import attrs


def _added_constant(add: onnx.NodeProto, g: GraphIndex, produced: str) -> np.ndarray | None:
    """The constant operand of Add(produced, const) or Add(const, produced)."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == produced else add.input[0]
    if produced not in add.input or other == produced:
        return None
    return g.const(other)


def _set_third_input(g: GraphIndex, node: onnx.NodeProto, name: str) -> None:
    while len(node.input) < 3:
        node.input.append("")
    g.set_input(node, 2, name)


def _fold_conv_add(conv: onnx.NodeProto, add: onnx.NodeProto, g: GraphIndex) -> bool:
    weight = g.const(conv.input[1]) if len(conv.input) > 1 else None
    extra = _added_constant(add, g, conv.output[0])
    if weight is None or extra is None or extra.dtype != weight.dtype:
        return False
    rank = weight.ndim  # the conv output has the weight's rank: [N, Co, spatial...]
    if extra.ndim > rank:
        return False
    full = extra.reshape((1,) * (rank - extra.ndim) + extra.shape)
    channels = weight.shape[0]
    if any(d != 1 for axis, d in enumerate(full.shape) if axis != 1) or full.shape[1] not in (1, channels):
        return False
    has_bias = len(conv.input) > 2 and conv.input[2]
    bias = g.const(conv.input[2]) if has_bias else np.zeros(channels, weight.dtype)
    if bias is None:
        return False
    new_bias = (bias + np.broadcast_to(full.reshape(-1), (channels,))).astype(weight.dtype)
    _set_third_input(g, conv, g.set_const(conv.input[2] if has_bias else conv.output[0] + "_bias", new_bias))
    return True


def _as_row(value: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(value.reshape(-1) if value.ndim else value, (n,))


def _fold_gemm_add(gemm: onnx.NodeProto, add: onnx.NodeProto, g: GraphIndex) -> bool:
    b = g.const(gemm.input[1])
    extra = _added_constant(add, g, gemm.output[0])
    if b is None or extra is None or extra.dtype != b.dtype or b.ndim != 2:
        return False
    found = attrs(gemm)
    n = b.shape[0] if found.get("transB", 0) else b.shape[1]
    # Only a row vector / scalar: anything else could change Y's shape or need M.
    if (
        extra.ndim > 2
        or (extra.ndim == 2 and extra.shape[0] != 1)
        or (extra.ndim >= 1 and extra.shape[-1] not in (1, n))
    ):
        return False
    beta = float(found.get("beta", 1.0))
    has_c = len(gemm.input) > 2 and gemm.input[2]
    c = g.const(gemm.input[2]) if has_c else None
    if has_c and c is None:
        return False
    if c is not None and (c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1)):
        return False
    base = np.zeros((n,), b.dtype) if c is None else (np.asarray(beta, b.dtype) * c if beta != 1.0 else c)
    new_c = _as_row(base, n) + _as_row(extra, n)
    _set_third_input(
        g, gemm, g.set_const(gemm.input[2] if c is not None else gemm.output[0] + "_C", new_c.astype(b.dtype))
    )
    for attr in list(gemm.attribute):
        if attr.name == "beta":
            gemm.attribute.remove(attr)
    return True


def _row_bias_as_vector(gemm: onnx.NodeProto, g: GraphIndex) -> bool:
    """A Gemm's constant C of shape [1, N] stored as [N]: the same broadcast over the rows, and the 1-D bias that
    quantizers read per output channel (ONNX Runtime's quantize_static fails on a [1, N] one: magika's classifier)."""
    c = g.const(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
    if c is None or c.ndim != 2 or c.shape[0] != 1:
        return False
    g.set_input(gemm, 2, g.set_const(gemm.input[2], c.reshape(-1)))
    return True


def fold_bias_adds(model: onnx.ModelProto) -> int:
    """Fold ``Add(const)`` after a biased Conv / a Gemm into the bias / C (and store a Gemm's [1, N] C as [N]).
    Returns folds done."""
    g = GraphIndex(model.graph)
    removed = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or not g.sole_use(node.output[0]):
            continue
        add = g.only_reader(node.output[0])
        if add is None or add.op_type != "Add":
            continue
        fold = _fold_conv_add if node.op_type == "Conv" else _fold_gemm_add
        if fold(node, add, g):
            g.set_output(node, 0, add.output[0])  # the fused node now produces what the Add produced
            removed.append(add)
    for add in removed:
        g.remove(add)
    vectors = [_row_bias_as_vector(node, g) for node in model.graph.node if node.op_type == "Gemm"]
    if removed or any(vectors):
        drop_unused_initializers(model)
    return len(removed)
