"""quantize's tuner chooses by the target's cost model: the passing candidate priced fastest (not the one with
the fewest float-kept nodes), a candidate priced above one within budget is never scored, and a later
op-type tier competes only when the chosen candidate keeps layers float and the tier could be cheaper."""

from __future__ import annotations

import onnx
import pytest
from conftest import DIGITS, needs_ocr
from lepton_cli.passes._quantize import tuning
from lepton_cli.passes._quantize.tuning import SearchSpace, Trial, TunerSettings, choose

from lepton_cli.errors import QualityGateError
from lepton_cli.evaluate.accuracy import AccuracyScore
from lepton_cli.pipeline.targets import load_target

NODES = ["n0", "n1", "n2", "n3"]


def _trial(method: str, keep: int, cost: float | None, drop: float = 0.5) -> Trial:
    return Trial(method, [f"n{i}" for i in range(keep)], drop, 100 - drop, True, cost_ms=cost)


def test_choose_prefers_the_cheapest_over_the_fewest_float_nodes():
    few_float_but_slow = _trial("minmax", 1, cost=9.0)
    more_float_but_fast = _trial("percentile", 3, cost=6.0)
    # the old rule (fewest float-kept nodes) picks the 1-float candidate; the target runs the other faster
    assert choose([few_float_but_slow, more_float_but_fast], ["minmax", "percentile"]) is more_float_but_fast


def test_choose_breaks_ties_by_float_nodes_then_drop_then_method_order():
    methods = ["minmax", "percentile"]
    a, b = _trial("minmax", 2, 5.0), _trial("minmax", 1, 5.0)
    assert choose([a, b], methods) is b
    c, d = _trial("percentile", 1, 5.0, drop=0.2), _trial("minmax", 1, 5.0, drop=0.4)
    assert choose([d, c], methods) is c
    e, f = _trial("percentile", 1, 5.0, drop=0.2), _trial("minmax", 1, 5.0, drop=0.2)
    assert choose([e, f], methods) is f
    e.agreement, f.agreement = {"snr_db": 31.0}, {"snr_db": 27.0}  # same drop: the output closer to the source's
    assert choose([e, f], methods) is e
    assert choose([_trial("minmax", 0, None), g := _trial("minmax", 4, 50.0)], methods) is g  # no estimate: last
    assert choose([_trial("minmax", 3, None), h := _trial("minmax", 1, None)], methods) is h  # none: fewest float
    closer = _trial("minmax", 3, None, drop=0.1)  # without estimates no price ties: the fewest float, then the drop
    assert choose([closer, h], methods) is h


def test_a_price_tie_goes_to_the_smaller_drop_then_the_fewest_float_nodes():
    # all-MiniLM-L6 on cpu-avx: one float FFN Gemm priced 1.13 ms at drop 0.89, every Gemm int8 (SmoothQuant'ed)
    # 1.15 ms at 0.31; measured the same speed (0.519x vs 0.514x fp32): within the cost model's error, the closer one
    methods = ["minmax", "percentile"]
    one_float, all_int8 = _trial("percentile", 1, 1.13, drop=0.89), _trial("minmax", 0, 1.15, drop=0.31)
    assert choose([one_float, all_int8], methods) is all_int8
    assert choose([one_float, _trial("minmax", 0, 1.17, drop=0.31)], methods) is one_float  # 3.5 % dearer: no tie
    cheap_and_close = _trial("minmax", 2, 1.12, drop=0.2)  # the cheapest sets the band and is the closest too
    assert choose([cheap_and_close, one_float, all_int8], methods) is cheap_and_close
    same_drop = [_trial("minmax", 2, 1.12), fewer := _trial("minmax", 1, 1.14), _trial("minmax", 3, 1.13)]
    assert choose(same_drop, methods) is fewer  # the same drop: the fewest float-kept nodes


class _Evaluator:
    """Scores a candidate by its tag: the drops a table gives; records what it scored."""

    opt_level = "all"

    workers = 1

    def __init__(self, drops: dict[str, float]):
        self.drops, self.scored = drops, []
        self.snrs: dict[str, float] = {}  # tag -> the candidate's output SNR (choose's tie-break)

    def first_feeds(self, count):
        return [{"image": None}]

    def input_floor(self):
        return None  # no input on an 8-bit grid

    def score(self, model):
        tag = model.doc_string
        self.scored.append(tag)
        drop = self.drops.get(tag, 5.0)
        return AccuracyScore("top1", 100.0, 100.0 - drop, drop, {"snr_db": self.snrs.get(tag, 20.0)}, 100)


