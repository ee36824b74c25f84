"""The accuracy quality gate: the compiled model scored against the source on the compile's data (exit 3 over
the budget). It runs inside the pipeline's retry, so a lossy pass that spent budget can yield it."""

from __future__ import annotations

from typing import Any

import onnx

from lepton_cli.errors import QualityGateError
from lepton_cli.evaluate.input_floor import noise_clause
from lepton_cli.pipeline.context import PassContext, budget_noise

NOT_MEASURED = {"measured": False, "reason": "no --eval or --calib data: accuracy not measured"}


class AccuracyGate:
    """The final accuracy check the pipeline runs inside its retry: the compiled model scored by the scorer the
    lossy passes used (``PassContext.scorer``), against the source; keeps the last measurement for the report."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.accuracy: dict[str, Any] = dict(NOT_MEASURED)

    def __call__(self, compiled: onnx.ModelProto) -> str | None:
        self.accuracy = measure_accuracy(compiled, self.ctx)
        return budget_failure(self.accuracy, self.ctx.accuracy_budget)


def measure_accuracy(compiled: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
    """Compiled vs source (``ctx.source``) on the compile's scoring data: every output, the worst one as the headline."""
    scorer, name = ctx.scorer()
    if scorer is None:
        return dict(NOT_MEASURED)
    score = scorer.score(compiled)
    floor = scorer.input_floor()  # how far input noise under half an 8-bit step moves the source (input_floor.py)
    arithmetic = (
        "exact integer (QDQ unfused): this x86 host's int8 kernels saturate (no VNNI), the target's do not"
        if scorer.opt_level != "all"
        else "as deployed (ORT, all optimisations)"
    )
    return {
        "measured": True,
        "data": name,
        "budget_pct": ctx.accuracy_budget,
        "arithmetic": arithmetic,
        "resolves_budget": score.resolution_pct <= ctx.accuracy_budget,  # a drop the size of the budget is visible
        "budget_noise_pct": round(budget_noise(score.resolution_pct, ctx.accuracy_budget), 4),  # its standard error
        **score.to_dict(),
        **({"input_floor": floor.to_dict()} if floor else {}),
    }


def budget_failure(accuracy: dict[str, Any], budget_pct: float) -> str | None:
    """Why ``accuracy`` fails the budget (the worst output over it), or None."""
    if not accuracy.get("measured") or accuracy["drop_pct"] <= budget_pct:
        return None
    where = f"output {accuracy['output']!r}: " if len(accuracy.get("outputs") or []) > 1 else ""
    floor = accuracy.get("input_floor")
    noise = f" ({noise_clause(floor)})" if floor and floor["drop_pct"] > budget_pct else ""
    return (
        f"accuracy dropped {accuracy['drop_pct']:.2f} points ({where}{accuracy['metric']} "
        f"{accuracy['source_value']:.2f}% → {accuracy['value']:.2f}% on {accuracy['data']} data), "
        f"over the budget of {budget_pct:g}{noise}"
    )


def check_accuracy_budget(accuracy: dict[str, Any], budget_pct: float) -> None:
    """The accuracy quality gate (exit 3): no output may lose more than ``budget_pct`` points."""
    failure = budget_failure(accuracy, budget_pct)
    if failure:
        raise QualityGateError(
            failure,
            "raise --max-accuracy-drop, give representative --calib data, or disable the lossy passes in a target file",
        )
