"""Accuracy-aware tuning: per-layer sensitivity, float-kept layers, calibration methods, the most-int8 model that fits.

The search, bounded so that it costs O(methods × log2(max_float_layers)) quantize-and-score rounds:
1. for each calibration method (in the target's order): quantize everything and score it;
2. if it misses the budget, measure per-layer sensitivity the cheap way round: in the fully
   quantized model, bypass one node's input Q/DQ at a time (no re-quantization) and measure how
   much the output noise-to-signal ratio falls on a few held-out samples; with more than
   ``max_candidates`` quantized nodes, preselect by the error each adds locally (one run of the
   float and the quantized model). Then keep the top k in float (their input Q/DQ bypassed, as
   measured: ``keep_float_nodes``) for k = 1, 2, 4, ... until the budget holds, and bisect down between the
   last failing and the first passing k (fewer float layers = faster); when no k does, do the same
   with the leading quantized nodes in graph order (error that builds up over many layers, which
   no single node's bypass reveals);
3. among the candidates that meet the budget, keep the one with the fewest float-kept nodes (then
   the smaller drop): deterministic, and the build host's latency says little about the target's;
   a fully quantized pass stops the search early, nothing can beat it.

Libraries checked: ONNX Runtime's ``qdq_loss_debug`` pairs float and QDQ tensors too, but only
reports them (no ranking, no search) and needs models saved to disk twice; Intel Neural
Compressor / Olive run similar "fallback the worst ops" loops but are not dependencies here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper

from lepton_cli.evaluate.accuracy import AccuracyScore, Evaluator
from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.model.sessions import make_session

SENSITIVITY, LEADING = "sensitivity", "leading"  # Trial.float_rule
Build = Callable[[str, list[str]], onnx.ModelProto]  # (method, float-kept node names) -> candidate model


@dataclass
class Trial:
    method: str
    float_nodes: list[str]
    drop_pct: float
    value: float
    meets_budget: bool
    latency_ms: float | None = None
    agreement: dict[str, float] = field(default_factory=dict)
    op_types: list[str] | None = None  # int8: the op types quantized ([]: every op ORT quantizes)
    drop_se: float = 0.0  # standard error of drop_pct over the evaluation samples
    float_rule: str = (
        SENSITIVITY  # how float_nodes were chosen: SENSITIVITY ranking or the LEADING nodes in graph order
    )

    @property
    def rule_tag(self) -> str:
        """Label suffix for progress lines and the exit-3 message: marks trials that kept the leading nodes float."""
        return " leading" if self.float_rule == LEADING else ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["float_kept"] = len(self.float_nodes)
        return out


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also returns the float tensors ``names`` (those it has)."""
    inferred = onnx.shape_inference.infer_shapes(model)
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


def _tensor_runs(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]):
    """Per feed, the float tensors ``names`` (those ``model`` has) as ``{name: array}``, one feed at a time."""
    extended, keep = _with_outputs(model, names)
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
    inferred = onnx.shape_inference.infer_shapes(model)
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
    (float64 scalars) before the next run. Holding every feed's tensors, as float64, for both models
    took a 7 MB layout detector past 18 GB."""
    nodes = {n.name: n for n in float_model.graph.node if n.name in set(candidates)}
    inits = {i.name for i in float_model.graph.initializer}
    names = sorted({t for n in nodes.values() for t in [*n.input, *n.output] if t and t not in inits})
    noise: dict[str, float] = {}
    signal: dict[str, float] = {}
    for group in _groups(float_model, names):
        for r, g in zip(_tensor_runs(float_model, group, feeds), _tensor_runs(quantized, group, feeds)):
            for name in set(r) & set(g):
                if r[name].shape == g[name].shape:
                    ref = r[name].astype(np.float32, copy=False)
                    noise[name] = noise.get(name, 0.0) + float(
                        np.sum(np.square(ref - g[name].astype(np.float32, copy=False)), dtype=np.float64)
                    )
                    signal[name] = signal.get(name, 0.0) + float(np.sum(np.square(ref), dtype=np.float64))
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
    """Names of compute nodes that read a DequantizeLinear output (they run quantized)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_outputs for i in n.input)
    ]


@dataclass
class SearchResult:
    best: onnx.ModelProto | None
    best_trial: Trial | None
    trials: list[Trial]
    sensitivity: list[tuple[str, float]]


