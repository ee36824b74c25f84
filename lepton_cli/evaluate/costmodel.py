"""Per-target cost model: roofline latency, peak activation memory (liveness bound + greedy arena), budgets.

Latency: for each node, MACs (``stats.node_macs``) and bytes moved (inputs, weights and outputs at
their own dtype's size) give a roofline time max(compute, memory) on the target's ``[hardware]``
facts: compute at the peak of the node's arithmetic (int8 for quantized kernels and the QDQ node
units ONNX Runtime's CPU EP fuses into integer kernels, ``qdq_units``; fp16 for half tensors; else
fp32), memory at the peak bandwidth, each derated by how much of the peak real kernels reach
(``Efficiency``), plus a fixed per-kernel dispatch cost. On an accelerator that runs quantized element-wise ops
itself (``int8_elementwise``: the DPU), those units move int8 bytes at the int8 rate; ops left float run on its host
between a dequantize and a quantize, each priced as a node. Nodes whose inputs are all constant cost
nothing: the runtime folds them when the session is created, except DequantizeLinear, which ORT
keeps for its QDQ fusions (a weight DQ no kernel absorbs runs on every inference). The sum is the
estimate.

Memory: activation tensors live from the node that makes them to their last reader (graph inputs
from the start, graph outputs to the end), in the graph's topological order. The most bytes live
at once is a lower bound for any plan; the arena a real planner needs comes from the greedy-by-size
strategy of TensorFlow Lite Micro's ``GreedyMemoryPlanner`` (largest buffer first, each at the
lowest offset that does not overlap a placed buffer whose lifetime overlaps; 16-byte aligned).
The MAC counts reuse ``lepton_cli.model.stats``; why this is written here: docs/decisions.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from lepton_cli.model.contrib_shapes import DYNAMIC_LSTM, restore, with_stand_ins
from lepton_cli.model.external_data import shapes_only_copy
from lepton_cli.model.shapes import bind_input_shapes, elem_types
from lepton_cli.model.stats import RECURRENT_OPS, node_macs, shape_map


class HardwareFacts(Protocol):
    """The hardware facts an estimate reads (a target's ``[hardware]``, ``pipeline.targets.Hardware``)."""

    @property
    def peak_int8_tops(self) -> float: ...
    @property
    def peak_fp16_tflops(self) -> float: ...
    @property
    def peak_fp32_tflops(self) -> float: ...
    @property
    def memory_bandwidth_gbps(self) -> float: ...
    @property
    def memory_mb(self) -> float: ...
    @property
    def on_chip_memory_kb(self) -> float: ...
    @property
    def isa(self) -> list[str]: ...
    @property
    def cores(self) -> int: ...
    @property
    def int8_elementwise(self) -> bool: ...


class BudgetLimits(Protocol):
    """A target's ``[budgets]`` (``pipeline.targets.Budgets``)."""

    @property
    def max_model_size_mb(self) -> float | None: ...
    @property
    def max_activation_memory_mb(self) -> float | None: ...


class CostTarget(Protocol):
    """What the cost model reads of a target (``pipeline.targets.Target``)."""

    @property
    def name(self) -> str: ...
    @property
    def hardware(self) -> HardwareFacts: ...
    @property
    def budgets(self) -> BudgetLimits: ...


HardwareT = TypeVar("HardwareT", bound=HardwareFacts)

ARENA_ALIGNMENT = 16  # bytes, as TFLite Micro's planner aligns buffers

# Ops that only reinterpret a buffer (ORT reuses the input buffer): no bytes moved, dispatch only.
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Size"}
# Kernels that run at the int8 rate when their inputs are quantized.
INT8_KERNELS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", DYNAMIC_LSTM}
# QLinearAdd/Mul/Sigmoid/... dequantize, compute and requantize each element: on PP-OCRv4 rec/det every-op int8
# measured no faster than Conv/MatMul/Gemm-only int8 (benchmarks/results/cost_choice.md), so they cost float bytes.
REQUANTIZING_ELEMENTWISE = {
    "Add",
    "Mul",
    "Sigmoid",
    "HardSigmoid",
    "LeakyRelu",
    "Softmax",
    "AveragePool",
    "GlobalAveragePool",
}
MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"} | INT8_KERNELS | RECURRENT_OPS
# ONNX Runtime CPU EP's QDQ node units (qdq_selector_action_transformer.cc; why: docs/decisions.md): DQ inputs
# -> op -> Q outputs of one 8-bit type become one integer kernel. 16-bit Q/DQ is fused only where the op just
# moves data (the pair is dropped); a 16-bit Conv/MatMul/Add runs in float between its Q/DQ nodes.
QDQ_EVERY_INPUT = {"Conv", "MatMul", "Gemm", "Add", "Mul", "Concat"}
QDQ_FIRST_INPUT = {"AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid", "Softmax", "MaxPool", "Resize"}
QDQ_DROP_16BIT = {"Expand", "Flatten", "Gather", "GatherElements", "Reshape", "Slice", "Squeeze", "Tile"}
QDQ_DROP_16BIT |= {"Transpose", "Unsqueeze"}
QDQ_OPS = QDQ_EVERY_INPUT | QDQ_FIRST_INPUT | QDQ_DROP_16BIT
# Activations an int8 accelerator (``int8_elementwise``) runs between its Q/DQ where ORT has no integer kernel.
ACCELERATOR_FIRST_INPUT = {"HardSigmoid", "HardSwish"}
QDQ_FLOAT_OUTPUT = {"MatMul", "Gemm"}  # MatMulIntegerToFloat / QGemm: integer inputs, float output, no Q needed
FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"}  # conv_activation_fusion.cc
_BITS = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT16: 16, TensorProto.UINT16: 16}


