"""The tuner: calibration methods, op-type tiers and float-kept layers, searched for the fastest model within budget.

The search, bounded so that it costs O(methods × log2(max_float_layers)) quantize-and-score rounds:
1. for each calibration method (in the target's order): quantize everything and score it;
2. if it misses the budget, rank the quantized nodes by what keeping each alone in float saves
   (``sensitivity.py``), then keep the top k in float (``float_keep.py``) for k = 1, 2, 4, ... until
   the budget holds, and bisect down between the last failing and the first passing k (fewer float
   layers = faster); when no k does, do the same with the leading quantized nodes in graph order, of
   which only those on or leading to the trunk are kept float (``trunk.py``: error that builds up over
   many layers, which no single node's bypass reveals, and not the side branches beside it);
3. among the candidates that meet the budget, keep the one the target's cost model
   (``evaluate.costmodel``, priced the way ONNX Runtime runs QDQ) says is fastest: deterministic, and
   the build host's latency says little about the target's. Prices within ``PRICE_TIE`` of the
   cheapest are a tie the cost model cannot order, which the smaller drop decides, then the fewest
   float-kept nodes, the price, the output closer to the source's, the method order; once a fully
   quantized model passes, only the other methods' fully quantized models are scored.
A candidate priced above the cheapest one of its tier already within budget is built but not scored:
it cannot be chosen (within a tier, more float nodes of one graph cost more). Each op-type tier
(``SearchSpace.builds``) is searched in turn; a later tier is searched only when the chosen candidate
keeps layers float and the later tier's fully quantized model is priced within the tie of it (its
float-kept variants cost more still). A tier may quantize a rewritten source (``SearchSpace.transforms``:
SmoothQuant'ed, its own float reference for float-kept nodes, made on first use), so a rewrite that
helps one model and hurts another is chosen by cost too.

Libraries checked: Intel Neural Compressor / Olive run similar "fallback the worst ops" loops but
are not dependencies here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from math import inf
from statistics import NormalDist
from typing import Any, Callable

import numpy as np
import onnx
from lepton_cli.passes._quantize.loss_attribution import LossByOpType, loss_by_op_type
from lepton_cli.passes._quantize.search_clock import SearchClock, SearchTimeUp
from lepton_cli.passes._quantize.sensitivity import float_gains, local_errors, quantized_nodes
from lepton_cli.passes._quantize.source_tiers import RECOVERY_TRANSFORMS
from lepton_cli.passes._quantize.trunk import TrunkPrefixes

from lepton_cli.errors import QualityGateError
from lepton_cli.evaluate.accuracy import AccuracyScore, Evaluator
from lepton_cli.evaluate.costmodel import HardwareFacts, latency_ms
from lepton_cli.evaluate.input_floor import noise_clause

SENSITIVITY, LEADING = "sensitivity", "leading"  # Trial.float_rule
SENSITIVITY_SAMPLES = 8  # held-out samples the per-node ranking runs on
# Candidates of one graph priced this close are not ordered by the cost model (benchmarks/results/cost_choice.md:
# PP-OCRv4 det at 5.68-5.77 ms estimated measured 0.74-0.80x fp32 in another order; price_tie.md: MiniLM).
PRICE_TIE = 0.03
LISTED_TRIALS = 8  # the exit-3 line lists every candidate up to this many, then each tier's closest
EDGE_SHARE = 0.5  # the edge's drop over this share of the budget and of the closest candidate's: the refusal names it
Build = Callable[[str, list[str]], onnx.ModelProto]  # (method, float-kept node names) -> candidate model
Progress = Callable[[str], None]
Cost = Callable[[onnx.ModelProto], float | None]  # a candidate's estimated latency on the target (ms)


def failed_fix(
    max_float: int,
    undecided: Trial | None = None,
    samples: int = 0,
    recovery_searched: bool = False,
    closest: str = "",
) -> str:
    """The exit-3 fix; a target that allows no float layers (tpu: full integer) is not told to raise them, nor to
    turn on recovery steps the search already tried (``recovery_searched``).
    ``undecided``: a candidate whose drop fits but whose upper bound does not, so more data could decide it.
    ``closest``: what a higher budget would have to cover (``_closest_clause``), after "raise --max-accuracy-drop"."""
    plain = _plain_fix(max_float, recovery_searched, closest)
    if undecided is not None:
        return (
            f"{undecided.method}+{len(undecided.float_nodes)} float read a drop of {undecided.drop_pct:.2f}, within "
            f"the budget, but {samples} scored samples bound it only to {undecided.drop_bound:.2f}: give more "
            "--calib samples or labelled --eval data (a larger scoring set narrows the bound), or " + plain
        )
    return plain


def _plain_fix(max_float: int, recovery_searched: bool, closest: str = "") -> str:
    raise_budget = f"raise --max-accuracy-drop{closest}"
    if not max_float and recovery_searched:
        return f"{raise_budget} or give more representative --calib data (the recovery steps were searched)"
    if not max_float:  # a full-integer accelerator runs neither float nor fp16 layers: only the int8 model can change
        return (
            f"{raise_budget}, give more representative --calib data, or turn on the quantize pass's "
            "recovery steps (equalize, bias_correction, adaround) in a target that extends this one"
        )
    return f'{raise_budget} or max_float_layers, give more representative --calib data, or use scheme = "fp16"'


def _closest_clause(trials: list[Trial]) -> str:
    """ " (the closest candidate, recovery:percentile[Conv,MatMul,Gemm]+8 float, read a drop of 1.69, upper bound 1.75)":
    what a higher budget would have to cover; "" when none was scored."""
    scored = [t for t in trials if t.scored and math.isfinite(t.drop_pct)]
    if not scored:
        return ""
    reach = lambda t: max(t.drop_pct, t.drop_bound if t.drop_bound is not None else t.drop_pct)  # noqa: E731
    nearest = min(scored, key=reach)
    bound = f", upper bound {reach(nearest):.2f}" if reach(nearest) > nearest.drop_pct else ""
    several = len({_tier_of(t) for t in trials}) > 1
    return f" (the closest candidate, {_trial_label(nearest, several)}, read a drop of {nearest.drop_pct:.2f}{bound})"


class TierUnavailable(Exception):
    """A tier's rewritten source could not be made (the tuner skips the tier and keeps the choice so far)."""


