"""A compiled QDQ ONNX graph as a full-integer TFLite model that keeps Lepton's calibration ranges.

Each ONNX node becomes the TensorFlow op TFLite maps to a builtin; each activation Q/DQ pair
becomes a ``FakeQuant`` with exactly the pair's range, ``[(qmin - zp) * s, (qmax - zp) * s]``, and
each int8 weight its per-output-channel ``FakeQuant`` (narrow range, ``[-127 s, 127 s]``). The
TFLite converter then makes the model integer from those ranges, as for a quantization-aware
trained model: nothing is re-calibrated, no representative dataset is given (docs/device-artifacts.md
says why this route and not onnx2tf). Tensors are NHWC inside: a 4-D tensor the ONNX graph holds
as NCHW is kept channel-last and only transposed back where its memory order matters (Reshape,
Flatten, a graph output). Ops outside the supported set raise ``UnsupportedOp``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.host.native_stderr import captured_stderr

QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


class UnsupportedOp(Exception):
    """An ONNX op (or attribute) this converter has no TFLite mapping for."""


class ConverterFailed(Exception):
    """TensorFlow's TFLite converter refused the exported graph (its last diagnostic line)."""


@dataclass
class _Value:
    tensor: Any  # tf.Tensor, or np.ndarray for a constant
    nhwc: bool = False  # a 4-D tensor that is NCHW in the ONNX graph, stored NHWC here
    weight_scale: np.ndarray | None = None  # a DequantizeLinear'd int8 constant: its per-axis scales
    weight_axis: int = 0


