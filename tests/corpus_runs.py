"""Slow tests' way through the benchmark corpus (benchmarks/corpus/, `make corpus`): compile one corpus model as
the yardstick does (labels stripped from --calib) and score the result on the held-out data no compile saw."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import REPO

CORPUS = Path(os.environ.get("LEPTON_CORPUS_DIR", Path.home() / ".cache" / "lepton-corpus"))


def needs_corpus(name: str):
    """Skip unless the corpus's model ``name`` and its data are built."""
    built = (CORPUS / "models" / f"{name}.onnx").is_file() and (CORPUS / "data" / name).is_dir()
    return pytest.mark.skipif(not built, reason=f"the corpus's {name} (make corpus) is not built")


def compile_for(name: str, target: str, tmp_path: Path) -> tuple[Any, dict[str, Any], Path]:
    """(corpus entry, the quantize step's summary, the compiled model's path) of a default compile."""
    sys.path.insert(0, str(REPO))
    from benchmarks.corpus.manifest import by_name
    from benchmarks.corpus.sweep import run_compile

    model = by_name(name)
    saved = tmp_path / "compiled.onnx"
    run = run_compile(model, target, tmp_path / "out", timeout=1800, save_model=saved)
    assert run.code == 0, run.message
    report = json.loads(next((tmp_path / "out").glob("*.lepton/report.json")).read_text())
    summary = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    return model, summary, saved


def int8_macs_pct(model: Any, saved: Path) -> float:
    from benchmarks.bench_corpus import int8_mac_share

    return int8_mac_share(onnx.load(saved), model.input_shapes)


def _held_out_outputs(model: Any, saved: Path) -> tuple[dict[str, np.ndarray], list, list, Path]:
    """(held-out arrays, the source's outputs, the compiled model's, the source's path): the compiled model fed and
    read back in the source's layout, as the yardstick does for a target with NHWC or integer I/O."""
    from benchmarks.corpus.runner import compiled_outputs, feeds, run_all, session
    from benchmarks.corpus.store import ensure_data, ensure_model

    _, evaluation_path = ensure_data(model)
    evaluation = dict(np.load(evaluation_path))
    path = ensure_model(model)
    reference = run_all(session(path), evaluation)
    candidate, _ = compiled_outputs(saved.read_bytes(), feeds(session(path), evaluation))
    return evaluation, reference, candidate, path


def held_out_char_drop(model: Any, saved: Path) -> float:
    """Character-accuracy points the compiled recogniser loses against its source on the held-out lines."""
    from benchmarks.corpus.data import charset
    from benchmarks.corpus.metrics import char_accuracy

    evaluation, reference, candidate, path = _held_out_outputs(model, saved)
    chars = charset(model, path)
    source = char_accuracy(model, evaluation, reference, reference, chars)
    return source - char_accuracy(model, evaluation, reference, candidate, chars)


def held_out_top1_flips(model: Any, saved: Path) -> tuple[int, int]:
    """(held-out samples whose arg-max of the first output the compiled model changed, samples), against the source."""
    _, reference, candidate, _ = _held_out_outputs(model, saved)
    changed = sum(int(np.argmax(r[0]) != np.argmax(c[0])) for r, c in zip(reference, candidate))
    return changed, len(reference)
