"""A constant scalar Add right before a QuantizeLinear folded into that quantize's zero point.

PP-LCNetV3's learnable affine blocks end each hard-swish with ``+ b`` (a scalar): between int8 convs that is a
float Add over the whole feature map, and it keeps the hard-swish's Mul from fusing into QLinearMul. Quantizing
``t`` at scale ``s'`` and zero point ``z + k`` with ``k * s' = b`` and dequantizing at ``(s', z)`` gives
``t + b`` exactly; ``s' = |b| / floor(|b| / s)`` is at most ``MAX_COARSER`` coarser than the calibrated ``s`` and
covers the calibrated range. A reader's int32 bias is quantized at input scale x weight scale (ORT fuses a conv
into QLinearConv only then), so it is rescaled with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.qparams import one_element, per_tensor, rescale_bias

from lepton_cli.model.graph_edit import GraphIndex

FOLDED_SUFFIX = "_folded_scale"  # the scale initializer of a quantize that absorbed an Add
MAX_COARSER = 1.25  # s' / s: past it (b under ~4 steps) the coarser grid costs more than the float Add


@dataclass
class _Fold:
    add: onnx.NodeProto
    tensor: str  # what the Add adds the constant to
    quantize: onnx.NodeProto
    dequantizes: list[onnx.NodeProto]
    old_scale: float
    scale: float
    quantize_zero: np.ndarray
    dequantize_zero: np.ndarray


def fold_scalar_adds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """(model, folded Add names): each Add of a constant scalar whose only reader is a per-tensor QuantizeLinear
    read only by DequantizeLinear nodes sharing its scale and zero point."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g = GraphIndex(result.graph)
    folded = []
    for add in [n for n in result.graph.node if n.op_type == "Add"]:
        fold = _plan(g, add)
        if fold is None:
            continue
        names = [f"{fold.quantize.name}{suffix}" for suffix in (FOLDED_SUFFIX, "_folded_zero", "_folded_dq_zero")]
        values = [np.array(fold.scale, np.float32), fold.quantize_zero, fold.dequantize_zero]
        for name, value in zip(names, values):
            g.add_initializer(name, value)
        for k, name in enumerate([fold.tensor, names[0], names[1]]):
            g.set_input(fold.quantize, k, name)
        for dequantize in fold.dequantizes:
            g.set_input(dequantize, 1, names[0])
            g.set_input(dequantize, 2, names[2])
            for reader in list(g.readers(dequantize.output[0])):
                rescale_bias(g, reader, fold.scale / fold.old_scale)
        g.remove(add)
        folded.append(add.name)
    return result, folded


def _plan(g: GraphIndex, add: onnx.NodeProto) -> _Fold | None:
    constants = [i for i in add.input if one_element(g, i) is not None]
    if len(constants) != 1 or add.output[0] in g.outputs:
        return None
    quantizes = g.readers(add.output[0])
    if len(quantizes) != 1 or quantizes[0].op_type != "QuantizeLinear":
        return None
    quantize = quantizes[0]
    params = per_tensor(g, quantize)
    if params is None or params.qrange is None or quantize.output[0] in g.outputs:
        return None
    dequantizes = g.readers(quantize.output[0])
    if any(d.op_type != "DequantizeLinear" or list(d.input[1:3]) != list(quantize.input[1:3]) for d in dequantizes):
        return None
    zero = params.zero
    b, s, z = float(one_element(g, constants[0])), params.scale, int(zero)
    steps = math.floor(abs(b) / s)
    if steps == 0 or abs(b) / steps / s > MAX_COARSER:
        return None
    low, high = params.qrange
    new_scale, k = abs(b) / steps, int(math.copysign(steps, b))
    dequantize_zero = int(round(low - s * (low - z) / new_scale))  # the calibrated range's real low end kept
    if not (low <= dequantize_zero <= high and low <= dequantize_zero + k <= high):
        return None
    tensor = add.input[1] if add.input[0] == constants[0] else add.input[0]
    zeros = np.array(dequantize_zero + k, zero.dtype), np.array(dequantize_zero, zero.dtype)
    return _Fold(add, tensor, quantize, list(dequantizes), s, new_scale, *zeros)
