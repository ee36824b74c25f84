"""A per-pixel class map in NHWC (MTCNN's PNet, a Keras export through tf2onnx: a Softmax over axis 3 of
[N, H, W, 2]) is scored over its classes, not over its rows, on photographs (scikit-learn's china.jpg and
flower.jpg, different crops for calibration and evaluation)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from wheel_models import MTCNN_PNET, photo_frames, wheel_member

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.samples.sample_set import load_samples


@pytest.fixture(scope="module")
def pnet() -> onnx.ModelProto:
    return onnx.load(wheel_member(*MTCNN_PNET))


def _samples(model: onnx.ModelProto, path, count: int, seed: int):
    np.savez(path, input_1=photo_frames(count, seed))
    return load_samples(path, model, role="--eval")


def _classes_swapped(model: onnx.ModelProto) -> onnx.ModelProto:
    """PNet with its face and background scores trading places (the conv that feeds the Softmax)."""
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    for init in swapped.graph.initializer:
        if init.name.startswith("conv2d_3/"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    return swapped


def test_the_face_map_is_read_over_its_classes(pnet, tmp_path):
    evaluator = Evaluator(pnet, _samples(pnet, tmp_path / "eval.npz", 8, 1))
    role = next(r for r in evaluator.roles if r.name == "softmax")
    assert role.metric == "top1_agreement" and role.class_axis == 3, role
    assert "axis 3" in role.why
    score = evaluator.score(_classes_swapped(pnet))
    softmax = next(o for o in score.outputs if o["name"] == "softmax")
    # every pixel's class flips (where the source's two scores are not within a point of each other)
    assert softmax["drop_pct"] > 95, softmax
    # one unit is a pixel: 8 frames of 55 x 75 cells, not 8 x 75 x 2 rows of a column
    assert softmax["resolution_pct"] == pytest.approx(100 / (8 * 55 * 75), abs=1e-4)
    assert evaluator.score(pnet).drop_pct == 0.0


def test_an_int8_pnet_keeps_its_face_map(pnet, run_cli, tmp_path):
    """Every op int8 (a budget any candidate meets): the face map agrees on nearly every pixel, as ONNX Runtime's
    own QDQ model does (99.7 %); read over the rows of each column it had looked 25-30 points off."""
    model = tmp_path / "pnet.onnx"
    onnx.save(pnet, model)
    calib, held_out = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, input_1=photo_frames(16, 0))
    np.savez(held_out, input_1=photo_frames(16, 1))
    result = run_cli(
        "compile", model, "--target", "cpu-avx", "--calib", calib, "--eval", held_out,
        "--max-accuracy-drop", "100", "--no-bench", "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads(next((tmp_path / "out").glob("*.lepton/report.json")).read_text())
    quantize = next(p for p in report["pipeline"] if p.get("name") == "quantize")["summary"]
    assert quantize["int8_weights"] > 0 and not quantize["float_kept"]
    softmax = next(o for o in report["accuracy"]["outputs"] if o["name"] == "softmax")
    assert softmax["class_axis"] == 3 and softmax["drop_pct"] < 2, softmax
