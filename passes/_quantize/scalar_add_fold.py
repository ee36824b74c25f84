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
from lepton_cli.passes._quantize.integer_gates import QRANGE
from onnx import numpy_helper

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
    graph = result.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    folded = []
    for add in [n for n in graph.node if n.op_type == "Add"]:
        fold = _plan(add, inits, readers, outputs)
        if fold is None:
            continue
        names = [f"{fold.quantize.name}{suffix}" for suffix in (FOLDED_SUFFIX, "_folded_zero", "_folded_dq_zero")]
        values = [np.array(fold.scale, np.float32), fold.quantize_zero, fold.dequantize_zero]
        for name, value in zip(names, values):
            inits[name] = numpy_helper.from_array(value, name)
            graph.initializer.append(inits[name])
        fold.quantize.input[0], fold.quantize.input[1], fold.quantize.input[2] = fold.tensor, names[0], names[1]
        for dequantize in fold.dequantizes:
            dequantize.input[1], dequantize.input[2] = names[0], names[2]
            for reader in readers.get(dequantize.output[0], []):
                _rescale_bias(reader, graph, inits, producer, readers, fold.scale / fold.old_scale)
        graph.node.remove(add)
        folded.append(add.name)
    return result, folded


def _scalar(init: onnx.TensorProto) -> float:
    return float(numpy_helper.to_array(init).reshape(-1)[0])


def _plan(add: onnx.NodeProto, inits: dict, readers: dict, outputs: set[str]) -> _Fold | None:
    constants = [i for i in add.input if i in inits and numpy_helper.to_array(inits[i]).size == 1]
    if len(constants) != 1 or add.output[0] in outputs:
        return None
    quantizes = readers.get(add.output[0], [])
    if len(quantizes) != 1 or quantizes[0].op_type != "QuantizeLinear" or len(quantizes[0].input) < 3:
        return None
    quantize = quantizes[0]
    scale_init, zero_init = inits.get(quantize.input[1]), inits.get(quantize.input[2])
    if scale_init is None or zero_init is None or zero_init.data_type not in QRANGE or quantize.output[0] in outputs:
        return None
    dequantizes = readers.get(quantize.output[0], [])
    if any(d.op_type != "DequantizeLinear" or list(d.input[1:3]) != list(quantize.input[1:3]) for d in dequantizes):
        return None
    b, s, z = _scalar(inits[constants[0]]), _scalar(scale_init), int(_scalar(zero_init))
    steps = math.floor(abs(b) / s)
    if steps == 0 or abs(b) / steps / s > MAX_COARSER:
        return None
    low, high = QRANGE[zero_init.data_type]
    scale, k = abs(b) / steps, int(math.copysign(steps, b))
    dequantize_zero = int(round(low - s * (low - z) / scale))  # the calibrated range's real low end kept
    if not (low <= dequantize_zero <= high and low <= dequantize_zero + k <= high):
        return None
    dtype = numpy_helper.to_array(zero_init).dtype
    tensor = add.input[1] if add.input[0] == constants[0] else add.input[0]
    zeros = np.array(dequantize_zero + k, dtype), np.array(dequantize_zero, dtype)
    return _Fold(add, tensor, quantize, dequantizes, s, scale, *zeros)


def _rescale_bias(
    reader: onnx.NodeProto, graph: onnx.GraphProto, inits: dict, producer: dict, readers: dict, ratio: float
) -> None:
    """A Conv/Gemm's int32 bias behind a DequantizeLinear (quantized at input scale x weight scale) rescaled by
    ``ratio`` with its input's scale; new initializers, in case the old ones are shared. A bias another node reads
    too stays: the conv then runs unfused (DQ -> float Conv), still exact."""
    if reader.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(reader.input) < 3:
        return
    dequantize = producer.get(reader.input[2])
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(readers.get(reader.input[2], [])) != 1:
        return
    values, scale = inits.get(dequantize.input[0]), inits.get(dequantize.input[1])
    if values is None or scale is None or values.data_type != onnx.TensorProto.INT32:
        return
    rescaled = np.round(numpy_helper.to_array(values).astype(np.float64) / ratio).astype(np.int32)
    names = (f"{dequantize.name}_rescaled_q", f"{dequantize.name}_rescaled_scale")
    arrays = (rescaled, (numpy_helper.to_array(scale).astype(np.float64) * ratio).astype(np.float32))
    for name, array in zip(names, arrays):
        inits[name] = numpy_helper.from_array(array, name)
        graph.initializer.append(inits[name])
    dequantize.input[0], dequantize.input[1] = names
