"""Shared test fixtures: real-model locations and an in-process CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
LIGHT_DIR = ONNX_DATA / "light"
LIGHT_MODELS = sorted(LIGHT_DIR.glob("*.onnx"))
DIGITS = REPO / "examples" / "digits"


def _rapidocr_models() -> Path | None:
    # find_spec does not import the package (its __init__ needs cv2, which we do not install).
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models"


OCR_DIR = _rapidocr_models()
OCR_DET = OCR_DIR / "ch_PP-OCRv4_det_infer.onnx" if OCR_DIR else None
OCR_REC = OCR_DIR / "ch_PP-OCRv4_rec_infer.onnx" if OCR_DIR else None
needs_ocr = pytest.mark.skipif(
    OCR_DIR is None, reason="rapidocr-onnxruntime (PP-OCRv4 models) not installed; `make test` installs it"
)


def _ddddocr_model(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("ddddocr")
    path = Path(spec.origin).parent / name if spec and spec.origin else None
    return path if path and path.exists() else None


DDDDOCR_DET = _ddddocr_model(
    "common_det.onnx"
)  # ddddocr's YOLOX character detector (a Focus stem, a [1, 3549, 6] head)
needs_ddddocr_det = pytest.mark.skipif(
    DDDDOCR_DET is None, reason="`pip install --no-deps ddddocr==1.6.1` provides common_det.onnx; `make test` does"
)
DDDDOCR_COMMON = _ddddocr_model("common.onnx")  # ddddocr's captcha recogniser: 21 convs, a bidirectional LSTM, CTC
needs_ddddocr_common = pytest.mark.skipif(
    DDDDOCR_COMMON is None, reason="`pip install --no-deps ddddocr==1.6.1` provides common.onnx; `make test` does"
)


@pytest.fixture(autouse=True, scope="session")
def _scratch_in_pytest_temp(tmp_path_factory):
    """Pass contexts a test builds itself make their work folder with ``tempfile``: keep them in pytest's
    rotating temp folder rather than leaving one per test in /tmp."""
    import tempfile

    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("scratch"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(autouse=True)
def _lepton_home(monkeypatch, tmp_path_factory):
    """Every test's key set and rollback state live in a temporary LEPTON_HOME, never the user's config folder."""
    monkeypatch.setenv("LEPTON_HOME", str(tmp_path_factory.mktemp("lepton-home")))
    for name in ("LEPTON_SIGNING_KEY", "LEPTON_RECIPIENT", "LEPTON_DECRYPTION_KEY", "LEPTON_TRUST"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """Run ``lepton ARGS`` in-process; returns exit code and captured output. Keys live in tmp."""
    from lepton_cli import console
    from lepton_cli.cli import main

    monkeypatch.setenv("LEPTON_HOME", str(tmp_path / "lepton-home"))
    monkeypatch.setenv("NO_COLOR", "1")

    def run(*args: str | os.PathLike) -> CliResult:
        console.settings.quiet = False
        console.settings.json_mode = False
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def unread_nodes(model: onnx.ModelProto) -> list[str]:
    """Main-graph nodes none of whose outputs anything reads (ONNX Runtime still runs them)."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    return [node.name for node in model.graph.node if not read.intersection(node.output)]


def perturbed_weights(model: onnx.ModelProto, scale: float, names: tuple[str, ...]) -> onnx.ModelProto:
    """A copy of ``model`` with Gaussian noise of ``scale`` times each named initializer's spread (seed 0)."""
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(0)
    for init in noisy.graph.initializer:
        if init.name in names:
            w = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array((w + rng.normal(0, scale * w.std(), w.shape)).astype(np.float32), init.name)
            )
    return noisy
