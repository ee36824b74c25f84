"""Rollback protection: the device remembers the highest bundle version it accepted per model.

The state is a small JSON file (``<config>/bundle-state.json``, or ``--state``): key
``<signing key id>/<model>/<target>`` → highest version. A bundle below it is refused (exit 4);
equal is allowed (re-running the same release). Written atomically (temp file, fsync, rename) under
an exclusive lock (``flock`` on ``<state>.lock``), so two ``lepton run`` processes on one device
cannot lose each other's update. Windows has no ``fcntl``: there the write stays atomic but unlocked.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from lepton_cli.bundle.keys import config_dir
from lepton_cli.bundle.manifest import fail
from lepton_cli.errors import BadInputError

STATE_FILE = "bundle-state.json"


def default_state_path() -> Path:
    return config_dir() / STATE_FILE


def state_key(signer_id: str, manifest: dict) -> str:
    return f"{signer_id}/{manifest['model']['name']}/{manifest['target']['name']}"


def _load(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise BadInputError(
            f"rollback state file {path} is unreadable or corrupt",
            "restore it from a backup, or pass another --state (a fresh file forgets the versions seen)",
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise BadInputError(
            f"rollback state file {path} has an unexpected structure", "restore it, or pass another --state"
        )
    return data


def check(path: Path, key: str, version: int) -> None:
    seen = _load(path).get(key)
    if seen is not None and version < seen:
        raise fail(
            f"rollback: bundle version {version} is lower than version {seen} already accepted on this device",
            "deploy the newer bundle; a publisher ships fixes with a higher --bundle-version",
        )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record(path: Path, key: str, version: int) -> None:
    with _locked(path):  # read, compare and replace as one step
        state = _load(path)
        if state.get(key, -1) >= version:
            return
        state[key] = version
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(state, indent=2, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a crash only once the folder is synced
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
