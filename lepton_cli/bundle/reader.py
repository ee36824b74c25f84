"""Opening a bundle: every authentication check, in an order that trusts nothing early.

1. list the files (folder or archive; links and special files fail);
2. ``model.sig`` must verify with the key the *user* trusts (never a key from the bundle);
3. the files present must be exactly the signed ones plus ``model.sig`` (extra, missing,
   renamed files fail — dotfiles too);
4. ``manifest.json`` must match its signed sha256, then parse strictly (known format version,
   safe paths) and agree with the signed table;
5. ``expires`` and the device's rollback state;
6. every plain file is hashed; each encrypted one is hashed and decrypted in the same pass, and
   its plaintext is released only after both the hash and the AEAD's ``finalize()`` passed.

Any failure is a ``VerificationError`` (exit 4) with one line; nothing is written to disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import onnx

from lepton_cli.bundle import crypto, signing, state
from lepton_cli.bundle.archive import BundleSource, open_source
from lepton_cli.bundle.keys import EncryptionPrivateKey, SigningPublicKey, key_id, load_key
from lepton_cli.bundle.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SIGNATURE,
    fail,
    now_utc,
    parse_expires,
    parse_json,
    validate,
)
from lepton_cli.bundle.signing import MAX_SIGNATURE_BYTES
from lepton_cli.errors import BadInputError
from lepton_cli.model.external_data import ModelBytes, external_tensors


@dataclass
class OpenedBundle:
    """A bundle that passed every check: its manifest and decrypted models (bundle path → bytes)."""

    path: Path
    manifest: dict[str, Any]
    models: dict[str, bytes] = field(default_factory=dict)
    signer: str = ""

    @property
    def variants(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("variants") or [])


def _as_trust(trust: object) -> SigningPublicKey:
    if isinstance(trust, SigningPublicKey):
        return trust
    if isinstance(trust, (str, Path)):
        return load_key(str(trust), "signing", "public", origin="trusted key")  # type: ignore[return-value]
    if trust is None:
        raise BadInputError(
            "no trusted signing key given",
            "pass --trust PUBKEY.pem (the publisher's signing-public.pem) or set LEPTON_TRUST",
        )
    # An encryption key object here is the "reverse" mix-up: usage error, not a verification failure.
    raise BadInputError(
        f"trust must be a signing public key, not {type(trust).__name__}", "pass the publisher's signing-public.pem"
    )


def _as_private(key: object) -> EncryptionPrivateKey:
    if isinstance(key, EncryptionPrivateKey):
        return key
    if isinstance(key, (str, Path)):
        return load_key(str(key), "encryption", "private", origin="decryption key")  # type: ignore[return-value]
    if key is None:
        raise BadInputError("no decryption key given", "pass --key encryption-private.pem or set LEPTON_DECRYPTION_KEY")
    raise BadInputError(
        f"key must be an encryption private key, not {type(key).__name__}", "pass encryption-private.pem"
    )


def _authenticate(
    source: BundleSource, trusted: SigningPublicKey, now: datetime | None, state_path: Path | None
) -> dict[str, Any]:
    """Steps 1-5: the signed, validated manifest."""
    present = source.sizes()
    if SIGNATURE not in present:
        raise fail("the bundle has no model.sig: it is unsigned", "do not use it; only signed bundles are accepted")
    if present[SIGNATURE] == 0:
        raise fail("model.sig is empty")
    digests = signing.verify(source.read(SIGNATURE, MAX_SIGNATURE_BYTES), trusted)
    expected = set(digests) | {SIGNATURE}
    extra = sorted(set(present) - expected)
    if extra:
        raise fail(
            f"unexpected file {extra[0]!r} in the bundle (not covered by the signature)",
            "bundles must hold exactly the signed files; remove it or re-fetch the bundle",
        )
    missing = sorted(expected - set(present))
    if missing:
        raise fail(f"signed file {missing[0]!r} is missing from the bundle")
    if MANIFEST not in digests:
        raise fail("the signature does not cover manifest.json")
    raw = source.read(MANIFEST, MAX_MANIFEST_BYTES)
    if hashlib.sha256(raw).hexdigest() != digests[MANIFEST]:
        raise fail("manifest.json does not match its signed sha256 (modified)")
    manifest = validate(parse_json(raw, "manifest.json"))
    if manifest.get("signer") not in (None, key_id(trusted)):
        raise fail(f"manifest.json names signer {manifest.get('signer')!r}, not the trusted key {key_id(trusted)}")
    table = {entry["path"]: entry for entry in manifest["files"]}
    if set(table) | {MANIFEST} != set(digests):
        raise fail("manifest.json's file table differs from the signed file list")
    for path, entry in table.items():
        if entry["sha256"] != digests[path] or entry["size"] != present[path]:
            raise fail(f"{path}: size or sha256 differs from the signed manifest (modified)")
    if manifest.get("expires"):
        deadline = parse_expires(manifest["expires"])
        if (now or now_utc()) > deadline:
            raise fail(f"the bundle expired on {manifest['expires']}", "ask the publisher for a current bundle")
    state.check(
        state_path or state.default_state_path(), state.state_key(key_id(trusted), manifest), manifest["version"]
    )
    return manifest


def _check_plain(source: BundleSource, entry: dict[str, Any]) -> None:
    with source.open(entry["path"]) as stream:
        digest, total = crypto.hash_stream(stream, entry["size"])
    if total != entry["size"] or digest != entry["sha256"]:
        raise fail(f"{entry['path']}: content does not match the signed sha256 (modified)")


def verify_bundle(
    path: str | Path, *, trust: object, state_path: Path | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """Signature and integrity of every file, no secret needed; returns the manifest."""
    trusted = _as_trust(trust)
    source = open_source(Path(path))
    try:
        manifest = _authenticate(source, trusted, now, state_path)
        for entry in manifest["files"]:
            _check_plain(source, entry)
    finally:
        source.close()
    return manifest


def read_manifest_unverified(path: str | Path) -> dict[str, Any]:
    """The manifest, for display only (``lepton inspect BUNDLE``): NOT authenticated."""
    source = open_source(Path(path))
    try:
        if MANIFEST not in source.sizes():
            raise fail("the bundle has no manifest.json")
        doc = parse_json(source.read(MANIFEST, MAX_MANIFEST_BYTES), "manifest.json")
    finally:
        source.close()
    if not isinstance(doc, dict):
        raise fail("manifest.json is not a JSON object")
    return doc


def _with_external_data(decrypted: dict[str, bytes], manifest: dict[str, Any]) -> dict[str, bytes]:
    """Attach each decrypted external data file to its model (``ModelBytes``), after checking that every
    external tensor of the graph names that file and nothing else (ONNX Runtime would read any other from disk)."""
    for entry in manifest["files"]:
        if entry["role"] != "model_data" or entry["plain_path"] not in decrypted:
            continue
        graph = decrypted[entry["model"]]
        name = Path(entry["plain_path"]).name
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(graph)
        except Exception:  # protobuf's DecodeError and friends
            raise fail(f"{entry['model']}: the decrypted graph does not parse as ONNX") from None
        for tensor in external_tensors(proto):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location != name:
                raise fail(
                    f"{entry['model']}: tensor {tensor.name!r} names external data {location!r}, not the bundle's {name!r}"
                )
        decrypted[entry["model"]] = ModelBytes(graph, {name: decrypted.pop(entry["plain_path"])})
    return decrypted


def open_bundle(
    path: str | Path,
    *,
    key: object,
    trust: object,
    state_path: Path | None = None,
    now: datetime | None = None,
    models: Sequence[str] | None = None,
    record: bool = True,
) -> OpenedBundle:
    """Verify, unwrap and decrypt in memory; records the version in the rollback state on success.

    ``models`` limits which model paths are decrypted (default: all of them).
    """
    trusted = _as_trust(trust)
    private = _as_private(key)
    source = open_source(Path(path))
    state_file = state_path or state.default_state_path()
    try:
        manifest = _authenticate(source, trusted, now, state_file)
        content_key = crypto.unwrap_key(manifest["encryption"]["recipients"], private, manifest["bundle_id"])
        opened = OpenedBundle(Path(path), manifest, signer=key_id(trusted))
        decrypted: dict[str, bytes] = {}
        for entry in manifest["files"]:
            owner = entry.get("model") if entry["role"] == "model_data" else entry.get("plain_path")
            wanted = entry["encrypted"] and (models is None or owner in models)
            if not wanted:
                _check_plain(source, entry)
                continue
            with source.open(entry["path"]) as stream:
                decrypted[entry["plain_path"]] = crypto.decrypt_stream(
                    stream,
                    content_key=content_key,
                    context=crypto.file_context(manifest["bundle_id"], entry["path"]),
                    cipher_size=entry["size"],
                    cipher_sha256=entry["sha256"],
                    plain_size=entry["plain_size"],
                    path=entry["path"],
                )
    finally:
        source.close()
    opened.models = _with_external_data(decrypted, manifest)  # only now, after every file passed
    if record:
        state.record(state_file, state.state_key(opened.signer, manifest), manifest["version"])
    return opened
