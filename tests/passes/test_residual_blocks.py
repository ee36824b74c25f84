"""Residual blocks (quantize recovery on per-tensor targets, residual_blocks.py): a post-LN encoder's residual sums
on the host beside their LayerNorms, the projection writing outlier dimensions split into blocks of output columns by
range; exact in float, far less int8 error at fpga's power-of-two per-tensor scales. all-MiniLM-L6 with real
sentences where the corpus is built; a small encoder with BERT's outlier dimensions otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus_runs import CORPUS, needs_corpus
from det_int8 import fused_model
from lepton_cli.passes._quantize import residual_blocks, schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.int8_plan import float_ops, sentinel_nodes
from lepton_cli.passes._quantize.recovery import RecoverySettings, recover
from test_gelu_equalize import MINILM_INPUTS, _minilm, _token_cosine
from test_residual_scaling import OUTLIERS, _encoder, _feeds, _run

from lepton_cli.errors import BadInputError
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.samples.sample_set import SampleSet

FPGA_SCHEME = schemes.Int8Scheme(
    activation_type="s8", weight_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True
)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


def _int8(model: onnx.ModelProto, calib: list[dict], exclude: list[str], tmp_path: Path) -> onnx.ModelProto:
    """fpga's grid (s8, symmetric, one power-of-two scale per tensor), minmax; an attention mask's path float."""
    stacked = {name: np.stack([f[name] for f in calib]) for name in calib[0]}
    samples = SampleSet(Path("calib"), stacked, None, {name: True for name in stacked})
    data = calibrate(model, samples, CalibrationSettings())
    ranges = schemes.save_ranges(data, tmp_path / "ranges.json")
    return schemes.quantize_int8(model, ranges, "minmax", FPGA_SCHEME, exclude + sentinel_nodes(model, data), tmp_path)


def test_column_blocks_part_outliers_from_the_rest_and_leave_flat_ranges_whole():
    ranges = np.array([1.0, 0.9, 200.0, 1.1, 5.0, 0.2, 0.8, 1.2])
    order, bounds = residual_blocks.column_blocks(ranges)
    assert [sorted(order[s:e].tolist()) for s, e in zip(bounds, bounds[1:])] == [[2], [4], [0, 1, 3, 6, 7], [5]]
    assert residual_blocks.column_blocks(np.array([1.0, 3.0, 0.5, 2.0])) is None


def test_the_outlier_projection_is_split_its_sum_left_float_and_the_rewrite_is_exact():
    model, feeds = _encoder(), _feeds(8, 1)
    blocked_model = _copy(model)
    blocked = residual_blocks.split_residual_branches(blocked_model, feeds)
    assert blocked.sites == 1 and list(blocked.branches_split) == ["ffn2"]
    nodes = {n.name: n for n in blocked_model.graph.node}
    assert "ffn2" not in nodes and {"ln1", "res2", "ln2"} <= set(blocked.float_nodes)
    join = [nodes[name].op_type for name in blocked.float_nodes[:2]]
    assert join == ["Concat", "Gather"]
    # the outlier dimensions get a block of their own
    first_block = next(n for n in blocked_model.graph.node if n.name == "ffn2_b0")
    width = {t.name: t.dims for t in blocked_model.graph.initializer}[first_block.input[1]][1]
    assert width == len(OUTLIERS)
    before, after = _run(model, feeds), _run(blocked_model, feeds)
    np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())


def test_power_of_two_int8_loses_far_less_with_the_blocks_and_the_sum_on_the_host(tmp_path):
    """One power-of-two scale per tensor (fpga): the outlier dimensions leave the others almost nothing, in the
    projection's output and in the sum; the sum on the host takes back some, the blocks (each its own scale) more."""
    model, calib, held_out = _encoder(), _feeds(24, 2), _feeds(16, 3)
    recovered = recover(model, calib, FPGA_SCHEME, RecoverySettings(residual_blocks=True, samples=24))
    assert recovered.summary["residual_branches_split"] == 1
    reference = _run(model, held_out)

    def error(int8: onnx.ModelProto) -> float:
        return float(np.linalg.norm(_run(int8, held_out) - reference) / np.linalg.norm(reference))

    plain = error(_int8(model, calib, [], tmp_path / "plain"))
    sum_on_host = error(_int8(model, calib, ["ln1", "res2", "ln2"], tmp_path / "sum"))
    int8 = _int8(recovered.quantize_source, calib, recovered.float_nodes, tmp_path / "blocked")
    # measured 0.181 -> 0.152 -> 0.105; the rest is ln1's outlier output, quantized for ffn1
    assert error(int8) < 0.75 * sum_on_host < 0.65 * plain, (plain, sum_on_host, error(int8))
    residual = next(n for n in int8.graph.node if n.name == "res2")
    assert "ln1" in residual.input  # the host's float norm output, no int8 round trip on the residual path
    host = {f["node"] for f in float_ops(int8, [])}
    assert {"res2", "ln2", "ffn2_blocks"} <= host and not any(n.startswith("ffn2_b") and n[-1].isdigit() for n in host)


def test_residual_blocks_and_residual_scaling_exclude_each_other():
    table = {"residual_blocks": True, "residual_scaling_alpha": 0.7}
    with pytest.raises(BadInputError, match="residual_scaling_alpha"):
        from_table(get_pass("quantize").params_cls, table, "test.quantize")


@needs_corpus("minilm_l6")
def test_minilm_on_fpgas_grid_keeps_its_token_states_with_the_feed_forward_sums_on_the_host(tmp_path):
    """all-MiniLM-L6 as fpga's fuse leaves it, real sentences, every op on fpga's power-of-two per-tensor grid: its six
    feed-forward projections write one dimension 40-220x the median; blocked and summed on the host the token-state
    cosine loss falls from 69 points to 9 (minmax, 16 sentences calibrated, 12 held out)."""
    source = fused_model(CORPUS / "models" / "minilm_l6.onnx", {name: [1, 32] for name in MINILM_INPUTS}, "fpga")
    calib, held_out = _minilm(16, "calib"), _minilm(12, "eval")
    reference = [r[0] for r in [[x] for x in _run_all(source, held_out)]]
    blocked_model = _copy(source)
    blocked = residual_blocks.split_residual_branches(blocked_model, calib)
    assert blocked.sites == 12 and len(blocked.branches_split) == 6
    assert _token_cosine(reference, _run_all(blocked_model, held_out), held_out) > 0.99999
    plain = 1.0 - _token_cosine(reference, _run_all(_int8(source, calib, [], tmp_path / "p"), held_out), held_out)
    int8 = _int8(blocked_model, calib, blocked.float_nodes, tmp_path / "b")
    after = 1.0 - _token_cosine(reference, _run_all(int8, held_out), held_out)
    assert plain > 0.2 and after < 0.2 * plain, (plain, after)


def _run_all(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    return list(_run(model, feeds))
