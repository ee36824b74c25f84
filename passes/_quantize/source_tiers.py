"""Rewritten sources searched as op-type tiers of their own: SmoothQuant'ed, or with recovery steps applied.

Each quantizes the last plain tier's op types on a source the recovery steps changed (``recovery.py``).
The tuner reaches one only when the choice so far keeps layers float, or nothing fits, and its fully
quantized model is priced within the tie of that choice (``tuning.py``): a step that helps one model
and hurts another, or costs minutes of compile, runs only where the plain search needed float layers.
PP-OCRv4 rec (cpu-avx): AdaRound and bias correction take the Conv tier's fully quantized drop from
1.34 to 0.45 points, where the plain search kept 6 convs float (benchmarks/results/recovery_tier.md).
A fast recovery tier (``fast_recovery_tier``) quantizes the first plain tier's op types instead (every op, on
cpu-avx) and offers only its fully quantized models: it exists to make a model fully int8, and its float-kept
variants, fitted on the data that scores them, are where the fit over-fits (docs/decisions.md, session 33).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from lepton_cli.passes._quantize.recovery import Recovered, RecoverySettings, changed_by

SMOOTHQUANT = "smoothquant"  # SmoothQuant'ed with inserted scales where nothing absorbs them
RECOVERY = "recovery"  # the steps of ``recovery_tier`` added to those every tier has
FAST_RECOVERY = "fast_recovery"  # the steps of ``fast_recovery_tier`` on the first tier's op types, fully quantized
RECOVERY_TRANSFORMS = (RECOVERY, FAST_RECOVERY)


@dataclass(frozen=True)
class SourceTier:
    transform: str  # the name the tier's trials carry (Trial.transform)
    settings: RecoverySettings  # every step the tier's source went through
    added: tuple[str, ...] = ()  # the steps the plain tiers do not apply
    first_ops: bool = False  # quantizes the first plain tier's op types (else the last's), nothing kept float

    @property
    def summary_key(self) -> str:
        return f"{self.transform}_tier"

    @property
    def label(self) -> str:
        """What the tier does to the source, for progress lines and errors."""
        if self.transform == SMOOTHQUANT:
            return f"SmoothQuant (alpha {self.settings.smoothquant_alpha:g})"
        return " + ".join(self.added)


def source_tiers(params: Any, plain: RecoverySettings, matmul_layers: Callable[[], bool]) -> list[SourceTier]:
    """The tiers ``params`` asks for, in search order. SmoothQuant needs a MatMul/Gemm with constant weights in the
    last tier's op types (``matmul_layers()``, asked only then) and is off when every tier is smoothed already; a
    recovery tier needs a step the plain tiers lack. The fast recovery tier comes first: its fully quantized model
    is the cheapest any tier offers, and when it fits, no later tier's steps need fitting."""
    tiers = []
    fast = tuple(step for step in params.fast_recovery_tier if step not in plain.steps)
    if fast:
        tiers.append(SourceTier(FAST_RECOVERY, replace(plain, **{step: True for step in fast}), fast, first_ops=True))
    if params.smoothquant_tier_alpha is not None and params.smoothquant_alpha is None and matmul_layers():
        settings = replace(plain, smoothquant_alpha=params.smoothquant_tier_alpha, smoothquant_insert=True)
        tiers.append(SourceTier(SMOOTHQUANT, settings, ("smoothquant",)))
    added = tuple(step for step in params.recovery_tier if step not in plain.steps)
    if added:
        tiers.append(SourceTier(RECOVERY, replace(plain, **{step: True for step in added}), added))
    return tiers


def tier_summary(tier: SourceTier, recovered: Recovered) -> dict[str, Any]:
    """What the tier's steps changed, for the report (``summary[tier.summary_key]``)."""
    if tier.transform == SMOOTHQUANT:
        return {
            "alpha": tier.settings.smoothquant_alpha,
            "layers": recovered.summary.get("smoothquant_layers", 0),
            "inserted": recovered.summary.get("smoothquant_inserted", 0),
        }
    return {"steps": list(tier.added), "changed": {step: changed_by(step, recovered.summary) for step in tier.added}}


def tier_changed(tier: SourceTier, summary: dict[str, Any]) -> str:
    """The report's "changed" cell for the tier's gains row."""
    recorded = summary.get(tier.summary_key, {})
    if tier.transform == SMOOTHQUANT:
        changed = f"{recorded.get('layers', 0)} layers, {recorded.get('inserted', 0)} scales inserted"
    else:
        changed = ", ".join(f"{step}: {what}" for step, what in recorded.get("changed", {}).items() if what)
    return f"{changed} (searched as a tier)" if changed else "searched as a tier"
