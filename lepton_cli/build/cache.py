"""The build cache: one entry per compile key (``bundle.provenance.inputs_key``), content-addressed, LRU-capped.

An entry is a folder ``entries/<key>/`` that appears by one rename (never half-written):
``bundle/`` (the bundle exactly as written, served as is while the keys are the same),
``models/*.enc`` (the plaintext models encrypted under the local cache key, so a hit can be re-sealed
for other keys without recompiling; plaintext never touches the disk) and ``entry.json`` (report,
manifest fields, inputs, seal identity, and the sha256 of every file). A file that does not match,
or an ``entry.json`` whose own checksum fails, makes the entry corrupt: removed and rebuilt, never served.

Location: ``$LEPTON_CACHE``, else ``$XDG_CACHE_HOME/lepton``, else ``~/.cache/lepton``. The cache key
file lives in the Lepton config folder, not in the cache, so a shared cache folder alone reveals no model.
``$LEPTON_CACHE_KEY`` replaces that key file where the cache outlives the machine (CI).
Size cap: ``$LEPTON_CACHE_MAX_MB`` (default 10 GiB); least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_cli.bundle import crypto
from lepton_cli.bundle.keys import _write_private, config_dir
from lepton_cli.errors import BadInputError
from lepton_cli.model.files import file_sha256

ENTRY_FORMAT = "lepton-build-cache/1"
DEFAULT_MAX_MB = 10 * 1024
CACHE_KEY_FILE = "cache.key"


def default_cache_dir() -> Path:
    if os.environ.get("LEPTON_CACHE"):
        return Path(os.environ["LEPTON_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lepton"


def _max_bytes() -> int:
    try:
        return int(float(os.environ.get("LEPTON_CACHE_MAX_MB", DEFAULT_MAX_MB)) * 2**20)
    except ValueError:
        return DEFAULT_MAX_MB * 2**20


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


@dataclass
class CacheHit:
    key: str
    folder: Path
    entry: dict[str, Any]

    @property
    def bundle_files(self) -> dict[str, bytes]:
        root = self.folder / "bundle"
        return {path: (root / path).read_bytes() for path in self.entry["bundle_files"]}

    def models(self, cache_key: bytes) -> dict[str, bytes]:
        """The plaintext models, decrypted (and authenticated) from ``models/``."""
        out = {}
        for plain, meta in self.entry["models"].items():
            path = self.folder / "models" / meta["file"]
            with path.open("rb") as stream:
                out[plain] = crypto.decrypt_stream(
                    stream,
                    content_key=cache_key,
                    context=_context(self.key, plain),
                    cipher_size=meta["size"],
                    cipher_sha256=meta["sha256"],
                    plain_size=meta["plain_size"],
                    path=meta["file"],
                )
        return out


def _context(key: str, plain: str) -> bytes:
    return f"{ENTRY_FORMAT}\0{key}\0{plain}".encode()


class BuildCache:
    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.max_bytes = max_bytes if max_bytes is not None else _max_bytes()
        self.entries = self.root / "entries"
        self.notes: list[str] = []

    def cache_key(self) -> bytes:
        """The symmetric key the cached models are encrypted under: ``$LEPTON_CACHE_KEY`` (64 hex digits, e.g. a CI
        secret, so a restored cache can be re-sealed), else ``<config>/cache.key`` (created 0600 on first use)."""
        if os.environ.get("LEPTON_CACHE_KEY"):
            try:
                key = bytes.fromhex(os.environ["LEPTON_CACHE_KEY"].strip())
            except ValueError:
                key = b""
            if len(key) != 32:
                raise BadInputError(
                    "LEPTON_CACHE_KEY is not 64 hex digits",
                    "generate one with: python -c 'import secrets; print(secrets.token_hex(32))'",
                )
            return key
        path = config_dir() / CACHE_KEY_FILE
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{CACHE_KEY_FILE}.{secrets.token_hex(4)}")
            _write_private(tmp, crypto.new_content_key())
            os.replace(tmp, path)
        return path.read_bytes()

    def lookup(self, key: str) -> CacheHit | None:
        """The entry for ``key`` when present and intact; a corrupt one is removed (and said so in ``notes``)."""
        folder = self.entries / key
        if not folder.is_dir():
            return None
        problem = self._check(folder, key)
        if problem:
            self.notes.append(f"cache entry {key[:12]} is corrupt ({problem}): rebuilt")
            self._remove(folder)
            return None
        os.utime(folder / "entry.json")  # least-recently-used order
        return CacheHit(key, folder, json.loads((folder / "entry.json").read_text(encoding="utf-8")))

    def _check(self, folder: Path, key: str) -> str | None:
        try:
            entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
            checksum = entry.pop("checksum")
            if hashlib.sha256(_canonical(entry)).hexdigest() != checksum or entry.get("key") != key:
                return "entry.json checksum"
            for rel, digest in entry["files"].items():
                if file_sha256(folder / rel) != digest:
                    return f"{rel} does not match its sha256"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unreadable: {exc.__class__.__name__}"
        return None

    def store(
        self,
        key: str,
        *,
        bundle_dir: Path,
        models: dict[str, bytes],
        report: dict[str, Any],
        manifest_fields: dict[str, Any],
        inputs: dict[str, Any],
        seal: dict[str, Any],
    ) -> None:
        """Add an entry (built in a temporary folder, renamed into place); then evict down to the size cap."""
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        staging = tmp_root / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            shutil.copytree(bundle_dir, staging / "bundle")
            (staging / "models").mkdir()
            cache_key = self.cache_key()
            sealed = {}
            for index, (plain, data) in enumerate(sorted(models.items())):
                cipher, digest = crypto.encrypt_bytes(cache_key, _context(key, plain), data)
                name = f"{index}.enc"
                (staging / "models" / name).write_bytes(cipher)
                sealed[plain] = {"file": name, "size": len(cipher), "sha256": digest, "plain_size": len(data)}
            bundle_files = sorted(
                p.relative_to(staging / "bundle").as_posix() for p in (staging / "bundle").rglob("*") if p.is_file()
            )
            files = {
                p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()
            }
            entry = {
                "format": ENTRY_FORMAT,
                "key": key,
                "created": time.time(),
                "report": report,
                "manifest_fields": manifest_fields,
                "inputs": inputs,
                "seal": seal,
                "models": sealed,
                "bundle_files": bundle_files,
                "files": files,
                "bytes": sum((staging / rel).stat().st_size for rel in files),
            }
            entry["checksum"] = hashlib.sha256(_canonical(entry)).hexdigest()
            (staging / "entry.json").write_text(json.dumps(entry, sort_keys=True, default=str), encoding="utf-8")
            self.entries.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, self.entries / key)
            except OSError:  # another build stored the same key first: theirs is as good
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.evict()

    def evict(self) -> list[str]:
        """Remove least recently used entries until the cache fits ``max_bytes``; returns the removed keys."""
        if not self.entries.is_dir():
            return []
        sized = []
        for folder in self.entries.iterdir():
            try:
                entry_file = folder / "entry.json"
                size = json.loads(entry_file.read_text(encoding="utf-8")).get("bytes", 0)
                sized.append((entry_file.stat().st_mtime, size, folder))
            except (OSError, ValueError):
                sized.append((0.0, 0, folder))  # unreadable: first to go
        total = sum(size for _, size, _ in sized)
        removed = []
        for _, size, folder in sorted(sized, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            self._remove(folder)
            total -= size
            removed.append(folder.name)
        return removed

    def discard(self, hit: CacheHit) -> None:
        """Drop an entry that cannot be used (its models do not decrypt with this cache key), so it is rebuilt and replaced."""
        self._remove(hit.folder)

    def _remove(self, folder: Path) -> None:
        """Rename away first, so a reader never sees a half-deleted entry."""
        doomed = self.root / "tmp" / f"doomed.{folder.name}.{secrets.token_hex(4)}"
        doomed.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder, doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)
