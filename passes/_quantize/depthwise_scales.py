"""A depthwise conv's input quantized per channel, the channel scales carried by its per-channel weight scales.

Depthwise inputs in PP-LCNet backbones are hard-swish outputs whose channel ranges lie 40-150x apart; one u8 scale
leaves the narrow channels a few levels. Output channel c of a depthwise conv reads only input channel c, so
quantizing channel c on its own grid ``s_c`` and dequantizing every channel at the tensor's ``s`` feeds the conv
``x_c s / s_c``; weight scale ``w_c`` becoming ``w_c s_c / s`` undoes it exactly, with the same int8 weights. The
grids share one zero point (the conv pads with it), and the quantize and dequantize stay per tensor, so ORT still
fuses QLinearConv. The per-channel part: a conv that produces the input scales its own output channels by
``s / s_c`` in its weight and bias scales (free); a producer that runs in float gets a float ``Mul`` by ``s / s_c``
in front of the quantize, where that gains ``MIN_BITS``; an element-wise producer ORT would fuse with the quantize
(one output scale) is left alone. PP-OCRv4 det with every conv int8, 32 held-out frames: worst page 3.26 -> 2.06
points (benchmarks/results/session29.md). ORT-run targets only: TFLite and the DPU take per-tensor activations.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from lepton_cli.passes._quantize.float_keep import SCALED_SUFFIX  # also names what the scaling adds
from lepton_cli.passes._quantize.qparams import QParams, per_tensor, rescale_bias
from lepton_cli.passes._quantize.sensitivity import tensor_runs
from onnx import helper

from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers
from lepton_cli.model.op_traits import attr

ZERO_SUFFIX = f"{SCALED_SUFFIX}_zero"  # the shared zero point of a channel-scaled quantize
MIN_BITS = 2.0  # mean bits per channel a scaler Mul must gain: it and the float producer it needs cost time
MIN_RATIO = 1.0 / 1024  # s_c / s floor: a dead channel would otherwise blow its int32 bias up


def depthwise_inputs(model: onnx.ModelProto) -> list[str]:
    """Float tensors whose per-tensor QuantizeLinear is read only by per-tensor DequantizeLinears that only depthwise
    convs with int8 per-channel weights read (nothing else sees the rescaled values)."""
    g = GraphIndex(model.graph)
    return [q.input[0] for q in model.graph.node if q.op_type == "QuantizeLinear" and _readers_ok(g, q)]


def channel_ranges(
    source: onnx.ModelProto, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (min, max) over axis 1 of each of ``tensors`` in ``source``, on every feed."""
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for values in tensor_runs(source, tensors, list(feeds)):
        for name, value in values.items():
            axes = tuple(k for k in range(value.ndim) if k != 1)
            low, high = value.min(axis=axes), value.max(axis=axes)
            old = ranges.get(name, (low, high))
            ranges[name] = (np.minimum(old[0], low), np.maximum(old[1], high))
    return ranges


def per_channel_depthwise_inputs(
    model: onnx.ModelProto, ranges: dict[str, tuple[np.ndarray, np.ndarray]], symmetric: bool = False
) -> dict[str, tuple[np.ndarray, bool]]:
    """Quantizes each tensor in ``ranges`` that ``depthwise_inputs`` names per channel, in place. ``symmetric``: each
    keeps its quantize's zero point (a symmetric scheme's), else the channels share the best. Returns, per conv
    whose weights now compute on scaled channels (a producing conv and its depthwise reader, where no Mul scales),
    the factor per output channel its float weights need when it is kept float (``scaled_reference``), and whether
    its bias needs it too (its output is the scaled one)."""
    g = GraphIndex(model.graph)
    factors: dict[str, tuple[np.ndarray, bool]] = {}
    changed = False
    for quantize in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ranges]:
        grids = _channel_grids(g, quantize, ranges[quantize.input[0]], symmetric) if _readers_ok(g, quantize) else None
        if grids is None:
            continue
        shared_zero, ratio = grids
        producer = _conv_producer(g, quantize)
        if producer is not None:  # free: the producing conv's output channels come out on their grids
            _scale_outputs(g, producer, 1.0 / ratio)
            factors[producer.name] = (1.0 / ratio, True)
        elif np.mean(np.log2(1.0 / ratio)) >= MIN_BITS:
            _insert_scaler(g, quantize, 1.0 / ratio)
        else:
            continue
        shared = np.array(shared_zero, g.const(quantize.input[2]).dtype)
        g.set_input(quantize, 2, g.add_initializer(f"{quantize.name}{ZERO_SUFFIX}", shared))
        for dequantize in g.readers(quantize.output[0]):
            g.set_input(dequantize, 2, quantize.input[2])
            for conv in g.readers(dequantize.output[0]):
                weights = _weight_dq(g, conv)
                _scale_constant(g, weights, 1, ratio, f"{weights.name}{SCALED_SUFFIX}")
                rescale_bias(g, conv, ratio)
                if producer is not None:  # its float input arrives scaled: float weights must undo it
                    factors[conv.name] = (ratio, False)
        changed = True
    if changed:
        drop_unused_initializers(model)  # the per-tensor scales and zero points replaced (ORT warns about each)
    return factors


