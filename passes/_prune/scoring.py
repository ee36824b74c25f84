"""The prune search's scorer: the compile's shared scorer on as few samples as show a drop of the pass's share."""

from __future__ import annotations

import math

from lepton_cli.evaluate.accuracy import Evaluator


def search_scorer(scorer: Evaluator, max_samples: int, allowed: float) -> Evaluator | None:
    """``scorer`` on its first ``max_samples`` samples, or on more where one wrong unit there (a flipped class among
    64 rows is 1.6 points) exceeds ``allowed``; None when all of it cannot show a drop that small. A search that
    cannot see its loss keeps every layer whose pruning flipped nothing: PP-OCR's text-direction classifier read
    0.00 on 64 lines for fpga and lost 2.7 points held out (docs/decisions.md, session 31)."""
    part = scorer.subset(max_samples)
    if allowed <= 0 or part.resolution_pct <= allowed:
        return part
    if scorer.resolution_pct > allowed:
        return None
    wider = scorer.subset(samples_needed(part, allowed))
    return wider if wider.resolution_pct <= allowed else scorer


def samples_needed(scorer: Evaluator, allowed: float) -> int:
    """How many samples like these show one wrong unit as a drop of at most ``allowed`` points."""
    return math.ceil(scorer.count * scorer.resolution_pct / allowed) if allowed > 0 else scorer.count