def _space(base: onnx.ModelProto, builds_log: list[str]) -> SearchSpace:
    def tier_build(tier: int):
        def build(method: str, keep: list[str]) -> onnx.ModelProto:
            model = onnx.ModelProto()
            model.CopyFrom(base)
            model.doc_string = f"t{tier}:{method}:{','.join(sorted(keep))}"
            builds_log.append(model.doc_string)
            return model

        return build

    return SearchSpace(
        [tier_build(0), tier_build(1)], ["minmax"], base, tiers=[["Conv"], []], candidates=lambda m: NODES
    )


def _tune(monkeypatch, drops: dict[str, float], costs: dict[str, float], fallback: tuple[int, ...] = ()):
    monkeypatch.setattr(tuning, "float_gains", lambda *a, **k: [(n, 1.0) for n in NODES])
    monkeypatch.setattr(
        tuning, "target_cost", lambda hw, feeds: (lambda m: costs.get(m.doc_string, 100.0)) if hw else None
    )
    builds: list[str] = []
    evaluator = _Evaluator(drops)
    summary: dict = {}
    space = _space(onnx.load(DIGITS / "digits_cnn.onnx"), builds)
    space.fallback = set(fallback)
    settings = TunerSettings(max_float=4, float_weights=True, confidence=0.5, hardware=load_target("cpu-avx").hardware)
    _, best = tuning.tune(space, evaluator, 1.0, "test", settings, summary, lambda *a: None)
    return best, summary, evaluator.scored, builds


def test_a_fallback_tier_is_not_even_built_while_an_earlier_tier_has_a_candidate(monkeypatch):
    """edge-arm's lowered tier: PP-OCRv5 rec passes plain with layers float and must keep that choice."""
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "t1:minmax:": 0.2}  # the fallback would fit, cheaper
    costs = {"t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 9.0}
    best, summary, scored, builds = _tune(monkeypatch, drops, costs, fallback=(1,))
    assert best.op_types == ["Conv"] and len(best.float_nodes) == 4
    assert not [b for b in builds if b.startswith("t1")]


def test_a_fallback_tier_is_searched_when_nothing_before_it_fits(monkeypatch):
    """PP-OCRv4 det on edge-arm: no plain candidate within budget, the lowered tier's within it."""
    drops = {"t1:minmax:n0": 0.6}
    best, summary, scored, builds = _tune(monkeypatch, drops, {}, fallback=(1,))
    assert best.op_types == [] and best.float_nodes == ["n0"]
    assert scored.index("t1:minmax:") > max(i for i, tag in enumerate(scored) if tag.startswith("t0"))


def test_a_later_tier_wins_when_it_is_cheaper_than_the_first_tiers_float_kept_candidate(monkeypatch):
    # tier 0 (Conv only, the fast tier) meets the budget only with 4 nodes float; tier 1 fully quantized does
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "t1:minmax:": 0.8}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0": 11.0, "t0:minmax:n0,n1": 12.0, "t0:minmax:n0,n1,n2,n3": 14.0}
    costs |= {"t0:minmax:n0,n1,n2": 13.5, "t1:minmax:": 13.0}
    best, summary, scored, _ = _tune(monkeypatch, drops, costs)
    assert best.op_types == [] and best.float_nodes == [] and best.cost_ms == 13.0  # old rule: tier 0, 4 float
    assert summary["op_types"] == [] and summary["cost_ms"] == 13.0 and summary["float_kept"] == []
    assert summary["choice"] == "lowest cost-model latency on the target among 1 candidates within budget"
    # Each tier's fully quantized candidate first: tier 1's price then bounds tier 0's float-kept search, so its
    # 4-float candidate (14.0, over 13.0's tie) is priced but never scored.
    tried = [(t["op_types"], t["cost_ms"], t["scored"]) for t in summary["tried"]]
    assert tried[0] == (["Conv"], 10.0, True) and tried[-1] == ([], 13.0, True)
    assert (["Conv"], 14.0, False) in tried and "t0:minmax:n0,n1,n2,n3" not in scored
    assert scored[:2] == ["t0:minmax:", "t1:minmax:"]


