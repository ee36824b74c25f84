"""Where a refused int8 model loses its accuracy: each quantized op type kept float on its own, scored.

When no candidate meets the budget, the exit-3 list says what was tried, not where the loss sits. On a
full-integer target (tpu: ``max_float_layers = 0``) the search ranks no node at all, so a user has nothing to
act on. This scores the best fully quantized candidate again with every node of one op type kept float (the
search's own float-keeping: those nodes, and the quantization of their inputs, float; they read the float
reference), one op type at a time, most nodes first, within a time limit: where the int8 error enters that counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import onnx
from lepton_cli.passes._quantize.sensitivity import quantized_nodes

Build = Callable[[str, list[str]], onnx.ModelProto]
SECONDS = 60.0  # the diagnosis runs after the search already failed: bounded, and said when cut short
SHOWN = 3  # op types named in the one-line error
# An op type that takes back less of the drop is within the scores' noise: PP-OCRv5 det named GlobalAveragePool
# for 3.66 -> 3.54 (± 0.66), and a user would have kept it float for nothing.
MIN_SHARE = 0.1


@dataclass(frozen=True)
class OpTypeLoss:
    op_type: str
    nodes: int  # quantized nodes of this type kept float
    drop_pct: float  # the candidate's drop with them float


@dataclass(frozen=True)
class LossByOpType:
    candidate: str  # the candidate's label in the exit-3 list: method, with its tier's transform ("recovery:mse")
    drop_pct: float  # the fully quantized candidate's drop, every op type int8
    losses: list[OpTypeLoss]
    unscored: int  # op types the time limit left out

    def helpful(self) -> list[OpTypeLoss]:
        """The op types whose float copies take back at least ``MIN_SHARE`` of the drop, most first."""
        ceiling = (1 - MIN_SHARE) * self.drop_pct
        return sorted((loss for loss in self.losses if loss.drop_pct <= ceiling), key=lambda x: x.drop_pct)

    def clause(self) -> str:
        """The exit-3 line's "; where it is lost (...): Add (24 nodes) 0.71, ..." (ahead of what was tried); where no
        op type takes back ``MIN_SHARE`` of it, that the loss is spread; "" when no op type lowers it at all."""
        head = (
            f"; where it is lost ({self.candidate}, drop {self.drop_pct:.2f} with every op int8; the drop with one op "
            "type and its inputs kept float)"
        )
        cut = f"; {self.unscored} op types not scored (time limit)" if self.unscored else ""
        if helped := self.helpful():
            named = ", ".join(f"{loss.op_type} ({_nodes(loss.nodes)}) {loss.drop_pct:.2f}" for loss in helped[:SHOWN])
            return f"{head}: {named}{cut}"
        lower = [loss for loss in self.losses if loss.drop_pct < self.drop_pct]
        if not lower:
            return ""
        best = min(lower, key=lambda x: x.drop_pct)
        return (
            f"{head}: no one op type takes back {MIN_SHARE:.0%} of it (the closest, {best.op_type} ({_nodes(best.nodes)}), "
            f"leaves {best.drop_pct:.2f}): the loss is spread through the graph{cut}"
        )


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def loss_by_op_type(
    build: Build,
    before_lowering: Build,
    method: str,
    drop_pct: float,
    score: Callable[[onnx.ModelProto], float],
    progress: Callable[[str], None] | None = None,
    seconds: float = SECONDS,
    transform: str = "",
) -> LossByOpType:
    """``build``'s fully quantized ``method`` candidate (drop ``drop_pct``; ``transform``: its tier's source) scored
    with each op type kept float; node names come from ``before_lowering`` (the graph float-keeping names, as the
    search's ranking reads it)."""
    label = f"{transform}:{method}" if transform else method
    model = before_lowering(method, [])
    kinds = {node.name: node.op_type for node in model.graph.node}
    groups: dict[str, list[str]] = {}
    for name in quantized_nodes(model):
        groups.setdefault(kinds[name], []).append(name)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    deadline = time.perf_counter() + seconds
    losses: list[OpTypeLoss] = []
    for index, (op_type, names) in enumerate(ordered):
        if time.perf_counter() > deadline:
            return LossByOpType(label, drop_pct, losses, len(ordered) - index)
        drop = score(build(method, names))
        losses.append(OpTypeLoss(op_type, len(names), drop))
        if progress:
            progress(f"where it is lost: {op_type} ({len(names)} nodes) float: drop {drop:.2f}")
    return LossByOpType(label, drop_pct, losses, 0)
