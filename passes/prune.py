"""prune: exact dead-channel removal, unstructured magnitude, N:M (2:4) and structured output-channel
pruning of Conv/Gemm weights, each lossy mode bounded by a share of the accuracy budget.

Modes (``PruneParams.mode``):
* ``dead``: remove output channels that are identically zero where they are read (e.g. a Conv
  whose weights are zero and bias ≤ 0, followed by ReLU; a BatchNormalization with gamma 0 and
  beta ≤ 0). Exact: the consumers lose only zero terms.
* ``magnitude``: zero the smallest-magnitude weights of each layer (unstructured); reports each
  layer's sparsity and the size a sparse encoding (values + a 1-bit mask) would take.
* ``2:4``: NVIDIA's N:M structured sparsity: in every four consecutive weights along the
  input-channel axis keep the two largest magnitudes, on layers whose shape the sparse Tensor
  Cores take (out % 8, in % 16, apex ASP's check).
* ``channel``: remove whole output channels of Conv/Gemm (groups from ``channel_groups``),
  ranked by the group's L1/L2 norm, so weights and MACs really shrink.
The lossy modes measure each layer's sensitivity (the accuracy drop with only that layer pruned,
per candidate ratio) with the compile's shared scorer (``PassContext.scorer``: against the source
model, on --eval or else held-out --calib, every output by its metric), pick per layer the largest
ratio whose drop fits a threshold, check the combination, and halve the threshold until the
combination fits ``budget_share`` of the accuracy budget (quantize, later in the pipeline, spends
the rest of the same ledger). Without data they fall back
to ``without_data`` (by default: dead channels only, with a warning), never guessing.

Libraries checked: onnx, onnxsim, onnx-ir and ONNX Runtime have no pruning; ORT's quantization
tools none; Intel Neural Compressor and Olive prune PyTorch modules only (INC's pattern names
``NxM``/``channelx1`` and apex ASP's 2:4 mask along the input axis are what we follow).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import onnx
from lepton_cli.passes._prune import channel_groups as cg
from onnx import numpy_helper

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs
from lepton_cli.model.stats import _shape_map, node_macs
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import LOSSY, PassResult, register_pass, tolerance

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
THRESHOLD_ROUNDS = 6  # halvings of the per-layer threshold before giving up on lossy pruning


@dataclass(frozen=True)
class PruneParams:
    mode: Literal["none", "dead", "magnitude", "2:4", "channel"] = "dead"
    # Candidate per-layer ratios the search tries (channel: share of output channels removed;
    # magnitude: sparsity). 2:4 has the one ratio 0.5.
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Per op type cap on the ratio (e.g. {Conv = 0.5, Gemm = 0.75}); types not listed: max(ratios).
    max_ratio: dict[str, float] = field(default_factory=dict)
    op_types: list[str] = field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    search: bool = True  # False: apply each layer's cap without measuring (for users who fine-tune later)
    budget_share: float = 0.5  # share of the accuracy budget pruning may spend; quantize gets the rest
    max_samples: int = 64  # samples per accuracy measurement during the search
    min_channels: int = 8  # never prune a channel group below this
    align_channels: bool = True  # keep channel counts multiples of the target's channel_alignment
    importance: Literal["l1", "l2"] = "l2"
    min_params: int = 2048  # smaller layers are left alone: little to gain, often sensitive (first conv)
    remove_dead: bool = True  # also remove exactly-dead channels in the lossy modes
    refine: bool = True  # after the threshold search, raise single layers one step while the whole still fits
    time_limit_s: float = 300.0  # search time; layers not measured by then stay unpruned (reported, warned)
    nm_out_multiple: int = 8  # 2:4 qualifies only out % 8 == 0 and in % 16 == 0 (apex ASP, fp16 spMMA)
    nm_in_multiple: int = 16
    without_data: Literal["dead", "apply", "skip"] = "dead"  # lossy mode but no --calib/--eval data

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ParamValueError("ratios", f"each ratio must be in (0, 1), got {self.ratios}")
        for op, r in self.max_ratio.items():
            if not 0 <= r < 1:
                raise ParamValueError("max_ratio", f"{op} = {r} must be in [0, 1)")
        if not 0 < self.budget_share <= 1:
            raise ParamValueError("budget_share", f"must be in (0, 1], got {self.budget_share}")
        if self.time_limit_s <= 0:
            raise ParamValueError("time_limit_s", f"must be > 0, got {self.time_limit_s}")
        if self.max_samples < 1:
            raise ParamValueError("max_samples", "must be >= 1")
        if self.min_channels < 1:
            raise ParamValueError("min_channels", "must be >= 1")
        unknown = sorted(set(self.op_types) - set(WEIGHT_OPS))
        if unknown:
            raise ParamValueError("op_types", f"unknown op type {unknown[0]!r}; choose from {', '.join(WEIGHT_OPS)}")
        if self.nm_out_multiple < 1 or self.nm_in_multiple < 4 or self.nm_in_multiple % 4:
            raise ParamValueError("nm_in_multiple", "must be a positive multiple of 4 (and nm_out_multiple >= 1)")


# ---- weight-level helpers -------------------------------------------------------------------


def nm_mask(weight: np.ndarray, axis: int, n: int = 2, m: int = 4) -> np.ndarray:
    """Keep the ``n`` largest magnitudes in each run of ``m`` consecutive weights along ``axis``."""
    moved = np.moveaxis(weight, axis, -1)
    groups = np.abs(moved).reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def magnitude_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``sparsity`` share of smallest magnitudes (ties broken by position, deterministic)."""
    flat = np.abs(weight).reshape(-1)
    drop = int(math.floor(sparsity * flat.size))
    mask = np.ones(flat.size, bool)
    if drop:
        mask[np.argsort(flat, kind="stable")[:drop]] = False
    return mask.reshape(weight.shape)


