"""Per-channel activation ranges of conv inputs moved into weights, where the producer absorbs the scale exactly.

One per-tensor activation scale is set by the widest channel: after BatchNorm folding a detector's
depthwise convs read tensors whose channel maxima lie 30-150x apart (PP-OCR det: 1.0..156 on one
tensor), so the narrow channels keep a level or two and the error compounds through the backbone.
With ``x' = x / s`` per channel and the reading convs' input channels multiplied by ``s``, the float
model computes the same thing. ``s_c = r_c^α / w_c^(1-α)`` (SmoothQuant's rule, ``r_c`` the channel's
largest magnitude on calibration data, ``w_c`` the largest weight that multiplies it in a dense
reader): a depthwise reader has a weight row per channel, which a per-channel weight scale absorbs
entirely, so only dense readers weigh in. The ``1/s`` is folded into what produces ``x``:
* a weight layer (Conv) writing it, directly or through ReLU/LeakyReLU (``relu(x/s) = relu(x)/s``):
  its output channel's weights and bias;
* a ``Mul(const)`` optionally followed by ``Add(const)`` (a learnable affine block after an
  activation), scalars or one value per channel: both constants become per-channel.
Tensors read by anything but such convs, or with another producer, are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from lepton_cli.passes._quantize.sensitivity import tensor_runs
from lepton_cli.passes._quantize.weight_layers import WeightLayer, load, store, weight_layers

from lepton_cli.model.graph_edit import GraphIndex

HOMOGENEOUS = ("Relu", "LeakyRelu")
LIMIT = 1e3  # most a channel's scale may differ from 1 (dead channels would otherwise reach denormals)


@dataclass
class Site:
    tensor: str  # the conv input whose channels are rescaled
    readers: list[WeightLayer]  # every node reading it: convs, input 0
    producer: WeightLayer | None  # a conv writing it (through a homogeneous activation), or
    affine: list[str]  # the Mul (then Add) constants writing it
    channels: int
    affine_nodes: list[str] = field(default_factory=list)  # the nodes reading those constants


@dataclass
class Smoothed:
    tensors: list[str]  # conv inputs rescaled
    float_nodes: list[str]  # Mul/Add whose constants became per-channel: one int8 scale would not hold them


def _affine_chain(tensor: str, producer: dict, readers: dict, inits: dict, channels: int) -> list[str] | None:
    """Constants of ``Mul(x, a)`` or ``Add(Mul(x, a), b)`` writing ``tensor`` (scalars or per channel)."""
    names: list[str] = []
    node = producer.get(tensor)
    for op in ("Add", "Mul"):
        if node is None or node.op_type != op:
            if op == "Add":
                continue  # the Add is optional
            return None
        const = [i for i in node.input if i in inits]
        data = [i for i in node.input if i not in inits]
        if len(const) != 1 or len(data) != 1 or len(readers.get(const[0], [])) != 1:
            return None
        if int(np.prod(inits[const[0]].dims)) not in (1, channels) or len(inits[const[0]].dims) > 4:
            return None
        names.append(const[0])
        if op == "Add":
            if len(readers.get(data[0], [])) != 1:
                return None
            node = producer.get(data[0])
    return names


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Conv inputs whose channels can be rescaled exactly, in graph order."""
    index = GraphIndex(model.graph)
    producer, readers, inits = index.producer, index.consumers, index.inits
    layers = {layer.node.name: layer for layer in weight_layers(model) if layer.kind == "conv"}
    outputs = {o.name for o in model.graph.output}
    sites = []
    for tensor, nodes in readers.items():
        if tensor in inits or tensor in outputs or tensor not in producer:
            continue
        convs = [layers.get(n.name) for n in nodes]
        if any(c is None or c.node.input[0] != tensor for c in convs):
            continue
        channels = int(inits[convs[0].weight].dims[1]) * convs[0].groups
        if any(c.groups not in (1, channels) for c in convs):
            continue
        site = _producer_site(tensor, producer, readers, inits, layers, channels)
        if site is not None:
            nodes = [n.name for const in site[1] for n in readers[const]]
            sites.append(Site(tensor, convs, site[0], site[1], channels, nodes))
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    return sorted(sites, key=lambda s: order[s.tensor])