def search(
    build: Build,
    methods: list[str],
    evaluator: Evaluator,
    budget: float,
    float_model: onnx.ModelProto,
    sensitivity_feeds: list[dict[str, np.ndarray]],
    *,
    max_float: int,
    candidates: Callable[[onnx.ModelProto], list[str]] | None = None,
    max_candidates: int = 64,
    note: Callable[[str], None] | None = None,
    float_weights: bool = True,
    z: float = 0.0,
) -> SearchResult:
    """Try methods and float-kept layer counts; return the most-quantized candidate within ``budget`` points.

    A candidate meets the budget when its drop plus ``z`` standard errors does (``z`` = 0: the measured
    drop itself): a tuning set's drop is an estimate, and a candidate chosen because it landed just
    under the budget tends to land over it on other data."""
    trials: list[Trial] = []
    passing: list[Trial] = []  # models are rebuilt, not kept: a candidate per trial held ~60 model copies
    sensitivity: list[tuple[str, float]] = []

    scored: dict[tuple[str, frozenset[str]], Trial] = {}

    def attempt(method: str, keep: list[str], rule: str) -> tuple[Trial, onnx.ModelProto | None]:
        key = (method, frozenset(keep))
        if key in scored:  # the leading nodes can be the set the ranking already tried
            return scored[key], None
        model = build(method, keep)
        score: AccuracyScore = evaluator.score(model)
        trial = Trial(
            method,
            list(keep),
            score.drop_pct,
            score.value,
            score.drop_bound(z) <= budget,
            agreement=score.agreement,
            drop_se=score.drop_se,
            float_rule=rule,
        )
        trials.append(trial)
        if note:
            spread = f" ± {score.drop_se:.2f}" if z else ""
            note(
                f"  {method:<10} float-kept {len(keep):3d}{trial.rule_tag}: {score.metric} "
                f"drop {score.drop_pct:.2f}{spread} ({'within' if trial.meets_budget else 'over'} {budget:g})"
            )
        if trial.meets_budget:
            passing.append(trial)
        scored[key] = trial
        return trial, model

    def grow(method: str, order: list[str], rule: str) -> bool:
        """Keep order[:k] float for k = 1, 2, 4, ... until the budget holds, then bisect k down."""
        limit = min(max_float, len(order))
        low, high, k = 0, None, 1  # low: largest failing k; high: smallest passing k
        while k <= limit:
            if attempt(method, order[:k], rule)[0].meets_budget:
                high = k
                break
            low = k
            k = k * 2 if k * 2 <= limit or k == limit else limit
        if high is None:
            return False
        while high - low > 1:  # bisect: fewer float layers run faster
            mid = (low + high) // 2
            if attempt(method, order[:mid], rule)[0].meets_budget:
                high = mid
            else:
                low = mid
        return True

    for method in methods:
        first, model = attempt(method, [], SENSITIVITY)
        model = model or build(method, [])
        if first.meets_budget:
            break  # everything quantized fits: no float-kept variant can be faster
        in_graph_order = (candidates or quantized_nodes)(model)
        pool = in_graph_order
        if len(pool) > max_candidates:  # bound the per-layer runs: preselect by the one-run local error
            pool = [name for name, _ in local_errors(float_model, model, pool, sensitivity_feeds)[:max_candidates]]
        ranking = float_gains(float_model, model, pool, sensitivity_feeds, evaluator.opt_level, float_weights)
        if not sensitivity:
            sensitivity = ranking
        if not grow(method, [name for name, _ in ranking], SENSITIVITY):
            # Error that builds up over many layers: no single node's bypass shows it, so the ranking
            # misses it. PP-OCRv4 det int8 (every op): bypassing any one of the first 24 activations
            # changed pixel F1 by < 0.004; all of them: 0.940 -> 0.957 (worst page 0.67 -> 0.86).
            # The leading layers run at the highest resolution, where rounding errors are widest spread.
            grow(method, in_graph_order, LEADING)
    if not passing:
        return SearchResult(None, None, trials, sensitivity)
    # Deterministic (same inputs, same bytes): fewest float-kept nodes (more int8 runs faster on the
    # target, whose speed this build host cannot measure), then the smaller drop, then method order.
    # Host latency used to break ties here, and its noise made two identical compiles differ.
    order_of = {m: i for i, m in enumerate(methods)}
    best_trial = min(passing, key=lambda t: (len(t.float_nodes), t.drop_pct, order_of.get(t.method, 0)))
    return SearchResult(build(best_trial.method, best_trial.float_nodes), best_trial, trials, sensitivity)