@dataclass
class Trial:
    method: str
    float_nodes: list[str]
    drop_pct: float
    value: float
    meets_budget: bool
    latency_ms: float | None = None
    agreement: dict[str, float] = field(default_factory=dict)
    op_types: list[str] | None = None  # int8: the op types quantized ([]: every op ORT quantizes)
    drop_se: float = 0.0  # standard error of drop_pct over the evaluation samples
    float_rule: str = SENSITIVITY  # how float_nodes were chosen: SENSITIVITY ranking or the LEADING nodes
    cost_ms: float | None = None  # the target cost model's latency estimate (None: no estimate)
    scored: bool = True  # False: priced above a candidate within budget, so never scored
    drop_bound: float | None = None  # the upper confidence bound held to the budget (None: the drop itself)
    transform: str = ""  # the source the tier quantizes ("": the model as given; "smoothquant": SmoothQuant'ed)

    @property
    def rule_tag(self) -> str:
        """Label suffix for progress lines and the exit-3 message: marks trials that kept the leading nodes float."""
        return " leading" if self.float_rule == LEADING else ""

    def refused_for_bound(self, budget: float) -> bool:
        """Its drop fits ``budget`` but its upper confidence bound does not: more scored samples could decide it."""
        return self.scored and self.drop_bound is not None and self.drop_pct <= budget < self.drop_bound

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["float_kept"] = len(self.float_nodes)
        if not self.scored:  # no drop was measured (inf is not JSON)
            out["drop_pct"] = out["value"] = None
        return out


@dataclass
class SearchResult:
    best_trial: Trial | None
    trials: list[Trial]
    sensitivity: list[tuple[str, float]]
    build: Build | None = None  # the search's build: the best trial's candidate is made again from it when asked for

    @property
    def best(self) -> onnx.ModelProto | None:
        """The chosen candidate, built on each call (builds are deterministic): no tier's model is held while
        later tiers search (memory), and a tier that is not chosen never builds it."""
        if self.best_trial is None or self.build is None:
            return None
        return self.build(self.best_trial.method, self.best_trial.float_nodes)


@dataclass
class SearchSpace:
    """What a scheme plan offers the tuner: one build per op-type tier (tried in order) and the methods."""

    builds: list[Build]
    methods: list[str]
    float_model: onnx.ModelProto  # the reference that float-kept nodes read
    tiers: list[list[str]] | None = None  # int8: the op types each build quantizes; None: no op-type tiers
    candidates: Callable[[onnx.ModelProto], list[str]] | None = None  # None: every quantized node may go float
    # Per build, when a tier quantizes a rewritten source: its name and its own float reference (made on first use).
    transforms: list[str] | None = None
    references: list[Callable[[], onnx.ModelProto]] | None = None
    # An exact-in-real-arithmetic speed rewrite of the chosen candidate, kept when it scores within the budget itself:
    # its name and the rewrite (the rewritten copy, how many places it changed).
    verified_rewrite: tuple[str, Callable[[onnx.ModelProto], tuple[onnx.ModelProto, int]]] | None = None
    # Tiers searched only when no earlier tier has a candidate within budget (never probed before them).
    fallback: set[int] = field(default_factory=set)
    # Tiers that offer only their fully quantized candidates (no float-kept variant is built or ranked).
    full_only: set[int] = field(default_factory=set)
    # Tiers that refit weights on each method's int8 model (minutes a method): once one method's fully quantized model
    # fits, the other methods are not built (PP-OCRv4 rec fpga: 2.5 of its 10.4 minutes for the same drop).
    one_fit_per_tier: set[int] = field(default_factory=set)

    def transform(self, tier: int) -> str:
        return self.transforms[tier] if self.transforms is not None else ""

    def reference(self, tier: int) -> onnx.ModelProto:
        """The float model tier ``tier``'s float-kept nodes read (its sensitivity ranking's reference)."""
        return self.references[tier]() if self.references is not None else self.float_model