@dataclass(frozen=True)
class Efficiency:
    """How much of the datasheet peak real kernels reach, and what one kernel launch costs.

    Fitted on ONNX Runtime's CPU EP (MLAS) by ``benchmarks/bench_costmodel.py``, which prints the
    fit's error table; what that table does and does not show: docs/decisions.md.
    """

    compute: float = 0.25  # share of the FMA peak dense Conv/Gemm kernels reach (a shared-VM Zen 3 at ~2.45 GHz)
    grouped_compute: float = 0.15  # depthwise / grouped conv: little reuse per loaded weight
    memory: float = 0.3  # share of the DRAM bandwidth streaming kernels reach
    cache_bandwidth: float = 4.0  # a node whose bytes fit in on-chip memory streams this much faster
    node_overhead_us: float = 2.0  # kernel dispatch + thread-pool fork/join per node
    # Ops whose kernels do much more than one op per output element (ORT has no vectorised LRN;
    # transcendental activations): ops per element, at the fp32 rate.
    element_ops: dict[str, float] = field(
        default_factory=lambda: {
            "LRN": 120.0,
            "Sigmoid": 8.0,
            "Tanh": 8.0,
            "Exp": 8.0,
            "Softmax": 10.0,
            "HardSigmoid": 2.0,
            "HardSwish": 3.0,
        }
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scale_to_cores(hw: HardwareT, cores: int) -> HardwareT:
    """The same part with ``cores`` cores (compute and bandwidth share per core): the host's slice of a profile."""
    f = cores / hw.cores
    return dataclasses.replace(  # type: ignore[type-var]  # every HardwareFacts is a dataclass
        hw,
        peak_int8_tops=hw.peak_int8_tops * f,
        peak_fp16_tflops=hw.peak_fp16_tflops * f,
        peak_fp32_tflops=hw.peak_fp32_tflops * f,
        memory_bandwidth_gbps=hw.memory_bandwidth_gbps * f,
        isa=list(hw.isa),
        cores=cores,
    )


def _itemsize(elem_type: int | None) -> int:
    if not elem_type:
        return 4
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError):
        return 4


def _constants(model: onnx.ModelProto) -> set[str]:
    """Names the runtime knows before any input arrives: initializers, Constant outputs, and outputs of
    nodes fed only by those (ORT folds them when the session is created)."""
    graph = model.graph
    # Initializers also listed as graph inputs (IR < 4 style, the light zoo) are weights all the same.
    known = {t.name for t in graph.initializer}
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (
            ins and all(i in known for i in ins) and not node.op_type.startswith("Random")
        ):
            known.update(o for o in node.output if o)
    return known