def _producer_site(
    tensor: str, producer: dict, readers: dict, inits: dict, layers: dict, channels: int
) -> tuple[WeightLayer | None, list[str]] | None:
    """(the conv writing ``tensor`` through at most a homogeneous activation, []) or (None, its affine constants)."""
    node = producer[tensor]
    source = tensor
    if node.op_type in HOMOGENEOUS and len(readers.get(node.input[0], [])) == 1:
        source = node.input[0]
        node = producer.get(source)
    if node is not None and node.name in layers and node.output[0] == source:
        layer = layers[node.name]
        if int(inits[layer.weight].dims[0]) == channels:
            return layer, []
    chain = _affine_chain(tensor, producer, readers, inits, channels)
    return (None, chain) if chain else None


def channel_absmax(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict:
    """Largest magnitude per channel (axis 1) of each tensor over ``feeds``, one feed's tensors held at a time."""
    found: dict[str, np.ndarray] = {}
    for values in tensor_runs(model, tensors, feeds):
        for name, value in values.items():
            reduced = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != 1))
            found[name] = np.maximum(found.get(name, reduced), reduced)
    return found


def _dense_weight_max(model: onnx.ModelProto, site: Site) -> np.ndarray | None:
    """Largest weight multiplying each input channel over the dense readers; None when every reader is depthwise."""
    dense = [load(model, c.weight) for c in site.readers if c.groups == 1]
    if not dense:
        return None
    return np.max([np.abs(w).max(axis=(0, 2, 3)) for w in dense], axis=0).astype(np.float64)


def _apply(model: onnx.ModelProto, site: Site, scale: np.ndarray) -> None:
    if site.producer is not None:
        weight = load(model, site.producer.weight)
        store(model, site.producer.weight, weight / scale.reshape(-1, 1, 1, 1))
        if site.producer.bias is not None:
            store(model, site.producer.bias, load(model, site.producer.bias) / scale)
    for name in site.affine:
        value = load(model, name).reshape(-1).astype(np.float64)
        store(model, name, (value / scale).reshape(-1, 1, 1))  # [C, 1, 1] broadcasts over N, C, H, W
        _drop_shape_notes(model.graph, name)
    for reader in site.readers:
        weight = load(model, reader.weight)
        per_row = scale if reader.groups == 1 else np.repeat(scale, weight.shape[0] // len(scale))
        shape = (1, -1, 1, 1) if reader.groups == 1 else (-1, 1, 1, 1)
        store(model, reader.weight, weight * per_row.reshape(shape))


def _drop_shape_notes(graph: onnx.GraphProto, name: str) -> None:
    """A constant's recorded shape (value_info, or an initializer listed as an input) no longer holds."""
    for entries in (graph.value_info, graph.input):
        for entry in [e for e in entries if e.name == name]:
            entries.remove(entry)


def smooth_conv_inputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], alpha: float) -> Smoothed:
    """Rescale every site's channels in place (float outputs unchanged)."""
    sites = find_sites(model)
    ranges = channel_absmax(model, [s.tensor for s in sites], feeds)
    done = Smoothed([], [])
    for site in sites:
        r = ranges.get(site.tensor)
        if r is None or len(r) != site.channels:
            continue
        r = np.maximum(r.astype(np.float64), r.max() / LIMIT)
        wmax = _dense_weight_max(model, site)
        scale = r if wmax is None else r**alpha / np.maximum(wmax, wmax.max() / LIMIT) ** (1 - alpha)
        scale = scale / scale.max()  # only ratios matter: per-tensor activation and per-channel weight scales
        _apply(model, site, np.clip(scale, 1 / LIMIT, 1.0))
        done.tensors.append(site.tensor)
        done.float_nodes += site.affine_nodes
    return done