@dataclass(frozen=True)
class TunerSettings:
    max_float: int  # most nodes the search may keep in float
    float_weights: bool  # float-kept nodes read float weights (else their int8 weights, dequantized)
    confidence: float  # one-sided confidence the drop's upper bound must meet the budget at (0.5: the drop)
    hardware: HardwareFacts | None = None  # the target's [hardware]: candidates are chosen by its cost model
    # The earlier lossy passes a refusal compiles again without (the pipeline's retry): that attempt explains the
    # refusal, and searches the tiers only a refusal reaches (recovery, fallback) where nothing plain fits
    retried_without: tuple[str, ...] = ()
    max_seconds: float | None = None  # the search's wall-time limit (search_clock.py); None: none

    @classmethod
    def of(cls, params: Any, hardware: HardwareFacts | None, retried_without: tuple[str, ...] = ()) -> TunerSettings:
        """From the quantize pass's params (QuantizeParams)."""
        float_weights = params.float_kept_weights == "float"
        return cls(
            params.max_float_layers,
            float_weights,
            params.budget_confidence,
            hardware,
            retried_without,
            params.max_search_seconds,
        )

    def left_for_retry(self, space: SearchSpace, tier: int, chosen: SearchResult | None) -> bool:
        """Whether ``tier`` waits for the compile without ``retried_without``: nothing fits so far and the tier is one a
        refusal reaches (its recovery steps' fits took minutes in an attempt that was compiled again anyway; PP-OCRv4
        rec on fpga spends 6 of its 9 minutes refusing the pruned model)."""
        nothing_fits = chosen is None or chosen.best_trial is None
        refusal_tier = tier in space.fallback or space.transform(tier) in RECOVERY_TRANSFORMS
        return bool(self.retried_without) and nothing_fits and refusal_tier


class _Search:
    """One search's trials: each (method, float-kept set) is built and scored once."""

    def __init__(
        self,
        build: Build,
        evaluator: Evaluator,
        budget: float,
        z: float,
        progress: Progress | None,
        cost: Cost | None = None,
        ceiling: float = inf,
        clock: SearchClock | None = None,
    ):
        self.build, self.evaluator, self.budget, self.z, self.progress = build, evaluator, budget, z, progress
        self.cost, self.ceiling = cost, ceiling  # ceiling: the cheapest estimate within budget so far
        self.clock = clock or SearchClock()  # the tuner's, shared by every tier's search; none: no limit
        self.trials: list[Trial] = []
        self.passing: list[Trial] = []  # models are rebuilt, not kept: a candidate per trial held ~60 model copies
        self.scored: dict[tuple[str, frozenset[str]], Trial] = {}

    def attempt(self, method: str, keep: list[str], rule: str) -> tuple[Trial, onnx.ModelProto | None]:
        key = (method, frozenset(keep))
        if key in self.scored:  # the leading nodes can be the set the ranking already tried
            return self.scored[key], None
        self.clock.check()
        model = self.build(method, keep)
        cost = self.cost(model) if self.cost else None
        if cost is not None and cost > self.ceiling:  # slower than a candidate within budget: cannot be chosen
            trial = Trial(method, list(keep), inf, inf, False, float_rule=rule, cost_ms=cost, scored=False)
            return self._record(key, trial, None), model
        score: AccuracyScore = self.evaluator.score(model)
        measured = _measured(score, self.budget, self.z)
        trial = Trial(method, list(keep), **measured, float_rule=rule, cost_ms=cost)
        if trial.meets_budget:
            self.passing.append(trial)
            self.ceiling = min(self.ceiling, cost if cost is not None else inf)
        return self._record(key, trial, score.metric), model

    def _record(self, key: tuple[str, frozenset[str]], trial: Trial, metric: str | None) -> Trial:
        self.trials.append(trial)
        self.scored[key] = trial
        if self.progress:
            cost = f", est. {trial.cost_ms:.3g} ms" if trial.cost_ms is not None else ""
            head = f"{trial.method:<10} float-kept {len(trial.float_nodes):3d}{trial.rule_tag}: "
            if not trial.scored:
                self.progress(f"{head}not scored{cost} (slower than a candidate within budget)")
            else:
                spread = f" ± {trial.drop_se:.2f}" if self.z else ""
                verdict = "within" if trial.meets_budget else "over"
                self.progress(f"{head}{metric} drop {trial.drop_pct:.2f}{spread} ({verdict} {self.budget:g}){cost}")
        return trial

    def grow(
        self, method: str, order: list[str], rule: str, max_float: int, prefix: Callable[[int], list[str]] | None = None
    ) -> bool:
        """Keep order[:k] (or ``prefix(k)``) float for k = 1, 2, 4, ... until the budget holds, then bisect k down."""
        limit = min(max_float, len(order))
        float_set = prefix or (lambda k: order[:k])
        low, high, k = 0, None, 1  # low: largest failing k; high: smallest passing k
        while k <= limit:
            trial = self.attempt(method, float_set(k), rule)[0]
            if trial.meets_budget:
                high = k
                break
            if not trial.scored:  # more float layers cost more still: none of them can be chosen
                return False
            low = k
            k = k * 2 if k * 2 <= limit or k == limit else limit
        if high is None:
            return False
        while high - low > 1:  # bisect: fewer float layers run faster
            mid = (low + high) // 2
            if self.attempt(method, float_set(mid), rule)[0].meets_budget:
                high = mid
            else:
                low = mid
        return True

    def result(self, methods: list[str], sensitivity: list[tuple[str, float]]) -> SearchResult:
        """The passing trial ``choose`` picks (its model is built when ``best`` is read)."""
        return SearchResult(choose(self.passing, methods), self.trials, sensitivity, self.build)


