"""The AMD/Xilinx DPU's documented limits, checked on the compiled QDQ graph; every violation named.

Reference configuration: DPUCZDX8G_ISA1_B4096 (ZCU102/ZCU104), channel_parallel 16, bank_depth
2048, bank_num 8. Sources (docs/device-artifacts.md has the details):

- Vitis AI User Guide UG1414 v3.0, "Currently Supported Operators" (DPUCZDX8G_ISA1_B4096 column):
  conv2d kernel w,h in [1,16], strides [1,8], pads <= (kernel-1)*dilation,
  kernel_w*kernel_h*ceil(ic/cp) <= bank_depth, ic and oc <= 256*cp, dilation*ic <= 256*cp, group 1;
  pooling kernel w,h in [1,256] with ceil(h/bank_num)*w <= bank_depth, strides [1,256];
  eltwise input_channel <= 256*cp; activations ReLU, LeakyReLU, ReLU6, Hard-Swish, Hard-Sigmoid.
- UG1414 v1.4.1, same table (DPUCZDX8G column): depthwise-conv2d kernel [1,16], strides [1,8].
- Vitis AI quantizer's DPU rules (vai_q_onnx / Quark ``adjust_shift_cut``/``adjust_shift_bias``):
  fix positions pos = -log2(scale); shift_cut = wpos + ipos - opos in [0, 16];
  shift_bias = wpos + ipos - bpos in [min(0, -(24 - (8 + shift_cut))), 15] with 8-bit bias.
- PG338: int8 fixed point, i.e. symmetric (zero point 0) power-of-two scales on every tensor.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.pipeline.targets import DPU_CHANNEL_PARALLEL, DPU_MAX_CHANNELS, Target

CHANNEL_PARALLEL = DPU_CHANNEL_PARALLEL
BANK_DEPTH = 2048
BANK_NUM = 8
MAX_CHANNELS = DPU_MAX_CHANNELS
SHIFT_CUT = (0, 16)
SHIFT_BIAS_MAX = 15
BIAS_BITS = 8
ACTIVATIONS = {"Relu", "LeakyRelu", "HardSwish", "HardSigmoid"}  # and Clip as ReLU6 (checked below)
QDQ = {"QuantizeLinear", "DequantizeLinear"}
REFERENCE = "DPUCZDX8G_ISA1_B4096 (channel_parallel 16, bank_depth 2048, bank_num 8)"
SOURCES = [
    "AMD UG1414 v3.0 'Currently Supported Operators' (DPUCZDX8G_ISA1_B4096)",
    "AMD UG1414 v1.4.1 same table (depthwise-conv2d, DPUCZDX8G)",
    "Vitis AI quantizer DPU shift rules (adjust_shift_cut, adjust_shift_bias)",
    "AMD PG338 (int8 fixed point)",
]


@dataclass
class Violation:
    node: str
    op: str
    rule: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "rule": self.rule, "detail": self.detail}


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        inferred = onnx.shape_inference.infer_shapes(model)
        self.nodes = list(inferred.graph.node)
        self.inits = {t.name: t for t in inferred.graph.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)
        self.shapes = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def dequantized(self, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(scale, float value if constant) of a tensor produced by DequantizeLinear; (None, None) otherwise."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None, None
        scale = self.array(dq.input[1])
        raw = self.array(dq.input[0])
        if raw is None or scale is None:
            return scale, None
        zero = self.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, raw.dtype)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * raw.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        return scale, (raw.astype(np.float64) - zero.reshape(shape if zero.size > 1 else [1])) * scale.reshape(
            shape if scale.size > 1 else [1]
        )

    def output_scale(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The scale the node's output is requantized to, through a fused activation."""
        tensor = node.output[0]
        for _ in range(2):
            users = self.consumers.get(tensor, [])
            q = next((u for u in users if u.op_type == "QuantizeLinear"), None)
            if q is not None:
                return self.array(q.input[1])
            act = next((u for u in users if u.op_type in ACTIVATIONS | {"Clip"}), None)
            if act is None:
                return None
            tensor = act.output[0]
        return None


def _pos(scale: np.ndarray | None) -> int | None:
    """The fix position -log2(scale) of a per-tensor power-of-two scale; None otherwise."""
    if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) <= 0:
        return None
    exponent = -math.log2(float(scale.reshape(-1)[0]))
    return int(round(exponent)) if abs(exponent - round(exponent)) < 1e-6 else None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else (a.i if a.type == onnx.AttributeProto.INT else a.f)
    return default


