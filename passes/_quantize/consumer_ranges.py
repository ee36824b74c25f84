"""Narrow calibrated activation ranges to what their readers can tell apart.

A tensor read only by a HardSigmoid (and by the Mul that multiplies it by that HardSigmoid: a
hard-swish) gives the same result for every value below ``-beta / alpha``, where HardSigmoid is 0.
Its u8 range need not reach further down: a symmetric percentile range spends up to half its 256
steps on values hard-swish maps to 0, and raising the floor to -3 roughly halves the step where it
matters (measured in docs/decisions.md, Quantize).

A tensor read only by a Sigmoid and the Mul of it by that Sigmoid (SiLU, YOLO's activation) is read
the same below ``SILU_FLOOR`` to within what int8 can hold: there the gate is under half a step of a
u8 [0, 1] grid (so its quantized value is 0) and x * sigmoid(x) is within 0.003 of 0. YOLOX's
pre-SiLU conv outputs reach -77 where 99.9 % of values lie above -12 (docs/decisions.md, session 28).

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
SILU_FLOOR = -8.0  # sigmoid(-8) = 3.4e-4 < 1/510; -8 * sigmoid(-8) = -0.0027


def _hard_sigmoid_floor(node: onnx.NodeProto) -> float | None:
    attrs = node_attrs(node)
    alpha = float(attrs.get("alpha", HARD_SIGMOID_DEFAULTS["alpha"]))
    beta = float(attrs.get("beta", HARD_SIGMOID_DEFAULTS["beta"]))
    return -beta / alpha if alpha > 0 else None


def _gated_floor(nodes: list[onnx.NodeProto]) -> float | None:
    """The floor of a tensor whose readers ``nodes`` are one gate (HardSigmoid or Sigmoid) and the Mul of it by that
    gate."""
    gates = [n for n in nodes if n.op_type in ("HardSigmoid", "Sigmoid")]
    if len(gates) != 1:
        return None
    gate = gates[0]
    # every other reader must be the gating Mul: x * gate(x) is (near) 0 wherever the gate is
    others = [n for n in nodes if n is not gate]
    if not all(n.op_type == "Mul" and gate.output[0] in n.input for n in others):
        return None
    if gate.op_type == "HardSigmoid":
        return _hard_sigmoid_floor(gate)
    return SILU_FLOOR if others else None  # a lone Sigmoid's output is read near 0 and 1 alike


def range_floors(model: onnx.ModelProto) -> dict[str, float]:
    """Tensor -> the lowest value any of its readers can distinguish (only tensors where that is known)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    floors: dict[str, float] = {}
    for tensor, nodes in readers.items():
        floor = None if tensor in graph_outputs else _gated_floor(nodes)
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