def choose(passing: list[Trial], methods: list[str]) -> Trial | None:
    """Deterministic: among the candidates priced within ``PRICE_TIE`` of the lowest estimated latency on the
    target, the smaller drop, then the fewest float-kept nodes, the lower price, the output closer to the source's
    (SNR: a small scoring set often reads 0.00 for every method), the method order. Candidates without an estimate
    rank last and tie with none: among them the fewest float-kept nodes, then the smaller drop."""
    order_of = {m: i for i, m in enumerate(methods)}
    cheapest = min((t.cost_ms for t in passing if t.cost_ms is not None), default=inf)

    def key(t: Trial) -> tuple[float, float, int, float, float, float, int]:
        cost = t.cost_ms if t.cost_ms is not None else inf
        snr = t.agreement.get("snr_db", -inf)
        tied = t.cost_ms is not None and cost <= _tie_limit(cheapest)  # unpriced candidates are no tie: fewest float
        band = cheapest if tied else cost  # one rank for every price in the tie
        order = order_of.get(t.method, len(order_of))
        return band, t.drop_pct if tied else 0.0, len(t.float_nodes), cost, t.drop_pct, -snr, order

    return min(passing, key=key, default=None)


def _tie_limit(price: float) -> float:
    """The highest price that ties with ``price`` (``PRICE_TIE``)."""
    return price * (1 + PRICE_TIE)


def _ranking(
    float_model: onnx.ModelProto,
    model: onnx.ModelProto,
    pool: list[str],
    feeds: list[dict[str, np.ndarray]],
    float_weights: bool,
    max_candidates: int,
    evaluator: Evaluator,
) -> list[tuple[str, float]]:
    """``pool`` ranked by what keeping each node float saves (run as ``evaluator`` runs candidates); a large pool is
    preselected by local error first."""
    if len(pool) > max_candidates:  # bound the per-layer runs: preselect by the one-run local error
        pool = [name for name, _ in local_errors(float_model, model, pool, feeds)[:max_candidates]]
    return float_gains(float_model, model, pool, feeds, evaluator.opt_level, float_weights, evaluator.workers)


def ranking_build(build: Build) -> Build:
    """The build whose models the sensitivity ranking bypasses nodes in: the build's ``before_lowering`` where it has
    one (integer_elementwise lowers a candidate after its float-kept nodes are bypassed, into nodes keep_float cannot
    bypass); the float-kept names are the same in both."""
    return getattr(build, "before_lowering", build)


def search(
    build: Build,
    methods: list[str],
    evaluator: Evaluator,
    budget: float,
    float_model: onnx.ModelProto,
    sensitivity_feeds: list[dict[str, np.ndarray]],
    *,
    max_float: int,
    candidates: Callable[[onnx.ModelProto], list[str]] | None = None,
    max_candidates: int = 64,
    progress: Progress | None = None,
    float_weights: bool = True,
    z: float = 0.0,
    cost: Cost | None = None,
    ceiling: float = inf,
    run: _Search | None = None,
    other_methods_once_fit: bool = True,
) -> SearchResult:
    """Try methods and float-kept layer counts; return the fastest candidate within ``budget`` points
    (by ``cost``; without one, the most quantized), none when nothing within budget is priced under ``ceiling``.
    ``run``: this build's search so far (``probe_fully_quantized``): its trials are not scored again, and its ``z``
    and ``cost`` stand for the arguments. ``other_methods_once_fit`` false: no method is tried after one that fits.

    A candidate meets the budget when its drop plus ``z`` standard errors does (``z`` = 0: the measured
    drop itself): a tuning set's drop is an estimate, and a candidate chosen because it landed just
    under the budget tends to land over it on other data."""
    run = run if run is not None else _Search(build, evaluator, budget, z, progress, cost, ceiling)
    run.ceiling = min(run.ceiling, ceiling)
    sensitivity: list[tuple[str, float]] = []
    for method in methods:
        fits_already = any(not t.float_nodes for t in run.passing)
        if fits_already and not other_methods_once_fit:
            break
        try:
            first, model = run.attempt(method, [], SENSITIVITY)
        except ValueError as exc:  # ORT's calibrators refuse some data (a histogram over an empty range, ...)
            if not fits_already:
                raise
            if progress:
                progress(f"{method:<10} not usable on this model ({exc}); a fully quantized candidate already fits")
            continue
        # Once a fully quantized model fits, no float-kept variant can be faster: only the other methods' fully
        # quantized models are still scored, so that their ranges compete on closeness (``choose``).
        if first.meets_budget or fits_already or max_float < 1:  # no float layer allowed (tpu): nothing to rank for
            continue
        if not first.scored or (first.cost_ms or 0.0) > run.ceiling:  # priced above a candidate within budget:
            break  # float-kept variants cost more, and every method's graph is the same (only its scales differ)
        # The ranking bypasses nodes one at a time in the model before lowering (``ranking_build``).
        before = ranking_build(build)
        ranked = before(method, []) if before is not build else model or build(method, [])
        in_graph_order = (candidates or quantized_nodes)(ranked)
        ranking = _ranking(
            float_model, ranked, in_graph_order, sensitivity_feeds, float_weights, max_candidates, evaluator
        )
        sensitivity = sensitivity or ranking
        if not run.grow(method, [name for name, _ in ranking], SENSITIVITY, max_float):
            # Error that builds up over many layers shows in no single node's bypass (docs/decisions.md).
            run.grow(method, in_graph_order, LEADING, max_float, TrunkPrefixes(ranked, in_graph_order).prefix)
    return run.result(methods, sensitivity)


