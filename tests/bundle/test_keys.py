"""`lepton keys generate` and key loading: purposes, permissions, ids, environment variables."""

from __future__ import annotations

import os
import stat

import pytest

from lepton_cli.bundle.keys import KEY_FILES, generate_keys, key_id, load_key, resolve
from lepton_cli.errors import BadInputError


def test_generate_writes_four_pem_files_private_ones_0600(tmp_path):
    keys = generate_keys(tmp_path / "k")
    for (purpose, kind), name in KEY_FILES.items():
        path = tmp_path / "k" / name
        text = path.read_text()
        assert text.startswith(f"# lepton {purpose} {kind} key, id lepton-")  # purpose in the file
        assert "-----BEGIN" in text
        mode = stat.S_IMODE(path.stat().st_mode)
        if kind == "private":
            assert mode == 0o600, (name, oct(mode))
    assert keys.signing_id.startswith("lepton-sign-") and keys.encryption_id.startswith("lepton-enc-")
    private = load_key(str(keys.path("signing", "private")), "signing", "private", origin="t")
    public = load_key(str(keys.path("signing", "public")), "signing", "public", origin="t")
    assert key_id(private) == key_id(public) == keys.signing_id


def test_two_generations_differ_and_existing_keys_are_not_overwritten(tmp_path):
    a = generate_keys(tmp_path / "a")
    b = generate_keys(tmp_path / "b")
    assert a.signing_id != b.signing_id and a.encryption_id != b.encryption_id
    with pytest.raises(BadInputError, match="already exists"):
        generate_keys(tmp_path / "a")


@pytest.mark.parametrize(
    "purpose,kind,wrong_file",
    [
        ("signing", "public", "encryption-public.pem"),
        ("encryption", "public", "signing-public.pem"),
        ("encryption", "private", "signing-private.pem"),
        ("signing", "private", "encryption-private.pem"),
    ],
)
def test_wrong_purpose_is_a_usage_error_naming_both_purposes(tmp_path, purpose, kind, wrong_file):
    generate_keys(tmp_path)
    with pytest.raises(BadInputError) as info:
        load_key(str(tmp_path / wrong_file), purpose, kind, origin="--x")
    assert f"{purpose} key is needed" in info.value.message and "is a" in info.value.message


def test_garbage_and_missing_key_files(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(BadInputError, match="not a readable"):
        load_key(str(tmp_path / "junk.pem"), "signing", "public", origin="--trust")
    with pytest.raises(BadInputError, match="not a file"):
        load_key(str(tmp_path / "nope.pem"), "signing", "public", origin="--trust")


def test_environment_variable_may_hold_pem_text(tmp_path, monkeypatch):
    keys = generate_keys(tmp_path)
    monkeypatch.setenv("LEPTON_TRUST", keys.path("signing", "public").read_text())
    assert key_id(resolve(None, "LEPTON_TRUST", "signing", "public", "trust")) == keys.signing_id
    monkeypatch.setenv("LEPTON_TRUST", str(keys.path("signing", "public")))
    assert key_id(resolve(None, "LEPTON_TRUST", "signing", "public", "trust")) == keys.signing_id


def test_cli_keys_generate(run_cli, tmp_path):
    result = run_cli("keys", "generate", "--dir", tmp_path / "k")
    assert result.code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "k")) == sorted(KEY_FILES.values())
    again = run_cli("keys", "generate", "--dir", tmp_path / "k")
    assert again.code == 2 and "already exists" in again.stderr
    default = run_cli("keys", "generate", "--json")
    assert default.code == 0 and (tmp_path / "lepton-home" / "keys" / "signing-private.pem").is_file()