def int8_mac(node: onnx.NodeProto, producers: dict[str, str]) -> bool:
    """Whether a MAC op (``MAC_OPS``) computes in int8: an integer kernel, or a float op whose data and weight are
    both dequantized (``producers``: tensor -> the op type producing it)."""
    return node.op_type in INT8_KERNELS or all(producers.get(name) == "DequantizeLinear" for name in node.input[:2])


def _compute_dtype(node: onnx.NodeProto, types: dict[str, int], fused: bool) -> str:
    if node.op_type in INT8_KERNELS or (fused and node.op_type in MAC_OPS):
        return "int8"
    if types.get(node.input[0] if node.input else "", 0) in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return "fp16"
    return "fp32"


@dataclass
class QdqUnits:
    """How ONNX Runtime's CPU EP runs a QDQ graph: which ops become integer kernels, which Q/DQ it absorbs."""

    fused: set[int] = field(default_factory=set)  # node indices run as integer kernels (or Q/DQ pair dropped)
    absorbed: set[int] = field(default_factory=set)  # Q, DQ (and Relu/Clip) nodes folded into a fused kernel
    reads: dict[str, str] = field(default_factory=dict)  # a fused kernel's input/output -> the integer tensor it moves


def _qdq_bits(node: onnx.NodeProto, types: dict[str, int]) -> int | None:
    """Bits of a Q/DQ node's integer side (None: not an integer Q/DQ)."""
    if node.op_type == "DequantizeLinear":
        return _BITS.get(types.get(node.input[0], 0))
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    return _BITS.get(types.get(node.output[0], 0) or types.get(zero_point, TensorProto.UINT8))


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type in QDQ_EVERY_INPUT:
        return [i for i in node.input if i]
    return node.input[:1]


def _unit_outputs(
    node: onnx.NodeProto, consumers: dict[str, list[int]], graph_outputs: set[str], nodes: list[onnx.NodeProto]
) -> tuple[list[int], int | None] | None:
    """(the Q nodes reading the node's output, a Relu/Clip between them) or None where ORT forms no unit."""
    out = node.output[0]
    readers = consumers.get(out, [])
    clip = None
    if len(readers) == 1 and nodes[readers[0]].op_type in ("Relu", "Clip") and out not in graph_outputs:
        after = nodes[readers[0]].output[0]  # ORT drops a Relu/Clip whose range the output Q already clamps
        if after not in graph_outputs and _all_quantize(consumers.get(after, []), nodes):
            clip, out, readers = readers[0], after, consumers[after]
    single = len([o for o in node.output if o]) == 1 and out not in graph_outputs
    if single and _all_quantize(readers, nodes):
        return readers, clip
    if node.op_type in QDQ_FLOAT_OUTPUT and not any(nodes[r].op_type == "QuantizeLinear" for r in readers):
        return [], None
    return None


def _all_quantize(readers: list[int], nodes: list[onnx.NodeProto]) -> bool:
    return bool(readers) and all(nodes[r].op_type == "QuantizeLinear" for r in readers)


def qdq_units(model: onnx.ModelProto, types: dict[str, int], accelerator: bool = False) -> QdqUnits:
    """The node units ORT's QDQ transformer fuses: every data input from an 8-bit DequantizeLinear, every
    output read only by QuantizeLinear of the same type (16-bit: data-movement ops only); ``accelerator``: also the
    activations an int8 accelerator runs (``ACCELERATOR_FIRST_INPUT``)."""
    unit_ops = QDQ_OPS | ACCELERATOR_FIRST_INPUT if accelerator else QDQ_OPS
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
    graph_outputs = {o.name for o in model.graph.output}
    units = QdqUnits()
    for index, node in enumerate(nodes):
        inputs = _data_inputs(node)
        dqs = [producer.get(t) for t in inputs]
        if (
            node.op_type not in unit_ops
            or not inputs
            or any(d is None or nodes[d].op_type != "DequantizeLinear" for d in dqs)
        ):
            continue
        quantized = dqs[:2] if node.op_type in ("Conv", "Gemm") else dqs  # a Conv/Gemm bias is int32
        kinds = {_qdq_bits(nodes[d], types) for d in quantized if d is not None}
        outputs = _unit_outputs(node, consumers, graph_outputs, nodes)
        if outputs is None or len(kinds) != 1:
            continue
        bits = kinds.pop()
        if bits is None or any(_qdq_bits(nodes[q], types) != bits for q in outputs[0]):
            continue
        if bits != 8 and not (bits == 16 and node.op_type in QDQ_DROP_16BIT):
            continue  # ORT has no 16-bit integer kernel for it: DQ -> float op -> Q, each run separately
        units.fused.add(index)
        units.absorbed.update(outputs[0])
        if outputs[1] is not None:
            units.absorbed.add(outputs[1])
        units.reads.update({nodes[d].output[0]: nodes[d].input[0] for d in dqs if d is not None})
        if outputs[0]:
            units.reads[node.output[0]] = nodes[outputs[0][0]].output[0]
    for index, node in enumerate(nodes):  # a DQ every reader of which is fused runs inside those kernels
        if node.op_type == "DequantizeLinear" and all(r in units.fused for r in consumers.get(node.output[0], [None])):
            units.absorbed.add(index)
    _float_conv_fusions(nodes, consumers, graph_outputs, units)
    return units