def _no_candidate(
    trials: list[Trial],
    budget: float,
    scored_on: str,
    evaluator: Evaluator,
    max_float: int,
    where_lost: Callable[[], LossByOpType | None] | None = None,
    stopped_at: float | None = None,
) -> QualityGateError:
    """The exit-3 error: what was tried, where it is lost (``where_lost``, loss_attribution.py), and the fix; where
    the source's own input noise moves the metric by more than the budget (input_floor.py), that instead.
    ``stopped_at``: the time limit that ended the search, which the message names first."""
    first = f"quantize: no candidate met the accuracy budget of {budget:g} points ({scored_on})"
    if stopped_at is not None:
        first += f" before the search's {stopped_at:g} s limit (quantize.max_search_seconds)"
    tried_line = _tried_line(trials, budget) if trials else "no candidate was scored"
    tried = f"{first}; tried: {tried_line}"
    floor = evaluator.input_floor()
    if floor is not None and floor.drop_pct > budget:
        noise = f"; {noise_clause(floor.to_dict())}, so this metric cannot tell a drop under that from input noise"
        fix = (
            f"raise --max-accuracy-drop to {math.ceil(floor.drop_pct)} or more to accept a model as close to the "
            "source as that noise, or score against labelled --eval data"
        )
        return QualityGateError(tried + noise, fix, attempt_summary=first)
    undecided = _undecided(trials, budget)
    searched = any(t.transform in RECOVERY_TRANSFORMS for t in trials)
    fix = failed_fix(max_float, undecided, evaluator.count if undecided else 0, searched, _closest_clause(trials))
    if stopped_at is not None:
        fix = f"raise or remove quantize.max_search_seconds in a target that extends this one, or {fix}"
    edge = _edge_clause(trials, budget, evaluator) if not max_float else None
    if edge is not None:  # the chip's 8-bit inputs and outputs, not an op type, hold most of the drop
        return QualityGateError(f"{first}{edge[0]}; tried: {tried_line}", f"{fix}; {edge[1]}", attempt_summary=first)
    where = where_lost() if where_lost is not None else None
    clause = where.clause() if where is not None else ""
    if clause:  # before the list of what was tried, which runs to dozens of candidates where layers may stay float
        tried = f"{first}{clause}; tried: {tried_line}"
    if where is not None and where.helpful():
        fix += "; an op type named there can run on the host in a target that extends this one (quantize op_types)"
    return QualityGateError(tried, fix, attempt_summary=first)


def _edge_clause(trials: list[Trial], budget: float, evaluator: Evaluator) -> tuple[str, str] | None:
    """(clause, fix) where every output is scored by relative error (no task metric) and the source with only its
    inputs and outputs on an 8-bit grid (io_grid.py) already reads at least half the budget and of the closest
    candidate's drop; else None."""
    scored = [t.drop_pct for t in trials if t.scored and math.isfinite(t.drop_pct)]
    generic = all(role.metric == "relative_error" for role in evaluator.roles)  # a task metric reads its own edge
    floor = evaluator.io_floor() if scored and generic else None
    if floor is None or floor < EDGE_SHARE * budget or floor < EDGE_SHARE * min(scored):
        return None
    output = evaluator.output_names[0] if len(evaluator.output_names) == 1 else "NAME"
    clause = (
        f"; the source itself, with only its inputs and outputs on an 8-bit grid as this integer chip takes and "
        f"returns them, reads a drop of {floor:.2f}: most of the loss is the chip's edge, not an op"
    )
    fix = (
        f"a budget under about {floor:.2f} cannot be met on this chip by this metric; score the output by what it "
        f"means (--eval-metric {output}=cosine for values read by direction, or a task metric)"
    )
    return clause, fix


def _where_lost(runs: list[_Search], evaluator: Evaluator, progress: Progress) -> LossByOpType | None:
    """Each op type's share of the loss in the closest fully quantized candidate of any tier (none scored: None)."""
    fully = [
        (t.drop_pct, tier, t)
        for tier, run in enumerate(runs)
        for t in run.trials
        if t.scored and not t.float_nodes and not math.isinf(t.drop_pct)
    ]
    if not fully:
        return None
    drop, tier, best = min(fully, key=lambda entry: entry[:2])
    build = runs[tier].build
    score = lambda model: evaluator.score(model).drop_pct  # noqa: E731
    return loss_by_op_type(build, ranking_build(build), best.method, drop, score, progress, transform=best.transform)


