"""Query and key channels balanced against each other in front of attention score MatMuls: exact in float.

A score is ``q · k`` summed over a head's channels, so scaling query channel c by ``a_c`` and its key channel by
``1 / a_c`` leaves every score unchanged. With ``a_c = sqrt(max|k_c| / max|q_c|)`` both take the geometric mean
of their ranges: the few query channels that set a per-tensor int8 grid shrink, and the keys' grow only to meet
them. PP-OCRv5 rec's fused QKV projection had one query channel at 9.3 against a median of 2.5 (keys 5.0, values
3.1): balanced, the fused tensor's range is 5.7, yet its int8 output noise and held-out accuracy on tpu did not
move, so no target turns the step on (docs/decisions.md, session 38).

Sites are found by following each score MatMul input up through shape-only ops (and scalar Mul/Div) to a weight
layer. Which projection column reaches which channel of each operand is read from the graph itself: the
projection's output is replaced by its column numbers, twice with an offset (a scalar Mul scales both), and the
operands are read. A site whose balanced model does not reproduce the source's outputs is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.residual_scaling import dimension_absmax
from lepton_cli.passes._quantize.sensitivity import tensor_runs
from lepton_cli.passes._quantize.weight_layers import WeightLayer, from_rows, load, store, to_rows, weight_layers
from onnx import helper, numpy_helper

from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.model.sessions import make_session, run_feeds
from lepton_cli.pipeline.equivalence import within_scaled_tolerance

SHAPE_ONLY = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Identity", "Flatten"}
LIMIT = 64.0  # the most a channel's factor may move it either way (a dead key channel would send its query to inf)
EXACT_RTOL = 1e-4  # the balanced model's outputs against the source's, relative to each output's largest value


@dataclass
class Site:
    score: onnx.NodeProto  # MatMul(q [.., T, d], k [.., d, T'])
    query: WeightLayer
    key: WeightLayer
    query_output: str  # the tensor the query projection writes (after its bias)
    key_output: str
    pairs: np.ndarray  # [n, 2]: (query column, key column) of the projections' outputs


def _projection_output(layer: WeightLayer, g: GraphIndex) -> str:
    if layer.kind == "matmul" and layer.bias is not None:
        return next(node.output[0] for node in g.readers(layer.node.output[0]) if node.op_type == "Add")
    return layer.node.output[0]


def _trace(tensor: str, g: GraphIndex, outputs: dict[str, WeightLayer]) -> WeightLayer | None:
    """The weight layer whose output reaches ``tensor`` through shape-only ops and scalar scales, if any."""
    for _ in range(16):
        if tensor in outputs:
            return outputs[tensor]
        node = g.producer.get(tensor)
        if node is None:
            return None
        if node.op_type in SHAPE_ONLY:
            tensor = node.input[0]
        elif node.op_type in ("Mul", "Div"):
            scalar = [g.const(name) for name in node.input]
            if node.op_type == "Div" and scalar[0] is not None:
                return None
            rest = [name for name, value in zip(node.input, scalar) if value is None]
            fixed = [value for value in scalar if value is not None]
            if len(rest) != 1 or len(fixed) != 1 or fixed[0].size != 1:
                return None
            tensor = rest[0]
        else:
            return None
    return None


def find_sites(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, WeightLayer, WeightLayer]]:
    """(score MatMul, query layer, key layer) for each MatMul of two activations that trace back to weight layers."""
    g = GraphIndex(model.graph)
    layers = [layer for layer in weight_layers(model) if layer.kind != "conv"]
    outputs = {_projection_output(layer, g): layer for layer in layers}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(g.const(name) is not None for name in node.input):
            continue
        query, key = (_trace(name, g, outputs) for name in node.input)
        if query is not None and key is not None:
            found.append((node, query, key))
    return found


def _coded(model: onnx.ModelProto, starts: list[str], widths: list[int], offset: float) -> onnx.ModelProto:
    """A copy in which each of ``starts`` holds its column number plus ``offset`` at every position."""
    coded = onnx.ModelProto()
    coded.CopyFrom(model)
    graph = coded.graph
    for start, width in zip(starts, widths):
        at, producer = next((k, node) for k, node in enumerate(graph.node) if start in node.output)
        raw = f"{start}__balance_raw"
        producer.output[list(producer.output).index(start)] = raw
        zero = numpy_helper.from_array(np.zeros((), np.float32), f"{start}__balance_zero")
        code = numpy_helper.from_array(np.arange(width, dtype=np.float32) + offset, f"{start}__balance_code")
        graph.initializer.extend([zero, code])
        zeroed = helper.make_node("Mul", [raw, zero.name], [f"{start}__balance_zeroed"])
        graph.node.insert(at + 1, helper.make_node("Add", [zeroed.output[0], code.name], [start]))
        graph.node.insert(at + 1, zeroed)
    return coded


def _columns(model: onnx.ModelProto, scores: list[onnx.NodeProto], starts: dict[str, int], feed: dict) -> dict:
    """Per score operand, the projection column at each of its elements (absent where the graph mixes columns)."""
    names = [name for score in scores for name in score.input]
    reads = []
    for offset in (1.0, 2.0):
        coded = _coded(model, list(starts), list(starts.values()), offset)
        try:
            reads.append(next(tensor_runs(coded, names, [feed])))
        except Exception:  # an optional step: a graph ORT cannot run coded keeps its scales
            return {}
    columns = {}
    for name in names:
        if name not in reads[0]:
            continue
        step = reads[1][name] - reads[0][name]
        if np.any(np.abs(step) < 1e-12):
            continue
        index = reads[0][name] / step - 1.0
        if np.abs(index - np.round(index)).max() <= 1e-3:
            columns[name] = np.round(index).astype(np.int64)
    return columns


def _pairs(query_columns: np.ndarray, key_columns: np.ndarray) -> np.ndarray | None:
    """(query column, key column) pairs the score MatMul multiplies, or None where they are not one-to-one."""
    if query_columns.ndim < 2 or key_columns.ndim < 2:
        return None
    q = np.moveaxis(query_columns, -2, 0)  # [T, .., d]: every row of a channel must come from one column
    k = np.moveaxis(key_columns, -1, 0)  # [T', .., d]
    if np.any(q != q[:1]) or np.any(k != k[:1]):
        return None
    try:
        q, k = np.broadcast_arrays(q[0], k[0])
    except ValueError:
        return None
    pairs = np.unique(np.stack([q.ravel(), k.ravel()], axis=1), axis=0)
    if len(np.unique(pairs[:, 0])) != len(pairs) or len(np.unique(pairs[:, 1])) != len(pairs):
        return None
    return pairs


def _sites(model: onnx.ModelProto, found: list[tuple], feed: dict) -> list[Site]:
    g = GraphIndex(model.graph)
    starts = {
        _projection_output(layer, g): to_rows(layer, load(model, layer.weight)).shape[0]
        for _, query, key in found
        for layer in (query, key)
    }
    columns = _columns(model, [score for score, _, _ in found], starts, feed)
    sites = []
    for score, query, key in found:
        if score.input[0] not in columns or score.input[1] not in columns:
            continue
        pairs = _pairs(columns[score.input[0]], columns[score.input[1]])
        if pairs is None or (query.name == key.name and np.intersect1d(pairs[:, 0], pairs[:, 1]).size):
            continue
        sites.append(Site(score, query, key, _projection_output(query, g), _projection_output(key, g), pairs))
    return sites


def _scale_columns(model: onnx.ModelProto, layer: WeightLayer, columns: np.ndarray, factors: np.ndarray) -> None:
    weight = load(model, layer.weight)
    rows = to_rows(layer, weight).astype(np.float64)
    rows[columns] *= factors[:, None]
    store(model, layer.weight, from_rows(layer, rows, weight.shape))
    if layer.bias is not None:
        bias = load(model, layer.bias).astype(np.float64)
        bias[columns] *= factors
        store(model, layer.bias, bias)


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    return run_feeds(make_session(model), [adapt_feed(model, feed) for feed in feeds])


def _same(reference: list[list[np.ndarray]], balanced: list[list[np.ndarray]]) -> bool:
    """Every float output within EXACT_RTOL of its scale (the pipeline's own tolerance rule), the rest identical."""
    return all(
        within_scaled_tolerance(ref, new, EXACT_RTOL, 1e-7) if ref.dtype.kind == "f" else np.array_equal(ref, new)
        for ref_run, new_run in zip(reference, balanced)
        for ref, new in zip(ref_run, new_run)
    )


def _factors(site: Site, ranges: dict[str, np.ndarray]) -> np.ndarray:
    """Per pair, the query's factor: the geometric mean of the two ranges over the query's range."""
    query_peak = ranges[site.query_output][site.pairs[:, 0]].astype(np.float64)
    key_peak = ranges[site.key_output][site.pairs[:, 1]].astype(np.float64)
    live = (query_peak > 0) & (key_peak > 0)
    factors = np.ones(len(site.pairs))
    factors[live] = np.clip(np.sqrt(key_peak[live] / query_peak[live]), 1.0 / LIMIT, LIMIT)
    return factors


def _apply(model: onnx.ModelProto, sites: list[Site], factors: list[np.ndarray]) -> onnx.ModelProto:
    balanced = onnx.ModelProto()
    balanced.CopyFrom(model)
    for site, factor in zip(sites, factors):
        _scale_columns(balanced, site.query, site.pairs[:, 0], factor)
        _scale_columns(balanced, site.key, site.pairs[:, 1], 1.0 / factor)
    return balanced


def balanced(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with its attention sites balanced on ``feeds``' ranges, how many were), or ``model``
    itself and 0. All sites are checked at once against the source's outputs, then one by one where that fails."""
    found = find_sites(model)
    sites = _sites(model, found, feeds[0]) if found and feeds else []
    if not sites:
        return model, 0
    ranges = dimension_absmax(model, sorted({name for s in sites for name in (s.query_output, s.key_output)}), feeds)
    factors = [_factors(site, ranges) for site in sites]
    check = feeds[:2]
    reference = _outputs(model, check)
    every = _apply(model, sites, factors)
    if _same(reference, _outputs(every, check)):
        return every, len(sites)
    kept = [k for k in range(len(sites)) if _same(reference, _outputs(_apply(model, [sites[k]], [factors[k]]), check))]
    return _apply(model, [sites[k] for k in kept], [factors[k] for k in kept]), len(kept)
