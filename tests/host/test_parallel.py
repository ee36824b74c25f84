"""Side-by-side model runs: the in-order map really overlaps calls, the run count follows the host, and a
search's numbers on real data are the same with one run at a time and several."""

from __future__ import annotations

import dataclasses
import threading

import onnx
import pytest
from conftest import DIGITS
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.sensitivity import float_gains, quantized_nodes

from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.host.detect import HostInfo
from lepton_cli.host.parallel import RUNS_ENV, ordered_map, parallel_runs
from lepton_cli.samples.sample_set import load_samples


def test_ordered_map_overlaps_calls_and_keeps_input_order():
    both_running = threading.Barrier(2, timeout=10)  # breaks (and fails the test) unless two calls overlap

    def meet(i: int) -> int:
        if i < 2:
            both_running.wait()
        return i * i

    assert list(ordered_map(meet, range(7), workers=2)) == [i * i for i in range(7)]


def test_ordered_map_holds_at_most_workers_plus_one_results():
    drawn: list[int] = []
    results = ordered_map(lambda i: i, (drawn.append(i) or i for i in range(100)), workers=3)
    assert next(results) == 0 and len(drawn) <= 4  # items are drawn as results are taken, not all at once
    assert list(results) == list(range(1, 100))


def _host(cores: int, memory_mb: float | None) -> HostInfo:
    return dataclasses.replace(HostInfo.unknown(), cores_physical=cores, memory_available_mb=memory_mb)


def test_parallel_runs_follow_cores_memory_and_the_override(monkeypatch):
    monkeypatch.delenv(RUNS_ENV, raising=False)
    monkeypatch.setattr("lepton_cli.host.parallel.available_cores", lambda: [0, 1, 2, 3])
    assert parallel_runs(_host(8, None)) == 4  # the cores this process may run on (a build worker's share)
    assert parallel_runs(_host(2, None)) == 2
    assert parallel_runs(_host(8, 4000.0), weights_mb=1000.0) == 2  # half the free memory, one weights copy each
    assert parallel_runs(_host(8, 100.0), weights_mb=1000.0) == 1
    monkeypatch.setenv(RUNS_ENV, "3")
    assert parallel_runs(_host(1, None)) == 3
    monkeypatch.setenv(RUNS_ENV, "two")
    with pytest.raises(BadInputError, match=RUNS_ENV):
        parallel_runs(_host(1, None))


def test_scores_and_ranking_on_real_digits_are_the_same_side_by_side(tmp_path):
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    calib = load_samples(DIGITS / "calib.npz", model)
    held_out = load_samples(DIGITS / "eval.npz", model, role="--eval")
    base = schemes.preprocess(model, tmp_path)
    ranges = schemes.save_ranges(calibrate(base, calib, CalibrationSettings(method="minmax")), tmp_path / "r.json")
    every_op = schemes.Int8Scheme(activation_type="s8", weight_type="s8", per_channel=False, op_types=())
    quantized = schemes.quantize_int8(base, ranges, "minmax", every_op, [], tmp_path)

    one, three = (Evaluator(base, held_out, workers=w) for w in (1, 3))
    assert one.score(quantized) == three.score(quantized)
    feeds = one.first_feeds(8)
    nodes = quantized_nodes(quantized)
    assert len(nodes) > 3
    assert float_gains(base, quantized, nodes, feeds, workers=1) == float_gains(
        base, quantized, nodes, feeds, workers=3
    )