def _tier_of(t: Trial) -> tuple[tuple[str, ...], str]:
    return tuple(t.op_types or ()), t.transform


def _trial_label(t: Trial, several_tiers: bool) -> str:
    """ "recovery:percentile[Conv,MatMul,Gemm]+8 float": the op types only when several tiers were tried."""
    name = t.method if not several_tiers or t.op_types is None else f"{t.method}[{_ops_label(t.op_types)}]"
    return f"{t.transform + ':' if t.transform else ''}{name}+{len(t.float_nodes)}{t.rule_tag} float"


def _described(t: Trial, several_tiers: bool, budget: float) -> str:
    """The label and the drop; one under the budget refused for its upper bound says so, or it reads wrong."""
    if not t.scored:
        return f"{_trial_label(t, several_tiers)}: not scored (slower than a candidate within budget)"
    bound = f" (upper bound {t.drop_bound:.2f})" if t.refused_for_bound(budget) else ""
    return f"{_trial_label(t, several_tiers)}: drop {t.drop_pct:.2f}{bound}"


def _tried_line(trials: list[Trial], budget: float) -> str:
    """Every candidate when there are few; past ``LISTED_TRIALS``, how many and each tier's closest (the progress lines
    name them all as they are scored): a list of 92 candidates made the exit-3 line 5,294 characters long."""
    tiers = len({_tier_of(t) for t in trials})
    if len(trials) <= LISTED_TRIALS:
        return "; ".join(_described(t, tiers > 1, budget) for t in trials)
    closest: dict[tuple[tuple[str, ...], str], Trial] = {}  # filled nearest first: each tier's first is its closest
    for trial in sorted(trials, key=lambda t: (not t.scored, t.drop_pct)):
        closest.setdefault(_tier_of(trial), trial)
    listed = "; ".join(_described(t, tiers > 1, budget) for t in closest.values())
    return f"{len(trials)} candidates in {tiers} tier{'s' if tiers > 1 else ''}, the closest of each: {listed}"


def _ops_label(op_types: list[str]) -> str:
    """A tier's op types for the one-line error: a long list (fpga's 16) named by its first few, or it fills the line."""
    if not op_types:
        return "all ops"
    shown = ",".join(op_types[:3])
    return shown if len(op_types) <= 4 else f"{shown}+{len(op_types) - 3} more"


def _tier_note(space: SearchSpace, tier: int) -> str:
    assert space.tiers is not None
    ops = f"op types: {', '.join(space.tiers[tier]) or 'every op ONNX Runtime quantizes'}"
    if space.transform(tier):
        only = ", fully quantized only" if tier in space.full_only else ""
        return f"{ops}, {space.transform(tier)} source (searched when priced below the choice so far{only})"
    first = tier < len(space.tiers) - 1 and not space.transform(tier + 1)
    return ops + (" (fast_op_types, tried first)" if first else "")


def target_cost(hardware: HardwareFacts | None, feeds: list[dict[str, np.ndarray]]) -> Cost | None:
    """A candidate's roofline latency on the target at the scoring data's input shapes; None without hardware facts."""
    if hardware is None or not feeds:
        return None
    shapes = {name: [int(d) for d in value.shape] for name, value in feeds[0].items()}

    def cost(model: onnx.ModelProto) -> float | None:
        try:
            ms, _ = latency_ms(model, hardware, input_shapes=shapes)
        except Exception:  # an estimate must never break a compile: the search then ranks by float-kept nodes
            return None
        return ms

    return cost


def _choice_note(best: Trial, passing: list[Trial], has_cost: bool) -> str:
    if has_cost and best.cost_ms is not None:
        cheapest = min(t.cost_ms for t in passing if t.cost_ms is not None)
        if best.cost_ms > cheapest:
            return (
                f"smallest drop among the candidates priced within {PRICE_TIE:.0%} of the lowest cost-model "
                f"latency on the target ({cheapest:.3g} ms; {len(passing)} candidates within budget)"
            )
        return f"lowest cost-model latency on the target among {len(passing)} candidates within budget"
    return f"fewest float-kept nodes among {len(passing)} candidates within budget (no cost estimate)"