@dataclass
class TfliteModel:
    data: bytes
    inputs: dict[str, str]  # ONNX input name -> TFLite signature name
    outputs: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Per-axis quantization parameters shaped to broadcast along ``axis`` of an ``ndim``-D tensor."""
    return values.reshape([-1 if i == axis else 1 for i in range(ndim)]) if values.size > 1 else values.reshape(())


def signature_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return clean if clean and clean[0].isalpha() else f"t_{clean}"


# ops whose TFLite int8 kernels take and give one scale
SAME_SCALE_OPS = {
    "Concat",
    "Resize",
    "MaxPool",
    "Gather",
    "SpaceToDepth",
    "Slice",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
}
# Resize (coordinate_transformation_mode, nearest_mode) pairs that copy pixel i // factor at whole upsampling factors
REPEATING_NEAREST = {
    ("asymmetric", "floor"),
    ("half_pixel", "round_prefer_floor"),
    ("pytorch_half_pixel", "round_prefer_floor"),
}


class _Builder:
    def __init__(self, tf: Any, model: onnx.ModelProto):
        self.tf = tf
        self.graph = model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.values: dict[str, _Value] = {}
        self.graph_outputs = {o.name for o in model.graph.output}
        self.quant: dict[str, tuple[float, float]] = {}  # Q output -> (min, max) of its FakeQuant
        self.dq_source: dict[str, str] = {}  # activation DQ output -> its Q output (the value before its FakeQuant)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    # -- layout helpers -------------------------------------------------------------------------
    def nchw(self, v: _Value) -> Any:
        """The tensor in the ONNX graph's own layout."""
        return self.tf.transpose(v.tensor, TO_NCHW) if v.nhwc else v.tensor

    def nhwc(self, v: _Value) -> Any:
        """A logical NCHW 4-D tensor, channel-last."""
        if v.nhwc:
            return v.tensor
        if isinstance(v.tensor, np.ndarray):
            return np.ascontiguousarray(v.tensor.transpose(TO_NHWC))
        return self.tf.transpose(v.tensor, TO_NHWC)

    def get(self, name: str) -> _Value:
        if name in self.values:
            return self.values[name]
        if name in self.inits:
            return _Value(self.inits[name])
        raise UnsupportedOp(f"tensor {name!r} has no producer")

    def const(self, name: str) -> np.ndarray:
        value = self.get(name).tensor
        if not isinstance(value, np.ndarray):
            raise UnsupportedOp(f"{name} must be a constant")
        return value

    # -- Q/DQ -----------------------------------------------------------------------------------
    def quantize_linear(self, node: onnx.NodeProto) -> None:
        scale = self.const(node.input[1]).astype(np.float64)
        zero = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale.size != 1:
            raise UnsupportedOp(f"{node.name}: per-axis activation quantization (TFLite activations are per-tensor)")
        low, high = QRANGE[zero.dtype]
        zp, s = float(zero.reshape(-1)[0]), float(scale.reshape(-1)[0])
        self.quant[node.output[0]] = ((low - zp) * s, (high - zp) * s)
        self.values[node.output[0]] = self.get(node.input[0])
        if node.output[0] in self.graph_outputs:  # an integer graph output: its range is the output's
            self.values[node.output[0]] = self._fake_quant(node.output[0])

    def _fake_quant(self, name: str) -> _Value:
        low, high = self.quant[name]
        v = self.values[name]
        return _Value(
            self.tf.quantization.fake_quant_with_min_max_vars(
                v.tensor, min=low, max=high, num_bits=8, narrow_range=False
            ),
            v.nhwc,
        )

    def dequantize_linear(self, node: onnx.NodeProto) -> None:
        source = node.input[0]
        if source not in self.quant and not isinstance(self.get(source).tensor, np.ndarray):
            # integer data from a graph input (through layout ops): here it is the real value, TFLite's int8 input has this range
            zero = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
            low, high = QRANGE[zero.dtype]
            zp, s = float(zero.reshape(-1)[0]), float(self.const(node.input[1]).reshape(-1)[0])
            self.quant[source] = ((low - zp) * s, (high - zp) * s)
        if source in self.quant:  # an activation pair: one FakeQuant with the pair's range
            self.values[node.output[0]] = self._fake_quant(source)
            self.dq_source[node.output[0]] = source
            return
        raw = self.const(source)
        scale = self.const(node.input[1]).astype(np.float64)
        zero = self.const(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(())
        axis = _attrs(node).get("axis", 1) % max(raw.ndim, 1)
        value = ((raw.astype(np.float64) - _along(zero, axis, raw.ndim)) * _along(scale, axis, raw.ndim)).astype(
            np.float32
        )
        is_weight = raw.dtype == np.int8 and not np.any(zero)
        self.values[node.output[0]] = _Value(
            value, weight_scale=scale.reshape(-1) if is_weight else None, weight_axis=axis
        )

    def weight(self, v: _Value, layout: Callable[[np.ndarray], np.ndarray]) -> Any:
        """A constant weight in TF layout (output channels last), FakeQuant'd per channel with its own int8 scales."""
        if not isinstance(v.tensor, np.ndarray):
            raise UnsupportedOp("weights computed at run time")
        w = np.ascontiguousarray(layout(v.tensor))
        if v.weight_scale is None:
            return w  # a float-kept layer: the converter leaves it float (named as a CPU op)
        scales = np.broadcast_to(v.weight_scale, (w.shape[-1],)).astype(np.float32)
        return self.tf.quantization.fake_quant_with_min_max_vars_per_channel(
            w, min=-127.0 * scales, max=127.0 * scales, num_bits=8, narrow_range=True
        )

    # -- ops ------------------------------------------------------------------------------------
    def conv(self, node: onnx.NodeProto) -> None:
        tf, a = self.tf, _attrs(node)
        x, w = self.get(node.input[0]), self.get(node.input[1])
        if len(w.tensor.shape) != 4:
            raise UnsupportedOp(f"{node.name}: only 2-D convolutions")
        out_c, in_per_group, kh, kw = w.tensor.shape
        group = a.get("group", 1)
        strides, dilations = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
        xin = self.nhwc(x)
        padding = self._padding(node, xin.shape[1:3], (kh, kw), strides, dilations)
        if group == 1:
            filt = self.weight(w, lambda t: t.transpose(2, 3, 1, 0))
            y = tf.nn.conv2d(xin, filt, strides=[1, *strides, 1], padding=padding, dilations=[1, *dilations, 1])
        elif in_per_group == 1 and out_c % group == 0 and group == xin.shape[-1]:
            mult = out_c // group
            flat = self.weight(w, lambda t: t.reshape(group * mult, kh, kw).transpose(1, 2, 0)[:, :, None, :])
            filt = tf.reshape(flat, [kh, kw, group, mult])
            if dilations != [1, 1] and strides != [1, 1]:
                raise UnsupportedOp(f"{node.name}: depthwise conv with both stride and dilation")
            y = tf.nn.depthwise_conv2d(xin, filt, strides=[1, *strides, 1], padding=padding, dilations=dilations)
        else:
            raise UnsupportedOp(f"{node.name}: grouped convolution (group {group}) that is not depthwise")
        if len(node.input) > 2 and node.input[2]:
            y = tf.nn.bias_add(y, self.const(node.input[2]))
        self.values[node.output[0]] = _Value(y, nhwc=True)

    def _padding(
        self, node: onnx.NodeProto, spatial: Any, kernel: tuple[int, int], strides: list[int], dilations: list[int]
    ) -> Any:
        a = _attrs(node)
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER",):
            return "SAME"
        if auto == "VALID":
            return "VALID"
        if auto != "NOTSET":
            raise UnsupportedOp(f"{node.name}: auto_pad {auto}")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if not any(pads):
            return "VALID"
        same = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            size = int(size)
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            same += [total // 2, total - total // 2]
        if [pads[0], pads[2], pads[1], pads[3]] == same:
            return "SAME"
        return [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]]

    def pool(self, node: onnx.NodeProto) -> None:
        tf, a = self.tf, _attrs(node)
        if len(self.get(node.input[0]).tensor.shape) != 4:
            raise UnsupportedOp(f"{node.name}: only 2-D pooling")
        x = self.nhwc(self.get(node.input[0]))
        if node.op_type.startswith("Global"):
            reduce = tf.reduce_mean if node.op_type == "GlobalAveragePool" else tf.reduce_max
            self.values[node.output[0]] = _Value(reduce(x, axis=[1, 2], keepdims=True), nhwc=True)
            return
        kernel, strides = a["kernel_shape"], a.get("strides", [1, 1])
        if a.get("ceil_mode", 0) or a.get("dilations", [1, 1]) != [1, 1]:
            raise UnsupportedOp(f"{node.name}: ceil_mode or dilated pooling")
        padding = self._padding(node, x.shape[1:3], tuple(kernel), strides, [1, 1])
        if isinstance(padding, list) or (
            padding == "SAME" and node.op_type == "AveragePool" and a.get("count_include_pad", 0)
        ):
            raise UnsupportedOp(f"{node.name}: pooling padding TFLite cannot express")
        op = tf.nn.max_pool2d if node.op_type == "MaxPool" else tf.nn.avg_pool2d
        self.values[node.output[0]] = _Value(op(x, kernel, [1, *strides, 1], padding), nhwc=True)

    def gemm(self, node: onnx.NodeProto) -> None:
        tf, a = self.tf, _attrs(node)
        x, w = self.get(node.input[0]), self.get(node.input[1])
        if node.op_type == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            raise UnsupportedOp(f"{node.name}: Gemm with transA, alpha or beta")
        if not isinstance(w.tensor, np.ndarray):
            y = tf.linalg.matmul(self.nchw(x), self.nchw(w))
        else:
            trans = node.op_type == "Gemm" and a.get("transB", 0)
            if w.weight_scale is not None and w.weight_scale.size > 1 and w.weight_axis != (0 if trans else 1):
                raise UnsupportedOp(f"{node.name}: weights quantized along the input axis")
            k, n = (w.tensor.shape[1], w.tensor.shape[0]) if trans else w.tensor.shape
            weight = self.weight(w, lambda t: (t.T if trans else t).reshape(1, 1, k, n))
            y = self._fully_connected(self.nchw(x), weight, int(n))
        if len(node.input) > 2 and node.input[2]:
            y = y + self.const(node.input[2])
        self.values[node.output[0]] = _Value(y)

    def _fully_connected(self, x: Any, weight: Any, units: int) -> Any:
        """x @ weight as a 1x1 CONV_2D: TFLite keeps per-output-channel weight scales there (a MatMul's
        per-channel FakeQuant would sit on the wrong axis once the converter transposes it for FULLY_CONNECTED).
        The rows are one image's width: the Edge TPU maps no tensor with a dimension above 1 outside its innermost 3."""
        tf = self.tf
        lead = [int(d) for d in x.shape[:-1]]
        rows = int(np.prod(lead)) if lead else 1
        image = tf.reshape(x, [1, 1, rows, int(x.shape[-1])])
        y = tf.nn.conv2d(image, weight, strides=[1, 1, 1, 1], padding="VALID")
        return tf.reshape(y, lead + [units])

    def elementwise(self, node: onnx.NodeProto) -> None:
        tf = self.tf
        fn = {"Add": tf.add, "Sub": tf.subtract, "Mul": tf.multiply, "Div": tf.divide}[node.op_type]
        a, b = self.get(node.input[0]), self.get(node.input[1])
        nhwc = any(v.nhwc for v in (a, b))
        self.values[node.output[0]] = _Value(fn(self._aligned(a, nhwc), self._aligned(b, nhwc)), nhwc=nhwc)

    def _aligned(self, v: _Value, nhwc: bool) -> Any:
        if not nhwc or v.nhwc:
            return v.tensor
        if isinstance(v.tensor, np.ndarray):
            t = v.tensor
            if t.ndim == 0:
                return t
            t = t.reshape((1,) * (4 - t.ndim) + t.shape)
            return np.ascontiguousarray(t.transpose(TO_NHWC))
        if int(np.prod(v.tensor.shape)) == 1:  # a quantized scalar (hard-swish's 3): broadcasts in any layout
            return self.tf.reshape(v.tensor, [])
        if len(v.tensor.shape) != 4:
            raise UnsupportedOp("broadcast of a lower-rank tensor against a channel-last one")
        return self.tf.transpose(v.tensor, TO_NHWC)

    def unary(self, node: onnx.NodeProto) -> None:
        tf, a = self.tf, _attrs(node)
        v = self.get(node.input[0])
        x = v.tensor
        if node.op_type == "Relu":
            y = tf.nn.relu(x)
        elif node.op_type == "Clip":
            low = float(self.const(node.input[1])) if len(node.input) > 1 and node.input[1] else None
            high = float(self.const(node.input[2])) if len(node.input) > 2 and node.input[2] else None
            y = (
                tf.nn.relu6(x)
                if (low, high) == (0.0, 6.0)
                else tf.clip_by_value(x, -3.4e38 if low is None else low, 3.4e38 if high is None else high)
            )
        elif node.op_type == "LeakyRelu":
            y = tf.nn.leaky_relu(x, alpha=a.get("alpha", 0.01))
        elif node.op_type == "Sigmoid":
            y = tf.math.sigmoid(x)
        elif node.op_type == "Tanh":
            y = tf.math.tanh(x)
        elif node.op_type == "HardSigmoid":
            y = tf.clip_by_value(x * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0)
        elif node.op_type == "HardSwish":
            y = x * tf.nn.relu6(x + 3.0) / 6.0
        elif node.op_type == "Identity":
            y = x
        else:
            raise UnsupportedOp(node.op_type)
        self.values[node.output[0]] = _Value(y, v.nhwc)

    def softmax(self, node: onnx.NodeProto) -> None:
        v = self.get(node.input[0])
        axis = _attrs(node).get("axis", -1)
        rank = len(v.tensor.shape)
        if axis % rank != rank - 1:
            raise UnsupportedOp(f"{node.name}: Softmax over axis {axis}, not the last")
        self.values[node.output[0]] = _Value(self.tf.nn.softmax(self.nchw(v), axis=-1))

    def reshape(self, node: onnx.NodeProto) -> None:
        v = self.get(node.input[0])
        x = self.nchw(v)
        if node.op_type == "Flatten":
            axis = _attrs(node).get("axis", 1)
            dims = [int(d) for d in x.shape]
            shape = [int(np.prod(dims[:axis])), int(np.prod(dims[axis:]))]
        else:
            shape = [int(d) for d in self.const(node.input[1])]
            dims = [int(d) for d in x.shape]
            shape = [dims[i] if d == 0 else d for i, d in enumerate(shape)]
        self.values[node.output[0]] = _Value(self.tf.reshape(x, shape))

    def transpose(self, node: onnx.NodeProto) -> None:
        v = self.get(node.input[0])
        perm = list(_attrs(node).get("perm", []))
        rank = len(v.tensor.shape)
        if rank == 4 and not v.nhwc and perm == TO_NCHW:  # channel-last data entering an NCHW graph: already NHWC
            self.values[node.output[0]] = _Value(v.tensor, nhwc=True)
        elif rank == 4 and v.nhwc and perm == TO_NHWC:  # back to channel-last: it is stored so
            self.values[node.output[0]] = _Value(v.tensor)
        else:
            self.values[node.output[0]] = _Value(self.tf.transpose(self.nchw(v), perm or None))

    def _q_range(self, q: onnx.NodeProto) -> tuple[float, float]:
        zero = self.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        low, high = QRANGE[zero.dtype]
        zp, s = float(zero.reshape(-1)[0]), float(self.const(q.input[1]).reshape(-1)[0])
        return (low - zp) * s, (high - zp) * s

    def requantized(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """``node`` reading its activations requantized to the range of the one Q after it, for ops whose TFLite int8
        kernels take and give one scale (the converter does not requantize between two FakeQuants). These ops only
        move values, so requantizing first equals ONNX Runtime's DQ -> op -> Q."""
        after = self.consumers.get(node.output[0], []) if node.op_type in SAME_SCALE_OPS else []
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or self.const(after[0].input[1]).size != 1:
            return node
        low, high = self._q_range(after[0])
        if all(self.quant.get(self.dq_source.get(n, ""), (low, high)) == (low, high) for n in node.input):
            return node
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        fq = self.tf.quantization.fake_quant_with_min_max_vars
        for k, name in enumerate(node.input):
            if name in self.dq_source and self.quant[self.dq_source[name]] != (low, high):
                v = self.values[name]
                fresh = f"{name}__at_{node.output[0]}"
                self.values[fresh] = _Value(fq(self._requantizer(v.tensor), min=low, max=high, num_bits=8), v.nhwc)
                copy.input[k] = fresh
        return copy

    def _requantizer(self, x: Any) -> Any:
        """An op that can change scale and keeps values: a 1x1 depthwise conv with weights exactly 1 (int8 127 at
        scale 1/127), other ranks seen as 4-D around it."""
        dims = [int(d) for d in x.shape]
        channels = dims[-1] if dims else 1
        ones = self.tf.quantization.fake_quant_with_min_max_vars_per_channel(
            np.ones((1, 1, 1, channels), np.float32),
            min=-np.ones(channels, np.float32),
            max=np.ones(channels, np.float32),
            num_bits=8,
            narrow_range=True,
        )
        filt = self.tf.reshape(ones, [1, 1, channels, 1])
        image = x if len(dims) == 4 else self.tf.reshape(x, [1, 1, int(np.prod(dims)) // channels, channels])
        y = self.tf.nn.depthwise_conv2d(image, filt, strides=[1, 1, 1, 1], padding="VALID")
        return y if len(dims) == 4 else self.tf.reshape(y, dims)

    def concat(self, node: onnx.NodeProto) -> None:
        values = [self.get(n) for n in node.input]
        axis = _attrs(node)["axis"]
        if all(v.nhwc for v in values):
            axis = {1: 3, 2: 1, 3: 2, -3: 3}.get(axis, axis) if axis % 4 != 0 else 0
            self.values[node.output[0]] = _Value(self.tf.concat([v.tensor for v in values], axis), nhwc=True)
        else:
            self.values[node.output[0]] = _Value(self.tf.concat([self.nchw(v) for v in values], axis))

    def slice(self, node: onnx.NodeProto) -> None:
        v = self.get(node.input[0])
        x = self.nchw(v)
        rank = len(x.shape)
        starts, ends = self.const(node.input[1]), self.const(node.input[2])
        axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
        steps = self.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(len(starts), np.int64)
        begin, end, stride = [0] * rank, [int(d) for d in x.shape], [1] * rank
        for start, stop, axis, step in zip(starts, ends, axes, steps):
            axis, size = int(axis) % rank, int(x.shape[int(axis) % rank])
            begin[axis] = int(np.clip(start + size if start < 0 else start, 0, size))
            end[axis] = int(np.clip(stop + size if stop < 0 else stop, 0, size))
            stride[axis] = int(step)
        if any(st < 1 for st in stride):
            raise UnsupportedOp(f"{node.name}: Slice with a negative step")
        if all(st == 1 for st in stride):
            self.values[node.output[0]] = _Value(self.tf.slice(x, begin, [e - b for b, e in zip(begin, end)]))
        else:  # e.g. YOLOX's Focus (space-to-depth by four stride-2 slices): STRIDED_SLICE, an Edge TPU op
            self.values[node.output[0]] = _Value(self.tf.strided_slice(x, begin, end, stride))

    def gather(self, node: onnx.NodeProto) -> None:
        v, indices = self.get(node.input[0]), self.const(node.input[1]).astype(np.int64)
        rank = len(v.tensor.shape)
        axis = _attrs(node).get("axis", 0) % rank
        indices = np.where(indices < 0, indices + int(v.tensor.shape[axis]), indices)
        if (
            v.nhwc and axis == 1 and indices.ndim == 1
        ):  # a channel selection (padded channels restored): stays channel-last
            self.values[node.output[0]] = _Value(self.tf.gather(v.tensor, indices, axis=3), nhwc=True)
        else:
            self.values[node.output[0]] = _Value(self.tf.gather(self.nchw(v), indices, axis=axis))

    def space_to_depth(self, node: onnx.NodeProto) -> None:
        # ONNX's channel order (block row, block column, channel) is TFLite's SPACE_TO_DEPTH order on NHWC data
        x = self.nhwc(self.get(node.input[0]))
        self.values[node.output[0]] = _Value(self.tf.nn.space_to_depth(x, _attrs(node)["blocksize"]), nhwc=True)

    def resize(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        mode = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items() if isinstance(v, (bytes, str))}
        x = self.nhwc(self.get(node.input[0]))
        height, width = int(x.shape[1]), int(x.shape[2])
        sizes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        scales = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if sizes is not None and sizes.size == 4:
            out_h, out_w = int(sizes[2]), int(sizes[3])
        elif scales is not None and scales.size == 4 and list(scales[:2]) == [1.0, 1.0]:
            out_h, out_w = int(height * scales[2]), int(width * scales[3])
        else:
            raise UnsupportedOp(f"{node.name}: Resize other than of height and width")
        modes = (
            mode.get("coordinate_transformation_mode", "half_pixel"),
            mode.get("nearest_mode", "round_prefer_floor"),
        )
        if (
            mode.get("mode", "nearest") != "nearest"
            or out_h % height
            or out_w % width
            or modes not in REPEATING_NEAREST
        ):
            raise UnsupportedOp(f"{node.name}: Resize other than nearest-neighbour by whole factors ({mode})")
        # these modes repeat each pixel factor times at whole factors, as TFLite's RESIZE_NEAREST_NEIGHBOR does
        y = self.tf.compat.v1.image.resize_nearest_neighbor(
            x, [out_h, out_w], align_corners=False, half_pixel_centers=False
        )
        self.values[node.output[0]] = _Value(y, nhwc=True)

    def squeeze(self, node: onnx.NodeProto) -> None:
        x = self.nchw(self.get(node.input[0]))
        axes = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else _attrs(node).get("axes")
        dims = [int(d) for d in x.shape]
        if node.op_type == "Squeeze":
            drop = {int(a) % len(dims) for a in axes} if axes is not None else {i for i, d in enumerate(dims) if d == 1}
            shape = [d for i, d in enumerate(dims) if i not in drop]
        else:
            rank = len(dims) + len(axes)
            shape, it = [], iter(dims)
            add = {int(a) % rank for a in axes}
            shape = [1 if i in add else next(it) for i in range(rank)]
        self.values[node.output[0]] = _Value(self.tf.reshape(x, shape))

    def layer_norm(self, node: onnx.NodeProto) -> None:
        tf, a = self.tf, _attrs(node)
        x = self.nchw(self.get(node.input[0]))
        if a.get("axis", -1) % len(x.shape) != len(x.shape) - 1:
            raise UnsupportedOp(f"{node.name}: LayerNormalization over more than the last axis")
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        var = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=-1, keepdims=True)
        y = (x - mean) * tf.math.rsqrt(var + a.get("epsilon", 1e-5)) * self.const(node.input[1])
        if len(node.input) > 2 and node.input[2]:
            y = y + self.const(node.input[2])
        self.values[node.output[0]] = _Value(y)

    def reduce_mean(self, node: onnx.NodeProto) -> None:
        x = self.nchw(self.get(node.input[0]))
        axes = _attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in self.const(node.input[1]).reshape(-1)]
        if not axes or _attrs(node).get("keepdims", 1) != 1:
            raise UnsupportedOp(f"{node.name}: ReduceMean needs constant axes and keepdims=1")
        self.values[node.output[0]] = _Value(self.tf.reduce_mean(x, axis=list(axes), keepdims=True))

    def l2_normalize(self, node: onnx.NodeProto) -> None:
        """The chip's L2_NORMALIZATION (the converter fuses TF's l2_normalize into it)."""
        a = _attrs(node)
        x = self.nchw(self.get(node.input[0]))
        if a.get("p", 2) != 2 or a.get("axis", -1) % len(x.shape) != len(x.shape) - 1:
            raise UnsupportedOp(f"{node.name}: LpNormalization other than L2 over the last axis")
        self.values[node.output[0]] = _Value(self.tf.math.l2_normalize(x, axis=-1))


HANDLERS: dict[str, str] = {
    "Slice": "slice",
    "Squeeze": "squeeze",
    "Unsqueeze": "squeeze",
    "LayerNormalization": "layer_norm",
    "ReduceMean": "reduce_mean",
    "LpNormalization": "l2_normalize",
    "QuantizeLinear": "quantize_linear",
    "DequantizeLinear": "dequantize_linear",
    "Conv": "conv",
    "MaxPool": "pool",
    "AveragePool": "pool",
    "GlobalAveragePool": "pool",
    "GlobalMaxPool": "pool",
    "Gemm": "gemm",
    "MatMul": "gemm",
    "Add": "elementwise",
    "Sub": "elementwise",
    "Mul": "elementwise",
    "Div": "elementwise",
    "Relu": "unary",
    "Clip": "unary",
    "LeakyRelu": "unary",
    "Sigmoid": "unary",
    "Tanh": "unary",
    "HardSigmoid": "unary",
    "HardSwish": "unary",
    "Identity": "unary",
    "Softmax": "softmax",
    "Flatten": "reshape",
    "Reshape": "reshape",
    "Transpose": "transpose",
    "Concat": "concat",
    "Resize": "resize",
    "Gather": "gather",
    "SpaceToDepth": "space_to_depth",
}


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model`` this converter cannot map (checked before TensorFlow is imported)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type not in HANDLERS or n.domain not in ("", "ai.onnx")})


