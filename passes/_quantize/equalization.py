"""Cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization"): equal weight ranges across conv pairs.

For ``conv2(act(conv1(x)))`` with ``act`` positively homogeneous (ReLU, LeakyReLU, PReLU:
``act(x / s) = act(x) / s`` for ``s > 0``, or no activation at all), dividing conv1's output
channel ``c`` (weights and bias) by ``s_c`` and multiplying conv2's input channel ``c`` by ``s_c``
leaves the float model's outputs unchanged. ``s_c = sqrt(r1_c / r2_c)`` gives both sides the range
``sqrt(r1_c r2_c)``, which a per-tensor (power-of-two) weight scale resolves far better when the
channels' ranges differ by orders of magnitude (depthwise convs after BatchNorm folding).
Hard-swish and ReLU6 (Clip with an upper bound) are not homogeneous: pairs across them are skipped.
Depthwise convs take part on either side (a depthwise conv2 reads input channel ``c`` in its own rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.weight_layers import WeightLayer, load, store, weight_layers

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")


@dataclass
class Pair:
    first: WeightLayer
    second: WeightLayer
    activation: onnx.NodeProto | None


def _depthwise(layer: WeightLayer, in_channels: int) -> bool:
    return layer.groups == in_channels and layer.groups > 1


def find_pairs(model: onnx.ModelProto) -> list[Pair]:
    """Conv pairs joined directly or by one homogeneous activation, each tensor between them read once."""
    layers = {layer.node.name: layer for layer in weight_layers(model) if layer.kind == "conv"}
    by_output = {layer.node.output[0]: layer for layer in layers.values()}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for second in layers.values():
        tensor, activation = second.node.input[0], None
        if tensor not in by_output:
            producer = next((n for n in model.graph.node if tensor in n.output), None)
            if producer is None or producer.op_type not in HOMOGENEOUS or producer.input[0] not in by_output:
                continue
            if producer.op_type == "PRelu" and producer.input[1] not in inits:
                continue
            activation, tensor = producer, producer.input[0]
        first = by_output[tensor]
        chain = [tensor] + ([activation.output[0]] if activation is not None else [])
        if any(len(readers.get(t, [])) != 1 or t in outputs for t in chain):
            continue
        if second.groups != 1 and not _depthwise(second, _out_channels(model, first)):
            continue
        pairs.append(Pair(first, second, activation))
    return pairs


def _out_channels(model: onnx.ModelProto, layer: WeightLayer) -> int:
    return int(next(i for i in model.graph.initializer if i.name == layer.weight).dims[0])


def _input_view(second: WeightLayer, weight: np.ndarray, channels: int) -> np.ndarray:
    """conv2's weights as [channels, ...]: everything that multiplies input channel c in row c."""
    if second.groups == 1:
        return weight.transpose(1, 0, 2, 3).reshape(channels, -1)
    return weight.reshape(channels, -1)  # depthwise (channel multiplier m): rows c*m .. c*m+m-1 read channel c


def _scale_inputs(second: WeightLayer, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if second.groups == 1:
        return weight * scale[None, :, None, None]
    return weight * np.repeat(scale, weight.shape[0] // len(scale))[:, None, None, None]


def equalize(model: onnx.ModelProto, *, sweeps: int = 8, limit: float = 1e4) -> list[str]:
    """Equalise every pair in place; returns the names of the second convs of the pairs changed.

    Chains (conv a -> b -> c) are swept until the scales settle; ``limit`` bounds each channel's
    total scale so a dead channel (range 0) is not pushed into denormals."""
    pairs = find_pairs(model)
    for _ in range(sweeps):
        largest = 0.0
        for pair in pairs:
            w1, w2 = load(model, pair.first.weight), load(model, pair.second.weight)
            channels = w1.shape[0]
            r1 = np.abs(w1.reshape(channels, -1)).max(axis=1).astype(np.float64)
            r2 = np.abs(_input_view(pair.second, w2, channels)).max(axis=1).astype(np.float64)
            live = (r1 > 1e-12) & (r2 > 1e-12)
            scale = np.where(live, np.sqrt(np.where(live, r1, 1.0) / np.where(live, r2, 1.0)), 1.0)
            scale = np.clip(scale, 1 / limit, limit)
            largest = max(largest, float(np.abs(np.log(scale)).max()))
            store(model, pair.first.weight, w1 / scale.reshape(-1, 1, 1, 1))
            if pair.first.bias is not None:
                store(model, pair.first.bias, load(model, pair.first.bias) / scale)
            store(model, pair.second.weight, _scale_inputs(pair.second, w2, scale))
        if largest < 1e-3:
            break
    return [pair.second.name for pair in pairs]


def describe(pairs: list[Pair]) -> list[str]:
    return [
        f"{p.first.name} -> {p.activation.op_type + ' -> ' if p.activation is not None else ''}{p.second.name}"
        for p in pairs
    ]
