"""How much each quantized node hurts: per-tensor noise added locally, and the output error a node's float bypass saves.

The cheap way round: in the fully quantized model, bypass one node's input Q/DQ at a time (no
re-quantization) and measure how much the output noise-to-signal ratio falls on a few held-out
samples; with many quantized nodes, preselect by the error each adds locally (one run of the float
and the quantized model).

Libraries checked: ONNX Runtime's ``qdq_loss_debug`` pairs float and QDQ tensors too, but only
reports them (no ranking) and needs models saved to disk twice.
"""

from __future__ import annotations

import numpy as np
import onnx
from lepton_cli.passes._quantize.float_keep import keep_float
from lepton_cli.passes._quantize.recurrent import DYNAMIC_LSTM
from onnx import helper

from lepton_cli.evaluate.accuracy import zero_padded
from lepton_cli.host.parallel import ordered_map
from lepton_cli.model.external_data import has_external, shapes_only_copy
from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.model.sessions import make_session


def with_outputs(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also returns the float tensors ``names`` (those it has)."""
    inferred = onnx.shape_inference.infer_shapes(shapes_only_copy(model))  # no second copy of the weights
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    have = {o.name for o in model.graph.output}
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    keep = [n for n in dict.fromkeys(names) if types.get(n) in floats and n not in have and n in produced]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in keep)
    return copy, keep


def tensor_runs(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]], *, graph_outputs: bool = False
):
    """Per feed, the float tensors ``names`` (those ``model`` has) as ``{name: array}``, one feed at a time.
    ``graph_outputs``: also those of ``names`` that are already graph outputs (left out by default: the ranking
    compares what flows between nodes)."""
    extended, keep = with_outputs(model, names)
    if graph_outputs:
        wanted = set(names)
        keep += [o.name for o in model.graph.output if o.name in wanted]
    # unoptimised: every named tensor still exists; no arena: with every tensor an output it would
    # keep one feed's worth of them allocated for the session's life
    session = make_session(extended, arena=False)
    del extended
    for feed in feeds:
        yield dict(zip(keep, session.run(keep, adapt_feed(model, feed))))


RUN_MB = 256  # tensors fetched per run by local_errors: one sample of a detector's activations can be GBs


def _groups(model: onnx.ModelProto, names: list[str]) -> list[list[str]]:
    """``names``, in order, cut into groups whose float32 tensors (shapes inferred; unknown: 0) fit
    ``RUN_MB``: each group is fetched in its own runs, so one run never holds them all."""
    inferred = onnx.shape_inference.infer_shapes(shapes_only_copy(model))  # no second copy of the weights
    sizes = {}
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            sizes[value.name] = 4 * int(np.prod([d.dim_value for d in dims]))
    groups: list[list[str]] = [[]]
    total = 0
    for name in names:
        size = sizes.get(name, 0)
        if groups[-1] and total + size > RUN_MB * 2**20:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def local_errors(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, candidates: list[str], feeds: list[dict[str, np.ndarray]]
) -> list[tuple[str, float]]:
    """Candidate nodes ranked by the noise each adds: NSR(output) − max NSR(inputs), worst first.

    Streamed: one feed's tensors of the two models are held at a time and reduced to per-tensor sums
    (float64 scalars) before the next run: holding every feed's tensors for both models does not fit."""
    nodes = {n.name: n for n in float_model.graph.node if n.name in set(candidates)}
    inits = {i.name for i in float_model.graph.initializer}
    names = sorted({t for n in nodes.values() for t in [*n.input, *n.output] if t and t not in inits})
    noise: dict[str, float] = {}
    signal: dict[str, float] = {}
    for group in _groups(float_model, names):
        for r, g in zip(tensor_runs(float_model, group, feeds), tensor_runs(quantized, group, feeds)):
            for name in set(r) & set(g):
                if r[name].shape == g[name].shape:
                    # float64: an attention mask's -3.4e38 squared overflows float32 to inf
                    ref = r[name].astype(np.float64)
                    noise[name] = noise.get(name, 0.0) + float(np.sum(np.square(ref - g[name].astype(np.float64))))
                    signal[name] = signal.get(name, 0.0) + float(np.sum(np.square(ref)))
            del r, g

    def nsr(name: str) -> float | None:
        return noise[name] / max(signal[name], 1e-30) if name in noise else None

    ranked = []
    for name, node in nodes.items():
        outs = [v for v in (nsr(t) for t in node.output) if v is not None]
        if not outs:
            continue
        ins = [v for v in (nsr(t) for t in node.input if t not in inits) if v is not None]
        ranked.append((name, max(outs) - (max(ins) if ins else 0.0)))
    ranked.sort(key=lambda item: -item[1])
    return ranked


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of compute nodes that read a DequantizeLinear output, or quantize their own weights (DynamicQuantizeLSTM):
    they run quantized."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and (n.op_type == DYNAMIC_LSTM or any(i in dq_outputs for i in n.input))
    ]


def output_nsr(
    reference: list[list[np.ndarray]],
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    opt_level: str = "all",
) -> float:
    """Noise-to-signal ratio of all outputs of ``model`` vs reference outputs, summed over feeds."""
    return _nsr(reference, model, [adapt_feed(model, f) for f in feeds], opt_level)


def _nsr(
    reference: list[list[np.ndarray]],
    model: onnx.ModelProto | bytes,
    adapted: list[dict[str, np.ndarray]],
    opt_level: str,
) -> float:
    session = make_session(model, opt_level=opt_level, prepack=False)  # a few feeds, per candidate, side by side
    noise = signal = 0.0
    for ref, feed in zip(reference, adapted):
        for r, g in zip(ref, session.run(None, feed)):
            if r.shape != g.shape and r.ndim == g.ndim:  # a decoder stopped at another step (SLANet's Loop)
                r, g = zero_padded(r, g)
            r32, g32 = r.astype(np.float32, copy=False), g.astype(np.float32, copy=False)
            noise += float(np.sum(np.square(r32 - g32), dtype=np.float64))
            signal += float(np.sum(np.square(r32), dtype=np.float64))
    return noise / max(signal, 1e-30)


def float_gains(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    candidates: list[str],
    feeds: list[dict[str, np.ndarray]],
    opt_level: str = "all",
    float_weights: bool = True,
    workers: int = 1,
) -> list[tuple[str, float]]:
    """Candidates ranked by how much keeping each alone in float lowers the output error, best first; ``workers``
    candidates are built and run side by side (each its own model copy and session)."""
    session = make_session(float_model, opt_level=opt_level)
    reference = [session.run(None, adapt_feed(float_model, f)) for f in feeds]
    del session
    adapted = [adapt_feed(quantized, f) for f in feeds]  # a candidate keeps quantized's inputs and their layout
    base = _nsr(reference, quantized, adapted, opt_level)
    in_memory = not has_external(quantized)  # bytes carry no weights folder

    def gain(name: str) -> float:
        candidate: onnx.ModelProto | bytes = keep_float(quantized, float_model, name, float_weights)
        if in_memory:  # its proto goes before ORT parses it: two candidates are built and run side by side
            candidate = candidate.SerializeToString()
        return base - _nsr(reference, candidate, adapted, opt_level)

    gains = list(zip(candidates, ordered_map(gain, candidates, workers)))
    gains.sort(key=lambda item: -item[1])
    return gains