def sparse_bytes(weight: np.ndarray) -> int:
    """Bytes of a bitmask encoding: the nonzero values plus one bit per weight."""
    return int(np.count_nonzero(weight)) * weight.dtype.itemsize + (weight.size + 7) // 8


def input_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The weight axis that runs over the layer's input channels (the reduction axis)."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        return 1 if cg._attr(node, "transB", 0) else 0
    return weight.ndim - 2  # MatMul B: [..., K, N]


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


@dataclass
class WeightLayer:
    """A prunable constant weight (magnitude / 2:4 modes)."""

    name: str  # node name
    op: str
    weight: str
    in_axis: int
    shape: list[int]


def weight_layers(
    model: onnx.ModelProto, params: PruneParams, nm: bool
) -> tuple[list[WeightLayer], list[dict[str, Any]]]:
    """Layers the mode may prune, and the skipped ones with the reason (for the report)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers, skipped, seen = [], [], set()
    for node in model.graph.node:
        if node.op_type not in params.op_types or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm" and cg._attr(node, "transA", 0):
            continue
        tensor = inits[node.input[1]]
        shape = list(tensor.dims)
        reason = None
        if node.input[1] in seen:
            reason = "weight shared with another layer"
        elif int(np.prod(shape)) < params.min_params:
            reason = f"{int(np.prod(shape))} weights < min_params {params.min_params}"
        elif tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            reason = "not a float weight"
        elif len(shape) < 2:
            reason = "not a matrix or kernel"
        weight = np.zeros(shape, np.float32) if reason is None else None
        axis = input_axis(node, weight) if weight is not None else 0
        if reason is None and nm:
            group = cg._attr(node, "group", 1)
            out_axis = {"Conv": 0, "ConvTranspose": 1}.get(
                node.op_type, 1 - axis if len(shape) == 2 else len(shape) - 1
            )
            if node.op_type in ("Conv", "ConvTranspose") and group != 1:
                reason = "grouped/depthwise convolution (no sparse Tensor Core kernel)"
            elif shape[axis] % params.nm_in_multiple or shape[out_axis] % params.nm_out_multiple:
                reason = (
                    f"input channels {shape[axis]} not a multiple of {params.nm_in_multiple} or output "
                    f"channels {shape[out_axis]} not a multiple of {params.nm_out_multiple}"
                )
        if reason:
            skipped.append({"layer": _node_name(node), "op": node.op_type, "shape": shape, "reason": reason})
            continue
        seen.add(node.input[1])
        layers.append(WeightLayer(_node_name(node), node.op_type, node.input[1], axis, shape))
    return layers, skipped


def apply_weights(
    model: onnx.ModelProto, layers: dict[str, WeightLayer], choice: dict[str, float], nm: bool
) -> onnx.ModelProto:
    """A copy of ``model`` with the chosen layers sparsified (2:4 if ``nm``, else magnitude)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {t.name: t for t in result.graph.initializer}
    for key, ratio in choice.items():
        if ratio <= 0:
            continue
        layer = layers[key]
        tensor = inits[layer.weight]
        weight = tensor_array(tensor)
        mask = nm_mask(weight, layer.in_axis) if nm else magnitude_mask(weight, ratio)
        tensor.CopyFrom(numpy_helper.from_array(np.where(mask, weight, np.zeros_like(weight)), layer.weight))
    return result


