"""layout_transform: channels-last model I/O and channel padding to the hardware's alignment.

Exactness, as measured: both transforms compute exactly the same real numbers (they move data or
add products with exact zero weights). Channels-last I/O and output-channel padding are bit-exact
under ONNX Runtime. Padding a consumer's *input* channels changes the GEMM's K dimension, and ORT's
CPU kernels (MLAS) pick their K blocking / GEMV reduction order from K, so some outputs differ in
the last bit (PP-OCRv4 det, fpga: max abs 1.8e-7 on a sigmoid output). The pass therefore declares
``tolerance(rtol=1e-5, atol=1e-6)`` — ten times tighter than fuse — and the proof tests check the
channels-last and output-padding cases bit-exact on their own.

Libraries checked first: onnxsim/onnxoptimizer only cancel Transposes that are already adjacent
(``fuse_consecutive_transposes``, ``eliminate_nop_transpose``) and do not change I/O layout;
ONNX Runtime's layout transformer (``ORT_ENABLE_ALL``, NCHWc / the NHWC transformer) rewrites the
graph inside a session for its own kernels and cannot emit a portable NHWC-I/O model; neither pads
channels. Both transforms are therefore written here, on the GraphProto, and both only move or
copy data or add exact zeros (see "Exactness" above for how ORT rounds them):

* **Channels-last I/O** (``io_layout = "NHWC"``): each 4-D float graph input is taken as NHWC and
  transposed to NCHW inside the model; each 4-D graph output is transposed back to NHWC. The model
  metadata ``lepton.io_layout.<name> = "NHWC"`` is the I/O contract ``lepton_cli.model.io_contract`` reads.
  The added Transposes are then pushed through layout-insensitive elementwise ops (constants
  permuted) and adjacent pairs composed or cancelled; the summary says how many remain.
* **Channel padding** (``pad_channels``): a group-1 Conv/ConvTranspose whose output-channel count
  is not a multiple of the alignment gets zero output filters (and zero bias). Padded tensors are
  tracked with a map from original channel to padded position, which flows through per-channel
  ops (activations, pooling, BatchNorm with β=0/mean 0/var 1, depthwise Conv, per-channel
  constants, residual Adds whose operands carry the same map, channel Concats whose groups are
  concatenated with their padding). A consumer Conv gets zero input-channel weights at the padded
  positions. Anything else (Flatten, Reshape, graph outputs, ...) first gets the original channels
  back with a Slice (or a Gather after a padded Concat), so graph outputs keep their shapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import drop_unused_initializers, subgraph_names
from lepton_cli.model.initializers import constants_to_initializers, list_initializers_as_inputs
from lepton_cli.model.io_contract import mark_nhwc
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import PassResult, register_pass, tolerance

TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


@dataclass(frozen=True)
class LayoutParams:
    io_layout: Literal["keep", "NHWC"] = "keep"  # NHWC: the compiled model takes and returns channel-last images
    pad_channels: bool = False  # pad conv channel counts to a multiple of ``alignment``
    alignment: int | None = None  # None: the target's hardware.channel_alignment

    def __post_init__(self) -> None:
        if self.alignment is not None and self.alignment < 1:
            raise ParamValueError("alignment", f"must be >= 1, got {self.alignment}")


# ---- small graph helpers ------------------------------------------------------------------------


class _Names:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.used = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
        self.used |= {o for n in g.node for o in n.output} | {i for n in g.node for i in n.input}
        self.used |= {n.name for n in g.node}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_float(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.tensor_type.elem_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )


def _rank(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type.tensor_type
    return len(tt.shape.dim) if vi.type.HasField("tensor_type") and tt.HasField("shape") else None


def _permute_dims(vi: onnx.ValueInfoProto, perm: tuple[int, ...]) -> None:
    dims = [onnx.TensorShapeProto.Dimension() for _ in perm]
    old = list(vi.type.tensor_type.shape.dim)
    for i, p in enumerate(perm):
        dims[i].CopyFrom(old[p])
    del vi.type.tensor_type.shape.dim[:]
    vi.type.tensor_type.shape.dim.extend(dims)


# ---- channels-last I/O ----------------------------------------------------------------------------

ELEMENTWISE_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Clip",
        "Abs",
        "Neg",
        "Exp",
        "Log",
        "Sqrt",
        "Erf",
        "Elu",
        "Selu",
        "Softplus",
        "Softsign",
        "Cast",
        "Identity",
        "Floor",
        "Ceil",
        "Round",
        "Reciprocal",
        "Sign",
        "Not",
        "Gelu",
        "Mish",
        "ThresholdedRelu",
        "Celu",
        "Sin",
        "Cos",
    }
)
ELEMENTWISE_BINARY = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "PRelu",
        "Equal",
        "Less",
        "Greater",
        "And",
        "Or",
        "Xor",
        "Mod",
        "LessOrEqual",
        "GreaterOrEqual",
    }
)


class _Transposer:
    """Push layout Transposes through elementwise ops and compose/cancel adjacent ones."""

    def __init__(self, model: onnx.ModelProto, names: _Names, down: set[str], up: set[str]):
        # Input-side Transposes (names in ``down``) only move down, output-side ones (``up``) only
        # up: moving the same Transpose both ways would undo itself forever.
        self.down, self.up = down, up
        self.model = model
        self.g = model.graph
        self.names = names
        self.protected = {o.name for o in self.g.output} | subgraph_names(self.g)

    def _index(self):
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in self.g.initializer}

    def _const(self, name: str) -> np.ndarray | None:
        return tensor_array(self.inits[name]) if name in self.inits else None

    def _permuted_const(self, name: str, perm: tuple[int, ...], inverse: bool) -> str | None:
        """A copy of constant ``name`` laid out for the other side of the Transpose ``perm``."""
        value = self._const(name)
        if value is None or value.ndim > len(perm):
            return None
        if value.ndim == 0 or value.size == 1:
            return name  # scalars broadcast the same way in every layout
        full = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
        order = tuple(np.argsort(perm)) if inverse else perm
        new = self.names.fresh(f"{name}__{'nchw' if inverse else 'nhwc'}")
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(full.transpose(order)), new))
        self.inits[new] = self.g.initializer[-1]
        return new

    def _movable(self, node: onnx.NodeProto, through: str, rank: int) -> bool:
        if len(node.output) != 1 or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in ELEMENTWISE_UNARY:
            # Clip's min/max are scalars; every other unary op has one input.
            return node.input[0] == through and all(i in self.inits or not i for i in node.input[1:])
        if node.op_type in ELEMENTWISE_BINARY:
            others = [i for i in node.input if i != through]
            return len(others) == 1 and others[0] in self.inits and self._const(others[0]).ndim <= rank
        return False

    def _push_down(self) -> bool:
        for t in list(self.g.node):
            if t.op_type != "Transpose" or t.name not in self.down or t.output[0] in self.protected:
                continue
            users = self.consumers.get(t.output[0], [])
            perm = tuple(_attr(t, "perm", ()))
            if len(users) != 1 or not perm or not self._movable(users[0], t.output[0], len(perm)):
                continue
            u = users[0]
            for k, name in enumerate(u.input):
                if name == t.output[0]:
                    u.input[k] = t.input[0]
                elif u.op_type in ELEMENTWISE_BINARY and name:
                    moved = self._permuted_const(name, perm, inverse=True)
                    if moved is None:
                        return False
                    u.input[k] = moved
            between = self.names.fresh(f"{u.output[0]}__pre_transpose")
            out = u.output[0]
            u.output[0] = between
            t.input[0], t.output[0] = between, out
            nodes = list(self.g.node)
            nodes.remove(t)
            nodes.insert(nodes.index(u) + 1, t)
            del self.g.node[:]
            self.g.node.extend(nodes)
            return True
        return False

    def _pull_up(self) -> bool:
        """Move a Transpose above the elementwise op that feeds it (output side)."""
        for t in list(self.g.node):
            if t.op_type != "Transpose" or t.name not in self.up:
                continue
            perm = tuple(_attr(t, "perm", ()))
            u = self.producer.get(t.input[0])
            if u is None or not perm or t.input[0] in self.protected or len(self.consumers.get(t.input[0], [])) != 1:
                continue
            live = [i for i in u.input if i and i not in self.inits]
            if len(live) != 1 or not self._movable(u, live[0], len(perm)):
                continue
            for k, name in enumerate(u.input):
                if name and name != live[0] and u.op_type in ELEMENTWISE_BINARY:
                    moved = self._permuted_const(name, perm, inverse=False)
                    if moved is None:
                        return False
                    u.input[k] = moved
            source = live[0]
            pre = self.names.fresh(f"{source}__transposed")
            t.input[0], t.output[0], u_out = source, pre, t.output[0]
            u.input[list(u.input).index(source)] = pre
            u.output[0] = u_out
            nodes = list(self.g.node)
            nodes.remove(t)
            nodes.insert(nodes.index(u), t)
            del self.g.node[:]
            self.g.node.extend(nodes)
            return True
        return False

    def _compose(self) -> bool:
        for t2 in list(self.g.node):
            if t2.op_type != "Transpose":
                continue
            t1 = self.producer.get(t2.input[0])
            if t1 is None or t1.op_type != "Transpose":
                continue
            p1, p2 = tuple(_attr(t1, "perm", ())), tuple(_attr(t2, "perm", ()))
            if not p1 or len(p1) != len(p2):
                continue
            composed = tuple(p1[i] for i in p2)
            source = t1.input[0]
            if composed == tuple(range(len(composed))):
                producer = self.producer.get(source)
                only_path = (
                    len(self.consumers.get(source, [])) == 1
                    and len(self.consumers.get(t1.output[0], [])) == 1
                    and source not in self.protected
                    and t1.output[0] not in self.protected
                )
                if t2.output[0] in self.protected and producer is not None and only_path:
                    # x → P → T1 → T2 → graph output: P writes the graph output itself
                    producer.output[list(producer.output).index(source)] = t2.output[0]
                    self.g.node.remove(t2)
                    self.g.node.remove(t1)
                    return True
                if t2.output[0] in self.protected:
                    t2.op_type = "Identity"
                    del t2.attribute[:]
                    t2.input[0] = source
                else:
                    for user in self.consumers.get(t2.output[0], []):
                        for k, name in enumerate(user.input):
                            if name == t2.output[0]:
                                user.input[k] = source
                    self.g.node.remove(t2)
            else:
                t2.input[0] = source
                del t2.attribute[:]
                t2.attribute.append(helper.make_attribute("perm", list(composed)))
            if not self.consumers.get(t1.output[0], [None])[1:] and t1.output[0] not in self.protected:
                self.g.node.remove(t1)
            return True
        return False

    def run(self) -> None:
        for _ in range(10 * len(self.g.node) + 10):  # each step removes or moves one Transpose
            self._index()
            if not (self._compose() or self._push_down() or self._pull_up()):
                break
        drop_unused_initializers(self.model)


def channels_last_io(model: onnx.ModelProto) -> dict:
    """Make every 4-D float graph input/output NHWC; returns counts for the summary."""
    g = model.graph
    names = _Names(model)
    inits = {t.name for t in g.initializer}
    in_subgraphs = subgraph_names(g)
    transposes_before = sum(n.op_type == "Transpose" for n in g.node)
    changed_in, changed_out, head, tail = [], [], [], []
    outputs = {o.name for o in g.output}
    for vi in g.input:
        if vi.name in inits or vi.name in in_subgraphs or vi.name in outputs or _rank(vi) != 4 or not _is_float(vi):
            continue
        inner = names.fresh(f"{vi.name}__nchw")
        for node in g.node:
            for k, name in enumerate(node.input):
                if name == vi.name:
                    node.input[k] = inner
        head.append(
            helper.make_node(
                "Transpose", [vi.name], [inner], perm=list(TO_NCHW), name=names.fresh(f"{vi.name}__to_nchw")
            )
        )
        _permute_dims(vi, TO_NHWC)
        changed_in.append(vi.name)
    producers = {o for n in g.node for o in n.output}
    for vi in g.output:
        if vi.name not in producers or vi.name in in_subgraphs or _rank(vi) != 4 or not _is_float(vi):
            continue
        inner = names.fresh(f"{vi.name}__nchw")
        for node in list(g.node):
            for k, name in enumerate(node.output):
                if name == vi.name:
                    node.output[k] = inner
            for k, name in enumerate(node.input):
                if name == vi.name:
                    node.input[k] = inner
        tail.append(
            helper.make_node(
                "Transpose", [inner], [vi.name], perm=list(TO_NHWC), name=names.fresh(f"{vi.name}__to_nhwc")
            )
        )
        _permute_dims(vi, TO_NHWC)
        changed_out.append(vi.name)
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    for value in list(g.value_info):  # a renamed output's stale entry would now describe the NHWC tensor
        if value.name in changed_out:
            g.value_info.remove(value)
    added = len(head) + len(tail)
    _Transposer(model, names, {n.name for n in head}, {n.name for n in tail}).run()
    for name in changed_in + changed_out:
        mark_nhwc(model, name)
    after = sum(n.op_type == "Transpose" for n in g.node)
    return {
        "nhwc_inputs": changed_in,
        "nhwc_outputs": changed_out,
        "transposes_added": added,
        "transposes_remaining": after - transposes_before,
        "transposes_cancelled": added - (after - transposes_before),
    }


# ---- channel padding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChanMap:
    """A padded tensor: ``size`` channels on axis 1, original channel i lives at ``pos[i]``."""

    size: int
    pos: tuple[int, ...]
    rank: int

    @property
    def contiguous(self) -> bool:
        return self.pos == tuple(range(len(self.pos)))


PER_CHANNEL_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Clip",
        "Identity",
        "Neg",
        "Abs",
        "Elu",
        "Selu",
        "Softsign",
        "Erf",
        "Gelu",
        "Celu",
        "Dropout",
    }
)
PER_CHANNEL_POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
# Binary ops whose padded lanes stay finite (padded lanes hold constants derived from zeros), with
# the fill used for a per-channel constant operand. Div only with a constant divisor (fill 1).
BINARY_FILL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Max": 0.0, "Min": 0.0, "Div": 1.0, "PRelu": 0.0}


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


class _Padder:
    def __init__(self, model: onnx.ModelProto, align: int):
        self.model, self.g, self.align = model, model.graph, align
        self.names = _Names(model)
        self.inits = {t.name: t for t in self.g.initializer}
        self.maps: dict[str, _ChanMap] = {}
        self.restored: dict[str, str] = {}
        self.out: list[onnx.NodeProto] = []
        self.outputs = {o.name for o in self.g.output}
        self.protected = self.outputs | subgraph_names(self.g)
        self.opset = _opset(model)
        self.stats = Counter()
        self.channels = self._static_channels()

    def _static_channels(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:  # shape inference is best effort; Concats without known shapes become barriers
            return {}
        found = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[1].HasField("dim_value"):
                found[vi.name] = dims[1].dim_value
        return found

    def const(self, name: str) -> np.ndarray | None:
        return tensor_array(self.inits[name]) if name in self.inits else None

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = self.names.fresh(f"{base}__padded")
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def restore(self, name: str, out: str | None = None) -> str:
        """The original channels of padded tensor ``name`` (a Slice, or a Gather after a padded Concat)."""
        if name in self.restored:
            return self.restored[name]
        cmap = self.maps[name]
        out = out or self.names.fresh(f"{name}__unpadded")
        if cmap.contiguous:
            if self.opset >= 10:
                ends = self.add_const(f"{name}_ends", np.array([len(cmap.pos)], np.int64))
                starts = self.add_const(f"{name}_starts", np.array([0], np.int64))
                axes = self.add_const(f"{name}_axes", np.array([1], np.int64))
                node = helper.make_node(
                    "Slice", [name, starts, ends, axes], [out], name=self.names.fresh(f"{name}__slice")
                )
            else:
                node = helper.make_node(
                    "Slice",
                    [name],
                    [out],
                    starts=[0],
                    ends=[len(cmap.pos)],
                    axes=[1],
                    name=self.names.fresh(f"{name}__slice"),
                )
        else:
            idx = self.add_const(f"{name}_channels", np.array(cmap.pos, np.int64))
            node = helper.make_node("Gather", [name, idx], [out], axis=1, name=self.names.fresh(f"{name}__gather"))
        self.out.append(node)
        self.restored[name] = out
        self.stats["restores"] += 1
        return out

    def barrier(self, node: onnx.NodeProto) -> None:
        for k, name in enumerate(node.input):
            if name in self.maps:
                node.input[k] = self.restore(name)
        self.out.append(node)

    def emit(self, node: onnx.NodeProto, cmap: _ChanMap | None) -> None:
        """Append ``node``; its first output carries ``cmap`` (graph outputs get restored right away)."""
        self.out.append(node)
        if cmap is None:
            return
        name = node.output[0]
        if name in self.protected:  # a graph output (or read by a subgraph) keeps its shape
            padded = self.names.fresh(f"{name}__padded")
            node.output[0] = padded
            self.maps[padded] = cmap
            self.restore(padded, out=name)
        else:
            self.maps[name] = cmap

    # -- per-op handlers --
    def conv(self, node: onnx.NodeProto) -> None:
        transpose = node.op_type == "ConvTranspose"
        weight = self.const(node.input[1]) if len(node.input) > 1 else None
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = self.const(bias_name) if bias_name else None
        if weight is None or (bias_name and bias is None) or len(node.output) != 1:
            return self.barrier(node)
        group = int(_attr(node, "group", 1))
        cin_axis, cout_axis = (0, 1) if transpose else (1, 0)
        m_in = self.maps.get(node.input[0])
        cout = weight.shape[cout_axis] * (group if transpose else 1)
        if group != 1:
            depthwise = not transpose and weight.shape[1] == 1 and weight.shape[0] == group
            if m_in is None or not depthwise or len(m_in.pos) != group:
                return self.barrier(node)
            w = np.zeros((m_in.size,) + weight.shape[1:], weight.dtype)
            w[list(m_in.pos)] = weight
            node.input[1] = self.add_const(node.input[1], w)
            if bias is not None:
                b = np.zeros(m_in.size, bias.dtype)
                b[list(m_in.pos)] = bias
                node.input[2] = self.add_const(bias_name, b)
            for a in node.attribute:
                if a.name == "group":
                    a.i = m_in.size
            self.stats["depthwise_padded"] += 1
            return self.emit(node, m_in)
        w = weight
        if m_in is not None and w.shape[cin_axis] != len(m_in.pos):
            return self.barrier(node)
        if m_in is not None:
            shape = list(w.shape)
            shape[cin_axis] = m_in.size
            scattered = np.zeros(shape, w.dtype)
            index = [slice(None)] * w.ndim
            index[cin_axis] = list(m_in.pos)
            scattered[tuple(index)] = w
            w = scattered
            self.stats["input_channels_padded"] += 1
        # A conv that writes a graph output keeps its channel count: padding would be sliced off at once.
        target = cout if node.output[0] in self.protected else _aligned(cout, self.align)
        cmap = None
        if target > cout:
            pad = [(0, 0)] * w.ndim
            pad[cout_axis] = (0, target - cout)
            w = np.pad(w, pad)
            if bias is not None:
                node.input[2] = self.add_const(bias_name, np.pad(bias, (0, target - cout)))
            cmap = _ChanMap(target, tuple(range(cout)), w.ndim)
            self.stats["convs_padded"] += 1
            self.stats["channels_added"] += target - cout
        if w is not weight:
            node.input[1] = self.add_const(node.input[1], w)
        self.emit(node, cmap)

    def batchnorm(self, node: onnx.NodeProto) -> None:
        m_in = self.maps.get(node.input[0])
        params = [self.const(n) for n in node.input[1:5]]
        if len(node.output) != 1 or any(p is None or p.ndim != 1 for p in params):
            return self.barrier(node)
        for k, (value, fill) in enumerate(zip(params, (1.0, 0.0, 0.0, 1.0)), start=1):  # scale, B=β, mean, var
            padded = np.full(m_in.size, fill, value.dtype)
            padded[list(m_in.pos)] = value
            node.input[k] = self.add_const(node.input[k], padded)
        self.emit(node, m_in)

    def binary(self, node: onnx.NodeProto) -> None:
        maps = {self.maps[i] for i in node.input if i in self.maps}
        if len(maps) != 1 or len(node.input) != 2 or len(node.output) != 1:
            return self.barrier(node)
        (cmap,) = maps
        if node.op_type in ("Div", "PRelu") and node.input[1] in self.maps:
            return self.barrier(node)  # padded lanes of a divisor may be 0; a slope must be a constant
        new_inputs = list(node.input)
        for k, name in enumerate(node.input):
            if name in self.maps:
                continue
            value = self.const(name)
            if value is None or value.ndim > cmap.rank:
                return self.barrier(node)
            full = value.reshape((1,) * (cmap.rank - value.ndim) + value.shape)
            if any(d != 1 for axis, d in enumerate(full.shape) if axis != 1):
                return self.barrier(node)  # only per-channel or scalar operands keep the padding meaningful
            if full.shape[1] == 1:
                continue
            if full.shape[1] != len(cmap.pos):
                return self.barrier(node)
            shape = list(full.shape)
            shape[1] = cmap.size
            padded = np.full(shape, BINARY_FILL[node.op_type], value.dtype)
            padded[:, list(cmap.pos)] = full
            new_inputs[k] = self.add_const(
                name, padded.reshape(shape[cmap.rank - value.ndim :]) if value.ndim < cmap.rank else padded
            )
        node.input[:] = new_inputs
        self.emit(node, cmap)

    def concat(self, node: onnx.NodeProto) -> None:
        first = next(self.maps[i] for i in node.input if i in self.maps)
        axis = int(_attr(node, "axis", 1))
        if axis < 0:
            axis += first.rank
        sizes = []
        for name in node.input:
            if name in self.maps:
                sizes.append(self.maps[name])
            elif name in self.channels:
                n = self.channels[name]
                sizes.append(_ChanMap(n, tuple(range(n)), first.rank))
            else:
                return self.barrier(node)
        if axis != 1 or len(node.output) != 1:
            return self.barrier(node)
        pos, offset = [], 0
        for cmap in sizes:
            pos.extend(offset + p for p in cmap.pos)
            offset += cmap.size
        self.stats["concats_padded"] += 1
        self.emit(node, _ChanMap(offset, tuple(pos), first.rank))

    def resize(self, node: onnx.NodeProto) -> None:
        m_in = self.maps[node.input[0]]
        scales = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        sizes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if sizes is not None and sizes.size == m_in.rank:
            resized = sizes.copy()
            resized[1] = m_in.size
            node.input[3] = self.add_const(node.input[3], resized)
        elif not (
            scales is not None
            and scales.size == m_in.rank
            and scales[1] == 1
            and (len(node.input) < 4 or not node.input[3])
        ):
            return self.barrier(node)
        self.emit(node, m_in)

    def run(self) -> None:
        for node in list(self.g.node):
            padded_in = [i for i in node.input if i in self.maps]
            op = node.op_type if node.domain in ("", "ai.onnx") else None
            if op in ("Conv", "ConvTranspose"):
                self.conv(node)
            elif not padded_in:
                self.out.append(node)
            elif (
                op in PER_CHANNEL_UNARY
                and node.input[0] in self.maps
                and len(node.output) == 1
                and all(i in self.inits or not i for i in node.input[1:])
            ):
                self.emit(node, self.maps[node.input[0]])
            elif op in PER_CHANNEL_POOL and len(node.output) == 1:
                self.emit(node, self.maps[node.input[0]])
            elif op == "BatchNormalization" and node.input[0] in self.maps and len(padded_in) == 1:
                self.batchnorm(node)
            elif op in BINARY_FILL:
                self.binary(node)
            elif op == "Concat":
                self.concat(node)
            elif op == "Resize" and node.input[0] in self.maps and len(padded_in) == 1:
                self.resize(node)
            else:
                self.barrier(node)
        del self.g.node[:]
        self.g.node.extend(self.out)
        stale = set(self.maps)
        kept = [v for v in self.g.value_info if v.name not in stale]
        del self.g.value_info[:]
        self.g.value_info.extend(kept)
        drop_unused_initializers(self.model)


def _conv_alignment(model: onnx.ModelProto, align: int) -> dict:
    inits = {t.name: t for t in model.graph.initializer}
    total = aligned = 0
    for node in model.graph.node:
        if (
            node.op_type == "Conv"
            and len(node.input) > 1
            and node.input[1] in inits
            and int(_attr(node, "group", 1)) == 1
        ):
            total += 1
            aligned += inits[node.input[1]].dims[0] % align == 0
    return {"convs": total, "convs_out_aligned": aligned}


def pad_channels(model: onnx.ModelProto, align: int) -> dict:
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute
    ):
        return {"skipped": "model has control-flow subgraphs"}
    before = _conv_alignment(model, align)
    padder = _Padder(model, align)
    padder.run()
    after = _conv_alignment(model, align)
    return {
        "alignment": align,
        **dict(sorted(padder.stats.items())),
        "convs_out_aligned_before": before["convs_out_aligned"],
        "convs_out_aligned_after": after["convs_out_aligned"],
        "convs": after["convs"],
    }


@register_pass(
    "layout_transform",
    params=LayoutParams,
    description="Channels-last (NHWC) model I/O with Transposes pushed and cancelled; channel padding to the "
    "hardware alignment with zero weights (exact math; K-padding reorders ORT's float sums).",
    exactness=tolerance(rtol=1e-5, atol=1e-6),
    order=30,
)
def layout_transform(model: onnx.ModelProto, ctx, params: LayoutParams) -> PassResult:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    summary: dict = {}
    constants_to_initializers(result)  # weights as initializers: padding rewrites them
    align = params.alignment or ctx.target.hardware.channel_alignment
    if params.pad_channels and align > 1:
        summary["padding"] = pad_channels(result, align)
    if params.io_layout == "NHWC":
        summary["io"] = channels_last_io(result)
    list_initializers_as_inputs(result)
    return PassResult(result, summary)