def convert(model: onnx.ModelProto, integer_io: bool, quantize: bool = True) -> TfliteModel:
    """``model`` (static shapes, QDQ) as full-integer TFLite bytes; int8 I/O with ``integer_io``, else float I/O.
    ``quantize=False`` converts without TFLite's optimizations (a float graph stays float: checks the op mapping)."""
    missing = unsupported_ops(model)
    if missing:
        raise UnsupportedOp(f"no TFLite mapping for {', '.join(missing)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with captured_stderr():
        import tensorflow as tf

        return _convert(tf, model, integer_io, quantize)


def _convert(tf: Any, model: onnx.ModelProto, integer_io: bool, quantize: bool) -> TfliteModel:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    specs, in_names = [], {}
    for i in inputs:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if any(d <= 0 for d in dims):
            raise UnsupportedOp(f"input {i.name}: needs a static shape, got {dims}")
        in_names[i.name] = signature_name(i.name)
        specs.append(tf.TensorSpec(dims, tf.float32, name=in_names[i.name]))
    out_names = {o.name: signature_name(o.name) for o in model.graph.output}

    def body(*args: Any) -> dict[str, Any]:
        builder = _Builder(tf, model)
        for i, arg in zip(inputs, args):
            builder.values[i.name] = _Value(arg)
        for node in model.graph.node:
            try:
                getattr(builder, HANDLERS[node.op_type])(builder.requantized(node))
            except UnsupportedOp as exc:  # name the node, once, so the user can find it in the compiled model
                where = f"{node.name} ({node.op_type})"
                raise (exc if str(exc).startswith(node.name or where) else UnsupportedOp(f"{where}: {exc}")) from None
        return {out_names[o.name]: builder.nchw(builder.get(o.name)) for o in model.graph.output}

    function = tf.function(body, input_signature=specs, autograph=False)
    concrete = function.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if integer_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        data = converter.convert()
    except Exception as exc:  # ConverterError and friends: the message's last line names the op
        lines = [line.strip() for line in str(exc).splitlines() if "error:" in line]
        raise ConverterFailed(
            (lines[-1].split("error:", 1)[1].strip() if lines else str(exc).splitlines()[0])[:300]
        ) from None
    return TfliteModel(bytes(data), in_names, out_names)
