"""Writing a bundle: encrypt the models, sign every file, and make the folder appear atomically.

The folder is built in a hidden temporary folder beside the destination and renamed into place
(swapped with an existing bundle by ``renameat2(RENAME_EXCHANGE)`` on Linux), so a compile killed
at any moment (SIGKILL included) leaves either the old bundle or the new one, never a partial one. The plaintext model is never written to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from lepton_cli import __version__
from lepton_cli.bundle import crypto, signing
from lepton_cli.bundle.keys import EncryptionPublicKey, SigningPrivateKey, key_id
from lepton_cli.bundle.manifest import (
    DATA_SUFFIX,
    ENCRYPTION_SCHEME,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SIGNATURE,
    check_path,
    parse_expires,
)
from lepton_cli.errors import BadInputError
from lepton_cli.model.external_data import ModelPayload

ENCRYPTED_SUFFIX = ".enc"


def _entry(path: str, data: bytes, role: str, digest: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "path": path,
        "role": role,
        "size": len(data),
        "sha256": digest or hashlib.sha256(data).hexdigest(),
        **extra,
    }


def check_bundle_options(version: int, expires: str | None) -> None:
    """Validate --bundle-version / --expires before any work (exit 2)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0 or version >= 2**63:
        raise BadInputError(
            f"--bundle-version {version!r} is not a non-negative integer", "pass e.g. --bundle-version 3"
        )
    if expires is not None:
        try:
            parse_expires(expires)
        except ValueError as exc:
            raise BadInputError(
                f"--expires: {exc}", "pass an ISO 8601 date or time with zone, e.g. 2027-01-31 or 2027-01-31T12:00:00Z"
            ) from None


def _stream_data(spool: Path, path: str, payload: ModelPayload, content_key: bytes, bundle_id: str) -> dict[str, Any]:
    """Encrypt a model's external data file straight into ``spool/path`` (never whole in memory)."""
    target = spool / path
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        digest, size, plain_size = crypto.encrypt_stream(
            content_key, crypto.file_context(bundle_id, path), payload.data_blocks(), handle
        )
        handle.flush()
        os.fsync(handle.fileno())
    return {"size": size, "sha256": digest, "plain_size": plain_size}


@dataclass
class _Contents:
    """The files of a bundle being built (path → bytes, or a spooled file) and their manifest entries."""

    bundle_id: str
    content_key: bytes
    spool: Path | None
    files: dict[str, bytes | Path] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)

    def add_model(self, plain_path: str, model: bytes | ModelPayload) -> None:
        payload = model if isinstance(model, ModelPayload) else ModelPayload(model)
        path = check_path(plain_path + ENCRYPTED_SUFFIX, "bundle writer")
        context = crypto.file_context(self.bundle_id, path)
        self.files[path], digest = crypto.encrypt_bytes(self.content_key, context, payload.graph)
        data_plain = plain_path + DATA_SUFFIX
        link = {"external_data": data_plain} if payload.data_name else {}
        self.table.append(
            _entry(
                path,
                self.files[path],
                "model",
                digest,
                encrypted=True,
                plain_path=plain_path,
                plain_size=len(payload.graph),
                **link,
            )
        )
        if payload.data_name:
            self._add_model_data(plain_path, data_plain, payload)

    def _add_model_data(self, plain_path: str, data_plain: str, payload: ModelPayload) -> None:
        if self.spool is None or payload.data_name != Path(data_plain).name:
            raise ValueError("a model with external data needs a spool folder and its data named <model file>.data")
        data_path = check_path(data_plain + ENCRYPTED_SUFFIX, "bundle writer")
        written = _stream_data(self.spool, data_path, payload, self.content_key, self.bundle_id)
        self.files[data_path] = self.spool / data_path
        self.table.append(
            {
                "path": data_path,
                "role": "model_data",
                "size": written["size"],
                "sha256": written["sha256"],
                "encrypted": True,
                "plain_path": data_plain,
                "plain_size": written["plain_size"],
                "model": plain_path,
            }
        )

    def add_plain(self, path: str, data: bytes) -> None:
        check_path(path, "bundle writer")
        self.files[path] = data
        self.table.append(_entry(path, data, "report" if path.startswith("report.") else "data", encrypted=False))


