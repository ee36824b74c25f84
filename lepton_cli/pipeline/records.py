"""What the pipeline records for each step: the pass's summary and what the instruments observed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lepton_cli.model.stats import ModelStats


@dataclass
class StepCheck:
    """The output comparison of one step: ``kind`` is the pass's exactness ("lossy" and "skipped": none)."""

    kind: str
    ok: bool | None = None  # None: the comparison could not run
    samples: int = 0
    max_abs_error: float = 0.0
    worst_output: str = ""
    rtol: float = 0.0
    atol: float = 0.0
    noise_floor: dict[str, float] | None = None  # per failing output, when a tolerance check fell back to it
    guessed_dims: bool = False  # unbound input dims were given stand-in sizes
    detail: str | None = None  # why the outputs cannot be compared at all (a shape changed)
    skipped: str | None = None  # why the comparison did not run

    def to_dict(self) -> dict[str, Any]:
        if self.kind in ("lossy", "skipped"):
            return {"kind": self.kind}
        doc: dict[str, Any] = {"kind": self.kind, "ok": self.ok}
        if self.skipped is not None:
            return doc | {"skipped": self.skipped}
        if self.detail is not None:
            doc["detail"] = self.detail
        else:
            doc |= {
                "samples": self.samples,
                "max_abs_error": self.max_abs_error,
                "worst_output": self.worst_output,
                "rtol": self.rtol,
                "atol": self.atol,
            }
        if self.noise_floor is not None:
            doc["noise_floor"] = self.noise_floor
        if self.guessed_dims:
            doc["guessed_dims"] = True
        return doc


@dataclass
class StepRecord:
    """One step of the pipeline: filled by the run loop (name, params, summary) and the instruments (the rest)."""

    name: str
    params: dict[str, Any]
    why: str
    seconds: float = 0.0
    before: ModelStats | None = None
    after: ModelStats | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    check: StepCheck = field(default_factory=lambda: StepCheck("lossy"))

    def to_dict(self) -> dict[str, Any]:
        assert self.before is not None and self.after is not None
        return {
            "name": self.name,
            "params": self.params,
            "why": self.why,
            "seconds": round(self.seconds, 4),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "summary": self.summary,
            "check": self.check.to_dict(),
        }
