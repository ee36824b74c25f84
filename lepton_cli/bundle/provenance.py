"""``provenance.intoto.json``: a signed in-toto statement (SLSA provenance v1 predicate) of how the bundle was built.

A DSSE envelope (the JSON form in-toto attestations use) over an in-toto Statement v1 whose
subjects are the bundle's plaintext models (name and sha256, so a rebuild can be compared without
decrypting anything) and whose predicate records every input digest and parameter the compile
depended on (``lepton_cli/compile/inputs.py``). Signed with the bundle's signing key, and listed in
the manifest like any file, so ``model.sig`` covers it and model-signing verifiers accept the bundle.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from lepton_cli.bundle.keys import SigningPrivateKey, SigningPublicKey, key_id
from lepton_cli.bundle.manifest import fail, parse_json
from lepton_cli.bundle.signing import PAYLOAD_TYPE, STATEMENT_TYPE, pae

PROVENANCE = "provenance.intoto.json"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:lepton-cli:compile:v1"
MAX_PROVENANCE_BYTES = 4 * 1024 * 1024


def _subjects(models: dict[str, Any], bundle_name: str) -> list[dict[str, Any]]:
    """Name and sha256 of each plaintext model file; a model with external data adds its data file (hashed as streamed)."""
    subjects = []
    for path, data in sorted(models.items()):
        graph = getattr(data, "graph", data)
        subjects.append({"name": f"{bundle_name}/{path}", "digest": {"sha256": hashlib.sha256(graph).hexdigest()}})
        if getattr(data, "data_name", None):
            digest = hashlib.sha256()
            for block in data.data_blocks():
                digest.update(block)
            subjects.append({"name": f"{bundle_name}/{path}.data", "digest": {"sha256": digest.hexdigest()}})
    return subjects


def statement(inputs: dict[str, Any], models: dict[str, Any], bundle_name: str) -> dict[str, Any]:
    """The in-toto statement: subjects are the plaintext models; materials and parameters come from ``inputs``."""
    dependencies = [{"name": f"model/{f['name']}", "digest": {"sha256": f["sha256"]}} for f in inputs["model"]]
    dependencies.append(
        {"name": f"target/{inputs['target']['name']}", "digest": {"sha256": inputs["target"]["sha256"]}}
    )
    dependencies += [
        {"name": f"{role}/{d['name']}", "digest": {"sha256": d["sha256"]}} for role, d in sorted(inputs["data"].items())
    ]
    if inputs.get("baseline_sha256"):
        dependencies.append({"name": "baseline/report.json", "digest": {"sha256": inputs["baseline_sha256"]}})
    versions = inputs["versions"]
    return {
        "_type": STATEMENT_TYPE,
        "subject": _subjects(models, bundle_name),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"target": inputs["target"], "options": inputs["options"]},
                "internalParameters": {"pipeline": inputs["pipeline"]},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": f"urn:lepton-cli:{versions.get('lepton-cli')}", "version": versions},
                "metadata": {"inputsDigest": inputs_key(inputs)},
            },
        },
    }


def inputs_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a compile's inputs: equal keys, equal compiles (and the build cache's key)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def sign(stmt: dict[str, Any], private: SigningPrivateKey) -> bytes:
    """DSSE envelope JSON: payload type in-toto, one ECDSA P-256 signature, keyid = the Lepton key id."""
    payload = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
    signature = private.sign(pae(payload), ec.ECDSA(hashes.SHA256()))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(private), "sig": base64.b64encode(signature).decode()}],
    }
    return (json.dumps(envelope, indent=2) + "\n").encode()


def verify(envelope_bytes: bytes, trusted: SigningPublicKey) -> dict[str, Any]:
    """The statement, after its DSSE signature verified with ``trusted`` (exit 4 otherwise)."""
    envelope = parse_json(envelope_bytes, PROVENANCE)
    signatures = envelope.get("signatures") if isinstance(envelope, dict) else None
    if (
        not isinstance(signatures, list)
        or len(signatures) != 1
        or not isinstance(signatures[0], dict)
        or envelope.get("payloadType") != PAYLOAD_TYPE
    ):
        raise fail(f"{PROVENANCE} is not a DSSE envelope with one in-toto signature")
    try:
        payload = base64.b64decode(envelope.get("payload", ""), validate=True)
        signature = base64.b64decode(signatures[0].get("sig", ""), validate=True)
        trusted.verify(signature, pae(payload), ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, TypeError, InvalidSignature):
        raise fail(f"{PROVENANCE}: the signature does not verify with the trusted key {key_id(trusted)}") from None
    stmt = parse_json(payload, f"{PROVENANCE} payload")
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
        raise fail(f"{PROVENANCE} payload is not an in-toto statement with a SLSA provenance v1 predicate")
    return stmt


def compare(built: dict[str, Any], rebuilt: dict[str, Any]) -> list[str]:
    """Differences between two statements' inputs and outputs (empty: the rebuild reproduced the bundle)."""
    differences = []
    a, b = built["predicate"]["buildDefinition"], rebuilt["predicate"]["buildDefinition"]
    deps_a = {d["name"]: d["digest"]["sha256"] for d in a["resolvedDependencies"]}
    deps_b = {d["name"]: d["digest"]["sha256"] for d in b["resolvedDependencies"]}
    for name in sorted(set(deps_a) | set(deps_b)):
        if deps_a.get(name) != deps_b.get(name):
            differences.append(f"input {name}: {deps_a.get(name, 'absent')[:12]} vs {deps_b.get(name, 'absent')[:12]}")
    for key in ("externalParameters", "internalParameters"):
        if a[key] != b[key]:
            differences.append(f"{key} differ")
    versions_a, versions_b = (s["predicate"]["runDetails"]["builder"]["version"] for s in (built, rebuilt))
    differences += [
        f"version of {k}: {versions_a.get(k)} vs {versions_b.get(k)}"
        for k in sorted(set(versions_a) | set(versions_b))
        if versions_a.get(k) != versions_b.get(k)
    ]
    subjects_a = {s["name"].split("/", 1)[-1]: s["digest"]["sha256"] for s in built["subject"]}
    subjects_b = {s["name"].split("/", 1)[-1]: s["digest"]["sha256"] for s in rebuilt["subject"]}
    differences += [
        f"output {name}: sha256 differs"
        for name in sorted(set(subjects_a) | set(subjects_b))
        if subjects_a.get(name) != subjects_b.get(name)
    ]
    return differences