def tune(
    space: SearchSpace,
    evaluator: Evaluator,
    budget: float,
    scored_on: str,
    settings: TunerSettings,
    summary: dict[str, Any],
    progress: Progress,
) -> tuple[onnx.ModelProto, Trial]:
    """(the chosen candidate, its trial), the search recorded in ``summary``; QualityGateError when none fits."""
    feeds = evaluator.first_feeds(SENSITIVITY_SAMPLES)
    cost = target_cost(settings.hardware, feeds)
    z = NormalDist().inv_cdf(settings.confidence)
    clock = SearchClock(settings.max_seconds)
    runs = [_Search(build, evaluator, budget, z, progress, cost, clock=clock) for build in space.builds]
    try:
        chosen, trials, sensitivity = _search_tiers(
            space, runs, evaluator, (budget, feeds), settings, summary, progress
        )
    except SearchTimeUp:
        chosen, trials, sensitivity = _scored_so_far(space, runs)
        summary["search_stopped_s"] = round(clock.elapsed(), 1)
        progress(
            f"search stopped after {clock.elapsed():.0f} s (quantize.max_search_seconds = {settings.max_seconds:g}): "
            "the choice among the candidates scored so far"
        )
    floor = evaluator.input_floor()
    summary |= {
        "tried": [t.to_dict() for t in trials],
        "worst_layers": [{"node": n, "output_nsr_gain_if_float": round(v, 6)} for n, v in sensitivity[:10]],
        "parallel_runs": evaluator.workers,  # samples and ranking candidates run side by side, one thread each
        **({"input_floor": floor.to_dict()} if floor else {}),
    }
    if chosen is None or chosen.best_trial is None:
        stopped = settings.max_seconds if "search_stopped_s" in summary else None
        explain = not settings.retried_without and stopped is None  # the explanation is more candidates to run
        where = (lambda: _where_lost(runs, evaluator, progress)) if explain else None
        raise _no_candidate(trials, budget, scored_on, evaluator, settings.max_float, where, stopped)
    best = chosen.best_trial
    _record_choice(best, [t for t in trials if t.meets_budget], cost is not None, space, summary)
    model = chosen.best
    assert model is not None
    return verified_rewrite(space, model, best, evaluator, (budget, z), summary, progress)


def _search_tiers(
    space: SearchSpace,
    runs: list[_Search],
    evaluator: Evaluator,
    budget_and_feeds: tuple[float, list[dict[str, np.ndarray]]],
    settings: TunerSettings,
    summary: dict[str, Any],
    progress: Progress,
) -> tuple[SearchResult | None, list[Trial], list[tuple[str, float]]]:
    """Each tier in turn while a later one can still win: (the choice, the trials of the tiers searched, the first
    sensitivity ranking)."""
    budget, feeds = budget_and_feeds
    trials: list[Trial] = []
    chosen: SearchResult | None = None
    sensitivity: list[tuple[str, float]] = []
    priced = runs[0].cost is not None if runs else False
    unavailable, probe_ceiling = probe_fully_quantized(space, runs, progress, settings) if priced else ({}, inf)
    for tier in range(len(space.builds)):
        if chosen is not None and chosen.best_trial is not None:
            if not chosen.best_trial.float_nodes or chosen.best_trial.cost_ms is None or tier in space.fallback:
                break  # fully quantized (nothing is cheaper), no cost model to compare tiers by, or a fallback's turn
        if settings.left_for_retry(space, tier, chosen):
            without = ", ".join(settings.retried_without)
            progress(f"{space.transform(tier) or 'fallback'} tier left for the compile without {without}")
            summary.setdefault("tiers_left_for_retry", []).append(space.transform(tier))
            continue
        # The probe announced each tier already: a tier's header again only before its float-kept candidates.
        said = _headed(progress, _tier_note(space, tier)) if len(space.builds) > 1 else progress
        runs[tier].progress = said
        try:
            if tier in unavailable:
                raise unavailable[tier]
            # A tie with the choice so far, or with a later tier's fully quantized candidate, may still win on its drop.
            ceiling = _tie_limit(min(_cost_of(chosen), probe_ceiling))
            found = _search_tier(space, tier, evaluator, budget, feeds, settings, said, ceiling, runs[tier])
        except TierUnavailable as exc:  # an optional rewritten source that cannot be made: the choice so far stands
            said(f"{space.transform(tier)} tier skipped: {exc}")
            summary.setdefault("tiers_skipped", []).append({"transform": space.transform(tier), "why": str(exc)})
            continue
        _label(space, tier, found.trials)
        trials += found.trials
        sensitivity = sensitivity or found.sensitivity
        if found.best_trial is not None and (chosen is None or _beats(found, chosen, space.methods)):
            chosen = found
    return chosen, trials, sensitivity


def _label(space: SearchSpace, tier: int, trials: list[Trial]) -> None:
    for trial in trials:
        trial.op_types = space.tiers[tier] if space.tiers is not None else None
        trial.transform = space.transform(tier)


def _scored_so_far(space: SearchSpace, runs: list[_Search]) -> tuple[SearchResult, list[Trial], list]:
    """What every tier scored before the time limit, and the choice among those within budget (``choose``, as the
    tiers' results are compared)."""
    for tier, run in enumerate(runs):
        _label(space, tier, run.trials)
    trials = [t for run in runs for t in run.trials]
    best = choose([t for run in runs for t in run.passing], space.methods)
    owner = next((run for run in runs if any(t is best for t in run.passing)), None)
    return SearchResult(best, trials, [], owner.build if owner is not None else None), trials, []


def verified_rewrite(
    space: SearchSpace,
    model: onnx.ModelProto,
    best: Trial,
    evaluator: Evaluator,
    budget_and_z: tuple[float, float],
    summary: dict[str, Any],
    progress: Progress,
) -> tuple[onnx.ModelProto, Trial]:
    """The chosen candidate with the space's exact speed rewrite when the rewritten model meets the budget by its
    own score (its float rounding differs), else the candidate as chosen; what happened goes to ``summary``."""
    if space.verified_rewrite is None:
        return model, best
    name, rewrite = space.verified_rewrite
    rewritten, places = rewrite(model)
    if not places:
        return model, best
    budget, z = budget_and_z
    measured = _measured(evaluator.score(rewritten), budget, z)
    kept = measured["meets_budget"]
    summary[name] = {"places": places, "drop_pct": round(measured["drop_pct"], 4), "kept": kept}
    verdict = "kept" if kept else f"over {budget:g}: the choice ships as scored"
    progress(f"{name} ({places} places): drop {measured['drop_pct']:.2f} ({verdict})")
    if not kept:
        return model, best
    best = replace(best, **measured)
    summary |= {"drop_pct": best.drop_pct, "value": best.value}
    return rewritten, best