def _float_conv_fusions(
    nodes: list[onnx.NodeProto], consumers: dict[str, list[int]], graph_outputs: set[str], units: QdqUnits
) -> None:
    """ORT's float Conv fusions (ConvBNFusion, ConvActivationFusion): a BatchNormalization, then an
    activation, that alone read a float Conv's output run inside the Conv kernel."""
    for index, node in enumerate(nodes):
        if node.op_type != "Conv" or index in units.fused:
            continue
        current = node
        for followers in ({"BatchNormalization"}, FUSED_ACTIVATIONS):
            readers = consumers.get(current.output[0], [])
            if len(readers) != 1 or current.output[0] in graph_outputs:
                break
            if nodes[readers[0]].op_type in followers:
                units.absorbed.add(readers[0])
                current = nodes[readers[0]]


def _grouped(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Conv", "QLinearConv", "ConvInteger") and any(
        a.name == "group" and a.i > 1 for a in node.attribute
    )


@dataclass
class NodeCost:
    name: str
    op: str
    macs: int
    bytes: int
    dtype: str
    compute_s: float
    memory_s: float
    seconds: float
    grouped: bool = False
    elements: int = 0  # output elements

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s > self.compute_s else "compute"


def _size(name: str, shapes: dict[str, list[int | None]], types: dict[str, int]) -> int | None:
    dims = shapes.get(name)
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) * _itemsize(types.get(name)) if dims else _itemsize(types.get(name))


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes and dtypes of every tensor (with data propagation, so computed Reshape targets resolve)."""
    fresh = shapes_only_copy(model)  # weights' bytes are not needed to infer shapes
    # Declared output dims ('N', 'T') would stay symbolic even where inference knows them: let inference fill them.
    for out in fresh.graph.output:
        if any(not d.HasField("dim_value") for d in out.type.tensor_type.shape.dim):
            out.type.tensor_type.ClearField("shape")
    contrib = with_stand_ins(fresh)
    try:
        inferred = onnx.shape_inference.infer_shapes(fresh, strict_mode=False, data_prop=True)
    except Exception:  # exotic graphs: keep what the exporter recorded; unknown sizes are reported
        return model
    restore(inferred, contrib)
    return inferred


_SHAPE_DTYPES = {TensorProto.INT64, TensorProto.INT32}


def _shape_arithmetic(name: str, shapes: dict[str, list[int | None]], types: dict[str, int]) -> bool:
    """An integer vector or scalar (Shape → Gather → Concat chains): a few bytes, whose length
    shape inference sometimes cannot tell; leaving it out changes nothing measurable."""
    return types.get(name) in _SHAPE_DTYPES and len(shapes.get(name) or []) <= 1


def _gathered_table(node: onnx.NodeProto, tensor: str, constants: set[str]) -> bool:
    """The constant table a Gather indexes (an embedding): it reads the rows it selects, not the table."""
    return node.op_type == "Gather" and tensor == node.input[0] and tensor in constants


def _rows_read(
    node: onnx.NodeProto, shapes: dict[str, list[int | None]], types: dict[str, int], table_bytes: int
) -> int:
    """The table bytes a Gather reads: its output's elements at the table's element size, at most the table."""
    out = _size(node.output[0], shapes, types)
    if out is None:
        return table_bytes
    out_item = _itemsize(types.get(node.output[0]))
    table_item = _itemsize(types.get(node.input[0]))
    return min(table_bytes, out // out_item * table_item)


def node_costs(
    model: onnx.ModelProto, hw: HardwareFacts, eff: Efficiency = Efficiency()
) -> tuple[list[NodeCost], list[str]]:
    """Roofline cost of every node of a shape-inferred model (``infer``); second item: tensors of unknown size."""
    shapes = shape_map(model)
    types = elem_types(model)
    constants = _constants(model)
    units = qdq_units(model, types, accelerator=hw.int8_elementwise)
    peaks = {"int8": hw.peak_int8_tops * 1e12, "fp16": hw.peak_fp16_tflops * 1e12, "fp32": hw.peak_fp32_tflops * 1e12}
    bandwidth = hw.memory_bandwidth_gbps * 1e9 * eff.memory
    costs: list[NodeCost] = []
    unknown: list[str] = []
    for index, node in enumerate(model.graph.node):
        folded = node.op_type != "DequantizeLinear" and all(o in constants for o in node.output if o)
        if node.op_type == "Constant" or folded or index in units.absorbed:
            continue  # folded at session creation, or run inside a fused integer kernel
        name = node.name or f"{node.op_type}_{index}"
        fused = index in units.fused
        on_accelerator = fused and hw.int8_elementwise  # an integer unit the accelerator runs: int8 bytes and rate
        dtype = "int8" if on_accelerator else _compute_dtype(node, types, fused)
        macs = node_macs(node, shapes) or 0
        moved = 0
        if node.op_type not in VIEW_OPS:
            for tensor in [*node.input, *node.output]:
                if not tensor:
                    continue
                integer_bytes = on_accelerator or (fused and node.op_type not in REQUANTIZING_ELEMENTWISE)
                size = _size(units.reads.get(tensor, tensor) if integer_bytes else tensor, shapes, types)
                if size is not None and _gathered_table(node, tensor, constants):
                    size = _rows_read(node, shapes, types, size)
                if size is None:
                    if tensor in node.output and len(node.output) > 1 and tensor != node.output[0]:
                        continue  # optional outputs (Dropout mask, ...) that nothing reads
                    if not _shape_arithmetic(tensor, shapes, types):
                        unknown.append(tensor)
                    continue
                moved += size
        # MAC kernels count 2 ops per MAC; other compute (activations, pooling) is 1 op per output element,
        # negligible next to its memory time, so it only matters for compute-heavy elementwise chains.
        grouped = _grouped(node)
        out_size = _size(node.output[0], shapes, types) if node.output else None
        elements = out_size // _itemsize(types.get(node.output[0])) if out_size else 0
        if node.op_type in MAC_OPS:
            compute_s = 2 * macs / (peaks[dtype] * (eff.grouped_compute if grouped else eff.compute))
        else:
            rate = peaks["int8" if on_accelerator else "fp32"]
            compute_s = elements * eff.element_ops.get(node.op_type, 1.0) / (rate * eff.compute)
        fits_on_chip = 0 < moved <= hw.on_chip_memory_kb * 1024
        memory_s = moved / (bandwidth * (eff.cache_bandwidth if fits_on_chip else 1.0))
        seconds = max(compute_s, memory_s) + eff.node_overhead_us * 1e-6
        costs.append(
            NodeCost(
                name, node.op_type, int(macs), int(moved), dtype, compute_s, memory_s, seconds, grouped, int(elements)
            )
        )
    return costs, unknown


# -- memory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int
    first: int  # index of the step that writes it (-1: a graph input)
    last: int  # index of the last step that reads it


def activation_buffers(model: onnx.ModelProto) -> tuple[list[Buffer], list[str]]:
    """Lifetimes of every activation tensor of a shape-inferred model in topological (graph) order;
    second item: tensors of unknown size."""
    shapes = shape_map(model)
    types = elem_types(model)
    constants = _constants(model)
    graph = model.graph
    end = len(graph.node)
    first: dict[str, int] = {i.name: -1 for i in graph.input if i.name not in constants}
    last: dict[str, int] = {}
    views: dict[str, str] = {}  # Reshape-like outputs share their input's buffer
    for index, node in enumerate(graph.node):
        for tensor in node.input:
            if tensor in first or tensor in views:
                last[views.get(tensor, tensor)] = index
        if node.op_type in VIEW_OPS and node.input and node.input[0] in first and node.op_type not in ("Shape", "Size"):
            root = views.get(node.input[0], node.input[0])
            for out in node.output[:1]:
                views[out] = root
            continue
        for out in node.output:
            if out and out not in constants:
                first[out] = index
    for out in graph.output:
        if out.name in first or out.name in views:
            last[views.get(out.name, out.name)] = end
    buffers, unknown = [], []
    for name, start in first.items():
        size = _size(name, shapes, types)
        if size is None:
            if name in last and not _shape_arithmetic(name, shapes, types):
                unknown.append(name)
            continue
        buffers.append(Buffer(name, size, start, last.get(name, start)))
    return buffers, unknown


def liveness_peak(buffers: list[Buffer]) -> int:
    """The most bytes live at any step: no plan can use less."""
    if not buffers:
        return 0
    lo = min(b.first for b in buffers)
    hi = max(b.last for b in buffers)
    delta = np.zeros(hi - lo + 2, dtype=np.int64)
    for b in buffers:
        delta[b.first - lo] += b.size
        delta[b.last - lo + 1] -= b.size
    return int(np.cumsum(delta).max())


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def greedy_arena(buffers: list[Buffer], alignment: int = ARENA_ALIGNMENT) -> tuple[int, dict[str, int]]:
    """TFLite Micro's greedy-by-size plan: (arena bytes, offset per buffer)."""
    placed: list[tuple[int, int, Buffer]] = []  # (offset, aligned size, buffer)
    offsets: dict[str, int] = {}
    for buf in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        size = _align(buf.size, alignment)
        overlapping = sorted(
            (off, sz) for off, sz, other in placed if other.first <= buf.last and buf.first <= other.last
        )
        offset = 0
        for off, sz in overlapping:  # first gap from the bottom that fits
            if off - offset >= size:
                break
            offset = max(offset, off + sz)
        placed.append((offset, size, buf))
        offsets[buf.name] = offset
    arena = max((off + sz for off, sz, _ in placed), default=0)
    return arena, offsets