def _check_qdq(g: _Graph, out: list[Violation]) -> None:
    seen: set[str] = set()
    for node in g.nodes:
        if node.op_type not in QDQ or node.input[1] in seen:
            continue
        seen.add(node.input[1])
        scale = g.array(node.input[1])
        zero = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        is_bias = zero is not None and zero.dtype == np.int32
        if zero is not None and zero.dtype != np.int8 and not is_bias:
            out.append(
                Violation(
                    node.name, node.op_type, "int8", f"{node.input[0]} is {zero.dtype}, the DPU computes signed int8"
                )
            )
        if zero is not None and np.any(zero != 0):
            out.append(
                Violation(
                    node.name,
                    node.op_type,
                    "symmetric",
                    f"{node.input[0]} has zero point {int(zero.reshape(-1)[0])}, the DPU needs 0",
                )
            )
        if scale is not None and scale.size > 1 and not is_bias:
            out.append(
                Violation(
                    node.name,
                    node.op_type,
                    "per-tensor",
                    f"{node.input[0]} has {scale.size} scales, the DPU takes one per tensor",
                )
            )
        elif scale is not None and not is_bias and _pos(scale) is None:
            out.append(
                Violation(
                    node.name,
                    node.op_type,
                    "power-of-two",
                    f"{node.input[0]} scale {float(scale.reshape(-1)[0]):.6g} is not 2^k",
                )
            )


def _range(out: list[Violation], node: onnx.NodeProto, rule: str, values: list[int], low: int, high: int) -> None:
    bad = [v for v in values if not low <= v <= high]
    if bad:
        out.append(Violation(node.name, node.op_type, rule, f"{values} outside [{low}, {high}]"))


def _check_conv(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    weight = g.array(g.producer[node.input[1]].input[0]) if node.input[1] in g.producer else g.array(node.input[1])
    if weight is None or weight.ndim != 4:
        out.append(
            Violation(node.name, node.op_type, "conv2d", "weights are not a constant 4-D tensor: runs on the CPU")
        )
        return
    oc, icg, kh, kw = weight.shape
    group = _attr(node, "group", 1)
    ic = icg * group
    strides, dilations = _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1])
    pads = _attr(node, "pads", [0, 0, 0, 0])
    depthwise = group > 1 and group == ic
    if group > 1 and not depthwise:
        out.append(
            Violation(node.name, node.op_type, "group", f"group {group} (not 1, not depthwise): runs on the CPU")
        )
    _range(out, node, "kernel", [kh, kw], 1, 16)
    _range(out, node, "stride", list(strides), 1, 8)
    for (begin, end), k, d, axis in zip(((pads[0], pads[2]), (pads[1], pads[3])), (kh, kw), dilations, "hw"):
        if max(begin, end) > (k - 1) * d:
            out.append(
                Violation(
                    node.name,
                    node.op_type,
                    "pad",
                    f"pad_{axis} {max(begin, end)} > (kernel-1)*dilation = {(k - 1) * d}",
                )
            )
    in_size = kh * kw * math.ceil(ic / CHANNEL_PARALLEL)
    if in_size > BANK_DEPTH:
        out.append(
            Violation(
                node.name,
                node.op_type,
                "in_size",
                f"kernel_w*kernel_h*ceil(ic/{CHANNEL_PARALLEL}) = {in_size} > bank_depth {BANK_DEPTH}",
            )
        )
    for name, value in (("input_channel", ic), ("output_channel", oc), ("dilation*input_channel", max(dilations) * ic)):
        if value > MAX_CHANNELS:
            out.append(Violation(node.name, node.op_type, name, f"{value} > 256*channel_parallel = {MAX_CHANNELS}"))
    _check_shifts(g, node, out)


