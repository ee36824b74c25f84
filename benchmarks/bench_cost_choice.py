"""Quantize's choice by the target's cost model vs the old fewest-float-layers rule, against measured latency.

For each model the quantize pass runs twice on cpu-avx with the corpus's calibration data (the
scoring set is the held-out part of ``--calib``, as in a compile without ``--eval``): once as
shipped (the candidate within budget the cost model prices fastest, tiers competing by cost) and
once with no cost model (the old rule: the first op-type tier with a candidate, fewest float-kept
nodes, then the smaller drop). The candidates within budget of both runs (the two choices first,
then the others by estimated cost, at most ``--max-candidates``) are rebuilt and timed with fp32
interleaved (ONNX Runtime, all optimisations, 1 thread by default, ABBA order), so each latency is a
ratio to fp32 from the same run; a few over-budget trials spread over the estimated costs
(``--rank-extra``) are timed too. The cost model's ranking is compared with the measured one: the
old-vs-new pair, and Kendall's tau over the candidates within budget and over all timed ones.

    LEPTON_CORPUS_DIR=/tmp/lcorpus nice -n 15 .venv/bin/python benchmarks/bench_cost_choice.py \
        [--models digits ddddocr_det ppocrv4_det ppocrv4_rec ddddocr_common] [--threads 1] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lepton_cli.passes.quantize as quantize_pass  # noqa: E402
from lepton_cli.passes._quantize import tuning  # noqa: E402

from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import data_paths  # noqa: E402
from lepton_cli.evaluate.latency import Candidate, StopRule, host_latency  # noqa: E402
from lepton_cli.host.detect import detect_host  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import load_samples  # noqa: E402

CORPUS = Path(os.environ.get("LEPTON_CORPUS_DIR", "/tmp/lcorpus"))
MODELS = {  # name: (model file, input shapes); data: the corpus's calib set
    "digits": (ROOT / "examples" / "digits" / "digits_cnn.onnx", {"image": [1, 1, 8, 8]}),
    "ddddocr_det": (CORPUS / "models" / "ddddocr_det.onnx", {"images": [1, 3, 416, 416]}),
    "ppocrv4_det": (CORPUS / "models" / "ppocrv4_det.onnx", {"x": [1, 3, 320, 320]}),
    "ppocrv4_rec": (CORPUS / "models" / "ppocrv4_rec.onnx", {"x": [1, 3, 48, 320]}),
    "ddddocr_common": (CORPUS / "models" / "ddddocr_common.onnx", {"input1": [1, 1, 64, 256]}),
}
OUT = ROOT / "benchmarks" / "results" / "cost_choice"


@dataclass
class Run:
    summary: dict[str, Any]
    space: tuning.SearchSpace
    seconds: float


def _quantize(model: onnx.ModelProto, calib_path: Path, target_name: str, *, cost_model: bool) -> Run:
    """The quantize pass as a compile runs it (--calib only), capturing its search space to rebuild candidates."""
    target = load_target(target_name)
    step = next(s for s in target.passes if s.name == "quantize")
    ctx = PassContext(target=target, calib=load_samples(calib_path, model), host=detect_host())
    captured: dict[str, tuning.SearchSpace] = {}
    real_tune, real_cost = quantize_pass.tune, tuning.target_cost

    def tune(space: tuning.SearchSpace, *args: Any) -> Any:
        captured["space"] = space
        return real_tune(space, *args)

    quantize_pass.tune = tune  # type: ignore[assignment]
    if not cost_model:
        tuning.target_cost = lambda hardware, feeds: None  # type: ignore[assignment]  # the old rule
    try:
        started = time.perf_counter()
        result = quantize_pass.quantize(onnx.ModelProto.FromString(model.SerializeToString()), ctx, step.params)
        seconds = time.perf_counter() - started
    finally:
        quantize_pass.tune, tuning.target_cost = real_tune, real_cost  # type: ignore[assignment]
    return Run(result.summary, captured["space"], seconds)


def _key(trial: dict[str, Any]) -> tuple[Any, ...]:
    ops = tuple(trial.get("op_types") or ())
    return (ops, trial.get("transform", ""), trial["method"], tuple(sorted(trial["float_nodes"])))


def _label(trial: dict[str, Any]) -> str:
    ops = ",".join(trial.get("op_types") or []) or "all ops"
    source = f"{trial['transform']}:" if trial.get("transform") else ""
    return f"{source}{trial['method']}[{ops}]+{trial['float_kept']}{' leading' if trial['float_rule'] == 'leading' else ''}"


def _chosen(run: Run) -> dict[str, Any]:
    s = run.summary
    key = (tuple(s.get("op_types") or ()), s.get("transform", ""), s["method"], tuple(sorted(s["float_kept"])))
    return next(t for t in s["tried"] if _key(t) == key and t["meets_budget"])


def _rebuild(space: tuning.SearchSpace, trial: dict[str, Any]) -> onnx.ModelProto:
    tiers = [(ops, space.transform(i)) for i, ops in enumerate(space.tiers or [])]
    tier = tiers.index((list(trial.get("op_types") or []), trial.get("transform", ""))) if tiers else -1
    return space.builds[tier](trial["method"], list(trial["float_nodes"]))


def _spread(tried: list[dict[str, Any]], picks: dict[tuple[Any, ...], Any], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` more trials spread over the estimated costs (cheapest, dearest, then between)."""
    rest = sorted((t for t in tried if _key(t) not in picks and t["cost_ms"] is not None), key=lambda t: t["cost_ms"])
    if count <= 0 or not rest:
        return []
    positions = np.linspace(0, len(rest) - 1, min(count, len(rest)))
    return [rest[i] for i in sorted({int(round(p)) for p in positions})]


