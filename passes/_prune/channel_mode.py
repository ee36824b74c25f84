"""The dead and channel modes: which output channels each group keeps, within the budget, and the rewrite."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from lepton_cli.passes._prune.importance import channel_importance
from lepton_cli.passes._prune.options import PruneOptions
from lepton_cli.passes._prune.search import Unit, choose, explain
from lepton_cli.passes._prune.sparsity import node_name

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.model.channels.channel_groups import analyze
from lepton_cli.model.channels.dead_channels import aligned_keep, dead_channels
from lepton_cli.model.channels.groups import ChannelAnalysis
from lepton_cli.model.channels.surgery import apply_keep


def prune_channels(
    model: onnx.ModelProto,
    options: PruneOptions,
    alignment: int,
    lossy: bool,
    evaluator: Evaluator | None,
    allowed: float,
    warn: Callable[[str], None],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``model`` without its dead channels and (``lossy``) the channels the search chose, and the summary.
    Kept channel counts stay multiples of ``alignment``."""
    a = analyze(model)
    if options.mode == "2:4":  # dead-channel removal must not cost a layer its 2:4 qualification (in % 16)
        alignment = math.lcm(alignment, options.nm_in_multiple, options.nm_out_multiple)
    dead = dead_channels(a) if (options.remove_dead or not lossy) else {}
    keep = aligned_keep(a, dead, alignment)
    summary: dict[str, Any] = {
        "groups": len(a.groups()),
        "prunable_groups": len(a.prunable()),
        "channel_alignment": alignment,
        "dead_channels": {group_name(model, a, g): a.sizes[g] - len(k) for g, k in keep.items()},
    }
    if lossy:
        plan = ChannelPlan(model, a, keep, channel_importance(model, a, options.importance), options, alignment)
        units = plan.units()
        chosen, info = choose(units, plan.build, evaluator, allowed, options, warn)
        keep = plan.keep_for(chosen)
        summary["search"] = info
        summary["decisions"] = plan.decisions(units, chosen, info, allowed)
    result = apply_keep(model, a, keep) if keep else model
    return result, summary


@dataclass
class ChannelPlan:
    """Channel pruning of an analysed model on top of the dead channels already removed (``keep``)."""

    model: onnx.ModelProto
    a: ChannelAnalysis
    keep: dict[int, np.ndarray]
    importance: dict[int, np.ndarray]
    options: PruneOptions
    alignment: int

    def units(self) -> list[Unit]:
        """The prunable groups with at least one ratio that removes a channel and ``min_params`` weights."""
        units = []
        for g in self.a.prunable():
            alive = self.keep.get(g, np.arange(self.a.sizes[g]))
            cap = self._cap(g)
            levels = sorted({r for r in self.options.ratios if r <= cap and self._count(len(alive), r) < len(alive)})
            producers = self.a.producers_of(g)
            weights = sum(int(np.prod(_dims(self.model, p.weight))) for p in producers)
            if levels and weights >= self.options.min_params:
                op = self.model.graph.node[producers[0].node].op_type if producers else "?"
                units.append(Unit(str(g), op, levels))
        return units

    def keep_for(self, choice: dict[str, float]) -> dict[int, np.ndarray]:
        """Per group: the most important channels, as many as ``choice``'s ratio leaves."""
        result = dict(self.keep)
        for key, ratio in choice.items():
            g = int(key)
            alive = result.get(g, np.arange(self.a.sizes[g]))
            ranked = alive[np.argsort(-self.importance[g][alive], kind="stable")]
            result[g] = np.sort(ranked[: self._count(len(alive), ratio)])
        return result

    def build(self, choice: dict[str, float]) -> onnx.ModelProto:
        return apply_keep(self.model, self.a, self.keep_for(choice))

    def decisions(
        self, units: list[Unit], chosen: dict[str, float], info: dict[str, Any], allowed: float
    ) -> list[dict[str, Any]]:
        """Per unit, for the report: the ratio, channels before and after, and why."""
        keep = self.keep_for(chosen)
        rows = []
        for u in units:
            g = int(u.key)
            sens = {float(k): v for k, v in info.get("sensitivity", {}).get(u.key, {}).items()}
            why = (
                explain(sens, chosen.get(u.key), info.get("final_threshold", allowed), allowed)
                if "sensitivity" in info
                else info["note"]
            )
            rows.append(
                {
                    "group": group_name(self.model, self.a, g),
                    "ratio": chosen.get(u.key, 0.0),
                    "channels": [self.a.sizes[g], int(len(keep.get(g, range(self.a.sizes[g]))))],
                    "why": why,
                }
            )
        return rows

    def _count(self, size: int, ratio: float) -> int:
        """Channels kept of ``size`` at ``ratio``: at least ``min_channels``, rounded up to the alignment."""
        kept = max(self.options.min_channels, int(math.ceil(size * (1 - ratio))))
        if self.alignment > 1:
            kept = int(math.ceil(kept / self.alignment) * self.alignment)
        return min(size, kept)

    def _cap(self, g: int) -> float:
        """The largest ratio for group ``g``: the least of its producers' op caps; 0 if one is not pruned."""
        ops = {self.model.graph.node[p.node].op_type for p in self.a.producers_of(g)}
        if ops - set(self.options.op_types):
            return 0.0
        return min([self.options.max_ratio.get(op, max(self.options.ratios)) for op in ops] or [0.0])


def group_name(model: onnx.ModelProto, a: ChannelAnalysis, g: int) -> str:
    """The group's first producer's node name, with how many more produce it."""
    names = [node_name(model.graph.node[p.node]) for p in a.producers_of(g)]
    return names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "") if names else f"group{g}"


def _dims(model: onnx.ModelProto, name: str) -> list[int]:
    return next(list(t.dims) for t in model.graph.initializer if t.name == name)