def channel_scaled_inputs(model: onnx.ModelProto) -> int:
    """How many quantizes in ``model`` put their channels on their own grids (before names are shortened)."""
    return sum(n.op_type == "QuantizeLinear" and n.input[2].endswith(ZERO_SUFFIX) for n in model.graph.node)


def scaled_reference(reference: onnx.ModelProto, factors: dict[str, tuple[np.ndarray, bool]]) -> onnx.ModelProto:
    """``reference`` (the float model float-kept nodes read) with each named conv's weights (and bias, where its
    output is scaled) times its per-output-channel factors: a conv kept float computes as its int8 form."""
    if not factors:
        return reference
    result = onnx.ModelProto()
    result.CopyFrom(reference)
    g = GraphIndex(result.graph)
    for conv in [n for n in result.graph.node if n.name in factors]:
        factor, with_bias = factors[conv.name]
        for k, shape in ((1, (-1, 1, 1, 1)), (2, (-1,)))[: 2 if with_bias else 1]:
            value = g.const(conv.input[k]) if len(conv.input) > k and conv.input[k] else None
            if value is not None:
                scaled = (value.astype(np.float64) * factor.reshape(shape)).astype(value.dtype)
                g.set_input(conv, k, g.add_initializer(f"{conv.input[k]}{SCALED_SUFFIX}", scaled))
    return result


def _channel_grids(
    g: GraphIndex, quantize: onnx.NodeProto, channel_range: tuple[np.ndarray, np.ndarray], symmetric: bool
) -> tuple[int, np.ndarray] | None:
    """(shared zero point, s_c / s per channel) for ``quantize``'s tensor, or None where its channels do not match."""
    params = per_tensor(g, quantize)
    low, high = params.qrange
    scale, zero = params.scale, int(params.zero)
    lo, hi = channel_range
    if len(lo) != g.const(_weight_dq(g, _convs(g, quantize)[0]).input[1]).size:
        return None
    # each channel's range, within the tensor's calibrated one (a clipping method's cut applies to each)
    lo = np.clip(lo, (low - zero) * scale, 0.0).astype(np.float64)
    hi = np.clip(hi, 0.0, (high - zero) * scale).astype(np.float64)
    shared_zero, channel = _shared_zero_scales(lo, hi, low, high, [zero] if symmetric else range(low, high + 1))
    return shared_zero, np.maximum(channel, scale * MIN_RATIO) / scale


def _insert_scaler(g: GraphIndex, quantize: onnx.NodeProto, factors: np.ndarray) -> None:
    """A float Mul by ``factors`` (s / s_c) in front of ``quantize``: the per-tensor quantize then gives each channel's
    integers on its grid. (ORT's per-axis QuantizeLinear is a scalar loop: 36 of PP-OCRv4 det's 48 ms.)"""
    scaled = f"{quantize.input[0]}{SCALED_SUFFIX}"
    constant = g.add_initializer(f"{scaled}_factors", factors.astype(np.float32).reshape(1, -1, 1, 1))
    scaler = helper.make_node("Mul", [quantize.input[0], constant], [scaled], name=f"{quantize.name}{SCALED_SUFFIX}")
    g.insert(g.position(quantize), scaler)
    g.set_input(quantize, 0, scaled)


def _scale_outputs(g: GraphIndex, conv: onnx.NodeProto, factors: np.ndarray) -> None:
    """``conv``'s output channels times ``factors``: its weight scales and its bias (int32 at input x weight scale,
    or float) scaled alike."""
    weights = _weight_dq(g, conv)
    _scale_constant(g, weights, 1, factors, f"{weights.name}{SCALED_SUFFIX}")
    if len(conv.input) < 3 or not conv.input[2]:
        return
    bias = g.producer.get(conv.input[2])
    if bias is None:  # a float bias constant
        _scale_constant(g, conv, 2, factors, f"{conv.name}{SCALED_SUFFIX}_bias")
    else:
        _scale_constant(g, bias, 1, factors, f"{bias.name}{SCALED_SUFFIX}")