def test_a_first_tier_priced_above_a_later_fully_quantized_fit_is_never_ranked(monkeypatch):
    """PP-OCRv4 rec on fpga: the every-op tier's fully quantized model priced above the host tier's, which fits."""
    monkeypatch.setattr(tuning, "float_gains", lambda *a, **k: pytest.fail("a tier that cannot win was ranked"))
    best, summary, scored, _ = _tune(monkeypatch, {"t1:minmax:": 0.5}, {"t0:minmax:": 25.4, "t1:minmax:": 22.9})
    assert best.op_types == [] and best.float_nodes == [] and scored == ["t0:minmax:", "t1:minmax:"]


def test_a_later_tier_priced_above_the_chosen_candidate_is_built_and_scored_once_and_not_chosen(monkeypatch):
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "t1:minmax:": 0.8}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0": 11.0, "t0:minmax:n0,n1": 12.0, "t0:minmax:n0,n1,n2,n3": 14.0}
    costs |= {"t0:minmax:n0,n1,n2": 13.5, "t1:minmax:": 15.0}
    best, summary, scored, builds = _tune(monkeypatch, drops, costs)
    assert best.op_types == ["Conv"] and len(best.float_nodes) == 4
    # The probe scores each tier's fully quantized candidate once, before tier 0's float-kept search.
    assert [s for s in scored if s.startswith("t1")] == [b for b in builds if b.startswith("t1")] == ["t1:minmax:"]
    assert not [t for t in summary["tried"] if not t["scored"]]


def test_a_fully_quantized_first_tier_ends_the_search(monkeypatch):
    best, summary, scored, builds = _tune(monkeypatch, {"t0:minmax:": 0.1}, {"t0:minmax:": 10.0, "t1:minmax:": 1.0})
    assert best.float_nodes == [] and best.op_types == ["Conv"]
    assert scored == ["t0:minmax:"] and not [b for b in builds if b.startswith("t1")]  # no time spent on tier 1


def test_within_a_tier_candidates_costlier_than_a_passing_one_are_not_scored(monkeypatch):
    # minmax passes with 2 float nodes (cost 30); percentile would need 4 (cost 50): built, priced, never scored
    monkeypatch.setattr(tuning, "float_gains", lambda *a, **k: [(n, 1.0) for n in NODES])

    def build(method, keep):
        model = onnx.ModelProto()
        model.doc_string = f"{method}:{','.join(sorted(keep))}"
        return model

    def cost(model):
        return 10.0 + 10.0 * model.doc_string.split(":")[1].count("n")

    evaluator = _Evaluator({"minmax:n0,n1": 0.5, "percentile:n0,n1,n2,n3": 0.1})
    found = tuning.search(
        build,
        ["minmax", "percentile"],
        evaluator,
        1.0,
        onnx.ModelProto(),
        [],
        max_float=4,
        candidates=lambda m: NODES,
        cost=cost,
    )
    assert found.best_trial is not None and found.best_trial.method == "minmax"
    assert found.best_trial.float_nodes == ["n0", "n1"] and found.best_trial.cost_ms == 30.0
    assert "percentile:n0,n1,n2,n3" not in evaluator.scored and "percentile:n0,n1" in evaluator.scored
    pruned = [t for t in found.trials if not t.scored]
    assert [(t.method, len(t.float_nodes), t.cost_ms) for t in pruned] == [("percentile", 4, 50.0)]


def test_no_candidate_within_budget_still_exits_3_with_every_trial(monkeypatch):
    with pytest.raises(QualityGateError) as exc:
        _tune(monkeypatch, {}, {})
    assert "minmax[Conv]+4 float: drop 5.00" in exc.value.message
    assert "minmax[all ops]+4 float: drop 5.00" in exc.value.message


def test_every_method_fully_quantized_is_scored_once_one_fits_and_the_closest_wins(monkeypatch):
    """A small scoring set reads 0.00 for both methods; the first method's ranges used to win by order alone."""
    monkeypatch.setattr(tuning, "float_gains", lambda *a, **k: pytest.fail("no float-kept search after a full fit"))

    def build(method, keep):
        model = onnx.ModelProto()
        model.doc_string = f"{method}:{','.join(sorted(keep))}"
        return model

    evaluator = _Evaluator({"minmax:": 0.0, "percentile:": 0.0, "mse:": 3.0})
    evaluator.snrs = {"minmax:": 24.0, "percentile:": 29.5, "mse:": 35.0}
    found = tuning.search(
        build, ["minmax", "percentile", "mse"], evaluator, 1.0, onnx.ModelProto(), [], max_float=4, cost=lambda m: 10.0
    )
    assert evaluator.scored == ["minmax:", "percentile:", "mse:"]  # mse is over budget: its SNR does not count
    assert found.best_trial is not None and found.best_trial.method == "percentile"


