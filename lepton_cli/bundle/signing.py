"""``model.sig``: OpenSSF model-signing v1.0 (in-toto statement, DSSE, Sigstore bundle JSON, ECDSA P-256).

Checked first: the ``model-signing`` package (PyPI, v1.1.1) — ``_signing/signing.py`` (the
``Payload``: in-toto Statement v1, predicate type ``https://model_signing/signature/v1.0``, one
subject whose sha256 is the hash of every resource digest in name order, ``resources`` of
name/algorithm/digest, ``serialization`` method ``files``), ``_signing/sign_ec_key.py`` (DSSE
envelope, ECDSA with SHA-256 over the DSSE PAE, Sigstore bundle v0.3 media type, the public key
hint = sha256 of the PEM public key) and ``verifying.py`` (its ``verify key`` compares only the
resource digests). We write the same JSON without depending on that package (it pulls in
sigstore, pydantic, pyOpenSSL); an optional test runs the real ``model_signing verify key``.

Our verifier is stricter than theirs: exactly the structure we write (so any edit of model.sig
fails, not only edits of what it signs), one signature, the key hint must match the trusted key,
canonical base64, and it returns the resource table for the reader to check
against the files actually present (extra files fail, dotfiles included).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from lepton_cli.bundle.keys import SigningPrivateKey, SigningPublicKey, key_id, public_pem
from lepton_cli.bundle.manifest import SIGNATURE, check_path, fail, parse_json

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


def pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    return b" ".join([f"DSSEv1 {len(PAYLOAD_TYPE)} {PAYLOAD_TYPE} {len(payload)}".encode(), payload])


def key_hint(public: SigningPublicKey) -> str:
    return hashlib.sha256(public_pem(public)).hexdigest()


def _root_digest(digests: dict[str, str]) -> str:
    root = hashlib.sha256()
    for name in sorted(digests):
        root.update(bytes.fromhex(digests[name]))
    return root.hexdigest()


def statement(model_name: str, digests: dict[str, str]) -> dict[str, Any]:
    """The in-toto statement over every file but ``model.sig`` (sorted by name, as model-signing does)."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": _root_digest(digests)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": [SIGNATURE],
            },
            "resources": [{"name": name, "algorithm": "sha256", "digest": digests[name]} for name in sorted(digests)],
        },
    }


def sign(model_name: str, digests: dict[str, str], private: SigningPrivateKey) -> bytes:
    """The Sigstore bundle JSON (``model.sig``) signing ``digests`` (path → sha256 hex)."""
    payload = json.dumps(statement(model_name, digests), indent=2, sort_keys=True).encode()
    signature = private.sign(pae(payload), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(private.public_key())}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    return (json.dumps(bundle, indent=2) + "\n").encode()


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise fail(f"model.sig: {what} is not a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise fail(f"model.sig: {what} is not valid base64") from None
    if base64.b64encode(raw).decode() != value:  # non-canonical padding bits: a modified file
        raise fail(f"model.sig: {what} is not canonical base64 (modified)")
    return raw


def _exact_keys(obj: object, keys: set[str], what: str) -> dict:
    """model.sig is written only by us: any other structure is a modified file."""
    if not isinstance(obj, dict) or set(obj) != keys:
        raise fail(f"model.sig: unexpected structure in {what} (modified, or not written by Lepton)")
    return obj


def verify(sig_bytes: bytes, trusted: SigningPublicKey) -> dict[str, str]:
    """Check ``model.sig`` against the trusted key; return the signed path → sha256 table."""
    doc = parse_json(sig_bytes, "model.sig")
    if not isinstance(doc, dict) or doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise fail("model.sig is not a Sigstore bundle v0.3 (wrong or missing mediaType)")
    _exact_keys(doc, {"mediaType", "verificationMaterial", "dsseEnvelope"}, "the bundle")
    material = _exact_keys(doc["verificationMaterial"], {"publicKey", "tlogEntries"}, "verificationMaterial")
    envelope = _exact_keys(doc["dsseEnvelope"], {"payload", "payloadType", "signatures"}, "dsseEnvelope")
    hint = _exact_keys(material["publicKey"], {"hint"}, "publicKey")["hint"]
    if material["tlogEntries"] != []:
        raise fail("model.sig: unexpected transparency-log entries (modified, or not written by Lepton)")
    if hint != key_hint(trusted):
        raise fail(
            f"model.sig was made by another key than the trusted one ({key_id(trusted)})",
            "pass the publisher's signing public key with --trust, or do not use this bundle",
        )
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise fail("model.sig: DSSE payloadType is not in-toto JSON")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise fail("model.sig must hold exactly one signature")
    if _exact_keys(signatures[0], {"sig", "keyid"}, "the signature")["keyid"] != "":
        raise fail("model.sig: unexpected keyid (modified, or not written by Lepton)")
    payload = _b64(envelope.get("payload"), "payload")
    signature = _b64(signatures[0].get("sig"), "signature")
    try:
        trusted.verify(signature, pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise fail(
            f"model.sig: the signature does not verify with the trusted key {key_id(trusted)}",
            "the bundle was modified or signed by someone else; do not use it",
        ) from None
    return _resources(parse_json(payload, "model.sig payload"))


def _resources(stmt: Any) -> dict[str, str]:
    """The signed statement's resource table (the signature already holds: this guards our own format)."""
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
        raise fail("model.sig payload is not a model-signing v1.0 in-toto statement")
    predicate = stmt.get("predicate")
    resources = predicate.get("resources") if isinstance(predicate, dict) else None
    if not isinstance(resources, list) or not resources:
        raise fail("model.sig payload lists no resources")
    digests: dict[str, str] = {}
    for entry in resources:
        if (
            not isinstance(entry, dict)
            or entry.get("algorithm") != "sha256"
            or not isinstance(entry.get("digest"), str)
            or not _HEX64.fullmatch(entry["digest"])
        ):
            raise fail("model.sig payload has a malformed resource entry")
        name = check_path(entry.get("name"), "model.sig resource")
        if name in digests or name == SIGNATURE:
            raise fail(f"model.sig payload lists {name!r} twice or signs itself")
        digests[name] = entry["digest"]
    subjects = stmt.get("subject")
    digest = (
        subjects[0].get("digest")
        if isinstance(subjects, list) and len(subjects) == 1 and isinstance(subjects[0], dict)
        else None
    )
    if not isinstance(digest, dict) or digest.get("sha256") != _root_digest(digests):
        raise fail("model.sig payload: subject digest does not match its resources")
    return digests
