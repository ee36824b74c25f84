"""Weight layers (Conv, Gemm, MatMul with constant weights) seen as rows, and the int8 grid ORT puts them on.

The recovery steps (equalisation, bias correction, rounding optimisation) all treat a layer as
``y[o] = rows[o] · patch + bias[o]``: one row per output channel over the inputs of its group.
``weight_grid`` reproduces the scale ONNX Runtime's ``quantize_static`` will choose for those
weights (symmetric, per channel or per tensor, power of two for the DPU), so weights moved onto
that grid here come out of ORT's quantizer unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.schemes import Int8Scheme, pow2_weight_scale
from onnx import numpy_helper

from lepton_cli.model.op_traits import attr


@dataclass
class WeightLayer:
    node: onnx.NodeProto
    weight: str  # initializer name
    bias: str | None  # initializer name of a per-output-channel bias (Conv/Gemm input 2, or MatMul's following Add)
    kind: str  # "conv", "gemm_t" (Gemm, transB=1), "gemm" (Gemm, transB=0) or "matmul"
    groups: int = 1

    @property
    def name(self) -> str:
        return self.node.name


def weight_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """Float Conv (2-D), Gemm and MatMul nodes whose weights are initializers, in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(readers.get(weight.name, [])) != 1:
            continue  # shared weights would be changed for two layers at once
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        if (
            node.op_type == "Conv"
            and len(weight.dims) == 4
            and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        ):
            layers.append(WeightLayer(node, weight.name, bias, "conv", int(attr(node, "group", 1))))
        elif node.op_type == "Gemm" and len(weight.dims) == 2 and not attr(node, "transA", 0):
            layers.append(WeightLayer(node, weight.name, bias, "gemm_t" if attr(node, "transB", 0) else "gemm"))
        elif node.op_type == "MatMul" and len(weight.dims) == 2:
            add = readers.get(node.output[0], [])
            bias = None
            if len(add) == 1 and add[0].op_type == "Add":
                other = [i for i in add[0].input if i != node.output[0]]
                if (
                    len(other) == 1
                    and other[0] in inits
                    and list(inits[other[0]].dims) == [weight.dims[1]]
                    and len(readers.get(other[0], [])) == 1
                ):
                    bias = other[0]
            layers.append(WeightLayer(node, weight.name, bias, "matmul"))
    return layers


def to_rows(layer: WeightLayer, weight: np.ndarray) -> np.ndarray:
    """[out, in_per_group] view of the weights (a copy for transposed layouts)."""
    if layer.kind == "conv":
        return weight.reshape(weight.shape[0], -1)
    if layer.kind == "gemm_t":
        return weight
    return weight.T


def from_rows(layer: WeightLayer, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if layer.kind == "conv":
        return rows.reshape(shape).astype(np.float32)
    if layer.kind == "gemm_t":
        return rows.astype(np.float32)
    return np.ascontiguousarray(rows.T).astype(np.float32)


@dataclass(frozen=True)
class Grid:
    scale: np.ndarray  # [out] (per tensor: the same value in every row)
    qmin: int
    qmax: int

    def quantize(self, rows: np.ndarray) -> np.ndarray:
        """Round to nearest onto the grid (as ORT does), returned as float values."""
        return np.clip(np.round(rows / self.scale[:, None]), self.qmin, self.qmax) * self.scale[:, None]


def weight_grid(rows: np.ndarray, scheme: Int8Scheme) -> Grid | None:
    """The symmetric int8 grid ORT's quantizer gives these weights; None for asymmetric weights (not simulated)."""
    if not (scheme.weight_symmetric or scheme.power_of_two):
        return None
    # ORT: QInt8 symmetric (-127, 127), reduced range (-64, 64); scale = 2 absmax / (qmax - qmin)
    qmin, qmax = (-64, 64) if scheme.reduce_range and not scheme.power_of_two else (-127, 127)
    if scheme.power_of_two:
        scale = np.full(len(rows), pow2_weight_scale(rows))  # the scale schemes.pow2_overrides gives the tensor
    else:
        absmax = np.abs(rows).max(axis=1).astype(np.float64)
        amax = absmax if scheme.per_channel else np.full(len(rows), absmax.max())
        scale = np.where(amax > 0, 2 * amax / (qmax - qmin), 1.0)
    return Grid(scale.astype(np.float32).astype(np.float64), qmin, qmax)


def load(model: onnx.ModelProto, name: str) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == name)
    return numpy_helper.to_array(init)


def store(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