def _tau(rows: list[dict[str, Any]]) -> float | None:
    return _kendall([r["cost_ms"] for r in rows], [r["measured_ratio"]["ratio"] for r in rows])


def _kendall(a: list[float], b: list[float]) -> float | None:
    pairs = list(combinations(range(len(a)), 2))
    if not pairs:
        return None
    agree = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(agree / len(pairs))


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path, shapes = MODELS[name]
    model = bind_input_shapes(upgrade_opset(onnx.load(path), 13, 21)[0], shapes)  # as a compile loads it
    calib = data_paths(by_name(name))[0]
    new = _quantize(model, calib, args.target, cost_model=True)  # first: any warm-cache advantage goes to the old rule
    old = _quantize(model, calib, args.target, cost_model=False)
    old_pick, new_pick = _chosen(old), _chosen(new)
    cost = tuning.target_cost(load_target(args.target).hardware, [{k: np.zeros(v) for k, v in shapes.items()}])
    assert cost is not None
    picks: dict[tuple[Any, ...], tuple[str, dict[str, Any], tuning.SearchSpace]] = {}
    for role, pick, run in (("old", old_pick, old), ("new", new_pick, new)):
        if _key(pick) in picks:
            picks[_key(pick)] = ("old = new", pick, run.space)
        else:
            picks[_key(pick)] = (role, pick, run.space)
    others = [(t, new.space) for t in new.summary["tried"] if t["meets_budget"] and _key(t) not in picks]
    others += [(t, old.space) for t in old.summary["tried"] if t["meets_budget"] and _key(t) not in picks]
    for trial, space in others:
        if len(picks) >= args.max_candidates:
            break
        picks.setdefault(_key(trial), ("other", trial, space))
    for trial in _spread(new.summary["tried"], picks, args.rank_extra):  # over budget: for the ranking only
        picks[_key(trial)] = ("over budget", trial, new.space)
    feeds = list(load_samples(calib, model).feeds(4))
    candidates = [Candidate("fp32", model, feeds)]
    rows = []
    for role, trial, space in picks.values():
        built = _rebuild(space, trial)
        label = f"{role}: {_label(trial)}"
        candidates.append(Candidate(label, built, feeds))
        rows.append({"role": role, "label": label, "trial": _trial_doc(trial), "cost_ms": cost(built)})
    fp32_cost = cost(model)
    timing = host_latency(
        candidates,
        StopRule(runs=args.runs, seconds=args.seconds, min_runs=10, warmup=3),
        threads=args.threads,
        providers=["CPUExecutionProvider"],
        keep_samples=False,
    )
    for row in rows:
        row["measured_ratio"] = timing["ratios"][row["label"]]
        row["cost_ratio"] = row["cost_ms"] / fp32_cost if row["cost_ms"] and fp32_cost else None
    within = [r for r in rows if r["trial"]["meets_budget"]]
    return {
        "model": name,
        "shapes": shapes,
        "fp32_cost_ms": fp32_cost,
        "fp32_p50_ms": timing["models"]["fp32"]["p50_ms"],
        "old": _run_doc(old, old_pick),
        "new": _run_doc(new, new_pick),
        "candidates": rows,
        "pair_agrees": _pair_agrees(rows),
        "kendall_tau_within_budget": _tau(within),
        "kendall_tau_all_timed": _tau(rows),
        "timing_settings": timing["settings"],
    }


