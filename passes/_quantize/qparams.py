"""A QuantizeLinear / DequantizeLinear node's per-tensor scale and zero point, read from its constants.

The element-wise lowerings (scalar Add folds, gates, Relu folds, hoisted quantizes, gated sums) all rewrite around
quantizes whose scale and zero point are one-element initializers; this reads them once, the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import GraphIndex

QRANGE = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127)}


def int32_values(values: np.ndarray) -> np.ndarray:
    """Integer-valued ``values`` as an int32 bias stores them, clipped to its range (a cast would wrap to -2^31)."""
    limit = np.iinfo(np.int32)
    return np.clip(values, limit.min, limit.max).astype(np.int32)


class QParams(NamedTuple):
    scale: float
    zero: np.ndarray  # 0-d, of the quantized type

    @property
    def qrange(self) -> tuple[int, int] | None:
        """The 8-bit type's integer range; None for another type (16-bit QDQ)."""
        return QRANGE.get(helper.np_dtype_to_tensor_dtype(self.zero.dtype))


def one_element(g: GraphIndex, name: str) -> np.ndarray | None:
    """A one-element initializer's value, 0-d; None for anything else."""
    value = g.const(name)
    return value.reshape(()) if value is not None and value.size == 1 else None


def per_tensor(g: GraphIndex, node: onnx.NodeProto) -> QParams | None:
    """(scale, zero point) of a quantize or dequantize whose scale and zero point are one-element constants."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    scale, zero = one_element(g, node.input[1]), one_element(g, node.input[2])
    return None if scale is None or zero is None else QParams(float(scale), zero)


def rescale_bias(g: GraphIndex, reader: onnx.NodeProto, ratio: float | np.ndarray) -> None:
    """A Conv/Gemm's int32 bias behind a DequantizeLinear (quantized at input scale x weight scale) rescaled by
    ``ratio`` (one per output channel, or one for all) with its input or weight scale; new initializers, in case the
    old ones are shared. A bias another node reads too stays: the conv then runs unfused (DQ -> float Conv), still
    exact."""
    if reader.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(reader.input) < 3:
        return
    dequantize = g.producer.get(reader.input[2])
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(g.readers(reader.input[2])) != 1:
        return
    values, scale = g.const(dequantize.input[0]), g.const(dequantize.input[1])
    if values is None or scale is None or values.dtype != np.int32:
        return
    rescaled = int32_values(np.round(values.astype(np.float64) / ratio))
    g.set_input(dequantize, 0, g.add_initializer(f"{dequantize.name}_rescaled_q", rescaled))
    rescaled_scale = (scale.astype(np.float64) * ratio).astype(np.float32)
    g.set_input(dequantize, 1, g.add_initializer(f"{dequantize.name}_rescaled_scale", rescaled_scale))
