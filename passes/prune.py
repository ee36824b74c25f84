"""prune: exact dead-channel removal, unstructured magnitude, N:M (2:4) and structured output-channel
pruning of Conv/Gemm weights, each lossy mode bounded by a share of the accuracy budget.

Modes (``PruneParams.mode``):
* ``dead``: remove output channels that are identically zero where they are read (e.g. a Conv whose weights
  are zero and bias ≤ 0, followed by ReLU). Exact: the consumers lose only zero terms.
* ``magnitude``: zero the smallest-magnitude weights of each layer (unstructured).
* ``2:4``: keep the two largest of every four weights along the input channels, on layers the sparse
  Tensor Cores take.
* ``channel``: remove whole output channels of Conv/Gemm, ranked by their weight norms, so that weights
  and MACs really shrink.
The lossy modes search each layer's ratio against the compile's shared scorer (``_prune/search.py``)
within ``budget_share`` of the accuracy budget; without data they fall back to ``without_data``.
The machinery lives in ``passes/_prune/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import onnx
from lepton_cli.passes._prune.channel_mode import prune_channels
from lepton_cli.passes._prune.layer_table import channel_table, totals
from lepton_cli.passes._prune.scoring import samples_needed, search_scorer
from lepton_cli.passes._prune.weight_mode import prune_weights

from lepton_cli.evaluate.accuracy import AccuracyScore, Evaluator
from lepton_cli.model.channels.channel_groups import weights_as_initializers
from lepton_cli.model.op_traits import WEIGHT_OPS
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import LOSSY, BudgetUse, PassResult, register_pass, tolerance

NO_DATA = "needs --calib or --eval data to stay within the accuracy budget"
COARSE = "too coarse"  # data that cannot show a drop of prune's share: exact removal only


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
    budget_confidence: float = 0.8  # the combination's drop must meet the share at this one-sided confidence
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
        if not 0.5 <= self.budget_confidence < 1:
            raise ParamValueError("budget_confidence", f"must be in [0.5, 1), got {self.budget_confidence}")
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


@register_pass(
    "prune",
    params=PruneParams,
    description="remove dead channels exactly; magnitude, 2:4 or structured channel pruning within a share of the accuracy budget",
    exactness=LOSSY,
    order=20,
)
def prune(model: onnx.ModelProto, ctx: PassContext, params: PruneParams) -> PassResult:
    if params.mode == "none":
        return PassResult(model, {"mode": "none"})
    working = onnx.ModelProto()
    working.CopyFrom(model)
    weights_as_initializers(working)
    allowed = ctx.lossy_budget(params.budget_share)
    evaluator, data = _evaluator(working, ctx, params, allowed)
    mode = _effective_mode(params, evaluator, data, ctx)
    if mode is None:
        return PassResult(model, {"mode": params.mode, "applied": "none", "reason": "no data"})
    summary: dict[str, Any] = {
        "mode": mode,
        "requested_mode": params.mode,
        "data": data or None,
        "budget_pct": round(allowed, 4),
        "budget_share": params.budget_share,
    }
    result = _run_mode(working, ctx, params, mode, evaluator, allowed, summary)
    rows = channel_table(working, result, ctx.calib if ctx.calib is not None else ctx.eval, ctx.input_shapes)
    summary["layers"] = [
        r for r in rows if r["out_channels"][0] != r["out_channels"][1] or r["in_channels"][0] != r["in_channels"][1]
    ]
    summary["totals"] = totals(rows)
    final = None
    if evaluator is not None:  # on every scored sample: the ledger's entry, as the final gate will see it
        final = ctx.scorer()[0].score(result)
        summary["accuracy"] = final.to_dict()
    shrunk = summary["totals"]["params"][0] != summary["totals"]["params"][1]
    sparsified = mode in ("magnitude", "2:4") and summary["weights"]["pruned_layers"] > 0
    changed = result is not working and (shrunk or sparsified)
    budget_use = _budget_use(allowed, mode != "dead" and changed, final, ctx)
    # Exact in real arithmetic; a shorter reduction may round differently in ORT's blocked GEMM (a few ulp).
    dead_only = tolerance(rtol=1e-4, atol=1e-5) if mode == "dead" else None
    if not changed:
        return PassResult(model, summary | {"applied": "nothing to prune"}, exactness=dead_only, budget_use=budget_use)
    return PassResult(result, summary, exactness=dead_only, budget_use=budget_use)


def _evaluator(
    model: onnx.ModelProto, ctx: PassContext, params: PruneParams, allowed: float
) -> tuple[Evaluator | None, str]:
    """The compile's shared scorer (against the source, on the data the final gate scores), on its first
    ``max_samples`` samples (more where they cannot show a drop of ``allowed``) for the search's many measurements;
    None for the exact mode, without data, or where all of it cannot show such a drop (then ``COARSE``, warned: only
    exact removal, whatever ``without_data`` says)."""
    if params.mode == "dead" or not params.search:
        return None, ""
    scorer, data = ctx.scorer(model)
    if scorer is None:
        return None, ""
    evaluator = search_scorer(scorer, params.max_samples, allowed)
    if evaluator is None:
        ctx.warn(
            f"mode {params.mode!r}: the {scorer.count} scored samples show a drop no smaller than "
            f"{scorer.resolution_pct:.2g} points, coarser than prune's {allowed:g}-point share of the budget, so its "
            f"loss would be invisible; only exactly-dead channels were removed (give at least "
            f"{samples_needed(scorer, allowed)} --calib samples, or --eval)"
        )
        return None, COARSE
    return evaluator, data


def _effective_mode(params: PruneParams, evaluator: Evaluator | None, data: str, ctx: PassContext) -> str | None:
    """The mode to run: a lossy mode on data too coarse for its share removes dead channels only (warned where that
    was found), one that needs data it lacks follows ``without_data`` (None: skip the pass)."""
    if data == COARSE:
        return "dead"
    if params.mode == "dead" or evaluator is not None or not params.search or params.without_data == "apply":
        return params.mode
    if params.without_data == "skip":
        ctx.warn(f"mode {params.mode!r} {NO_DATA}; nothing pruned")
        return None
    ctx.warn(f"mode {params.mode!r} {NO_DATA}; only exactly-dead channels were removed")
    return "dead"


def _run_mode(
    working: onnx.ModelProto,
    ctx: PassContext,
    params: PruneParams,
    mode: str,
    evaluator: Evaluator | None,
    allowed: float,
    summary: dict[str, Any],
) -> onnx.ModelProto:
    """Run the mode's steps on ``working``; each step's summary goes into ``summary``."""
    result = working
    if mode in ("dead", "channel") or (params.remove_dead and mode in ("magnitude", "2:4")):
        ctx.progress("channel groups")
        alignment = ctx.target.hardware.channel_alignment if params.align_channels else 1
        lossy = mode == "channel"
        result, summary["channels"] = prune_channels(working, params, alignment, lossy, evaluator, allowed, ctx.warn)
    if mode in ("magnitude", "2:4"):
        ctx.progress("weight sparsity")
        result, summary["weights"] = prune_weights(result, params, mode == "2:4", evaluator, allowed, ctx.warn)
    return result


def _budget_use(allowed: float, lossy_change: bool, final: AccuracyScore | None, ctx: PassContext) -> BudgetUse:
    """The ledger's entry: exact or nothing pruned leaves the drop where it was; measured, what was measured;
    lossy but unmeasured (no search), the whole share."""
    if not lossy_change:
        return BudgetUse(allowed, ctx.source_drop)
    if final is not None:
        return BudgetUse(allowed, final.drop_pct, changed=True)
    return BudgetUse(allowed, allowed, changed=True)