# ---- the budgeted search ------------------------------------------------------------------


@dataclass
class Unit:
    key: str
    op: str
    levels: list[float]  # ascending candidate ratios


def search(
    units: list[Unit],
    build: Callable[[dict[str, float]], onnx.ModelProto],
    evaluator: Evaluator,
    allowed: float,
    refine: bool = True,
    time_limit_s: float = math.inf,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer sensitivity, then the largest ratios whose drops fit a threshold, halving it until
    the combination's measured drop is within ``allowed`` points; then (``refine``) raise single
    layers one ratio step while the combination still fits."""
    deadline = time.perf_counter() + time_limit_s
    sensitivity: dict[str, dict[float, float]] = {}
    unmeasured = []
    for unit in units:
        if time.perf_counter() > deadline:
            unmeasured.append(unit.key)
            continue
        sensitivity[unit.key] = {}
        for level in unit.levels:
            drop = evaluator.score(build({unit.key: level})).drop_pct
            sensitivity[unit.key][level] = drop
            if drop > allowed:  # larger ratios only hurt more: stop measuring this layer
                break
    threshold, rounds, chosen, combined = allowed, [], {}, None
    for _ in range(THRESHOLD_ROUNDS):
        chosen = {}
        for unit in units:
            fits = [lv for lv, d in sensitivity.get(unit.key, {}).items() if d <= threshold]
            if fits:
                chosen[unit.key] = max(fits)
        if not chosen:
            rounds.append({"threshold": threshold, "layers": 0, "drop": 0.0})
            break
        combined = evaluator.score(build(chosen))
        rounds.append({"threshold": round(threshold, 4), "layers": len(chosen), "drop": combined.drop_pct})
        if combined.drop_pct <= allowed:
            break
        threshold = threshold / 2 if threshold > 0 else -1.0
        if threshold < 0:
            chosen = {}
            break
        if threshold < allowed / 2 ** (THRESHOLD_ROUNDS - 2):
            threshold = 0.0  # last try: only layers whose pruning alone changed nothing measurable
    else:
        chosen = {}
    if combined is not None and chosen and combined.drop_pct > allowed:
        chosen = {}
    refined: list[dict[str, Any]] = []
    if refine and combined is not None:
        # Greedy: one step up for each layer whose next ratio fit the budget alone, least sensitive first,
        # kept when the whole combination still fits (one measurement per layer at most).
        steps = []
        for unit in units:
            higher = [
                (d, lv)
                for lv, d in sensitivity.get(unit.key, {}).items()
                if lv > chosen.get(unit.key, 0.0) and d <= allowed
            ]
            if higher:
                d, lv = min(higher, key=lambda item: item[1])
                steps.append((d, unit.key, lv))
        for d, key, level in sorted(steps):
            if time.perf_counter() > deadline:
                break
            trial = dict(chosen) | {key: level}
            score = evaluator.score(build(trial))
            if score.drop_pct <= allowed:
                chosen, combined = trial, score
                refined.append({"layer": key, "ratio": level, "combined_drop": score.drop_pct})
    return chosen, {
        "sensitivity": {k: {str(lv): d for lv, d in v.items()} for k, v in sensitivity.items()},
        "rounds": rounds,
        "final_threshold": threshold,
        "refined": refined,
        "unmeasured": unmeasured,
        "combined": combined.to_dict() if combined is not None and chosen else None,
    }


def _why(unit: Unit, sens: dict[float, float], chosen: float | None, threshold: float) -> str:
    tried = ", ".join(f"{lv:g}→{d:+.2f}" for lv, d in sens.items())
    if chosen and sens.get(chosen, math.inf) > threshold:
        return (
            f"raised to {chosen:g} by the greedy step: the combination still fit the budget (ratio→drop alone: {tried})"
        )
    if chosen:
        return f"largest ratio whose drop alone fits {threshold:.3g} pts (ratio→drop: {tried})"
    return (
        f"every ratio over {threshold:.3g} pts alone (ratio→drop: {tried})"
        if sens
        else "not measured (search time limit)"
    )


# ---- the pass -----------------------------------------------------------------------------


def _evaluator(model: onnx.ModelProto, ctx: Any, params: PruneParams) -> tuple[Evaluator | None, str]:
    """The compile's shared scorer (against the source, on the data the final gate scores), on its first
    ``max_samples`` samples for the search's many measurements."""
    scorer, data = ctx.scorer(model)
    if scorer is None:
        return None, ""
    return scorer.subset(params.max_samples), data


def _macs_by_output(model: onnx.ModelProto, ctx: Any) -> dict[str, int | None]:
    """MACs per Conv/Gemm/MatMul node, keyed by its first output; dynamic batch bound to 1."""
    shapes = {}
    samples = ctx.calib if ctx.calib is not None else ctx.eval
    for sig in graph_inputs(model):
        if not sig.is_static:
            known = (samples.shapes().get(sig.name) if samples is not None else None) or ctx.input_shapes.get(sig.name)
            if known:
                shapes[sig.name] = list(known)
            elif all(isinstance(d, int) for d in sig.dims[1:]):
                shapes[sig.name] = [1, *sig.dims[1:]]
    try:
        bound = bind_input_shapes(model, shapes) if shapes else model
    except Exception:
        bound = model
    smap = _shape_map(bound)
    return {n.output[0]: node_macs(n, smap) for n in bound.graph.node if n.op_type in WEIGHT_OPS}


def _params_of(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(int(np.prod(inits[i].dims)) for i in node.input[1:] if i in inits)


def _align(params: PruneParams, ctx: Any) -> int:
    return ctx.target.hardware.channel_alignment if params.align_channels else 1


def _keep_count(size: int, ratio: float, params: PruneParams, align: int) -> int:
    keep = max(params.min_channels, int(math.ceil(size * (1 - ratio))))
    if align > 1:
        keep = int(math.ceil(keep / align) * align)
    return min(size, keep)


def _dead_keep(a: cg.ChannelAnalysis, dead: dict[int, np.ndarray], align: int) -> dict[int, np.ndarray]:
    """Keep everything but the dead channels, removing only as many as keep the count aligned."""
    keep = {}
    for g, idx in dead.items():
        size = a.sizes[g]
        remaining = size - len(idx)
        if align > 1 and remaining % align:
            remaining = min(size, int(math.ceil(remaining / align) * align))
        removable = size - remaining
        if remaining < 1 or removable <= 0:
            continue
        gone = set(idx[:removable].tolist())
        keep[g] = np.array([c for c in range(size) if c not in gone], np.int64)
    return keep


def _group_name(model: onnx.ModelProto, a: cg.ChannelAnalysis, g: int) -> str:
    names = [_node_name(model.graph.node[p.node]) for p in a.producers if a.find(a.layouts[p.output][0].group) == g]
    return names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "") if names else f"group{g}"


def _channel_table(before: onnx.ModelProto, after: onnx.ModelProto, ctx: Any) -> list[dict[str, Any]]:
    """Per Conv/Gemm/MatMul: channels, params and MACs before and after."""
    macs_b, macs_a = _macs_by_output(before, ctx), _macs_by_output(after, ctx)
    inits_a = {t.name: t for t in after.graph.initializer}
    inits_b = {t.name: t for t in before.graph.initializer}
    rows = []
    for nb, na in zip(before.graph.node, after.graph.node):
        if nb.op_type not in WEIGHT_OPS or len(nb.input) < 2 or nb.input[1] not in inits_b:
            continue
        wb, wa = list(inits_b[nb.input[1]].dims), list(inits_a[na.input[1]].dims)
        out_axis = {"Conv": 0, "ConvTranspose": 1}.get(nb.op_type, 0 if cg._attr(nb, "transB", 0) else len(wb) - 1)
        in_axis = input_axis(nb, np.zeros(wb))
        rows.append(
            {
                "layer": _node_name(nb),
                "op": nb.op_type,
                "out_channels": [wb[out_axis], wa[out_axis]],
                "in_channels": [wb[in_axis], wa[in_axis]],
                "params": [_params_of(before, nb), _params_of(after, na)],
                "macs": [macs_b.get(nb.output[0]), macs_a.get(na.output[0])],
            }
        )
    return rows


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str, i: int) -> int | None:
        vals = [r[key][i] for r in rows]
        return None if any(v is None for v in vals) else int(sum(vals))

    return {"params": [total("params", 0), total("params", 1)], "macs": [total("macs", 0), total("macs", 1)]}


