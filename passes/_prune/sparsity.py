"""Weight sparsity without removing channels: unstructured magnitude pruning and N:M (2:4) patterns.

2:4 follows NVIDIA's sparse Tensor Cores: in every four consecutive weights along the input-channel axis keep
the two largest magnitudes, on layers whose shape those kernels take (out % 8, in % 16 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from lepton_cli.passes._prune.options import PruneOptions
from onnx import numpy_helper

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.op_traits import attr

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def nm_mask(weight: np.ndarray, axis: int, n: int = 2, m: int = 4) -> np.ndarray:
    """Keep the ``n`` largest magnitudes in each run of ``m`` consecutive weights along ``axis``."""
    moved = np.moveaxis(weight, axis, -1)
    groups = np.abs(moved).reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def magnitude_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``sparsity`` share of smallest magnitudes (ties broken by position, deterministic)."""
    flat = np.abs(weight).reshape(-1)
    drop = int(math.floor(sparsity * flat.size))
    mask = np.ones(flat.size, bool)
    if drop:
        mask[np.argsort(flat, kind="stable")[:drop]] = False
    return mask.reshape(weight.shape)


def sparse_bytes(weight: np.ndarray) -> int:
    """Bytes of a bitmask encoding: the nonzero values plus one bit per weight."""
    return int(np.count_nonzero(weight)) * weight.dtype.itemsize + (weight.size + 7) // 8


def input_axis(node: onnx.NodeProto, rank: int) -> int:
    """The axis of a ``rank``-D weight that runs over the layer's input channels (the reduction axis)."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    return rank - 2  # MatMul B: [..., K, N]


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


@dataclass
class WeightLayer:
    """A prunable constant weight (magnitude / 2:4 modes)."""

    name: str  # node name
    op: str
    weight: str
    in_axis: int
    shape: list[int]


def weight_layers(
    model: onnx.ModelProto, options: PruneOptions, nm: bool
) -> tuple[list[WeightLayer], list[dict[str, Any]]]:
    """Layers the mode may prune, and the skipped ones with the reason (for the report)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers, skipped, seen = [], [], set()
    for node in model.graph.node:
        if node.op_type not in options.op_types or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        tensor = inits[node.input[1]]
        shape = list(tensor.dims)
        reason = _skip_reason(tensor, shape, node.input[1] in seen, options)
        axis = input_axis(node, len(shape)) if reason is None else 0
        if reason is None and nm:
            reason = _nm_skip_reason(node, shape, axis, options)
        if reason:
            skipped.append({"layer": node_name(node), "op": node.op_type, "shape": shape, "reason": reason})
            continue
        seen.add(node.input[1])
        layers.append(WeightLayer(node_name(node), node.op_type, node.input[1], axis, shape))
    return layers, skipped


def _skip_reason(tensor: onnx.TensorProto, shape: list[int], shared: bool, options: PruneOptions) -> str | None:
    if shared:
        return "weight shared with another layer"
    if int(np.prod(shape)) < options.min_params:
        return f"{int(np.prod(shape))} weights < min_params {options.min_params}"
    if tensor.data_type not in FLOAT_TYPES:
        return "not a float weight"
    if len(shape) < 2:
        return "not a matrix or kernel"
    return None


def _nm_skip_reason(node: onnx.NodeProto, shape: list[int], axis: int, options: PruneOptions) -> str | None:
    """Why the sparse Tensor Cores would not take this layer's 2:4 weight, or None."""
    out_axis = {"Conv": 0, "ConvTranspose": 1}.get(node.op_type, 1 - axis if len(shape) == 2 else len(shape) - 1)
    if node.op_type in ("Conv", "ConvTranspose") and attr(node, "group", 1) != 1:
        return "grouped/depthwise convolution (no sparse Tensor Core kernel)"
    if shape[axis] % options.nm_in_multiple or shape[out_axis] % options.nm_out_multiple:
        return (
            f"input channels {shape[axis]} not a multiple of {options.nm_in_multiple} or output "
            f"channels {shape[out_axis]} not a multiple of {options.nm_out_multiple}"
        )
    return None


def apply_weights(
    model: onnx.ModelProto, layers: dict[str, WeightLayer], choice: dict[str, float], nm: bool
) -> onnx.ModelProto:
    """A copy of ``model`` with the chosen layers sparsified (2:4 if ``nm``, else magnitude)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {t.name: t for t in result.graph.initializer}
    for key, ratio in choice.items():
        if ratio <= 0:
            continue
        layer = layers[key]
        tensor = inits[layer.weight]
        weight = tensor_array(tensor)
        mask = nm_mask(weight, layer.in_axis) if nm else magnitude_mask(weight, ratio)
        tensor.CopyFrom(numpy_helper.from_array(np.where(mask, weight, np.zeros_like(weight)), layer.weight))
    return result