def test_a_method_that_cannot_calibrate_does_not_sink_a_model_another_method_fits():
    def build(method, keep):
        if method == "percentile":
            raise ValueError("Histogram has not been collected. Please run collect() first.")
        model = onnx.ModelProto()
        model.doc_string = f"{method}:{','.join(sorted(keep))}"
        return model

    notes: list[str] = []
    evaluator = _Evaluator({"minmax:": 0.0})
    found = tuning.search(
        build, ["minmax", "percentile"], evaluator, 1.0, onnx.ModelProto(), [], max_float=4, progress=notes.append
    )
    assert found.best_trial is not None and found.best_trial.method == "minmax"
    assert any("percentile" in n and "not usable" in n for n in notes)
    with pytest.raises(ValueError):  # with nothing fitting yet, the failure is not hidden
        tuning.search(build, ["percentile", "minmax"], _Evaluator({}), 1.0, onnx.ModelProto(), [], max_float=4)


def _with_smoothquant_tier(space: SearchSpace, builds_log: list[str], made: list[str]) -> SearchSpace:
    """``space`` plus a third tier quantizing a rewritten source, whose float reference is made on first use."""
    reference = onnx.ModelProto()
    reference.doc_string = "smoothed reference"

    def build(method: str, keep: list[str]) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.doc_string = f"sq:{method}:{','.join(sorted(keep))}"
        builds_log.append(model.doc_string)
        return model

    def make_reference() -> onnx.ModelProto:
        made.append("reference")
        return reference

    assert space.tiers is not None
    space.builds.append(build)
    space.tiers.append([])
    space.transforms = ["", "", "smoothquant"]
    space.references = [lambda: space.float_model, lambda: space.float_model, make_reference]
    return space


def _tune_with_tier(
    monkeypatch,
    drops: dict[str, float],
    costs: dict[str, float],
    transform: str = "smoothquant",
    retried_without: tuple[str, ...] = (),
    full_only: frozenset = frozenset(),
    builds: list[str] | None = None,
    summary: dict | None = None,
    one_fit: frozenset = frozenset(),
    methods: tuple[str, ...] = ("minmax",),
):
    """(best, summary, builds, made, references) of a search over two plain tiers and a ``transform`` tier ("sq:");
    ``builds`` and ``summary`` are filled in place when given (they outlive a refusal)."""
    references: list[str] = []  # the float model each sensitivity ranking ran against
    monkeypatch.setattr(
        tuning, "float_gains", lambda ref, *a, **k: references.append(ref.doc_string) or [(n, 1.0) for n in NODES]
    )
    monkeypatch.setattr(tuning, "target_cost", lambda hw, feeds: lambda m: costs.get(m.doc_string, 100.0))
    builds = [] if builds is None else builds
    made: list[str] = []
    base = onnx.load(DIGITS / "digits_cnn.onnx")
    space = _with_smoothquant_tier(_space(base, builds), builds, made)
    space.full_only, space.one_fit_per_tier, space.methods = set(full_only), set(one_fit), list(methods)
    space.transforms = ["", "", transform]
    summary = {} if summary is None else summary
    hardware = load_target("cpu-avx").hardware
    settings = TunerSettings(4, True, 0.5, hardware=hardware, retried_without=retried_without)
    _, best = tuning.tune(space, _Evaluator(drops), 1.0, "test", settings, summary, lambda *a: None)
    return best, summary, builds, made, references


def test_a_recovery_tier_waits_for_the_retry_when_nothing_plain_fits(monkeypatch):
    # only the recovered source fits; prune spent budget before, so a refusal compiles again without it
    drops, costs = {"sq:minmax:": 0.4}, {"t0:minmax:": 10.0, "t1:minmax:": 15.0, "sq:minmax:": 10.0}
    best, _, builds, _, _ = _tune_with_tier(monkeypatch, drops, costs, transform="recovery")
    assert best.transform == "recovery" and "sq:minmax:" in builds  # the attempt nothing retries takes it
    builds, summary = [], {}
    with pytest.raises(QualityGateError) as refused:
        _tune_with_tier(monkeypatch, drops, costs, "recovery", ("prune",), builds=builds, summary=summary)
    assert not [b for b in builds if b.startswith("sq:")]  # its fits never ran
    assert summary["tiers_left_for_retry"] == ["recovery"]
    assert "where it is lost" not in refused.value.message  # the retry explains its own refusal