def _trial_doc(t: dict[str, Any]) -> dict[str, Any]:
    keep = ("method", "op_types", "float_kept", "float_rule", "drop_pct", "cost_ms", "meets_budget")
    return {k: t.get(k) for k in keep}


def _run_doc(run: Run, pick: dict[str, Any]) -> dict[str, Any]:
    tried = run.summary["tried"]
    return {
        "search_seconds": round(run.seconds, 1),
        "trials": len(tried),
        "scored": sum(t["scored"] for t in tried),
        "within_budget": sum(t["meets_budget"] for t in tried),
        "choice": run.summary.get("choice"),
        "chosen": _trial_doc(pick),
        "tried": [_trial_doc(t) | {"scored": t["scored"]} for t in tried],
    }


def _pair_agrees(rows: list[dict[str, Any]]) -> bool | None:
    """Does the cost model order the old and the new choice as the measured latency does?"""
    by_role = {r["role"]: r for r in rows}
    if "old" not in by_role or "new" not in by_role:
        return None  # one choice: nothing to order
    old, new = by_role["old"], by_role["new"]
    return (new["cost_ms"] <= old["cost_ms"]) == (new["measured_ratio"]["ratio"] <= old["measured_ratio"]["ratio"])


def _drop(trial: dict[str, Any]) -> str:
    return "not scored" if trial["drop_pct"] is None else f"{trial['drop_pct']:.2f}"


def _fmt(value: float | bool | None) -> str:
    if value is None:
        return "—"
    return str(value) if isinstance(value, bool) else f"{value:.2f}"


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | candidate | float-kept | drop | est. ms | est. / fp32 | measured / fp32 (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["candidates"]:
            m = r["measured_ratio"]
            ci = f"{m['ratio']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})"
            lines.append(
                f"| {res['model']} | {r['label']} | {r['trial']['float_kept']} | {_drop(r['trial'])} "
                f"| {r['cost_ms']:.3f} | {r['cost_ratio']:.3f} | {ci} |"
            )
    lines += [
        "",
        "| model | old rule chose | new rule chose (why) | search s old / new | trials scored old / new (+ built, not scored) "
        "| cost model orders old vs new as measured | Kendall tau within budget | Kendall tau all timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        o, n = res["old"], res["new"]
        lines.append(
            f"| {res['model']} | {_label(o['chosen'])} | {_label(n['chosen'])} ({n['choice']}) "
            f"| {o['search_seconds']} / {n['search_seconds']} | {o['scored']} / {n['scored']} (+{n['trials'] - n['scored']}) "
            f"| {_fmt(res['pair_agrees'])} | {_fmt(res['kendall_tau_within_budget'])} | {_fmt(res['kendall_tau_all_timed'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--target", default="cpu-avx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-candidates", type=int, default=5, help="candidates within budget timed")
    ap.add_argument("--rank-extra", type=int, default=3, help="over-budget trials timed for the ranking check")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    results = []
    for name in args.models:
        print(f"== {name}", flush=True)
        results.append(bench_model(name, args))
        print(_table(results[-1:]), flush=True)
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": os.getloadavg(), "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    args.out.with_suffix(".md").write_text(_table(results) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