def _check_fc(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    weight = g.array(g.producer[node.input[1]].input[0]) if node.input[1] in g.producer else g.array(node.input[1])
    if weight is None or weight.ndim != 2:
        out.append(
            Violation(
                node.name, node.op_type, "fully-connected", "second operand is not a constant matrix: runs on the CPU"
            )
        )
        return
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    ic, oc = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
    for name, value in (("input_channel", ic), ("output_channel", oc)):
        if value > MAX_CHANNELS:  # compiled as a 1x1 conv2d
            out.append(Violation(node.name, node.op_type, name, f"{value} > 256*channel_parallel = {MAX_CHANNELS}"))
    _check_shifts(g, node, out)


def _check_shifts(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    ipos, wpos = _pos(g.dequantized(node.input[0])[0]), _pos(g.dequantized(node.input[1])[0])
    opos = _pos(g.output_scale(node))
    if None in (ipos, wpos, opos):
        return  # not power-of-two int8 here: already named by the scheme check, or a float layer
    shift_cut = wpos + ipos - opos  # type: ignore[operator]
    if not SHIFT_CUT[0] <= shift_cut <= SHIFT_CUT[1]:
        out.append(
            Violation(node.name, node.op_type, "shift_cut", f"wpos+ipos-opos = {shift_cut} outside {list(SHIFT_CUT)}")
        )
    bias_name = node.input[2] if len(node.input) > 2 else ""
    bias = g.dequantized(bias_name)[1] if bias_name else None
    if bias is None or not np.any(bias):
        return
    # The largest fix position that holds the bias in 8 bits; the shift limit asks for one at least wpos+ipos-15.
    bpos_max = math.floor(math.log2((2 ** (BIAS_BITS - 1) - 1) / float(np.abs(bias).max())))
    need = wpos + ipos - SHIFT_BIAS_MAX  # type: ignore[operator]
    if need > bpos_max:
        out.append(
            Violation(
                node.name,
                node.op_type,
                "shift_bias",
                f"bias up to {float(np.abs(bias).max()):.4g} needs fix position <= {bpos_max}, the shift limit "
                f"(wpos+ipos-bpos <= {SHIFT_BIAS_MAX}) needs >= {need}: the bias saturates",
            )
        )


def _check_pool(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    shape = g.shapes.get(node.input[0]) or []
    if node.op_type.startswith("Global"):
        if not shape or None in shape[2:]:
            out.append(Violation(node.name, node.op_type, "pool", "input shape unknown: kernel size cannot be checked"))
            return
        kernel, strides = list(shape[2:]), [1, 1]
    else:
        kernel, strides = list(_attr(node, "kernel_shape", [1, 1])), _attr(node, "strides", [1, 1])
    if len(kernel) != 2:  # 1-D and 3-D pooling (pytorch-converted AvgPool3d) have no DPU kernel
        out.append(Violation(node.name, node.op_type, "pool2d", f"{len(kernel)}-D pooling: runs on the CPU"))
        return
    kh, kw = kernel
    _range(out, node, "kernel", [kh, kw], 1, 256)
    _range(out, node, "stride", list(strides), 1, 256)
    if math.ceil(kh / BANK_NUM) * kw > BANK_DEPTH:
        out.append(
            Violation(
                node.name,
                node.op_type,
                "kernel",
                f"ceil(h/{BANK_NUM})*w = {math.ceil(kh / BANK_NUM) * kw} > bank_depth {BANK_DEPTH}",
            )
        )
    if "Average" in node.op_type and kh != kw:
        out.append(
            Violation(node.name, node.op_type, "kernel", f"average pooling needs a square kernel, got {kh}x{kw}")
        )


def _check_eltwise(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    shape = g.shapes.get(node.output[0]) or []
    channels = shape[1] if len(shape) >= 2 else None
    if channels and channels > MAX_CHANNELS:
        out.append(
            Violation(node.name, node.op_type, "input_channel", f"{channels} > 256*channel_parallel = {MAX_CHANNELS}")
        )


CHECKS: dict[str, Callable[[_Graph, onnx.NodeProto, list[Violation]], None]] = {
    "Conv": _check_conv,
    "Gemm": _check_fc,
    "MatMul": _check_fc,
    "MaxPool": _check_pool,
    "AveragePool": _check_pool,
    "GlobalAveragePool": _check_pool,
    "GlobalMaxPool": _check_pool,
    "Add": _check_eltwise,
    "Mul": _check_eltwise,
}


def check(model: onnx.ModelProto, supported_ops: list[str]) -> tuple[list[Violation], int]:
    """Every violation of the DPU's limits in ``model``, and the number of compute nodes checked."""
    g = _Graph(model)
    out: list[Violation] = []
    _check_qdq(g, out)
    supported = set(supported_ops) or set(CHECKS) | ACTIVATIONS | {"Clip", "Concat", "Reshape", "Flatten"}
    checked = 0
    for node in g.nodes:
        if node.op_type in QDQ:
            continue
        checked += 1
        if node.op_type not in supported and node.op_type not in ACTIVATIONS:
            out.append(
                Violation(node.name, node.op_type, "operator", f"{node.op_type} is not a DPU operator: runs on the CPU")
            )
            continue
        if node.op_type == "Clip" and not _is_relu6(g, node):
            out.append(
                Violation(node.name, node.op_type, "activation", "Clip other than [0, 6] (ReLU6): runs on the CPU")
            )
        if node.op_type in ("Conv", "Gemm", "MatMul") and g.dequantized(node.input[0])[0] is None:
            out.append(
                Violation(node.name, node.op_type, "float", "input not quantized: this layer stays float, on the CPU")
            )
        check_node = CHECKS.get(node.op_type)
        if check_node is not None:
            check_node(g, node, out)
    return out, checked


def _is_relu6(g: _Graph, node: onnx.NodeProto) -> bool:
    bounds = [g.array(name) if name else None for name in list(node.input[1:3])]
    low, high = (float(b) if b is not None else None for b in (bounds + [None, None])[:2])
    return low == 0.0 and high == 6.0


def check_report(model: onnx.ModelProto, target: Target, warn: Callable[[str], None]) -> dict[str, Any]:
    """The report's ``device.dpu`` section; one warning summarising any violation."""
    violations, checked = check(model, list(target.runtime.supported_ops))
    by_rule: dict[str, int] = defaultdict(int)
    for v in violations:
        by_rule[v.rule] += 1
    if violations:
        first = violations[0]
        warn(
            f"DPU check: {len(violations)} violation(s) of {REFERENCE} limits ({', '.join(f'{r} {n}' for r, n in sorted(by_rule.items()))}); "
            f"first: {first.node} ({first.op}) {first.rule}: {first.detail}"
        )
    return {
        "reference": REFERENCE,
        "sources": SOURCES,
        "nodes_checked": checked,
        "ok": not violations,
        "violations": [v.to_dict() for v in violations],
        "by_rule": dict(sorted(by_rule.items())),
    }
