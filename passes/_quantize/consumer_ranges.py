"""Narrow calibrated activation ranges to what their readers can tell apart.

A tensor read only by a HardSigmoid (and by the Mul that multiplies it by that HardSigmoid: a
hard-swish) gives the same result for every value below ``-beta / alpha``, where HardSigmoid is 0.
Its u8 range need not reach further down: a symmetric percentile range spends up to half its 256
steps on values hard-swish maps to 0, and raising the floor to -3 roughly halves the step where it
matters (measured in docs/decisions.md, Quantize).

ONNX Runtime's quantizer already does this for Relu and Clip (it folds them into the Q's range);
it has no such rule for HardSigmoid (checked: onnxruntime.quantization qdq_quantizer 1.2x), so it is
written here, applied to the calibration result before quantize_static reads it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import TensorsData

from lepton_cli.model.op_traits import attrs as node_attrs

HARD_SIGMOID_DEFAULTS = {"alpha": 0.2, "beta": 0.5}  # ONNX's defaults


def _hard_sigmoid_floor(node: onnx.NodeProto) -> float | None:
    attrs = node_attrs(node)
    alpha = float(attrs.get("alpha", HARD_SIGMOID_DEFAULTS["alpha"]))
    beta = float(attrs.get("beta", HARD_SIGMOID_DEFAULTS["beta"]))
    return -beta / alpha if alpha > 0 else None


def range_floors(model: onnx.ModelProto) -> dict[str, float]:
    """Tensor -> the lowest value any of its readers can distinguish (only tensors where that is known)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    floors: dict[str, float] = {}
    for tensor, nodes in readers.items():
        hard_sigmoids = [n for n in nodes if n.op_type == "HardSigmoid"]
        if tensor in graph_outputs or len(hard_sigmoids) != 1:
            continue
        gate = hard_sigmoids[0]
        # every other reader must be the hard-swish Mul: x * HardSigmoid(x) is 0 wherever the gate is
        if all(n.op_type == "HardSigmoid" or (n.op_type == "Mul" and gate.output[0] in n.input) for n in nodes):
            floor = _hard_sigmoid_floor(gate)
            if floor is not None:
                floors[tensor] = floor
    return floors


def narrow_to_readers(model: onnx.ModelProto, ranges: TensorsData) -> list[str]:
    """Raise the calibrated lower bound of tensors in ``range_floors``; returns the names changed."""
    changed = []
    for tensor, floor in range_floors(model).items():
        data = ranges.data.get(tensor)
        if data is None or not hasattr(data, "lowest"):
            continue
        lowest = float(np.min(data.lowest))
        highest = float(np.max(data.highest))
        if lowest < floor < highest:
            data.lowest = np.array(floor, dtype=np.asarray(data.lowest).dtype)
            changed.append(tensor)
    return changed
