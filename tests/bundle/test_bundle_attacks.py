"""Attacks on a bundle, table-driven: each must fail closed with exit 4 (2 for malformed usage),
one clear line, no traceback, and no plaintext left anywhere.

Most cases tamper with the files; the cases marked "re-signed" then re-sign the bundle with the
*trusted* key (a signer bug, or a stolen signing key without the recipients' keys), so that only
the reader's own checks — format version, paths, crypto binding, recipients — stop them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import DIGITS
from test_bundle import MODEL_BYTES, Keys, edit_manifest, make_bundle, make_keys, resign

from lepton_cli.bundle.archive import write_archive


@dataclass
class Ctx:
    tmp: Path
    bundle: Path
    keys: Keys  # the publisher (trusted) and the device
    other: Keys  # someone else

    def run(self, target: Path | None = None, *, key: str | None = None, trust: str | None = None) -> list:
        return [
            "run",
            target or self.bundle,
            "--key",
            key or self.keys.enc_priv,
            "--trust",
            trust or self.keys.sign_pub,
            "--state",
            self.tmp / "state.json",
            "--inputs",
            DIGITS / "eval.npz",
            "-o",
            self.tmp / "out.npz",
        ]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_case(name: str, offset: int) -> Callable[[Ctx], list]:
    def case(c: Ctx) -> list:
        flip(c.bundle / name, offset)
        return c.run()

    return case


def truncated(c: Ctx) -> list:
    path = c.bundle / "model.onnx.enc"
    path.write_bytes(path.read_bytes()[:-100])
    return c.run()


def truncated_resigned(c: Ctx) -> list:  # cut at a chunk boundary and re-sign: only the AEAD's last-chunk flag stops it
    path = c.bundle / "model.onnx.enc"
    path.write_bytes(path.read_bytes()[: 65536 + 16])
    edit_manifest(
        c.bundle,
        c.keys,
        lambda d: [
            e.update(
                size=path.stat().st_size,
                plain_size=65536,
                sha256=__import__("hashlib").sha256(path.read_bytes()).hexdigest(),
            )
            for e in d["files"]
            if e["path"] == "model.onnx.enc"
        ],
    )
    return c.run()


def trailing(c: Ctx) -> list:
    with open(c.bundle / "model.onnx.enc", "ab") as handle:
        handle.write(b"\0" * 32)
    return c.run()


def swapped_model(c: Ctx) -> list:
    twin = make_bundle(c.tmp / "twin.lepton", c.keys)
    shutil.copy(twin / "model.onnx.enc", c.bundle / "model.onnx.enc")
    return c.run()


def swapped_signature(c: Ctx) -> list:
    twin = make_bundle(c.tmp / "twin.lepton", c.keys)
    shutil.copy(twin / "model.sig", c.bundle / "model.sig")
    return c.run()


def swapped_model_resigned(c: Ctx) -> list:  # another bundle's ciphertext under this bundle's (re-signed) table
    twin = make_bundle(c.tmp / "twin.lepton", c.keys)
    shutil.copy(twin / "model.onnx.enc", c.bundle / "model.onnx.enc")
    import hashlib

    digest = hashlib.sha256((c.bundle / "model.onnx.enc").read_bytes()).hexdigest()
    edit_manifest(
        c.bundle, c.keys, lambda d: [e.update(sha256=digest) for e in d["files"] if e["path"] == "model.onnx.enc"]
    )
    return c.run()


def _extra(name: str) -> Callable[[Ctx], list]:
    def case(c: Ctx) -> list:
        (c.bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (c.bundle / name).write_bytes(b"extra")
        return c.run()

    return case


def _missing(name: str) -> Callable[[Ctx], list]:
    def case(c: Ctx) -> list:
        (c.bundle / name).unlink()
        return c.run()

    return case


def renamed(c: Ctx) -> list:
    os.rename(c.bundle / "report.json", c.bundle / "report2.json")
    return c.run()


def empty_signature(c: Ctx) -> list:
    (c.bundle / "model.sig").write_bytes(b"")
    return c.run()


def signature_extra_field(c: Ctx) -> list:  # the signed content is intact; model.sig itself was edited
    doc = json.loads((c.bundle / "model.sig").read_text())
    doc["dsseEnvelope"]["signatures"][0]["keyid"] = "attacker"
    (c.bundle / "model.sig").write_text(json.dumps(doc))
    return c.run()


def untrusted_signer(c: Ctx) -> list:
    resign(c.bundle, c.other)  # a valid signature, by a key the device does not trust
    return c.run()


def untrusted_trust(c: Ctx) -> list:
    return c.run(trust=c.other.sign_pub)


def signing_key_as_recipient(c: Ctx) -> list:
    return ["compile", DIGITS / "digits_cnn.onnx", "-t", "cpu-avx", "-o", c.tmp / "o", "--recipient", c.keys.sign_pub]


def encryption_key_as_signing_key(c: Ctx) -> list:
    return ["compile", DIGITS / "digits_cnn.onnx", "-t", "cpu-avx", "-o", c.tmp / "o", "--sign-key", c.keys.enc_priv]


def encryption_key_as_trust(c: Ctx) -> list:
    return c.run(trust=c.keys.enc_pub)


def signing_key_as_decryption_key(c: Ctx) -> list:
    return c.run(key=c.keys.sign_priv)


def unknown_format_version(c: Ctx) -> list:
    edit_manifest(c.bundle, c.keys, lambda d: d.update(format_version=2))
    return c.run()


def rollback(c: Ctx) -> list:
    (c.tmp / "state.json").write_text(json.dumps({f"{c.keys.set.signing_id}/digits_cnn/test": 5}))
    return c.run()


def expired(c: Ctx) -> list:
    make_bundle(c.bundle, c.keys, expires="2001-01-01T00:00:00Z")
    return c.run()


def _bad_path(path: str) -> Callable[[Ctx], list]:
    def case(c: Ctx) -> list:
        edit_manifest(
            c.bundle, c.keys, lambda d: [e.update(path=path) for e in d["files"] if e["path"] == "report.json"]
        )
        return c.run()

    return case


def malformed_manifest(c: Ctx) -> list:
    edit_manifest(c.bundle, c.keys, lambda raw: raw[: len(raw) // 2], raw=True)
    return c.run()


def duplicate_key_manifest(c: Ctx) -> list:
    edit_manifest(c.bundle, c.keys, lambda raw: raw.replace(b'"version":', b'"version": 9, "version":', 1), raw=True)
    return c.run()


def oversized_manifest(c: Ctx) -> list:
    edit_manifest(c.bundle, c.keys, lambda d: d.update(padding="x" * (17 * 1024 * 1024)))
    return c.run()


def no_matching_recipient(c: Ctx) -> list:
    make_bundle(c.bundle, c.keys, recipients=[c.other.recipient()])
    return c.run()


def zero_x25519_share(c: Ctx) -> list:
    def change(doc):
        sealed = base64.b64decode(doc["encryption"]["recipients"][0]["wrapped_key"])
        doc["encryption"]["recipients"][0]["wrapped_key"] = base64.b64encode(bytes(32) + sealed[32:]).decode()

    edit_manifest(c.bundle, c.keys, change)
    return c.run()


def wrapped_key_from_other_bundle(c: Ctx) -> list:
    twin = json.loads((make_bundle(c.tmp / "twin.lepton", c.keys) / "manifest.json").read_text())
    edit_manifest(c.bundle, c.keys, lambda d: d["encryption"].update(recipients=twin["encryption"]["recipients"]))
    return c.run()


def changed_context(c: Ctx) -> list:  # a different bundle id: the Cobblestone context and HPKE info no longer match
    edit_manifest(c.bundle, c.keys, lambda d: d.update(bundle_id="0" * 32))
    return c.run()


def moved_path_resigned(c: Ctx) -> list:  # same bundle, same key: only the Cobblestone context (path) differs
    os.rename(c.bundle / "model.onnx.enc", c.bundle / "other.onnx.enc")
    edit_manifest(
        c.bundle,
        c.keys,
        lambda d: [e.update(path="other.onnx.enc") for e in d["files"] if e["path"] == "model.onnx.enc"],
    )
    return c.run()


def symlinked_file(c: Ctx) -> list:
    target = c.tmp / "elsewhere.json"
    shutil.move(c.bundle / "report.json", target)
    os.symlink(target, c.bundle / "report.json")
    return c.run()


def archive_trailing(c: Ctx) -> list:
    archive = write_archive(c.bundle, c.tmp / "m.lepton.zip")
    with open(archive, "ab") as handle:
        handle.write(b"junk")
    return c.run(archive)


def archive_duplicate_entry(c: Ctx) -> list:
    archive = write_archive(c.bundle, c.tmp / "m.lepton.zip")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("report.json", b"{}")
    return c.run(archive)


def archive_flipped(c: Ctx) -> list:
    archive = write_archive(c.bundle, c.tmp / "m.lepton.zip")
    flip(archive, 3000)
    return c.run(archive)


CASES: list[tuple[str, Callable[[Ctx], list], int, str]] = [
    ("flipped byte in model.onnx.enc", _flip_case("model.onnx.enc", 5000), 4, "sha256"),
    ("flipped byte in manifest.json", _flip_case("manifest.json", 200), 4, "manifest.json"),
    ("flipped byte in report.json", _flip_case("report.json", 3), 4, "report.json"),
    ("flipped byte in model.sig", _flip_case("model.sig", 400), 4, "model.sig"),
    ("truncated ciphertext", truncated, 4, "model.onnx.enc"),
    ("truncated at a chunk boundary, re-signed", truncated_resigned, 4, "decryption failed"),
    ("trailing data", trailing, 4, "model.onnx.enc"),
    ("model swapped from another bundle", swapped_model, 4, "model.onnx.enc"),
    ("signature swapped from another bundle", swapped_signature, 4, "manifest.json"),
    ("model swapped from another bundle, re-signed", swapped_model_resigned, 4, "decryption failed"),
    ("extra file", _extra("extra.bin"), 4, "unexpected file 'extra.bin'"),
    ("extra dotfile", _extra(".hidden"), 4, "unexpected file '.hidden'"),
    ("extra file in a subfolder", _extra("sub/x.onnx"), 4, "unexpected file 'sub/x.onnx'"),
    ("missing model file", _missing("model.onnx.enc"), 4, "missing"),
    ("missing report", _missing("report.json"), 4, "missing"),
    ("renamed file", renamed, 4, "report2.json"),
    ("removed signature", _missing("model.sig"), 4, "unsigned"),
    ("empty signature", empty_signature, 4, "model.sig is empty"),
    ("edited model.sig, signed content intact", signature_extra_field, 4, "keyid"),
    ("signed by an untrusted key", untrusted_signer, 4, "another key"),
    ("verified with the wrong trusted key", untrusted_trust, 4, "another key"),
    ("signing key used as recipient", signing_key_as_recipient, 2, "encryption key is needed"),
    ("encryption key used as signing key", encryption_key_as_signing_key, 2, "signing key is needed"),
    ("encryption key used as trust", encryption_key_as_trust, 2, "signing key is needed"),
    ("signing key used to decrypt", signing_key_as_decryption_key, 2, "encryption key is needed"),
    ("unknown format version, re-signed", unknown_format_version, 4, "unknown bundle format version 2"),
    ("rollback below the version seen", rollback, 4, "rollback"),
    ("expired", expired, 4, "expired"),
    ("'..' path, re-signed", _bad_path("../report.json"), 4, "unsafe file path"),
    ("absolute path, re-signed", _bad_path("/etc/passwd"), 4, "unsafe file path"),
    ("backslash path, re-signed", _bad_path("..\\report.json"), 4, "unsafe file path"),
    ("NUL in path, re-signed", _bad_path("report.json\x00.enc"), 4, "unsafe file path"),
    ("malformed manifest JSON, re-signed", malformed_manifest, 4, "not valid JSON"),
    ("duplicate key in manifest, re-signed", duplicate_key_manifest, 4, "duplicate key"),
    ("oversized manifest, re-signed", oversized_manifest, 4, "limit"),
    ("no matching recipient", no_matching_recipient, 4, "not encrypted to your key"),
    ("all-zero X25519 share, re-signed", zero_x25519_share, 4, "does not decrypt"),
    ("wrapped key from another bundle, re-signed", wrapped_key_from_other_bundle, 4, "does not decrypt"),
    ("changed context (bundle id), re-signed", changed_context, 4, "does not decrypt"),
    ("file moved to another path, re-signed", moved_path_resigned, 4, "decryption failed"),
    ("symlink in place of a file", symlinked_file, 4, "not a regular file"),
    ("archive with trailing data", archive_trailing, 4, "after the archive"),
    ("archive with a duplicate entry", archive_duplicate_entry, 4, "appears twice"),
    ("archive with a flipped byte", archive_flipped, 4, ""),
]


def _files_holding_plaintext(folder: Path) -> list[Path]:
    probe = MODEL_BYTES[20000:20064]
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and probe in p.read_bytes()]


@pytest.fixture(scope="module")
def two_keys(tmp_path_factory) -> tuple[Keys, Keys]:
    base = tmp_path_factory.mktemp("attack-keys")
    return make_keys(base / "mine"), make_keys(base / "other")


def test_attack_table_has_at_least_20_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name,attack,code,needle", CASES, ids=[c[0] for c in CASES])
def test_attack_fails_closed(name, attack, code, needle, tmp_path, run_cli, two_keys):
    mine, other = two_keys
    ctx = Ctx(tmp_path, make_bundle(tmp_path / "m.test.lepton", mine), mine, other)
    args = attack(ctx)
    result = run_cli(*args)
    assert result.code == code, (name, result.code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], (name, result.stderr)
    if os.environ.get("LEPTON_ATTACK_LOG"):  # the table's results, for the closing note
        with open(os.environ["LEPTON_ATTACK_LOG"], "a", encoding="utf-8") as log:
            log.write(f"| {name} | {result.code} | {errors[0].split(' (fix:')[0].removeprefix('error: ')} |\n")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out.npz").exists()
    assert _files_holding_plaintext(tmp_path) == [], name
    if code == 4 and args[0] == "run" and "--key" in args:  # the keyless check must refuse it too
        verify = run_cli(
            "verify", args[1], "--trust", args[args.index("--trust") + 1], "--state", tmp_path / "state.json"
        )
        if name not in {
            "no matching recipient",
            "all-zero X25519 share, re-signed",
            "wrapped key from another bundle, re-signed",
            "changed context (bundle id), re-signed",
            "truncated at a chunk boundary, re-signed",
            "model swapped from another bundle, re-signed",
            "file moved to another path, re-signed",
        }:  # need the secret key
            assert verify.code == 4, (name, verify.stderr)