# -- the whole estimate ----------------------------------------------------------------------------


def estimate(
    model: onnx.ModelProto,
    hw: HardwareFacts,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    eff: Efficiency = Efficiency(),
    top: int = 10,
) -> dict[str, Any]:
    """The cost-model section of the report for one model on one hardware description."""
    if input_shapes:
        model = bind_input_shapes(model, input_shapes)
    model = infer(model)
    costs, unknown = node_costs(model, hw, eff)
    buffers, unknown_mem = activation_buffers(model)
    total = sum(c.seconds for c in costs)
    mem_bound = sum(c.seconds for c in costs if c.bound == "memory")
    by_op: dict[str, float] = {}
    for c in costs:
        by_op[c.op] = by_op.get(c.op, 0.0) + c.seconds
    arena, _ = greedy_arena(buffers)
    weights = _weights_bytes(model, _constants(model))
    doc: dict[str, Any] = {
        "complete": not unknown and not unknown_mem,
        "latency_ms": total * 1e3,
        "memory_bound_share": mem_bound / total if total else 0.0,
        "compute_bound_share": 1 - mem_bound / total if total else 0.0,
        "macs": sum(c.macs for c in costs),
        "bytes_moved": sum(c.bytes for c in costs),
        "kernels": len(costs),
        "peak_activation_bytes": {"liveness_lower_bound": liveness_peak(buffers), "greedy_arena": arena},
        "weights_bytes": weights,
        "by_op_ms": {op: round(s * 1e3, 4) for op, s in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "top_nodes": [
            {
                "name": c.name,
                "op": c.op,
                "ms": round(c.seconds * 1e3, 4),
                "bound": c.bound,
                "dtype": c.dtype,
                "macs": c.macs,
                "bytes": c.bytes,
            }
            for c in sorted(costs, key=lambda c: -c.seconds)[:top]
        ],
        "efficiency": eff.to_dict(),
    }
    if unknown or unknown_mem:
        missing = sorted(set(unknown) | set(unknown_mem))
        doc["unknown_tensors"] = missing[:20]
        doc["note"] = (
            f"{len(missing)} tensor sizes unknown (dynamic dims?): the estimate leaves them out; bind shapes with --input-shape"
        )
    return doc


def latency_ms(
    model: onnx.ModelProto,
    hw: HardwareFacts,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    eff: Efficiency = Efficiency(),
) -> tuple[float, bool]:
    """The roofline latency alone, what a search ranks candidates by; second: whether every tensor's size was known."""
    if input_shapes:  # set on a weightless copy: bind_input_shapes serializes the model (2 s for a 54 MB CRNN)
        model = shapes_only_copy(model)
        for value in model.graph.input:
            if value.name in input_shapes:
                dims = value.type.tensor_type.shape.dim
                del dims[:]
                dims.extend(onnx.TensorShapeProto.Dimension(dim_value=int(d)) for d in input_shapes[value.name])
    costs, unknown = node_costs(infer(model), hw, eff)
    return sum(c.seconds for c in costs) * 1e3, not unknown


def _weights_bytes(model: onnx.ModelProto, constants: set[str]) -> int:
    """Bytes of the constants the runtime keeps: those read by nodes that are not folded away
    (so the light zoo's ConstantOfShape weights count, and their shape vectors do not)."""
    shapes = shape_map(model)
    types = elem_types(model)
    kept = set()
    for node in model.graph.node:
        if node.op_type == "Constant" or all(o in constants for o in node.output if o):
            continue
        kept.update(i for i in node.input if i in constants)
    return sum(_size(name, shapes, types) or 0 for name in kept)


def cost_model_section(target: CostTarget, models: dict[str, onnx.ModelProto]) -> dict[str, Any]:
    """``report["cost_model"]``: every model's estimate on the target's hardware facts (shapes must be bound)."""
    hw = target.hardware
    out = {}
    for label, model in models.items():
        try:
            out[label] = estimate(model, hw)
        except Exception as exc:  # an estimate must never break a compile; say why it is missing
            out[label] = {"error": f"no estimate: {exc.__class__.__name__}: {str(exc)[:200]}"}
    return {
        "target": target.name,
        "hardware": {
            "peak_fp32_tflops": hw.peak_fp32_tflops,
            "peak_fp16_tflops": hw.peak_fp16_tflops,
            "peak_int8_tops": hw.peak_int8_tops,
            "memory_bandwidth_gbps": hw.memory_bandwidth_gbps,
            "memory_mb": hw.memory_mb,
            "cores": hw.cores,
        },
        "method": "roofline max(compute, memory) per node, summed; liveness lower bound and greedy-by-size arena",
        "models": out,
    }


def budgets_section(
    target: CostTarget, model_bytes: int, estimate_doc: dict[str, Any] | None, label: str
) -> dict[str, Any]:
    """``report["budgets"]``: the target's size and memory budgets checked against ``label``'s model."""
    usable = estimate_doc if estimate_doc and "error" not in estimate_doc and estimate_doc.get("complete") else None
    checks = check_budgets(model_bytes, usable, target.budgets, target.hardware)
    doc: dict[str, Any] = {"model": label, "checks": checks, "ok": all(c["ok"] for c in checks)}
    if usable is None:
        # An arena over unknown tensor sizes would read as a small, passing number: better not checked at all.
        doc["skipped"] = [
            "activation memory: some tensor sizes are unknown (bind dynamic dims with --input-shape or --calib)"
        ]
    return doc


def check_budgets(
    model_bytes: int, estimate_doc: dict[str, Any] | None, budgets: BudgetLimits, hw: HardwareFacts
) -> list[dict[str, Any]]:
    """Each budget of the target against the compiled model: ``{"name", "value", "limit", "unit", "ok"}``."""
    checks = []
    mb = 1024 * 1024

    def add(name: str, value: float | None, limit: float | None) -> None:
        if limit is None or value is None:
            return
        checks.append({"name": name, "value": round(value, 3), "limit": limit, "unit": "MB", "ok": value <= limit})

    add("model size", model_bytes / mb, budgets.max_model_size_mb)
    if estimate_doc is not None:
        arena = estimate_doc["peak_activation_bytes"]["greedy_arena"]
        add("activation memory (greedy arena)", arena / mb, budgets.max_activation_memory_mb)
        add("weights + activations vs device memory", (model_bytes + arena) / mb, hw.memory_mb)
    return checks