def _scale_constant(g: GraphIndex, node: onnx.NodeProto, index: int, factors: np.ndarray, name: str) -> None:
    """``node``'s constant input ``index`` times ``factors`` (in float64), as a new float32 initializer ``name``."""
    scaled = (g.const(node.input[index]).astype(np.float64) * factors).astype(np.float32)
    g.set_input(node, index, g.add_initializer(name, scaled))


def _conv_producer(g: GraphIndex, quantize: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Conv with int8 per-channel weights, not yet channel-scaled, whose output only ``quantize`` reads, and whose
    bias is a constant or a dequantized one."""
    conv = g.producer.get(quantize.input[0])
    weights = _weight_dq(g, conv) if conv is not None and conv.op_type == "Conv" else None
    if weights is None or g.only_reader(conv.output[0]) is not quantize or weights.input[1].endswith(SCALED_SUFFIX):
        return None  # (a depthwise conv whose own input is scaled keeps that one scaling)
    if len(conv.input) < 3 or not conv.input[2] or conv.input[2] in g.inits:
        return conv
    bias = g.producer.get(conv.input[2])
    usable = bias is not None and bias.op_type == "DequantizeLinear" and len(g.readers(conv.input[2])) == 1
    return conv if usable and g.const(bias.input[1]) is not None else None


def _shared_zero_scales(
    lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int, zeros: Iterable[int]
) -> tuple[int, np.ndarray]:
    """(zero point, per-channel scales): the one zero point for which the channels' scales, each the finest that
    covers its [lo, hi], have the least product (the most levels over all channels)."""
    best: tuple[float, int, np.ndarray] | None = None
    span = np.maximum(hi - lo, 1e-12)
    for zero in zeros:
        below, above = zero - qmin, qmax - zero
        need_low = np.where(lo < 0, -lo / max(below, 1e-12), 0.0) if below else np.where(lo < 0, np.inf, 0.0)
        need_high = hi / above if above else np.where(hi > 0, np.inf, 0.0)
        scales = np.maximum(np.maximum(need_low, need_high), span * 1e-6)
        cost = float(np.sum(np.log(scales)))
        if best is None or cost < best[0]:
            best = (cost, zero, scales)
    return best[1], best[2]


def _convs(g: GraphIndex, quantize: onnx.NodeProto) -> list[onnx.NodeProto]:
    return [conv for dq in g.readers(quantize.output[0]) for conv in g.readers(dq.output[0])]


def _weight_dq(g: GraphIndex, conv: onnx.NodeProto) -> onnx.NodeProto | None:
    """The per-channel DequantizeLinear of ``conv``'s int8 constant weight (axis 0), or None."""
    dq = g.producer.get(conv.input[1]) if len(conv.input) > 1 else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(g.readers(dq.output[0])) != 1:
        return None
    weights, scale = g.const(dq.input[0]), g.const(dq.input[1])
    if weights is None or scale is None or weights.ndim != 4 or scale.size != weights.shape[0] or attr(dq, "axis", 1):
        return None
    return dq


def _is_depthwise(g: GraphIndex, conv: onnx.NodeProto) -> bool:
    group = attr(conv, "group", 1)
    weights = _weight_dq(g, conv)
    return (
        conv.op_type == "Conv"
        and weights is not None
        and group > 1
        and g.const(weights.input[0]).shape[:2] == (group, 1)
    )


def _readers_ok(g: GraphIndex, quantize: onnx.NodeProto) -> bool:
    params = per_tensor(g, quantize)
    if params is None or params.qrange is None or quantize.output[0] in g.outputs or quantize.input[0] in g.inits:
        return False
    dequantizes = g.readers(quantize.output[0])
    if not dequantizes or any(not _same_grid(per_tensor(g, d), params) for d in dequantizes):
        return False
    if any(d.output[0] in g.outputs for d in dequantizes):
        return False
    producer = g.producer.get(quantize.input[0])
    if producer is not None and _reads_only_dequantized(g, producer) and _conv_producer(g, quantize) is None:
        return False  # ORT would fuse it into a QLinear op, which takes one output scale
    convs = _convs(g, quantize)
    read = {d.output[0] for d in dequantizes}
    return bool(convs) and all(_is_depthwise(g, c) and c.input[0] in read and c.input[1] not in read for c in convs)


def _reads_only_dequantized(g: GraphIndex, node: onnx.NodeProto) -> bool:
    return all(i in g.producer and g.producer[i].op_type == "DequantizeLinear" for i in node.input if i)


def _same_grid(dequantize: QParams | None, quantize: QParams) -> bool:
    return dequantize is not None and dequantize.scale == quantize.scale and int(dequantize.zero) == int(quantize.zero)
