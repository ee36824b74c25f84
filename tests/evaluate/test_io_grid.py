"""A full-integer chip's edge (io_grid.py): the source with only its float inputs and outputs on an 8-bit grid, and
the refusal that names it where it holds most of a relative-error drop. pytorch's converted Conv2d (real weights,
the onnx package's own test input) on tpu."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ONNX_DATA
from onnx import numpy_helper

from lepton_cli.evaluate.io_grid import io_on_grid, value_ranges
from lepton_cli.model.sessions import make_session

CONV = ONNX_DATA / "pytorch-converted" / "test_Conv2d"


def _shipped_batches() -> np.ndarray:
    """The test input and three variants of it (mirrored, halved, 1.5x), as the corpus calibrates op-level models."""
    tensor = onnx.TensorProto()
    tensor.ParseFromString((CONV / "test_data_set_0" / "input_0.pb").read_bytes())
    x = numpy_helper.to_array(tensor)
    return np.stack([x, np.flip(x, -1), x * 0.5, x * 1.5]).astype(np.float32)


def test_the_edge_model_rounds_only_the_input_and_the_output_to_256_levels():
    model, batches = onnx.load(CONV / "model.onnx"), _shipped_batches()
    feeds = [{"0": b} for b in batches]
    outputs = [{"3": make_session(model).run(None, feed)[0]} for feed in feeds]
    edge = io_on_grid(model, value_ranges([*feeds, *outputs]))
    quantizers = [n for n in edge.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.input[0] for n in quantizers) == ["0", "3_before_grid"]
    source, gridded = make_session(model), make_session(edge)
    for feed in feeds:
        want, got = source.run(None, feed)[0], gridded.run(None, feed)[0]
        assert 0 < np.abs(got - want).max() and len(np.unique(got)) <= 256
        relative = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 0.001 < relative < 0.05, relative


def test_tpu_refuses_a_single_conv_for_its_edge_and_compiles_it_scored_by_direction(run_cli, tmp_path):
    """Relative error under 1 % is finer than an 8-bit input and output allow: the refusal says the edge holds the
    drop (not the Conv) and names the metric flag that scores the output by what it means; with it, it compiles."""
    np.savez(tmp_path / "calib.npz", **{"0": _shipped_batches()})
    args = ["compile", CONV / "model.onnx", "-t", "tpu", "--calib", tmp_path / "calib.npz"]
    refused = run_cli(*args, "-o", tmp_path / "refused")
    assert refused.code == 3, refused.stderr
    assert "the chip's edge, not an op" in refused.stderr and "--eval-metric 3=cosine" in refused.stderr
    assert "where it is lost" not in refused.stderr and "Traceback" not in refused.stderr
    assert not any((tmp_path / "refused").glob("*")) if (tmp_path / "refused").exists() else True
    shipped = run_cli(*args, "--eval-metric", "3=cosine", "-o", tmp_path / "shipped")
    assert shipped.code == 0, shipped.stderr


def test_an_output_scored_by_a_named_metric_is_not_told_about_the_edge(run_cli, tmp_path):
    """The edge clause is for relative error only: a cosine the user named, refused at a budget no int8 model meets,
    gets the usual refusal (a map or a classifier reads its own edge through its task metric)."""
    np.savez(tmp_path / "calib.npz", **{"0": _shipped_batches()})
    refused = run_cli(
        "compile", CONV / "model.onnx", "-t", "tpu", "--calib", tmp_path / "calib.npz",
        "--eval-metric", "3=cosine", "--max-accuracy-drop", "0.00001", "-o", tmp_path / "out",
    )  # fmt: skip
    assert refused.code == 3, refused.stderr
    assert "the chip's edge" not in refused.stderr and "Traceback" not in refused.stderr