def _prune_channels(
    model: onnx.ModelProto, ctx: Any, params: PruneParams, lossy: bool, evaluator: Evaluator | None, allowed: float
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    a = cg.analyze(model)
    align = _align(params, ctx)
    if params.mode == "2:4":  # dead-channel removal must not cost a layer its 2:4 qualification (in % 16)
        align = math.lcm(align, params.nm_in_multiple, params.nm_out_multiple)
    dead = cg.dead_channels(a) if (params.remove_dead or not lossy) else {}
    base_keep = _dead_keep(a, dead, align)
    summary: dict[str, Any] = {
        "groups": len(a.groups()),
        "prunable_groups": len(a.prunable()),
        "channel_alignment": align,
        "dead_channels": {_group_name(model, a, g): a.sizes[g] - len(k) for g, k in base_keep.items()},
    }
    keep = dict(base_keep)
    if lossy:
        importance = cg.channel_importance(model, a, params.importance)
        cap_of = {g: _group_cap(model, a, g, params) for g in a.prunable()}
        units = []
        for g in a.prunable():
            alive = keep.get(g, np.arange(a.sizes[g]))
            levels = sorted(
                {r for r in params.ratios if r <= cap_of[g] and _keep_count(len(alive), r, params, align) < len(alive)}
            )
            producers = [p for p in a.producers if a.find(a.layouts[p.output][0].group) == g]
            weights = sum(int(np.prod(_dims(model, p.weight))) for p in producers)
            if levels and weights >= params.min_params:
                units.append(Unit(str(g), model.graph.node[producers[0].node].op_type if producers else "?", levels))

        def keep_for(choice: dict[str, float]) -> dict[int, np.ndarray]:
            result = dict(keep)
            for key, ratio in choice.items():
                g = int(key)
                alive = result.get(g, np.arange(a.sizes[g]))
                count = _keep_count(len(alive), ratio, params, align)
                ranked = alive[np.argsort(-importance[g][alive], kind="stable")]
                result[g] = np.sort(ranked[:count])
            return result

        def build(choice: dict[str, float]) -> onnx.ModelProto:
            return cg.apply_keep(model, a, keep_for(choice))

        chosen, info = _choose(units, build, evaluator, allowed, params, ctx)
        keep = keep_for(chosen)
        summary["search"] = info
        summary["decisions"] = []
        for u in units:
            g = int(u.key)
            sens = {float(k): v for k, v in info.get("sensitivity", {}).get(u.key, {}).items()}
            why = (
                _why(u, sens, chosen.get(u.key), info.get("final_threshold", allowed))
                if "sensitivity" in info
                else info["note"]
            )
            summary["decisions"].append(
                {
                    "group": _group_name(model, a, g),
                    "ratio": chosen.get(u.key, 0.0),
                    "channels": [a.sizes[g], int(len(keep.get(g, range(a.sizes[g]))))],
                    "why": why,
                }
            )
    result = cg.apply_keep(model, a, keep) if keep else model
    return result, summary


def _dims(model: onnx.ModelProto, name: str) -> list[int]:
    return next(list(t.dims) for t in model.graph.initializer if t.name == name)


def _group_cap(model: onnx.ModelProto, a: cg.ChannelAnalysis, g: int, params: PruneParams) -> float:
    ops = {model.graph.node[p.node].op_type for p in a.producers if a.find(a.layouts[p.output][0].group) == g}
    if ops - set(params.op_types):
        return 0.0
    return min([params.max_ratio.get(op, max(params.ratios)) for op in ops] or [0.0])


def _choose(
    units: list[Unit],
    build: Callable[[dict[str, float]], onnx.ModelProto],
    evaluator: Evaluator | None,
    allowed: float,
    params: PruneParams,
    ctx: Any,
) -> tuple[dict[str, float], dict[str, Any]]:
    if not units:
        return {}, {"note": "no layer qualifies"}
    if not params.search or evaluator is None:
        chosen = {u.key: max(u.levels) for u in units}
        return chosen, {
            "note": "search disabled: each layer's cap applied without measuring"
            if not params.search
            else "no data: each layer's cap applied without measuring (without_data = 'apply')"
        }
    chosen, info = search(units, build, evaluator, allowed, params.refine, params.time_limit_s)
    if info["unmeasured"]:
        ctx.warn(
            f"search time limit ({params.time_limit_s:g} s) reached: {len(info['unmeasured'])} of {len(units)} layers "
            "not measured and left unpruned; raise time_limit_s or lower max_samples"
        )
    return chosen, info


def _prune_weights(
    model: onnx.ModelProto, ctx: Any, params: PruneParams, nm: bool, evaluator: Evaluator | None, allowed: float
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    layers, skipped = weight_layers(model, params, nm)
    by_key = {layer.name: layer for layer in layers}
    units = []
    for layer in layers:
        levels = (
            [0.5]
            if nm
            else sorted({r for r in params.ratios if r <= params.max_ratio.get(layer.op, max(params.ratios))})
        )
        if levels:
            units.append(Unit(layer.name, layer.op, levels))
    chosen, info = _choose(units, lambda c: apply_weights(model, by_key, c, nm), evaluator, allowed, params, ctx)
    result = apply_weights(model, by_key, chosen, nm)
    inits_b = {t.name: t for t in model.graph.initializer}
    inits_a = {t.name: t for t in result.graph.initializer}
    rows = []
    for u in units:
        layer = by_key[u.key]
        wb, wa = tensor_array(inits_b[layer.weight]), tensor_array(inits_a[layer.weight])
        sens = {float(k): v for k, v in info.get("sensitivity", {}).get(u.key, {}).items()}
        rows.append(
            {
                "layer": layer.name,
                "op": layer.op,
                "weight": layer.weight,
                "shape": layer.shape,
                "pattern": "2:4 along input channels" if nm else "unstructured",
                "sparsity": [
                    round(1 - np.count_nonzero(wb) / wb.size, 4),
                    round(1 - np.count_nonzero(wa) / wa.size, 4),
                ],
                "bytes": [int(wb.nbytes), int(wa.nbytes)],
                "sparse_bytes": sparse_bytes(wa),
                "why": _why(u, sens, chosen.get(u.key), info.get("final_threshold", allowed))
                if sens
                else info.get("note", ""),
            }
        )
    dense = sum(r["bytes"][1] for r in rows if r["sparsity"][1] > 0)
    compressed = sum(r["sparse_bytes"] for r in rows if r["sparsity"][1] > 0)
    return result, {
        "layers": rows,
        "skipped": skipped,
        "search": info,
        "pruned_layers": sum(1 for r in rows if r["sparsity"][1] > r["sparsity"][0]),
        "pruned_dense_bytes": dense,
        "pruned_sparse_bytes": compressed,
    }


@register_pass(
    "prune",
    params=PruneParams,
    description="remove dead channels exactly; magnitude, 2:4 or structured channel pruning within a share of the accuracy budget",
    exactness=LOSSY,
    order=20,
)
def prune(model: onnx.ModelProto, ctx: Any, params: PruneParams) -> PassResult:
    if params.mode == "none":
        return PassResult(model, {"mode": "none"})
    working = onnx.ModelProto()
    working.CopyFrom(model)
    cg.constants_to_initializers(working)
    mode, lossy = params.mode, params.mode != "dead"
    evaluator, data = (None, "")
    allowed = ctx.lossy_budget(params.budget_share)
    if lossy:
        evaluator, data = _evaluator(working, ctx, params) if params.search else (None, "")
        if evaluator is None and params.search:
            if params.without_data == "skip":
                ctx.warn(
                    f"mode {mode!r} needs --calib or --eval data to stay within the accuracy budget; nothing pruned"
                )
                return PassResult(model, {"mode": mode, "applied": "none", "reason": "no data"})
            if params.without_data == "dead":
                ctx.warn(
                    f"mode {mode!r} needs --calib or --eval data to stay within the accuracy budget; "
                    "only exactly-dead channels were removed"
                )
                mode, lossy = "dead", False
    summary: dict[str, Any] = {
        "mode": mode,
        "requested_mode": params.mode,
        "data": data or None,
        "budget_pct": round(allowed, 4),
        "budget_share": params.budget_share,
    }
    result = working
    if mode in ("dead", "channel") or (params.remove_dead and mode in ("magnitude", "2:4")):
        result, info = _prune_channels(working, ctx, params, mode == "channel", evaluator, allowed)
        summary["channels"] = info
    if mode in ("magnitude", "2:4"):
        result, info = _prune_weights(result, ctx, params, mode == "2:4", evaluator, allowed)
        summary["weights"] = info
    rows = _channel_table(working, result, ctx)
    summary["layers"] = [
        r for r in rows if r["out_channels"][0] != r["out_channels"][1] or r["in_channels"][0] != r["in_channels"][1]
    ]
    summary["totals"] = _totals(rows)
    final = None
    if evaluator is not None:
        final = ctx.scorer()[0].score(
            result
        )  # on every scored sample: the ledger's entry, as the final gate will see it
        summary["accuracy"] = final.to_dict()
    shrunk = summary["totals"]["params"][0] != summary["totals"]["params"][1]
    sparsified = mode in ("magnitude", "2:4") and summary["weights"]["pruned_layers"] > 0
    changed = result is not working and (shrunk or sparsified)
    if not lossy or not changed:  # exact dead-channel removal, or nothing pruned: the ledger is unchanged
        ctx.spent(allowed, ctx.source_drop)
    elif final is not None:
        ctx.spent(allowed, final.drop_pct)
    else:  # lossy but unmeasured (no search): assume it spent its share
        ctx.spent(allowed, allowed)
    # Dead-channel removal is exact in real arithmetic; a shorter reduction may round differently
    # in ORT's blocked GEMM (a few ulp), hence a tight tolerance rather than bit-identity.
    dead_only = tolerance(rtol=1e-4, atol=1e-5) if mode == "dead" else None
    if not changed:
        return PassResult(model, summary | {"applied": "nothing to prune"}, exactness=dead_only)
    return PassResult(result, summary, exactness=dead_only)