_RESERVED_FIELDS = frozenset({"format", "format_version", "bundle_id", "version", "expires", "encryption", "files"})


def _manifest(
    contents: _Contents,
    manifest_fields: dict[str, Any],
    signing_key: SigningPrivateKey,
    recipients: Sequence[EncryptionPublicKey],
    version: int,
    expires: str | None,
) -> dict[str, Any]:
    clash = _RESERVED_FIELDS & set(manifest_fields)
    if clash:
        raise ValueError(f"manifest_fields may not set {sorted(clash)}")
    wrapped = crypto.wrap_key(contents.content_key, recipients, contents.bundle_id)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_id": contents.bundle_id,
        "version": version,
        "expires": expires,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "lepton", "version": __version__},
        **manifest_fields,
        "signer": key_id(signing_key),
        "encryption": {"scheme": ENCRYPTION_SCHEME, "recipients": wrapped},
        "files": contents.table,
    }


def build(
    dest_dir: Path,
    *,
    models: dict[str, bytes | ModelPayload],
    plain_files: dict[str, bytes],
    manifest_fields: dict[str, Any],
    signing_key: SigningPrivateKey,
    recipients: Sequence[EncryptionPublicKey],
    version: int,
    expires: str | None,
    spool: Path | None = None,
) -> dict[str, bytes | Path]:
    """The bundle's files (path → bytes), without touching the disk, except a model's external data
    file, which is encrypted into ``spool`` (the value is then its path there)."""
    check_bundle_options(version, expires)
    if not recipients:
        raise BadInputError("no recipient for the bundle's encryption", "pass --recipient PUBKEY.pem")
    contents = _Contents(secrets.token_hex(16), crypto.new_content_key(), spool)
    for plain_path, model in sorted(models.items()):
        contents.add_model(plain_path, model)
    for path, data in sorted(plain_files.items()):
        contents.add_plain(path, data)
    manifest = _manifest(contents, manifest_fields, signing_key, recipients, version, expires)
    files = contents.files
    # Compact: the C JSON encoder (indent forces the pure-Python one, ~20 ms for a long pipeline record).
    files[MANIFEST] = (json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()
    digests = {entry["path"]: entry["sha256"] for entry in contents.table}  # each file hashed once
    digests[MANIFEST] = hashlib.sha256(files[MANIFEST]).hexdigest()
    files[SIGNATURE] = signing.sign(dest_dir.name, digests, signing_key)
    return files


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_bundle(
    dest_dir: Path,
    *,
    models: dict[str, bytes | ModelPayload],
    plain_files: dict[str, bytes],
    manifest_fields: dict[str, Any],
    signing_key: SigningPrivateKey,
    recipients: Sequence[EncryptionPublicKey],
    version: int = 0,
    expires: str | None = None,
) -> Path:
    """Encrypt ``models`` (bundle path → plaintext, or a graph plus external data) to ``recipients``,
    sign everything, write ``dest_dir`` atomically."""
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    try:
        files = build(
            dest_dir,
            models=models,
            plain_files=plain_files,
            manifest_fields=manifest_fields,
            signing_key=signing_key,
            recipients=recipients,
            version=version,
            expires=expires,
            spool=staging,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return install_files(dest_dir, files, staging=staging)


def install_files(dest_dir: Path, files: dict[str, bytes | Path], staging: Path | None = None) -> Path:
    """Write ``files`` (path -> bytes, or a file already in ``staging``) as the folder ``dest_dir``,
    atomically: built hidden beside it, then renamed in."""
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging or Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    try:
        for path, data in files.items():
            if isinstance(data, Path):  # streamed into the staging folder already
                continue
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # durable before the rename makes it visible
        os.chmod(staging, 0o755)
        if dest_dir.exists():
            if _exchange(staging, dest_dir):  # one atomic step: the old bundle or the new one, always
                shutil.rmtree(staging, ignore_errors=True)  # now holds the old bundle
            else:  # no renameat2: two renames, with a moment where the folder is absent (never partial)
                old = dest_dir.with_name(f".{dest_dir.name}.old-{os.getpid()}")
                os.replace(dest_dir, old)
                os.replace(staging, dest_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest_dir
