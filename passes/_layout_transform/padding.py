"""Channel padding: a group-1 Conv/ConvTranspose whose output-channel count is not a multiple of the
alignment gets zero output filters (and zero bias).

Padded tensors carry a map from original channel to padded position, which flows through per-channel ops
(activations, pooling, BatchNorm with β=0/mean 0/var 1, depthwise Conv, per-channel constants, residual Adds
whose operands carry the same map, channel Concats whose groups are concatenated with their padding). A
consumer Conv gets zero input-channel weights at the padded positions. Anything else (Flatten, Reshape, graph
outputs, ...) first gets the original channels back with a Slice (or a Gather after a padded Concat), so graph
outputs keep their shapes. A Conv whose output reaches no other Conv through such ops (a detector head's box and
score Convs before their Concat) keeps its channel count: its padding could only be cut off again, and the Gather
that cuts it after a Concat is an op the Edge TPU and the DPU do not run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import (
    FreshNames,
    GraphIndex,
    drop_unused_initializers,
    drop_value_info,
    subgraph_names,
)
from lepton_cli.model.op_traits import DEFAULT_DOMAINS, attr, opset


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
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Clip Identity Neg Abs Elu Selu Softsign Erf Gelu Celu "
    "Dropout".split()
)
PER_CHANNEL_POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
# Binary ops whose padded lanes stay finite (padded lanes hold constants derived from zeros), with
# the fill used for a per-channel constant operand. Div only with a constant divisor (fill 1).
BINARY_FILL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Max": 0.0, "Min": 0.0, "Div": 1.0, "PRelu": 0.0}


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


def _scatter(value: np.ndarray, axis: int, cmap: _ChanMap) -> np.ndarray:
    """``value`` with its ``axis`` spread to ``cmap``'s padded size: original channel i at ``cmap.pos[i]``, zeros
    elsewhere."""
    shape = list(value.shape)
    shape[axis] = cmap.size
    scattered = np.zeros(shape, value.dtype)
    index = [slice(None)] * value.ndim
    index[axis] = list(cmap.pos)
    scattered[tuple(index)] = value
    return scattered


class _Padder:
    """One walk over the nodes in order, writing a new node list: each node is padded, passes a padded
    tensor's channel map on, or (a barrier) gets the original channels back first."""

    def __init__(self, model: onnx.ModelProto, align: int):
        self.model, self.g, self.align = model, model.graph, align
        self.names = FreshNames(model)
        self.ix = GraphIndex(self.g)  # constants only: the padder writes a new node list
        self.maps: dict[str, _ChanMap] = {}
        self.restored: dict[str, str] = {}
        self.out: list[onnx.NodeProto] = []
        self.outputs = {o.name for o in self.g.output}
        self.protected = self.outputs | subgraph_names(self.g)
        self.opset = opset(model)
        self.stats = Counter()
        self.channels = self._static_channels()
        self.conv_fed = self._conv_fed()

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
        return self.ix.const(name)

    def _conv_fed(self) -> set[str]:
        """The tensors that reach a Conv's data input through ops that carry a channel map: one pass over the
        nodes in reverse order (a node's readers come after it, so its outputs are decided when it is reached)."""
        fed: set[str] = set()
        carries = PER_CHANNEL_UNARY | PER_CHANNEL_POOL | set(BINARY_FILL) | {"Concat", "Resize", "BatchNormalization"}
        for node in reversed(self.g.node):
            if node.op_type in ("Conv", "ConvTranspose") and node.input:
                fed.add(node.input[0])
            elif node.op_type in carries and any(out in fed for out in node.output):
                fed.update(name for name in node.input if name)
        return fed

    def add_const(self, base: str, value: np.ndarray) -> str:
        return self.ix.add_initializer(self.names.fresh(f"{base}__padded"), np.ascontiguousarray(value))

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
        group = int(attr(node, "group", 1))
        cin_axis, cout_axis = (0, 1) if transpose else (1, 0)
        m_in = self.maps.get(node.input[0])
        cout = weight.shape[cout_axis] * (group if transpose else 1)
        if group != 1:
            depthwise = not transpose and weight.shape[1] == 1 and weight.shape[0] == group
            if m_in is None or not depthwise or len(m_in.pos) != group:
                return self.barrier(node)
            return self._depthwise(node, weight, bias, m_in)
        w = weight
        if m_in is not None and w.shape[cin_axis] != len(m_in.pos):
            return self.barrier(node)
        if m_in is not None:
            w = _scatter(w, cin_axis, m_in)
            self.stats["input_channels_padded"] += 1
        # A conv that writes a graph output, or whose output no later Conv reads, keeps its channel count: its
        # padding would only be cut off again.
        dead_end = node.output[0] in self.protected or node.output[0] not in self.conv_fed
        target = cout if dead_end else _aligned(cout, self.align)
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

    def _depthwise(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None, m_in: _ChanMap) -> None:
        """A depthwise Conv on a padded tensor gets one zero filter (and zero bias) per padded channel."""
        node.input[1] = self.add_const(node.input[1], _scatter(weight, 0, m_in))
        if bias is not None:
            node.input[2] = self.add_const(node.input[2], _scatter(bias, 0, m_in))
        for a in node.attribute:
            if a.name == "group":
                a.i = m_in.size
        self.stats["depthwise_padded"] += 1
        self.emit(node, m_in)

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
        axis = int(attr(node, "axis", 1))
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
            op = node.op_type if node.domain in DEFAULT_DOMAINS else None
            if op in ("Conv", "ConvTranspose"):
                self.conv(node)
            elif not padded_in:
                self.out.append(node)
            elif (
                op in PER_CHANNEL_UNARY
                and node.input[0] in self.maps
                and len(node.output) == 1
                and all(i in self.ix.inits or not i for i in node.input[1:])
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
        drop_value_info(self.g, set(self.maps))
        drop_unused_initializers(self.model)


def _conv_alignment(model: onnx.ModelProto, align: int) -> dict:
    inits = {t.name: t for t in model.graph.initializer}
    total = aligned = 0
    for node in model.graph.node:
        if (
            node.op_type == "Conv"
            and len(node.input) > 1
            and node.input[1] in inits
            and int(attr(node, "group", 1)) == 1
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
