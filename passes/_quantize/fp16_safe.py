"""fp16 without overflow: which nodes stay fp32, found on the data, and a converted model verified finite.

Three steps, each needed on real graphs:
1. activation ranges measured in fp32 on the data (calibration, else the check feeds): a node whose
   output (or input) reaches ``FP16_HEADROOM`` of fp16's 65504 stays fp32;
2. round-trip casts removed: ONNX Runtime's ``convert_float_to_float16`` casts the tensor *between
   two fp32-kept nodes* to fp16 and back (light-zoo squeezenet: a Conv output of 3.6e5, kept fp32,
   became inf in that Cast), so keeping nodes fp32 alone does not stop the overflow;
3. the converted model is run on the same data; any node whose fp16 result is non-finite while its
   fp32 result is finite (an fp16 accumulation can overflow where the output does not) joins the
   fp32 set and the conversion runs again, up to ``MAX_ROUNDS`` times.
Libraries checked: onnxconverter-common and ORT's float16 converter take a block list but measure
nothing; neither removes the round-trip casts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import subgraph_names
from lepton_cli.model.op_traits import attr

FP16_MAX = 65504.0
FP16_HEADROOM = 0.5  # keep a node in fp32 when its observed value reaches half of fp16's range
MAX_ROUNDS = 4
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@dataclass
class Fp32Kept:
    """The nodes kept fp32 for range, and how they were found (for the report)."""

    overflow: list[str]  # measured in fp32 beyond the headroom
    nonfinite: list[str] = field(default_factory=list)  # found by running the converted model
    rounds: int = 0
    finite: bool = True  # the final converted model returned only finite values on the data

    @property
    def kept(self) -> list[str]:
        return sorted(set(self.overflow) | set(self.nonfinite))


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor that shape inference or the graph knows (``model``'s value_info
    already cleared by the caller, on its own copy)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    return types | {t.name: t.data_type for t in model.graph.initializer}


def _all_float_outputs(model: onnx.ModelProto, elem_types: tuple[int, ...]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also returns every intermediate tensor of a type in ``elem_types``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]  # the fp16 converter leaves stale fp32 annotations that inference rejects
    typed = _inferred_types(probe)
    have = {o.name for o in probe.graph.output}
    names = [
        out
        for node in probe.graph.node
        for out in node.output
        if out and out not in have and typed.get(out) in elem_types
    ]
    probe.graph.output.extend(helper.make_tensor_value_info(n, typed[n], None) for n in names)
    return probe, [o.name for o in probe.graph.output]


def tensor_peaks(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], elem_types: tuple[int, ...] = (FLOAT,)
) -> dict[str, float]:
    """Largest |value| of every float tensor over ``feeds`` (inf when non-finite)."""
    from lepton_cli.model.sessions import make_session

    probe, names = _all_float_outputs(model, elem_types)
    session = make_session(probe, opt_level="disable")  # unoptimised: every tensor exists as in the graph
    peak: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(None, feed)):
            value = np.asarray(value)
            if value.size and np.issubdtype(value.dtype, np.floating):
                top = float(np.max(np.abs(value))) if np.isfinite(value).all() else math.inf
                peak[name] = max(peak.get(name, 0.0), top)
    return peak


def overflow_nodes(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Nodes whose fp32 outputs or inputs on ``feeds`` reach ``FP16_HEADROOM`` of fp16's range
    (a consumer of a large tensor would cast it to fp16 at its input, so it stays fp32 too)."""
    peak = tensor_peaks(model, feeds)
    limit = FP16_MAX * FP16_HEADROOM
    return [
        node.name
        for node in model.graph.node
        if any(peak.get(name, 0.0) > limit for name in [*node.output, *node.input])
    ]


def collapse_round_trip_casts(model: onnx.ModelProto) -> int:
    """Remove Cast(fp32→fp16)→Cast(fp16→fp32) chains in place (readers take the fp32 tensor); return how many."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return attr(node, "to") if node.op_type == "Cast" else None

    types = _elem_types(model)
    rename: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if cast_to(node) == FLOAT and first is not None and cast_to(first) == FLOAT16 and node.output[0] not in outputs:
            # only where the fp16 Cast read an fp32 tensor: a model's own Cast inside a converted region reads fp16
            # (Silero's half-precision export), and its reader would then get fp16 where it runs fp32
            read = types.get(first.input[0])
            source = producer.get(first.input[0])
            if read == FLOAT or (read is None and source is not None and cast_to(source) != FLOAT16):
                rename[node.output[0]] = first.input[0]
    if not rename:
        return 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    outputs = outputs | subgraph_names(graph)  # a Cast an If/Loop body reads is read
    used = {i for n in graph.node for i in n.input} | outputs
    while True:  # the bypassed casts (and fp16 casts nobody reads any more)
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        used = {i for n in graph.node for i in n.input} | outputs
    return len(rename)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the main graph that shape inference (or the graph) knows."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]  # stale annotations, as in _all_float_outputs
    return _inferred_types(probe)


def _nonfinite_fp16_nodes(
    converted: onnx.ModelProto, reference: dict[str, float], feeds: list[dict[str, np.ndarray]]
) -> list[str]:
    """Nodes of ``converted`` producing a non-finite fp16 (or fp32) value where the fp32 model's tensor
    of the same name is finite; the earliest in graph order first."""
    peaks = tensor_peaks(converted, feeds, (FLOAT, FLOAT16))
    bad = []
    for node in converted.graph.node:
        if node.op_type == "Cast":
            continue
        if any(math.isinf(peaks.get(o, 0.0)) and not math.isinf(reference.get(o, 0.0)) for o in node.output):
            bad.append(node.name)
    return bad


def plan_fp16(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], convert: Callable[[list[str]], onnx.ModelProto]
) -> tuple[Fp32Kept, onnx.ModelProto]:
    """The fp32-kept set for ``model`` on ``feeds`` and the verified converted model (see the module doc)."""
    reference = tensor_peaks(model, feeds)
    limit = FP16_MAX * FP16_HEADROOM
    overflow = [
        node.name
        for node in model.graph.node
        if any(reference.get(name, 0.0) > limit for name in [*node.output, *node.input])
    ]
    plan = Fp32Kept(overflow)
    names = {n.name for n in model.graph.node}
    while True:
        converted = convert(plan.kept)
        plan.rounds += 1
        bad = [n for n in _nonfinite_fp16_nodes(converted, reference, feeds) if n in names and n not in plan.kept]
        if not bad:
            plan.finite = not _has_nonfinite_output(converted, feeds, reference)
            return plan, converted
        if plan.rounds >= MAX_ROUNDS:
            plan.finite = False
            return plan, converted
        plan.nonfinite += bad[:8]  # the first overflow poisons everything after it: fix the earliest first


def _has_nonfinite_output(
    converted: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], reference: dict[str, float]
) -> bool:
    from lepton_cli.model.sessions import make_session

    session = make_session(converted)
    names = [o.name for o in session.get_outputs()]
    for feed in feeds:
        for name, value in zip(names, session.run(None, feed)):
            value = np.asarray(value)
            if (
                np.issubdtype(value.dtype, np.floating)
                and not np.isfinite(value).all()
                and not math.isinf(reference.get(name, 0.0))
            ):
                return True
    return False