def test_a_recovery_tier_still_improves_a_plain_choice_before_a_retry(monkeypatch):
    # the plain tiers fit with 4 float nodes: the recovery tier is searched as without a pending retry, and wins
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "sq:minmax:": 0.6}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0, "sq:minmax:": 10.0}
    best, summary, _, _, _ = _tune_with_tier(monkeypatch, drops, costs, "recovery", ("prune",))
    assert best.transform == "recovery" and best.float_nodes == [] and "tiers_left_for_retry" not in summary


def test_a_transform_tier_cheaper_than_the_plain_choice_wins_and_ranks_against_its_own_reference(monkeypatch):
    # plain tiers fit only with 4 nodes float (cost 14); the smoothed source fits with 1 float node at cost 12
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "sq:minmax:n0": 0.6}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0": 11.0, "t0:minmax:n0,n1": 12.0, "t0:minmax:n0,n1,n2": 13.5}
    costs |= {"t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0, "sq:minmax:": 11.0, "sq:minmax:n0": 12.0}
    best, summary, _, made, references = _tune_with_tier(monkeypatch, drops, costs)
    assert best.transform == "smoothquant" and best.float_nodes == ["n0"] and best.cost_ms == 12.0
    assert summary["transform"] == "smoothquant" and summary["float_kept"] == ["n0"]
    assert made == ["reference"] and references[-1] == "smoothed reference"  # its float-kept nodes read its source
    assert [t["transform"] for t in summary["tried"] if t["cost_ms"] in (11.0, 12.0)][-2:] == ["smoothquant"] * 2


def test_a_fully_quantized_only_tier_builds_no_float_kept_variant(monkeypatch):
    # as above, but the transform tier offers only its fully quantized model (fast_recovery_tier): its 1-float variant,
    # which would fit and win, is never built, so the plain tier's 4 float nodes stand
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "sq:minmax:n0": 0.6}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0": 11.0, "t0:minmax:n0,n1": 12.0, "t0:minmax:n0,n1,n2": 13.5}
    costs |= {"t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0, "sq:minmax:": 11.0, "sq:minmax:n0": 12.0}
    best, summary, builds, _, _ = _tune_with_tier(monkeypatch, drops, costs, full_only=frozenset({2}))
    assert best.transform == "" and best.float_nodes == ["n0", "n1", "n2", "n3"]
    assert [b for b in builds if b.startswith("sq:")] == ["sq:minmax:"]


def test_a_fully_quantized_only_tier_wins_when_its_fully_quantized_model_fits(monkeypatch):
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "sq:minmax:": 0.7}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0, "sq:minmax:": 10.0}
    best, summary, _, _, _ = _tune_with_tier(monkeypatch, drops, costs, full_only=frozenset({2}))
    assert best.transform == "smoothquant" and best.float_nodes == [] and summary["float_kept"] == []


@pytest.mark.parametrize("one_fit", [False, True])
def test_a_tier_that_refits_per_method_builds_no_other_method_once_one_fits(monkeypatch, one_fit):
    """fpga's fast recovery tier re-rounds the weights on each method's int8 model (about 2.5 minutes a method on
    PP-OCRv4 rec): once percentile's fully quantized model fits, mse's is not built there; plain tiers still score
    every method's, whose ranges then compete on closeness."""
    drops = {"sq:percentile:": 0.3, "sq:mse:": 0.2}
    costs = {"t0:percentile:": 8.0, "t0:mse:": 8.0, "t1:percentile:": 15.0, "t1:mse:": 15.0}
    costs |= {"sq:percentile:": 9.0, "sq:mse:": 9.0}
    tier = frozenset({2}) if one_fit else frozenset()
    best, _, builds, _, _ = _tune_with_tier(
        monkeypatch,
        drops,
        costs,
        "fast_recovery",
        full_only=frozenset({2}),
        one_fit=tier,
        methods=("percentile", "mse"),
    )
    assert {"t0:percentile:", "t0:mse:", "t1:percentile:", "t1:mse:"} <= set(builds)
    assert ("sq:mse:" in builds) is not one_fit
    assert best.transform == "fast_recovery" and best.method == ("percentile" if one_fit else "mse")


