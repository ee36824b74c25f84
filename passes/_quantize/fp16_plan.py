"""fp16 compute and weights with fp32 graph I/O; activations beyond fp16's range on the data stay fp32, verified finite."""

from __future__ import annotations

from typing import Any

import onnx
from lepton_cli.passes._quantize import fp16_safe, schemes
from lepton_cli.passes._quantize.plan import SearchPlan, int8_weights
from lepton_cli.passes._quantize.tuning import SearchSpace

from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.pipeline.registry import BudgetUse, PassResult
from lepton_cli.samples.sample_set import SampleSet

PROBE_SAMPLES = 64  # data samples whose fp32 ranges decide what stays fp32 (and that the fp16 model must pass finite)


class Fp16Plan(SearchPlan):
    def __init__(self, block_ops: list[str], max_calib_samples: int):
        self.block_ops = list(block_ops)
        self.max_calib_samples = max_calib_samples

    def _probe_count(self, ctx: Any) -> int:
        data = ctx.calib if ctx.calib is not None else ctx.eval
        return min(len(data), PROBE_SAMPLES, self.max_calib_samples) if data is not None else 4

    def _convert(self, model: onnx.ModelProto, keep: list[str]) -> onnx.ModelProto:
        converted = schemes.to_fp16(model, self.block_ops, keep)
        fp16_safe.collapse_round_trip_casts(converted)
        return converted

    def _range_plan(self, model: onnx.ModelProto, ctx: Any) -> fp16_safe.Fp32Kept:
        """Which nodes stay fp32 so the fp16 model is finite on the calibration data (else the check feeds)."""
        feeds = ctx.sample_feeds(model, self._probe_count(ctx))
        if ctx.calib is not None or ctx.eval is not None:  # data is in the source layout (NCHW)
            feeds = [adapt_feed(model, feed) for feed in feeds]
        plan, _ = fp16_safe.plan_fp16(model, feeds, lambda keep: self._convert(model, keep))
        return plan

    def space(self, model: onnx.ModelProto, ctx: Any, calib: SampleSet, summary: dict[str, Any]) -> SearchSpace:
        plan = self._range_plan(model, ctx)
        overflow = plan.kept
        summary["fp16_range"] = {
            "probe_samples": self._probe_count(ctx),
            "beyond_range": len(plan.overflow),
            "nonfinite_in_fp16": plan.nonfinite,
            "rounds": plan.rounds,
            "finite": plan.finite,
        }
        if overflow:
            ctx.warn(f"{len(overflow)} node(s) produce values beyond fp16's range and stay fp32")
            summary["fp16_overflow_kept"] = overflow
        if not plan.finite:
            ctx.warn("the fp16 model still returns inf/NaN on the data after keeping overflowing nodes fp32")
        candidates = [n.name for n in model.graph.node if n.op_type not in self.block_ops and n.name not in overflow]

        def build(method: str, keep: list[str]) -> onnx.ModelProto:
            return self._convert(model, sorted(set(keep) | set(overflow)))

        return SearchSpace([build], ["fp16"], model, candidates=lambda _: candidates)

    def finish(
        self,
        source: onnx.ModelProto,
        result: onnx.ModelProto,
        ctx: Any,
        summary: dict[str, Any],
        budget_use: BudgetUse | None,
    ) -> PassResult:
        summary["int8_weights"] = int8_weights(result)
        return PassResult(result, summary, budget_use=budget_use)
