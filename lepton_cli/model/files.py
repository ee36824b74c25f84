"""Safe access to the files a model names: a digest, and an external-data location that cannot escape its folder."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from lepton_cli.errors import BadInputError


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_external_location(model_dir: Path, location: str, tensor: str) -> Path:
    """Return the resolved path of an external-data file, refusing anything outside model_dir."""
    fix = "keep external data files as plain files inside the model's folder, named by relative paths"
    if not location or "\x00" in location or "\\" in location:
        raise BadInputError(f"tensor {tensor!r}: invalid external data location {location!r}", fix)
    relative = Path(location)
    if relative.is_absolute() or location.startswith("/") or ".." in relative.parts:
        raise BadInputError(f"tensor {tensor!r}: external data location {location!r} escapes the model's folder", fix)
    candidate = model_dir / relative
    # Check every component: a symlinked folder is as dangerous as a symlinked file.
    probe = model_dir
    for part in relative.parts:
        probe = probe / part
        if probe.is_symlink():
            raise BadInputError(f"tensor {tensor!r}: external data {location!r} is a symbolic link", fix)
    try:
        info = candidate.lstat()
    except FileNotFoundError:
        raise BadInputError(
            f"tensor {tensor!r}: external data file {location!r} is missing", "copy it next to the model"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"tensor {tensor!r}: external data {location!r} is not a regular file", fix)
    if info.st_nlink > 1:
        raise BadInputError(
            f"tensor {tensor!r}: external data {location!r} is a hard link (it may point outside the folder)",
            "copy the file instead of linking it",
        )
    resolved = candidate.resolve()
    if model_dir.resolve() not in resolved.parents:
        raise BadInputError(f"tensor {tensor!r}: external data location {location!r} escapes the model's folder", fix)
    return resolved