def test_a_transform_tier_is_neither_made_nor_built_when_the_plain_choice_is_fully_quantized(monkeypatch):
    best, summary, builds, made, _ = _tune_with_tier(monkeypatch, {"t0:minmax:": 0.1}, {"t0:minmax:": 10.0})
    assert best.transform == "" and "transform" not in summary
    assert made == [] and not [b for b in builds if b.startswith("sq")]


def test_a_transform_tier_that_misses_the_budget_leaves_the_plain_choice(monkeypatch):
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5}  # the smoothed source never fits
    costs = {"t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0, "sq:minmax:": 11.0, "sq:minmax:n0": 12.0}
    costs |= {"sq:minmax:n0,n1": 13.0, "sq:minmax:n0,n1,n2,n3": 14.5}
    best, summary, _, made, _ = _tune_with_tier(monkeypatch, drops, costs)
    assert best.transform == "" and len(best.float_nodes) == 4 and made == ["reference"]
    smoothed = [t for t in summary["tried"] if t["transform"] == "smoothquant"]
    assert smoothed and not any(t["meets_budget"] for t in smoothed)
    assert [t["scored"] for t in smoothed if t["float_kept"] == 4] == [False]  # priced above the plain choice


def test_an_untuned_quantize_never_takes_the_transform_tier():
    builds: list[str] = []
    space = _with_smoothquant_tier(_space(onnx.load(DIGITS / "digits_cnn.onnx"), builds), builds, [])
    summary: dict = {}
    model = tuning.untuned(space, summary)
    assert model.doc_string == "t1:minmax:" and summary["op_types"] == []


def test_a_transform_tier_that_cannot_be_made_is_skipped_and_the_plain_choice_stands(monkeypatch):
    monkeypatch.setattr(tuning, "float_gains", lambda *a, **k: [(n, 1.0) for n in NODES])
    costs = {"t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0}
    monkeypatch.setattr(tuning, "target_cost", lambda hw, feeds: lambda m: costs.get(m.doc_string, 10.0))
    builds: list[str] = []
    space = _space(onnx.load(DIGITS / "digits_cnn.onnx"), builds)

    def unavailable(method, keep):
        raise tuning.TierUnavailable("SmoothQuant could not run on this model (ValueError: no layer statistics)")

    space.builds.append(unavailable)
    space.tiers = [["Conv"], [], []]
    space.transforms = ["", "", "smoothquant"]
    notes: list[str] = []
    summary: dict = {}
    settings = TunerSettings(max_float=4, float_weights=True, confidence=0.5, hardware=load_target("cpu-avx").hardware)
    _, best = tuning.tune(
        space, _Evaluator({"t0:minmax:n0,n1,n2,n3": 0.5}), 1.0, "test", settings, summary, notes.append
    )
    assert best.transform == "" and len(best.float_nodes) == 4
    assert summary["tiers_skipped"] == [
        {"transform": "smoothquant", "why": "SmoothQuant could not run on this model (ValueError: no layer statistics)"}
    ]
    assert any(n.startswith("smoothquant tier skipped: ") for n in notes)


def test_a_transform_tier_priced_within_the_tie_of_the_plain_choice_is_searched_and_wins_on_its_drop(monkeypatch):
    # plain tiers fit with 4 nodes float at 14.0 (drop 0.5); the smoothed source fully quantized at 14.3 (2 % dearer)
    drops = {"t0:minmax:n0,n1,n2,n3": 0.5, "sq:minmax:": 0.3}
    costs = {"t0:minmax:": 10.0, "t0:minmax:n0": 11.0, "t0:minmax:n0,n1": 12.0, "t0:minmax:n0,n1,n2": 13.5}
    costs |= {"t0:minmax:n0,n1,n2,n3": 14.0, "t1:minmax:": 15.0, "sq:minmax:": 14.3}
    best, summary, _, made, _ = _tune_with_tier(monkeypatch, drops, costs)
    assert best.transform == "smoothquant" and best.float_nodes == [] and best.cost_ms == 14.3
    assert summary["choice"].startswith("smallest drop among the candidates priced within 3%")
    assert "(14 ms; 2 candidates within budget)" in summary["choice"]


@pytest.mark.parametrize("rewritten_drop, kept", [(0.4, True), (1.5, False)])
def test_an_exact_speed_rewrite_of_the_choice_ships_only_when_it_meets_the_budget_itself(
    monkeypatch, rewritten_drop, kept
):
    """Float rounding differs after an exact rewrite (restore_hard_swish): it is scored, and the choice as made ships
    when the rewritten model does not meet the budget."""
    monkeypatch.setattr(tuning, "float_gains", lambda *a, **k: [(n, 1.0) for n in NODES])
    monkeypatch.setattr(tuning, "target_cost", lambda hw, feeds: lambda m: 10.0)

    def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
        copy = onnx.ModelProto.FromString(model.SerializeToString())
        copy.doc_string += ":rewritten"
        return copy, 2

    space = _space(onnx.load(DIGITS / "digits_cnn.onnx"), [])
    space.verified_rewrite = ("rewrite", rewrite)
    evaluator, summary = _Evaluator({"t0:minmax:": 0.1, "t0:minmax::rewritten": rewritten_drop}), {}
    settings = TunerSettings(max_float=4, float_weights=True, confidence=0.5, hardware=load_target("cpu-avx").hardware)
    model, best = tuning.tune(space, evaluator, 1.0, "test", settings, summary, lambda *a: None)
    assert evaluator.scored == ["t0:minmax:", "t0:minmax::rewritten"]
    assert summary["rewrite"] == {"places": 2, "drop_pct": rewritten_drop, "kept": kept}
    assert model.doc_string.endswith(":rewritten") == kept
    assert best.drop_pct == summary["drop_pct"] == (rewritten_drop if kept else 0.1)


@needs_ocr
def test_fpga_prices_pp_ocr_rec_with_its_hard_swish_on_the_dpu_below_the_host_tier(tmp_path):
    """PP-OCRv4 rec on fpga: fuse writes its hard-swishes as x * HardSigmoid(x), which the DPU runs (no Div left for
    the A53). Priced the DPU's way, every op int8 costs well under the host tier (element-wise ops float on the A53
    between a dequantize and a quantize); priced as ORT's CPU EP runs QLinearMul, the two were within a few per cent,
    so the search shipped 608 host ops where a fully int8 model fit."""
    import dataclasses
    import sys

    import numpy as np
    from conftest import OCR_REC, REPO
    from det_int8 import fused_model
    from lepton_cli.passes._quantize import schemes
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

    from lepton_cli.device_artifacts import dpu
    from lepton_cli.evaluate.costmodel import latency_ms
    from lepton_cli.samples.sample_set import load_samples

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    target, shapes = load_target("fpga"), {"x": [1, 3, 48, 320]}
    fused = fused_model(OCR_REC, shapes, "fpga")

    def hard_sigmoids(m: onnx.ModelProto) -> int:
        return sum(node.op_type == "HardSigmoid" for node in m.graph.node)

    assert hard_sigmoids(fused) - hard_sigmoids(onnx.load(OCR_REC)) >= 20  # each fused hard-swish adds one
    model = schemes.preprocess(fused, tmp_path)
    np.savez(tmp_path / "calib.npz", x=ocr_textset.make_set(8, 1, "calib")[0])
    settings = CalibrationSettings(method="minmax", chunk=8, max_samples=8, power_of_two=True)
    ranges = calibrate(model, load_samples(tmp_path / "calib.npz", model), settings, None)
    ranges_file = schemes.save_ranges(ranges, tmp_path / "ranges.json")
    host_tier = tuple(next(step for step in target.passes if step.name == "quantize").params.op_types)
    ort_style = dataclasses.replace(target.hardware, int8_elementwise=False)
    priced = {}
    for label, op_types in {"every op": (), "host tier": host_tier}.items():
        scheme = schemes.Int8Scheme(
            activation_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True, op_types=op_types
        )
        int8 = schemes.quantize_int8(model, ranges_file, "minmax", scheme, [], tmp_path)
        priced[label] = (
            latency_ms(int8, target.hardware, input_shapes=shapes)[0],
            latency_ms(int8, ort_style, input_shapes=shapes)[0],
        )
        violations, _ = dpu.check(int8, list(target.runtime.supported_ops))
        assert not [v for v in violations if v.op in ("Div", "Clip")], violations
    assert priced["every op"][0] < 0.6 * priced["host tier"][0], priced
    assert priced["every op"][1] > 0.9 * priced["host tier"][1], priced  # what chose the host tier before
