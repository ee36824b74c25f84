"""What one pipeline run shares: target, data, host facts, seed, the accuracy budget ledger, scorers,
warnings, progress and a work folder (TVM's ``PassContext``)."""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable

import numpy as np
import onnx

from lepton_cli.evaluate.accuracy import Evaluator, label_free, scoring_opt_level
from lepton_cli.host.detect import HostInfo
from lepton_cli.host.parallel import parallel_runs
from lepton_cli.model.external_data import model_weights_mb
from lepton_cli.model.sessions import model_random_feed
from lepton_cli.model.shapes import require_static
from lepton_cli.pipeline.ledger import BudgetLedger
from lepton_cli.pipeline.targets import Target
from lepton_cli.samples.sample_set import SampleSet

log = logging.getLogger("lepton")
log.addHandler(logging.NullHandler())  # the CLI shows warnings itself; a log file is opt-in
log.propagate = False

HOLDOUT_FRACTION = 0.25  # of --calib, scored (not calibrated on) when there is no --eval
MIN_HOLDOUT_SPLIT = 8  # fewer calibration samples: score on them all
SCORE_SAMPLE_LIMIT = 1000  # enough for a 0.1-point resolution; bounds compile time on big sets
MIN_WORST_CASE_SAMPLES = 16  # 8 held-out pages passed a PP-OCRv4 det that lost 1.52 on 32 (camera_pages.md)
# One wrong unit reads its resolution with a standard error about as large; the lossy passes hold drop + z * se to
# the budget (budget_confidence 0.8 by default), so a scoring set fits its budget only if that much of one unit does.
SEARCH_Z = NormalDist().inv_cdf(0.8)
ONE_UNIT_BOUND = 1.0 + SEARCH_Z
# A drop of one budget B counts B / r wrong units (r: one unit's points), read to about sqrt(B * r) points; where z of
# those span more than half the budget, a candidate at the budget and one at half of it read alike (docs/decisions.md).
BUDGET_NOISE_SHARE = 0.5

ProgressReport = Callable[[str, str, "int | None", "int | None"], None]  # (pass, message, done, total)
ScoringSplit = tuple["SampleSet | None", "SampleSet | None", str]  # (calibration, scored, what is scored)