def keep_float_nodes(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, names: list[str], float_weights: bool = True
) -> onnx.ModelProto:
    """``quantized`` with every node in ``names`` reading float inputs, and the Q/DQ nodes and int8
    weights that nothing reads any more removed (see ``keep_float`` for ``float_weights``)."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)  # the caller caches ``quantized``
    for name in names:
        model = keep_float(model, float_model, name, float_weights)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    _float_graph_outputs(graph, set(names), outputs)
    while True:  # drop nodes whose outputs nobody reads (bypassed Q/DQ chains), then their initializers
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return model


def _float_graph_outputs(graph: onnx.GraphProto, kept: set[str], outputs: set[str]) -> None:
    """A float-kept node whose output reaches a graph output only through Q -> DQ writes the output
    itself: quantizing a graph output (digits' logits when every op is quantized) undoes keeping it float."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in kept:
            continue
        for index, out in enumerate(node.output):
            readers = consumers.get(out, [])
            if out in outputs or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
                continue
            dqs = consumers.get(readers[0].output[0], [])
            if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear" and dqs[0].output[0] in outputs:
                node.output[index] = dqs[0].output[0]
                dropped.append(dqs[0])
    for dq in dropped:  # their Qs are left unread and removed with the other dead nodes
        graph.node.remove(dq)


def keep_float(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, node_name: str, float_weights: bool = True
) -> onnx.ModelProto:
    """``quantized`` with node ``node_name`` reading float inputs again (its input Q/DQ bypassed).

    ``float_weights=False`` keeps its weights stored as int8 (their DequantizeLinear stays; the runtime
    folds it at load): the node still computes in float on float activations, and the model stays
    a quarter of the size (PP-OCRv4 rec: its nine Gemm layers kept float with float weights took the
    int8 model from 0.29x to 0.56x the fp32 size).

    A cheap stand-in for re-quantizing with ``nodes_to_exclude=[node]``: no calibration, no
    quantizer run, just the edge rewiring, so every candidate's effect can be measured.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(quantized)
    producer = {o: n for n in copy.graph.node for o in n.output}
    float_node = next((n for n in float_model.graph.node if n.name == node_name), None)
    float_inits = {i.name: i for i in float_model.graph.initializer}
    have_inits = {i.name for i in copy.graph.initializer}
    restored: dict[str, onnx.NodeProto] = {}  # activations put back, inserted after the loop
    for node in copy.graph.node:
        if node.name != node_name:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source = _float_source(copy, float_model, q.input[0], producer, have_inits, restored)
                if source is not None:
                    node.input[index] = source
            elif (
                float_weights
                and float_node is not None
                and index < len(float_node.input)
                and float_node.input[index] in float_inits
            ):
                original = float_node.input[index]
                # ORT may name a weight's DequantizeLinear output after the float weight: rename the copy.
                fresh = original + "_float" if original in producer else original
                if fresh not in have_inits:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(float_inits[original])
                    tensor.name = fresh
                    copy.graph.initializer.append(tensor)
                    have_inits.add(fresh)
                node.input[index] = fresh
    if restored:
        nodes = list(copy.graph.node)
        for tensor, activation in restored.items():
            nodes.insert(next(i for i, n in enumerate(nodes) if tensor in n.output) + 1, activation)
        del copy.graph.node[:]
        copy.graph.node.extend(nodes)
    return copy


def _float_source(
    model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    tensor: str,
    producer: dict[str, onnx.NodeProto],
    have_inits: set[str],
    restored: dict[str, onnx.NodeProto],
) -> str | None:
    """The name of ``tensor``'s float value for a node bypassing its Q/DQ, or None to keep the Q/DQ.

    ORT's quantizer removes a Relu or Clip whose output is quantized (the Q clamps to the same range)
    and gives the producer the activation's output name: bypassing that Q/DQ would silently drop the
    activation (PP-OCRv4 det, every op quantized, head kept float: pixel F1 0.68 instead of 0.90).
    A copy of the float activation is queued in ``restored`` to go in front of the float node.
    """
    float_producer = next((n for n in float_model.graph.node if tensor in n.output), None)
    made_by = producer.get(tensor)
    if float_producer is None or made_by is None or float_producer.name == made_by.name:
        return tensor
    if tensor in restored:
        return restored[tensor].output[0]
    float_inits = {i.name: i for i in float_model.graph.initializer}
    extra = [i for i in float_producer.input[1:] if i]
    if len(float_producer.output) != 1 or any(i not in float_inits for i in extra):
        return None  # e.g. Clip bounds computed at run time: keep the quantized (clamped) input
    for name in extra:
        if name not in have_inits:
            init = onnx.TensorProto()
            init.CopyFrom(float_inits[name])
            model.graph.initializer.append(init)
            have_inits.add(name)
    activation = onnx.NodeProto()
    activation.CopyFrom(float_producer)
    activation.name = float_producer.name + "_float"
    activation.input[0] = tensor
    activation.output[0] = tensor + "_float_" + float_producer.op_type.lower()
    restored[tensor] = activation
    return activation.output[0]


def output_nsr(
    reference: list[list[np.ndarray]],
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    opt_level: str = "all",
) -> float:
    """Noise-to-signal ratio of all outputs of ``model`` vs reference outputs, summed over feeds."""
    session = make_session(model, opt_level=opt_level)
    noise = signal = 0.0
    for ref, feed in zip(reference, feeds):
        for r, g in zip(ref, session.run(None, adapt_feed(model, feed))):
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
) -> list[tuple[str, float]]:
    """Candidates ranked by how much keeping each alone in float lowers the output error, best first."""
    session = make_session(float_model, opt_level=opt_level)
    reference = [session.run(None, adapt_feed(float_model, f)) for f in feeds]
    del session
    base = output_nsr(reference, quantized, feeds, opt_level)
    gains = [
        (name, base - output_nsr(reference, keep_float(quantized, float_model, name, float_weights), feeds, opt_level))
        for name in candidates
    ]
    gains.sort(key=lambda item: -item[1])
    return gains
