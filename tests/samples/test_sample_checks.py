"""Placeholder and repeated calibration data: refused or named before any pass runs (real digits images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS

from lepton_cli.errors import BadInputError
from lepton_cli.samples.sample_set import SampleSet, load_samples, placeholder_error, survey

DIGITS_MODEL = DIGITS / "digits_cnn.onnx"


def _digits() -> np.ndarray:
    return np.load(DIGITS / "calib.npz")["image"]


def check_not_constant(samples: SampleSet, role: str) -> None:
    found = survey(samples)
    if found.constant is not None:
        raise placeholder_error(found.constant, samples, role)


def test_real_images_are_distinct_and_not_a_placeholder():
    samples = load_samples(DIGITS / "calib.npz", onnx.load(DIGITS_MODEL))
    assert survey(samples).distinct == len(samples) == 200
    check_not_constant(samples, "--calib")  # raises on placeholder data only


def test_repeats_are_counted_once():
    images = _digits()[:8]
    samples = SampleSet(Path("calib.npz"), {"image": np.concatenate([images] * 4)}, None, {"image": False})
    assert len(samples) == 32 and survey(samples).distinct == 8


def test_a_constant_input_beside_real_data_is_not_a_placeholder():
    # A transformer's token_type_ids are all zero in every sentence: only data with no input that varies is refused.
    images = _digits()[:16]
    arrays = {"image": images, "mask": np.zeros((16, 1, 8, 8), np.float32)}
    check_not_constant(SampleSet(Path("calib.npz"), arrays, None, {"image": False, "mask": False}), "--calib")
    arrays["image"] = np.full_like(images, 16.0)  # a blank (all-ink) page in every sample
    with pytest.raises(BadInputError, match="every input holds one value in every sample"):
        check_not_constant(SampleSet(Path("calib.npz"), arrays, None, {"image": False, "mask": False}), "--calib")


def test_compile_names_repeated_calibration_samples(tmp_path, run_cli):
    np.savez(tmp_path / "calib.npz", image=np.concatenate([_digits()[:8]] * 4))
    result = run_cli(
        "compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out"
    )
    assert result.code == 0, result.stderr[-2000:]
    assert "--calib: 24 of 32 samples repeat another exactly (8 distinct)" in result.stderr
