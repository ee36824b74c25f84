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