def _measured(score: AccuracyScore, budget: float, z: float) -> dict[str, Any]:
    """A score as Trial fields: the drop, its spread, and whether its upper bound (z standard errors; none at z = 0)
    meets ``budget``."""
    bound = score.drop_bound(z, budget)
    return {
        "drop_pct": score.drop_pct,
        "value": score.value,
        "meets_budget": bound <= budget,
        "agreement": score.agreement,
        "drop_se": score.drop_se,
        "drop_bound": bound if z else None,
    }


def _headed(progress: Progress, header: str) -> Progress:
    """``progress`` that says ``header`` once, before its first line."""
    pending = [header]

    def say(line: str) -> None:
        if pending:
            progress(pending.pop())
        progress(line)

    return say


def probe_fully_quantized(
    space: SearchSpace, runs: list[_Search], progress: Progress, settings: TunerSettings
) -> tuple[dict[int, TierUnavailable], float]:
    """Each tier's fully quantized candidates, tier by tier until one meets the budget: (the tiers that could not be
    made, that candidate's price). A tier whose float-kept variants would cost more than it is then never ranked
    (the ranking is most of a search: PP-OCRv4 rec fpga's every-op tier ranked 64 nodes per method for nothing).
    Tiers left for a retry are not probed: nothing fits before them yet."""
    unavailable: dict[int, TierUnavailable] = {}
    for tier, run in enumerate(runs):
        if tier in space.fallback:  # searched by ``tune`` only when nothing before it fits
            break
        if settings.left_for_retry(space, tier, None):
            continue
        if len(runs) > 1:
            progress(_tier_note(space, tier))
        for method in space.methods:
            try:
                run.attempt(method, [], SENSITIVITY)
            except TierUnavailable as exc:
                unavailable[tier] = exc
                break
            except ValueError:  # a calibrator refusing this data: the tier's search says so
                continue
            if run.passing and tier in space.one_fit_per_tier:
                break
        if run.passing:
            return unavailable, min(t.cost_ms if t.cost_ms is not None else inf for t in run.passing)
    return unavailable, inf


def _search_tier(
    space: SearchSpace,
    tier: int,
    evaluator: Evaluator,
    budget: float,
    feeds: list[dict[str, np.ndarray]],
    settings: TunerSettings,
    progress: Progress,
    ceiling: float,
    run: _Search,
) -> SearchResult:
    return search(
        space.builds[tier],
        space.methods,
        evaluator,
        budget,
        space.reference(tier),
        feeds[:SENSITIVITY_SAMPLES],
        max_float=0 if tier in space.full_only else settings.max_float,
        candidates=space.candidates,
        progress=progress,
        float_weights=settings.float_weights,
        ceiling=ceiling,
        run=run,  # carries the tier's z, cost model and trials so far
        other_methods_once_fit=tier not in space.one_fit_per_tier,
    )


def _record_choice(
    best: Trial, passing: list[Trial], has_cost: bool, space: SearchSpace, summary: dict[str, Any]
) -> None:
    summary |= {"method": best.method, "tuned": True, "float_kept": best.float_nodes}
    summary |= {"drop_pct": best.drop_pct, "value": best.value, "cost_ms": best.cost_ms}
    summary["choice"] = _choice_note(best, passing, has_cost)
    if space.tiers is not None:
        summary["op_types"] = best.op_types
    if best.transform:
        summary["transform"] = best.transform


def _undecided(trials: list[Trial], budget: float) -> Trial | None:
    """The fastest-priced candidate whose drop is within ``budget`` while its upper bound is not (None: none)."""
    close = [t for t in trials if t.refused_for_bound(budget)]
    return min(close, key=lambda t: (t.cost_ms if t.cost_ms is not None else inf, t.drop_bound), default=None)


def _beats(found: SearchResult, chosen: SearchResult, methods: list[str]) -> bool:
    assert found.best_trial is not None and chosen.best_trial is not None
    return choose([chosen.best_trial, found.best_trial], methods) is found.best_trial


def _cost_of(chosen: SearchResult | None) -> float:
    trial = chosen.best_trial if chosen is not None else None
    return trial.cost_ms if trial is not None and trial.cost_ms is not None else inf


def untuned(space: SearchSpace, summary: dict[str, Any]) -> onnx.ModelProto:
    """No scorer or no search: the last tier, everything quantized with the first method."""
    summary |= {"method": space.methods[0], "tuned": False}
    # A rewritten source (SmoothQuant tier) is searched, never assumed: the last plain tier.
    last = max(i for i in range(len(space.builds)) if not space.transform(i))
    if space.tiers is not None:
        summary["op_types"] = space.tiers[last]
    return space.builds[last](space.methods[0], [])