@dataclass
class PassContext:
    """What the whole run shares: target, data, host facts, seed, budgets, warnings, a work folder."""

    target: Target
    calib: SampleSet | None = None
    eval: SampleSet | None = None
    host: HostInfo = field(default_factory=HostInfo.unknown)
    seed: int = 0
    max_accuracy_drop: float | None = None  # percentage points; None: the target's budget
    eval_metric: str = "auto"  # lepton_cli.evaluate.accuracy.METRICS
    source: onnx.ModelProto | None = None  # the model the pipeline started from: lossy passes score against it
    scorers: dict[str, Any] = field(default_factory=dict)  # ORT level -> the shared Evaluator (variants share it)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lepton-")))
    warnings: list[str] = field(default_factory=list)
    on_warning: Callable[[str], None] | None = None
    on_progress: ProgressReport | None = None  # the progress display: passes report through ctx.progress, never print
    current_pass: str = ""
    ledger: BudgetLedger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = BudgetLedger(self.accuracy_budget)

    def progress(self, message: str, done: int | None = None, total: int | None = None) -> None:
        """A pass's progress: a phase (``message``) or ``done`` of ``total`` steps of it."""
        if self.on_progress:
            self.on_progress(self.current_pass, message, done, total)

    def warn(self, message: str, *, compile_wide: bool = False) -> None:
        """A warning for the report and stderr, named after the running pass unless it concerns the whole compile."""
        text = f"{self.current_pass}: {message}" if self.current_pass and not compile_wide else message
        self.warnings.append(text)
        log.warning(text)
        if self.on_warning:
            self.on_warning(text)

    @property
    def scoring_opt_level(self) -> str:
        """ORT level accuracy is scored at (lepton_cli.evaluate.accuracy.scoring_opt_level)."""
        return scoring_opt_level(list(self.target.hardware.isa), list(self.host.isa))

    @property
    def accuracy_budget(self) -> float:
        budget = self.max_accuracy_drop
        return budget if budget is not None else self.target.budgets.max_accuracy_drop_pct

    def lossy_budget(self, share: float) -> float:
        """The drop against the source a lossy pass with ``share`` of the budget may reach (``BudgetLedger``)."""
        return self.ledger.allowance(share)

    @property
    def source_drop(self) -> float:
        """The drop against the source of the model the lossy passes have made so far."""
        return self.ledger.source_drop

    def scoring_data(self) -> ScoringSplit:
        """(calibration samples, scored samples, what is scored): one split for the whole compile, so prune,
        quantize and the final gate measure on the same data. --eval when given, else a held-out part of --calib."""
        if "split" not in self.scorers:
            self.scorers["split"] = self._split()
        return self.scorers["split"]

    def _split(self) -> ScoringSplit:
        calib = self.calib
        if self.eval is not None and len(self.eval):
            return calib, self.eval, "--eval"
        if calib is not None and len(calib) >= MIN_HOLDOUT_SPLIT:
            kept, held = calib.split(HOLDOUT_FRACTION, self.seed)
            return kept, held, f"held-out {len(held)} of --calib (agreement with the source)"
        if calib is not None and len(calib):
            self.warn(
                f"only {len(calib)} calibration samples and no --eval: "
                "scoring agreement on the calibration samples themselves"
            )
            return calib, calib, "--calib (agreement with the source, not held out)"
        return calib, None, "none"

    def scorer(self, model: onnx.ModelProto | None = None) -> tuple[Any, str]:
        """(the Evaluator every lossy pass and the final gate share, what it scores), or (None, "none") without data.
        ``model`` is the source when no pipeline set one (a pass run on its own)."""
        if self.source is None:
            self.source = model
        _, data, _ = self.scoring_data()
        if data is None or self.source is None:
            return None, "none"
        level = self.scoring_opt_level
        if level not in self.scorers:
            self.scorers[level] = self._resolving_evaluator(data, level)
        return self.scorers[level], self.scoring_data()[2]

    def _evaluator(self, data: SampleSet, level: str) -> Evaluator:
        assert self.source is not None
        metric = self.eval_metric if data is self.eval and data.labels is not None else label_free(self.eval_metric)
        labels = data.labels if data is self.eval else None
        workers = parallel_runs(self.host, model_weights_mb(self.source))
        return Evaluator(
            self.source, data, labels, limit=SCORE_SAMPLE_LIMIT, metric=metric, opt_level=level, workers=workers
        )

    def _resolving_evaluator(self, data: SampleSet, level: str) -> Evaluator:
        """The evaluator on ``data``, or on all of --calib when one wrong unit of the held-out part, with its standard
        error, is over the budget (one flip of 50 samples is 2 points: it takes a budget of 3.7), or a drop of one
        budget reads too loosely to tell from half of it (``budget_noise``), and all of it can show less; warns when
        even all of it cannot show a drop as small as the budget."""
        evaluator = self._evaluator(data, level)
        budget = self.accuracy_budget
        calib = self.calib
        widen = data is not self.eval and calib is not None and min(len(calib), SCORE_SAMPLE_LIMIT) > evaluator.count
        few_pages = evaluator.worst_case and evaluator.count < MIN_WORST_CASE_SAMPLES
        coarse = evaluator.resolution_pct * ONE_UNIT_BOUND > budget
        noise = budget_noise(evaluator.resolution_pct, budget)
        noisy = SEARCH_Z * noise > BUDGET_NOISE_SHARE * budget
        if (coarse or noisy or few_pages) and widen:
            assert calib is not None
            if few_pages:
                why = f"the worst of {evaluator.count} held-out pages says little about the next page"
            elif coarse:
                why = (
                    f"the held-out {len(data)} resolve only {evaluator.resolution_pct:.2g} points, too coarse for "
                    f"the {budget:g}-point budget at the search's confidence"
                )
            else:
                why = f"the held-out {len(data)} read a {budget:g}-point drop only to ±{noise:.2g} points"
            evaluator = self._evaluator(calib, level)
            name = f"all {evaluator.count} of --calib (agreement with the source; {why})"
            self.scorers["split"] = (self.scorers["split"][0], calib, name)
        if 0 < budget < evaluator.resolution_pct and not self.scorers.get("coarse_warned"):
            self.scorers["coarse_warned"] = True  # variants share the scorer: one warning per compile
            self.warn(
                f"the accuracy gate scores {evaluator.count} samples, so it resolves only "
                f"{evaluator.resolution_pct:.2g} points, coarser than the {budget:g}-point budget: a smaller drop is "
                f"invisible; pass --eval with labelled data or more --calib samples (at least "
                f"{math.ceil(100.0 / budget)} {evaluator.coarsest_unit} in the scored set)",
                compile_wide=True,
            )
        return evaluator

    def require_static_shapes(self, model: onnx.ModelProto) -> None:
        require_static(model, f"pass {self.current_pass!r}" if self.current_pass else "this step")

    def sample_feeds(self, model: onnx.ModelProto, count: int) -> list[dict[str, np.ndarray]]:
        """Real samples when calibration or eval data exist, else seeded random inputs."""
        for data in (self.calib, self.eval):
            if data is not None and len(data):
                return list(data.feeds(count))
        rng = np.random.default_rng(self.seed)
        return [model_random_feed(model, rng, self.input_shapes or None) for _ in range(count)]


def budget_noise(resolution_pct: float, budget: float) -> float:
    """The standard error, in points, of a drop of ``budget`` counted in wrong units of ``resolution_pct`` each
    (a count's Poisson error): 0.0 for a continuous metric or a budget of no drop at all."""
    return math.sqrt(budget * resolution_pct) if resolution_pct > 0 and budget > 0 else 0.0
