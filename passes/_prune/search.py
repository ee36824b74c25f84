"""The budgeted search: how much to prune each layer so that the whole stays within the accuracy budget.

Each layer's sensitivity is the measured drop with only that layer pruned, per candidate ratio; each layer
takes the largest ratio whose drop fits a threshold, the combination is measured, and the threshold halves
until the combination fits the budget; then single layers are raised one step while the whole still fits.
A combination fits when its drop plus ``z`` standard errors does (quantize holds the same bound): a small
scoring set reads a point estimate that a search filling its share on it overshoots on other data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable

import onnx
from lepton_cli.passes._prune.options import PruneOptions

from lepton_cli.evaluate.accuracy import AccuracyScore, Evaluator

THRESHOLD_ROUNDS = 6  # halvings of the per-layer threshold before giving up on lossy pruning

Build = Callable[[dict[str, float]], onnx.ModelProto]
Sensitivity = dict[str, dict[float, float]]  # layer key -> ratio -> drop with only that layer pruned


@dataclass
class Unit:
    """A layer (or channel group) the search decides on, with its candidate ratios."""

    key: str
    op: str
    levels: list[float]  # ascending candidate ratios


def choose(
    units: list[Unit],
    build: Build,
    evaluator: Evaluator | None,
    allowed: float,
    options: PruneOptions,
    warn: Callable[[str], None],
) -> tuple[dict[str, float], dict[str, Any]]:
    """Each unit's ratio: searched within ``allowed`` when there is data, else each unit's largest."""
    if not units:
        return {}, {"note": "no layer qualifies"}
    if not options.search or evaluator is None:
        chosen = {u.key: max(u.levels) for u in units}
        return chosen, {
            "note": "search disabled: each layer's cap applied without measuring"
            if not options.search
            else "no data: each layer's cap applied without measuring (without_data = 'apply')"
        }
    z = NormalDist().inv_cdf(options.budget_confidence)
    chosen, info = search(units, build, evaluator, allowed, options.refine, options.time_limit_s, z)
    if info["unmeasured"]:
        warn(
            f"search time limit ({options.time_limit_s:g} s) reached: {len(info['unmeasured'])} of {len(units)} "
            "layers not measured and left unpruned; raise time_limit_s or lower max_samples"
        )
    return chosen, info


def search(
    units: list[Unit],
    build: Build,
    evaluator: Evaluator,
    allowed: float,
    refine: bool = True,
    time_limit_s: float = math.inf,
    z: float = 0.0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer sensitivity, then the largest ratios whose drops fit a threshold, halving it until
    the combination's drop plus ``z`` standard errors is within ``allowed`` points; then (``refine``)
    raise single layers one ratio step while the combination still fits."""
    deadline = time.perf_counter() + time_limit_s
    sensitivity, unmeasured = _sensitivity(units, build, evaluator, allowed, deadline)
    fits = _Fits(allowed, z)
    chosen, combined, threshold, rounds = _threshold_rounds(units, sensitivity, build, evaluator, fits)
    refined: list[dict[str, Any]] = []
    if refine and combined is not None:
        chosen, combined, refined = _refine(units, sensitivity, chosen, combined, build, evaluator, fits, deadline)
    return chosen, {
        "sensitivity": {k: {str(lv): d for lv, d in v.items()} for k, v in sensitivity.items()},
        "rounds": rounds,
        "final_threshold": threshold,
        "refined": refined,
        "unmeasured": unmeasured,
        "combined": combined.to_dict() if combined is not None and chosen else None,
    }


@dataclass(frozen=True)
class _Fits:
    """A combination's test: its drop plus ``z`` standard errors within ``allowed`` (z = 0: the drop itself)."""

    allowed: float
    z: float

    def __call__(self, score: AccuracyScore) -> bool:
        return score.drop_bound(self.z, self.allowed) <= self.allowed


