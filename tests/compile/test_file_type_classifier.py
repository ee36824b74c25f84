"""Google's Magika file-type classifier (the ``magika`` 1.0.3 wheel's ``standard_v3_3`` model: 2,048 byte values in,
214 content types out; a jax2tf export whose last MatMul + Add onnxsim fuses into a Gemm with a [1, N] C), a model
none of the corpus's rules were tuned on, fed what Magika feeds it: the bytes at the start and end of real files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO
from lepton_cli.passes._fuse.bias_adds import fold_bias_adds
from wheel_models import MAGIKA, wheel_member

from benchmarks.corpus.data import magika_features  # Magika's own feature extraction, reimplemented there
from lepton_cli.model.sessions import make_session

CONFIDENT = 0.5  # its medium_confidence_threshold: under it the application reports a generic type, not the class


STDLIB = Path(sysconfig.get_paths()["stdlib"])


def real_files(roots: list[Path], count: int, seed: int, half: int | None = None) -> np.ndarray:
    """``count`` files under ``roots``, spread over their suffixes (source, text, data, compiled libraries); ``half``
    0 or 1: only every second file in path order, so that two sets from one tree share no file."""
    by_suffix: dict[str, list[Path]] = {}
    for root in roots:
        for k, path in enumerate(sorted(root.rglob("*"))):
            if half is not None and k % 2 != half:
                continue
            if (
                path.is_file()
                and not path.is_symlink()
                and path.stat().st_size >= 8
                and "__pycache__" not in path.parts
            ):
                by_suffix.setdefault(path.suffix, []).append(path)
    rng = np.random.default_rng(seed)
    suffixes = sorted(by_suffix)
    chosen = [by_suffix[s][int(rng.integers(len(by_suffix[s])))] for s in rng.choice(suffixes, count)]
    return np.array([magika_features(p.read_bytes()) for p in chosen], np.int32)


@pytest.fixture(scope="module")
def magika() -> Path:
    return wheel_member(*MAGIKA)


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory) -> Path:
    """64 files of Python's standard library (source, text, data, compiled modules): one half of its files."""
    path = tmp_path_factory.mktemp("magika") / "files64.npz"
    np.savez(path, bytes=real_files([STDLIB], 64, 1, half=0))
    return path


def test_gemm_row_bias_is_stored_as_a_vector(magika):
    """onnxsim's MatMul + Add -> Gemm keeps the Add's [1, 214] constant as C; ONNX Runtime's quantize_static reads a
    per-channel bias element by element and failed on it (exit 1). fuse stores it as [214]: the same outputs."""
    import onnxsim

    from lepton_cli.model.shapes import bind_input_shapes

    model = bind_input_shapes(onnx.load(magika), {"bytes": [1, 2048]})  # a Gemm needs the batch bound: 2-D rows
    simplified, _ = onnxsim.simplify(model)
    gemms = [n for n in simplified.graph.node if n.op_type == "Gemm"]
    inits = {t.name: t for t in simplified.graph.initializer}
    assert [list(inits[g.input[2]].dims) for g in gemms] == [[1, 214]]
    fold_bias_adds(simplified)
    inits = {t.name: t for t in simplified.graph.initializer}
    assert [list(inits[g.input[2]].dims) for g in gemms] == [[214]]
    files = real_files([REPO / "tests"], 4, 3)
    source, folded = make_session(model), make_session(simplified)
    for row in files:
        np.testing.assert_allclose(
            folded.run(None, {"bytes": row[None]})[0], source.run(None, {"bytes": row[None]})[0], atol=1e-6
        )


def test_untuned_int8_compiles(magika, calib_files, tmp_path, run_cli):
    """Every op int8 in one try (no search): exit 1 before the Gemm's C was a vector."""
    target = tmp_path / "untuned.toml"
    target.write_text('extends = "cpu-avx"\nname = "cpu-avx-untuned"\n[pass_params.quantize]\ntune = false\n')
    result = run_cli(
        "compile", magika, "-t", target, "--calib", calib_files, "--input-shape", "bytes=1,2048",
        "-o", tmp_path / "out", "--no-bench", "--max-accuracy-drop", "100",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_default_cpu_avx_keeps_every_confident_answer_held_out(magika, calib_files, tmp_path, run_cli):
    """The default path on 64 standard-library files, judged on 256 of the other half that calibration never saw:
    every file the source classifies with the application's own confidence keeps its class. (Calibrated on this
    repository's own files, a narrower mix of types, 6.5 % of them changed.)"""
    from test_device_artifacts import _open

    result = run_cli(
        "compile", magika, "-t", "cpu-avx", "--calib", calib_files, "--input-shape", "bytes=1,2048",
        "-o", tmp_path, "--no-bench",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    files = real_files([STDLIB], 256, 2, half=1)
    compiled = ort.InferenceSession(_open(tmp_path / "model.cpu-avx.lepton").models["model.onnx"])
    source = ort.InferenceSession(str(magika))
    ref = np.concatenate([source.run(None, {"bytes": row[None]})[0] for row in files])
    got = np.concatenate([compiled.run(None, {"bytes": row[None]})[0] for row in files])
    sure = ref.max(axis=1) >= CONFIDENT
    assert sure.sum() >= 128  # the files are ones the classifier knows
    assert np.mean(ref[sure].argmax(axis=1) == got[sure].argmax(axis=1)) >= 0.99
