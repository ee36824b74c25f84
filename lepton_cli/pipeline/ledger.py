"""The accuracy budget as one ledger of drop against the source model, shared by every lossy pass.

Each lossy pass gets a share of the budget on top of what the earlier ones were allowed (or reached, if
more), so the shares partition the budget and what one leaves carries over to the next. When a later pass
cannot meet its budget, the pipeline compiles again with the earlier spenders yielding their shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_cli.pipeline.registry import BudgetUse

FINAL_GATE = "the accuracy gate"  # what a failed final check is called in the ledger and the retry's warning


@dataclass
class BudgetLedger:
    """Drop against the source, in percentage points, of the model the lossy passes have made so far."""

    budget: float  # the whole accuracy budget
    source_drop: float = 0.0  # what the last lossy pass measured on its result
    granted: float = 0.0  # what the last lossy pass was allowed
    spent: dict[str, float] = field(default_factory=dict)  # pass name -> points its result added
    yielded: set[str] = field(default_factory=set)  # lossy passes skipped so that a later one meets its budget
    changed: set[str] = field(default_factory=set)  # lossy passes that changed the model, at any measured drop

    def allowance(self, share: float) -> float:
        """The drop against the source a lossy pass with ``share`` of the budget may reach."""
        return min(self.budget, max(self.granted, self.source_drop) + share * self.budget)

    def enter(self, pass_name: str, use: BudgetUse) -> None:
        """A lossy pass allowed ``use.allowed`` measured ``use.drop`` on its result: the ledger's new totals."""
        drop = max(0.0, use.drop)
        if pass_name:
            self.spent[pass_name] = max(0.0, drop - self.source_drop)
            if use.changed:
                self.changed.add(pass_name)
        self.source_drop, self.granted = drop, use.allowed

    def pass_over(self, pass_name: str, share: float) -> None:
        """A yielded pass: it adds nothing, and its whole share carries over to the next lossy pass."""
        self.enter(pass_name, BudgetUse(self.allowance(share), self.source_drop))

    def last_spender(self) -> str:
        """The lossy pass that made the current model (entered last, not yielded): the one a failed final gate judged."""
        return next((name for name in reversed(self.spent) if name not in self.yielded), "")

    def spenders(self, failed: str) -> list[str]:
        """The lossy passes that spent budget before ``failed``, in the order they ran, or changed the model where
        their few scored samples read no drop (PP-OCRv4 rec's channel pruning read 0.00 on 16 lines and cost fpga's
        int8 4 points). For the final gate (``FINAL_GATE``) that is every spender but the last one, which made the
        model the gate judged."""
        judged = self.last_spender() if failed == FINAL_GATE else failed
        return [name for name, drop in self.spent.items() if (drop > 0 or name in self.changed) and name != judged]

    def yield_for(self, failed: str) -> list[str]:
        """Start over with the passes that spent before ``failed`` yielding their shares; [] when none did."""
        spenders = self.spenders(failed) if failed else []
        if spenders:
            self.yielded.update(spenders)
            self.source_drop = self.granted = 0.0
            self.spent.clear()
            self.changed.clear()
        return spenders