def _sensitivity(
    units: list[Unit], build: Build, evaluator: Evaluator, allowed: float, deadline: float
) -> tuple[Sensitivity, list[str]]:
    """Each unit's drop alone per ratio, and the units the time limit left unmeasured."""
    sensitivity: Sensitivity = {}
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
    return sensitivity, unmeasured


def _threshold_rounds(
    units: list[Unit], sensitivity: Sensitivity, build: Build, evaluator: Evaluator, fits: _Fits
) -> tuple[dict[str, float], AccuracyScore | None, float, list[dict[str, Any]]]:
    """(chosen ratios, their combined score, the last threshold, one entry per round) of the halving search."""
    allowed = fits.allowed
    threshold, rounds, chosen, combined = allowed, [], {}, None
    for _ in range(THRESHOLD_ROUNDS):
        chosen = {}
        for unit in units:
            under = [lv for lv, d in sensitivity.get(unit.key, {}).items() if d <= threshold]
            if under:
                chosen[unit.key] = max(under)
        if not chosen:
            rounds.append({"threshold": threshold, "layers": 0, "drop": 0.0})
            break
        combined = evaluator.score(build(chosen))
        bound = round(combined.drop_bound(fits.z, fits.allowed), 4)
        rounds.append(
            {"threshold": round(threshold, 4), "layers": len(chosen), "drop": combined.drop_pct}
            | ({"drop_bound": bound} if fits.z else {})
        )
        if fits(combined):
            break
        threshold = threshold / 2 if threshold > 0 else -1.0
        if threshold < 0:
            chosen = {}
            break
        if threshold < allowed / 2 ** (THRESHOLD_ROUNDS - 2):
            threshold = 0.0  # last try: only layers whose pruning alone changed nothing measurable
    else:
        chosen = {}
    if combined is not None and chosen and not fits(combined):
        chosen = {}
    return chosen, combined, threshold, rounds


def _refine(
    units: list[Unit],
    sensitivity: Sensitivity,
    chosen: dict[str, float],
    combined: AccuracyScore,
    build: Build,
    evaluator: Evaluator,
    fits: _Fits,
    deadline: float,
) -> tuple[dict[str, float], AccuracyScore, list[dict[str, Any]]]:
    """Greedy: one step up for each layer whose next ratio fit the budget alone, least sensitive first,
    kept when the whole combination still fits (one measurement per layer at most)."""
    steps = []
    for unit in units:
        higher = [
            (d, lv)
            for lv, d in sensitivity.get(unit.key, {}).items()
            if lv > chosen.get(unit.key, 0.0) and d <= fits.allowed
        ]
        if higher:
            d, lv = min(higher, key=lambda item: item[1])
            steps.append((d, unit.key, lv))
    refined: list[dict[str, Any]] = []
    for d, key, level in sorted(steps):
        if time.perf_counter() > deadline:
            break
        trial = dict(chosen) | {key: level}
        score = evaluator.score(build(trial))
        if fits(score):
            chosen, combined = trial, score
            refined.append({"layer": key, "ratio": level, "combined_drop": score.drop_pct})
    return chosen, combined, refined


def explain(sens: dict[float, float], chosen: float | None, threshold: float, allowed: float | None = None) -> str:
    """Why a unit got ``chosen`` (for the report), from its ratio→drop measurements."""
    tried = ", ".join(f"{lv:g}→{d:+.2f}" for lv, d in sens.items())
    if chosen and sens.get(chosen, math.inf) > threshold:
        return (
            f"raised to {chosen:g} by the greedy step: the combination still fit the budget (ratio→drop alone: {tried})"
        )
    if chosen:
        return f"largest ratio whose drop alone fits {threshold:.3g} pts (ratio→drop: {tried})"
    if allowed is not None and any(d <= allowed for d in sens.values()):  # refused in combination, not alone
        return (
            f"fit the {allowed:.3g}-pt share alone (ratio→drop: {tried}), but no combination of such layers did at "
            "its upper confidence bound (the search's rounds)"
        )
    return (
        f"every ratio over {threshold:.3g} pts alone (ratio→drop: {tried})"
        if sens
        else "not measured (search time limit)"
    )
