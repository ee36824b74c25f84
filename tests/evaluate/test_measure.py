"""Host measurement logic: interleaving order, stop rules, percentile maths, bootstrap CI, and `lepton bench`.

No test here asserts a speed: timings come from a fake clock, or only their structure is checked.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import DIGITS

from lepton_cli.evaluate import latency as measure
from lepton_cli.samples.sample_set import load_samples


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _runners(clock: FakeClock, costs: dict[str, float], log: list[tuple[str, int]]):
    def make(name: str):
        def run(i: int) -> None:
            log.append((name, i))
            clock.now += costs[name]

        return run

    return {name: make(name) for name in costs}


def test_round_order_alternates_abba():
    assert [measure.round_order(["a", "b"], r) for r in range(4)] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert measure.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_interleaved_order_and_warmup_excluded():
    clock, log = FakeClock(), []
    rule = measure.StopRule(runs=4, seconds=1e9, warmup=2)
    samples = measure.measure_interleaved(_runners(clock, {"a": 0.001, "b": 0.003}, log), rule, clock=clock)
    # 2 warm-up rounds then 4 measured rounds, every round in ABBA order
    assert [name for name, _ in log] == ["a", "b", "b", "a"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(samples["a"]) == len(samples["b"]) == 4  # warm-up runs not recorded
    assert samples["a"] == pytest.approx([0.001] * 4) and samples["b"] == pytest.approx([0.003] * 4)
    # each measured run gets the round number, so feeds cycle across rounds
    assert [i for name, i in log[4:] if name == "a"] == [0, 1, 2, 3]


def test_stop_after_seconds_but_not_before_min_runs():
    clock, log = FakeClock(), []
    rule = measure.StopRule(runs=1000, seconds=0.05, min_runs=5, warmup=0)
    samples = measure.measure_interleaved(_runners(clock, {"a": 0.01, "b": 0.01}, log), rule, clock=clock)
    # each round costs 0.02 s: the 0.05 s cap is passed after round 3, but min_runs holds it to 5 rounds
    assert len(samples["a"]) == 5
    clock2, log2 = FakeClock(), []
    quick = measure.StopRule(runs=1000, seconds=0.05, min_runs=1, warmup=0)
    samples = measure.measure_interleaved(_runners(clock2, {"a": 0.01, "b": 0.01}, log2), quick, clock=clock2)
    assert len(samples["a"]) == 3  # 0.06 s >= 0.05 s after the third round


def test_stop_rule_runs_cap_and_validation():
    rule = measure.StopRule(runs=10, seconds=100, min_runs=5)
    assert rule.done(10, 0.0) and not rule.done(9, 99.0) and rule.done(5, 100.0) and not rule.done(4, 100.0)
    assert measure.StopRule(runs=3, seconds=1, min_runs=5).done(3, 2.0)  # runs cap below min_runs still stops
    for bad in ({"runs": 0}, {"seconds": 0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            measure.StopRule(**bad)


def test_percentiles_and_summary_maths():
    values = [float(v) for v in range(1, 101)]  # 1..100 s
    assert measure.percentile(values, 50) == pytest.approx(50.5)
    assert measure.percentile(values, 90) == pytest.approx(90.1)
    assert measure.percentile(values, 99) == pytest.approx(99.01)
    s = measure.summarize([0.001, 0.002, 0.003, 0.010], batch=4)
    assert s["runs"] == 4 and s["p50_ms"] == pytest.approx(2.5) and s["mean_ms"] == pytest.approx(4.0)
    assert s["min_ms"] == pytest.approx(1.0)
    assert s["throughput_per_s"] == pytest.approx(4 / 0.004)  # samples per second = batch / mean
    with pytest.raises(ValueError):
        measure.percentile([], 50)


def test_bootstrap_exact_ratio_gives_degenerate_interval():
    a = np.linspace(1.0, 2.0, 51)
    r = measure.bootstrap_p50_ratio(a, 2 * a)
    assert r["paired"] and r["ratio"] == pytest.approx(2.0)
    assert r["ci_low"] == pytest.approx(2.0) and r["ci_high"] == pytest.approx(2.0)


def test_paired_median_ratio_cancels_load_shared_by_a_round():
    rng = np.random.default_rng(0)
    load = rng.uniform(1.0, 3.0, 80)  # a neighbour's load, changing from round to round, hits A and B alike
    a = 1.0 * load * rng.uniform(0.99, 1.01, 80)
    b = 1.5 * load * rng.uniform(0.99, 1.01, 80)
    r = measure.bootstrap_p50_ratio(a, b)
    assert r["paired_median_ratio"] == pytest.approx(1.5, rel=0.01)
    low, high = r["paired_ci"]
    assert high - low < 0.03 < r["ci_high"] - r["ci_low"]  # far tighter than the ratio of medians' interval
    assert "paired_median_ratio" not in measure.bootstrap_p50_ratio(a, b[:-1])  # unpaired: not defined


def test_bootstrap_interval_covers_true_ratio_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (30, 600):
        a = rng.lognormal(0.0, 0.2, n)
        b = 1.3 * rng.lognormal(0.0, 0.2, n)
        r = measure.bootstrap_p50_ratio(a, b, seed=3)
        assert r["ci_low"] <= r["ratio"] <= r["ci_high"]
        assert r["ci_low"] < 1.3 < r["ci_high"] or abs(r["ratio"] - 1.3) < 0.05
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[1] < widths[0]
    same = measure.bootstrap_p50_ratio(a, b, seed=3)
    assert same == measure.bootstrap_p50_ratio(a, b, seed=3)  # seeded: reproducible


def test_bootstrap_unpaired_lengths():
    r = measure.bootstrap_p50_ratio([1.0, 1.1, 0.9], [2.0, 2.2, 1.8, 2.1, 1.9])
    assert not r["paired"] and r["ratio"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        measure.bootstrap_p50_ratio([], [1.0])


def test_make_feeds_real_samples_or_random_with_warning():
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    random = measure.make_feeds(model, None)
    assert random.source == "random" and random.warning and "random" in random.warning
    samples = load_samples(DIGITS / "calib.npz", model, role="--calib")
    real = measure.make_feeds(model, samples, "--calib")
    assert real.warning is None and real.source.startswith("--calib")
    assert len(real.feeds) == min(measure.MAX_FEEDS, len(samples))
    np.testing.assert_array_equal(next(iter(real.feeds[0].values())), next(iter(samples.feed(0).values())))


def test_host_latency_structure_on_a_real_model():
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    samples = load_samples(DIGITS / "calib.npz", model, role="--calib")
    feeds = measure.make_feeds(model, samples, "--calib")
    cands = [measure.Candidate("a", model, feeds.feeds), measure.Candidate("b", model, feeds.feeds)]
    doc = measure.host_latency(
        cands, measure.StopRule(runs=6, seconds=60, warmup=1), threads=1, providers=["CPUExecutionProvider"]
    )
    assert doc["base"] == "a" and set(doc["models"]) == {"a", "b"} and set(doc["ratios"]) == {"b"}
    assert doc["settings"]["threads"] == 1 and doc["settings"]["providers"] == ["CPUExecutionProvider"]
    for m in doc["models"].values():
        assert m["runs"] == 6 and len(m["samples_ms"]) == 6
        assert m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"]
    r = doc["ratios"]["b"]
    assert r["ci_low"] <= r["ratio"] <= r["ci_high"]


def test_bench_cli_json_shape(run_cli, tmp_path):
    res = run_cli(
        "bench",
        DIGITS / "digits_cnn.onnx",
        "--against",
        DIGITS / "digits_cnn.onnx",
        "--target",
        "cpu-avx",
        "--runs",
        "5",
        "--seconds",
        "30",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--calib",
        DIGITS / "calib.npz",
        "--json",
        "-o",
        tmp_path / "out",
    )
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["format"] == "lepton-bench/1" and doc["target"] == "cpu-avx"
    lat = doc["host_latency"]
    assert lat["base"] == "digits_cnn.onnx (against)" and list(lat["ratios"]) == ["digits_cnn.onnx"]
    assert lat["settings"]["threads"] == 1 and lat["input"]["source"].startswith("--calib")
    assert all(m["runs"] == 5 and len(m["samples_ms"]) == 5 for m in lat["models"].values())
    assert set(doc["cost_model"]["models"]) == set(lat["models"])
    assert doc["budgets"]["ok"] is True
    assert not any("random" in w for w in doc["warnings"])
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_bench_cli_latency_gate_exits_3(run_cli):
    # Any real ratio is far above 1e-6: this gate must fail, whatever the speed of the machine.
    res = run_cli(
        "bench",
        DIGITS / "digits_cnn.onnx",
        "--against",
        DIGITS / "digits_cnn.onnx",
        "--runs",
        "3",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--max-latency-ratio",
        "0.000001",
    )
    assert res.code == 3, res.stderr
    assert "max-latency-ratio" in res.stderr and "random inputs" in res.stderr  # random-input warning said plainly


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--runs", "0"], "--runs"),
        (["--max-latency-ratio", "1.1"], "--against"),
        (["--target", "no-such-target"], "unknown target"),
        (["--enforce-budgets"], "--target"),
        (["--seconds", "nan"], "--seconds > 0"),
        (["--seed", "-1"], "--seed -1 is out of range"),
    ],
)
def test_bench_cli_bad_usage_exits_2(run_cli, args, needle):
    res = run_cli("bench", DIGITS / "digits_cnn.onnx", *args)  # each fails before measuring anything
    assert res.code == 2, res.stderr
    assert needle in res.stderr


def test_bench_missing_file_exits_2(run_cli, tmp_path):
    res = run_cli("bench", tmp_path / "nope.onnx")
    assert res.code == 2 and "does not exist" in res.stderr


def test_bench_a_bundle_against_its_source(run_cli, tmp_path):
    """A compiled bundle is opened (dev keys in the test's LEPTON_HOME), its target's cost model applies."""
    done = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", "cpu-avx", "-o", tmp_path, "--no-bench", "--json")
    assert done.code == 0, done.stderr
    bundle = json.loads(done.stdout)["bundle"]
    perf = json.loads(done.stdout)["performance"]  # compile --json: latency/estimate/budgets in a few keys
    assert perf["host_p50_ms"] is None and perf["budgets_ok"] is True and perf["estimated_latency_ms"] > 0
    res = run_cli(
        "bench",
        bundle,
        "--against",
        DIGITS / "digits_cnn.onnx",
        "--runs",
        "3",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--calib",
        DIGITS / "calib.npz",
        "--json",
    )
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    kinds = {s["label"]: s["kind"] for s in doc["subjects"]}
    assert sorted(kinds.values()) == ["bundle", "model"] and doc["target"] == "cpu-avx"
    assert doc["host_latency"]["base"] == "digits_cnn.onnx" and set(doc["cost_model"]["models"]) == set(kinds)


def test_bench_dynamic_dims_without_shapes_exit_2(run_cli, tmp_path):
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # free spatial dims: random inputs cannot guess them
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    res = run_cli("bench", path, "--runs", "2")
    assert res.code == 2 and "--input-shape" in res.stderr


def test_bench_an_nhwc_bundle_alone_and_against_its_source(run_cli, tmp_path):
    """edge-arm compiles to NHWC input: random feeds follow the bundle's own layout, source data is converted."""
    done = run_cli(
        "compile",
        DIGITS / "digits_cnn.onnx",
        "--target",
        "edge-arm",
        "-o",
        tmp_path,
        "--no-bench",
        "--json",
        "--calib",
        DIGITS / "calib.npz",
    )
    assert done.code == 0, done.stderr
    bundle = json.loads(done.stdout)["bundle"]
    alone = run_cli("bench", bundle, "--runs", "2", "--warmup", "0", "--threads", "1", "--json")
    assert alone.code == 0, alone.stderr
    with_data = run_cli(
        "bench", bundle, "--runs", "2", "--warmup", "0", "--threads", "1", "--calib", DIGITS / "calib.npz"
    )
    assert with_data.code == 0, with_data.stderr  # NCHW data, as for compile, fed to the NHWC bundle
    pair = run_cli(
        "bench",
        bundle,
        "--against",
        DIGITS / "digits_cnn.onnx",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--calib",
        DIGITS / "calib.npz",
        "--json",
    )
    assert pair.code == 0, pair.stderr
    assert json.loads(pair.stdout)["target"] == "edge-arm"


def test_bind_like_follows_layout_and_keeps_static_dims():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", "W", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "H", "W", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"lepton.io_layout.x": "NHWC"})
    bound = measure.bind_like(model, {"x": [1, 3, 32, 48]})  # NCHW terms, 3 channels; the model pads to 8
    dims = [d.dim_value for d in bound.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 32, 48, 8]


def test_bootstrap_on_many_samples_is_chunked():
    rng = np.random.default_rng(2)
    a = rng.lognormal(0, 0.1, 50_000)
    r = measure.bootstrap_p50_ratio(a, a * 1.25, resamples=200)  # 200 x 50k indices would be 80 MB at once
    assert r["ratio"] == pytest.approx(1.25) and r["paired_ci"] == pytest.approx([1.25, 1.25])


def test_a_compiled_model_slower_than_its_source_is_warned_only_where_the_host_stands_in_for_the_target():
    from dataclasses import replace

    from lepton_cli.evaluate.latency import slower_than_source
    from lepton_cli.host.detect import HostInfo
    from lepton_cli.pipeline.targets import load_target

    vnni = replace(HostInfo.unknown(), isa=("avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"))
    slower = {"ratios": {"compiled": {"ratio": 1.22, "ci_low": 1.18, "ci_high": 1.27}}}  # PP-OCRv4 rec at 0.5 pt
    unsure = {"ratios": {"compiled": {"ratio": 1.03, "ci_low": 0.97, "ci_high": 1.08}}}
    paired = {"ratios": {"compiled": {"ratio": 1.1, "ci_low": 0.5, "ci_high": 1.3, "paired_ci": [1.05, 1.14]}}}
    assert "95% CI 1.05-1.14" in slower_than_source(paired, load_target("cpu-avx"), vnni)[0]  # the paired interval
    (text,) = slower_than_source(slower, load_target("cpu-avx"), vnni)
    assert "1.22x the source's p50" in text and "--max-accuracy-drop" in text
    assert slower_than_source(unsure, load_target("cpu-avx"), vnni) == []  # the interval reaches 1: not shown
    assert slower_than_source(slower, load_target("edge-arm"), vnni) == []  # x86 kernels say nothing of an A76
    assert slower_than_source({"measured": False}, load_target("cpu-avx"), vnni) == []
