"""Bundles end to end: write → verify → open/run, on the real digits model and a real compile.

Helpers here (``make_keys``, ``make_bundle``, ``resign``) are shared with test_bundle_attacks.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS

from lepton_cli.bundle import open_bundle, signing, verify_bundle, write_bundle
from lepton_cli.bundle.archive import write_archive
from lepton_cli.bundle.keys import generate_keys, load_key
from lepton_cli.errors import VerificationError
from lepton_cli.runtime.bundle_session import load_bundle

DIGITS_MODEL = DIGITS / "digits_cnn.onnx"
MODEL_BYTES = DIGITS_MODEL.read_bytes()


class Keys:
    def __init__(self, folder: Path):
        self.set = generate_keys(folder)
        self.folder = folder
        self.sign_priv = str(folder / "signing-private.pem")
        self.sign_pub = str(folder / "signing-public.pem")
        self.enc_priv = str(folder / "encryption-private.pem")
        self.enc_pub = str(folder / "encryption-public.pem")

    def signing_key(self):
        return load_key(self.sign_priv, "signing", "private", origin="test")

    def recipient(self):
        return load_key(self.enc_pub, "encryption", "public", origin="test")


def make_keys(folder: Path) -> Keys:
    return Keys(folder)


def make_bundle(
    dest: Path, keys: Keys, *, recipients=None, version: int = 1, expires: str | None = None, model: bytes = MODEL_BYTES
) -> Path:
    return write_bundle(
        dest,
        models={"model.onnx": model},
        plain_files={"report.json": b'{"ok": true}\n'},
        manifest_fields={
            "model": {"name": "digits_cnn"},
            "target": {"name": "test", "execution_providers": ["CPUExecutionProvider"]},
        },
        signing_key=keys.signing_key(),
        recipients=recipients or [keys.recipient()],
        version=version,
        expires=expires,
    )


def resign(bundle: Path, keys: Keys) -> None:
    """Re-sign whatever the bundle now holds with the *trusted* key: only the reader's own checks
    (format, paths, crypto binding) stand between the edit and acceptance."""
    digests = {
        p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != "model.sig"
    }
    (bundle / "model.sig").write_bytes(signing.sign(bundle.name, digests, keys.signing_key()))


def edit_manifest(bundle: Path, keys: Keys, change, raw: bool = False) -> None:
    path = bundle / "manifest.json"
    if raw:
        path.write_bytes(change(path.read_bytes()))
    else:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    resign(bundle, keys)


@pytest.fixture
def keys(tmp_path) -> Keys:
    return make_keys(tmp_path / "keys")


def test_round_trip_decrypts_exactly_the_model_and_never_stores_it_in_clear(tmp_path, keys):
    bundle = make_bundle(tmp_path / "m.test.lepton", keys)
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx.enc", "model.sig", "report.json"]
    for path in bundle.iterdir():
        assert MODEL_BYTES[1000:1064] not in path.read_bytes()  # no plaintext weights on disk
    manifest = verify_bundle(bundle, trust=keys.sign_pub, state_path=tmp_path / "state.json")
    assert manifest["format_version"] == 1 and manifest["version"] == 1
    opened = open_bundle(bundle, key=keys.enc_priv, trust=keys.sign_pub, state_path=tmp_path / "state.json")
    assert opened.models == {"model.onnx": MODEL_BYTES}
    assert json.loads((tmp_path / "state.json").read_text()) == {f"{keys.set.signing_id}/digits_cnn/test": 1}


def test_two_bundles_of_the_same_model_differ_in_every_encrypted_byte(tmp_path, keys):
    a = (make_bundle(tmp_path / "a.lepton", keys) / "model.onnx.enc").read_bytes()
    b = (make_bundle(tmp_path / "b.lepton", keys) / "model.onnx.enc").read_bytes()
    assert len(a) == len(b) and a != b  # fresh content key and bundle id each time


def test_several_recipients_each_decrypt(tmp_path, keys):
    other = make_keys(tmp_path / "other")
    bundle = make_bundle(tmp_path / "m.lepton", keys, recipients=[keys.recipient(), other.recipient()])
    for key in (keys.enc_priv, other.enc_priv):
        opened = open_bundle(bundle, key=key, trust=keys.sign_pub, state_path=tmp_path / "s.json")
        assert opened.models["model.onnx"] == MODEL_BYTES


def test_archive_is_read_in_place(tmp_path, keys):
    bundle = make_bundle(tmp_path / "m.lepton", keys)
    archive = write_archive(bundle, tmp_path / "m.lepton.zip")
    shutil.rmtree(bundle)
    before = sorted(os.listdir(tmp_path))
    opened = open_bundle(archive, key=keys.enc_priv, trust=keys.sign_pub, state_path=tmp_path / "s.json")
    assert opened.models["model.onnx"] == MODEL_BYTES
    # only the rollback state (and its lock file) is written: nothing is extracted
    assert sorted(os.listdir(tmp_path)) == sorted(set(before) | {"s.json", "s.json.lock"})


def test_load_bundle_runs_like_the_source(tmp_path, keys):
    bundle = make_bundle(tmp_path / "m.lepton", keys)
    session = load_bundle(bundle, key=keys.enc_priv, trust=keys.sign_pub, state_path=tmp_path / "s.json")
    data = np.load(DIGITS / "eval.npz")
    x = data["image"][:16]
    import onnxruntime as ort

    want = ort.InferenceSession(MODEL_BYTES, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = session.run(None, {"image": x})[0]
    np.testing.assert_array_equal(got, want)
    assert session.manifest["model"]["name"] == "digits_cnn"


def test_expiry_and_rollback(tmp_path, keys):
    from datetime import datetime, timezone

    state = tmp_path / "state.json"
    v2 = make_bundle(tmp_path / "v2.lepton", keys, version=2, expires="2030-01-01T00:00:00Z")
    open_bundle(v2, key=keys.enc_priv, trust=keys.sign_pub, state_path=state)
    v1 = make_bundle(tmp_path / "v1.lepton", keys, version=1)
    with pytest.raises(VerificationError, match="rollback"):
        open_bundle(v1, key=keys.enc_priv, trust=keys.sign_pub, state_path=state)
    open_bundle(v2, key=keys.enc_priv, trust=keys.sign_pub, state_path=state)  # the same version again is fine
    with pytest.raises(VerificationError, match="expired"):
        verify_bundle(v2, trust=keys.sign_pub, state_path=state, now=datetime(2030, 1, 2, tzinfo=timezone.utc))


def test_openssf_model_signing_tool_accepts_our_bundle(tmp_path, keys):
    """Optional: the standard `model_signing verify key` (PyPI model-signing) must accept model.sig."""
    pytest.importorskip("model_signing", reason="model-signing not installed (optional: pip install model-signing)")
    from model_signing import verifying

    bundle = make_bundle(tmp_path / "m.lepton", keys)
    verifying.Config().use_elliptic_key_verifier(public_key=keys.sign_pub).verify(bundle, bundle / "model.sig")
    (bundle / "report.json").write_bytes(b"{}")
    with pytest.raises(ValueError):
        verifying.Config().use_elliptic_key_verifier(public_key=keys.sign_pub).verify(bundle, bundle / "model.sig")


def test_standard_model_signing_cli_if_on_path(tmp_path, keys):
    tool = shutil.which("model_signing") or shutil.which("model_signing", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("model_signing CLI not installed (optional)")
    bundle = make_bundle(tmp_path / "m.lepton", keys)
    ok = subprocess.run(
        [tool, "verify", "key", bundle, "--signature", bundle / "model.sig", "--public_key", keys.sign_pub],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    (bundle / "model.onnx.enc").write_bytes(b"x" + (bundle / "model.onnx.enc").read_bytes()[1:])
    bad = subprocess.run(
        [tool, "verify", "key", bundle, "--signature", bundle / "model.sig", "--public_key", keys.sign_pub],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


def test_compile_verify_run_cli_first_run_creates_dev_keys(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("compile", DIGITS_MODEL, "--target", "cpu-avx", "-o", out, "--archive", "--bundle-version", "3")
    assert result.code == 0, result.stderr
    assert "created a development key set" in result.stderr
    bundle = out / "digits_cnn.cpu-avx.lepton"
    assert (out / "digits_cnn.cpu-avx.lepton.zip").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folders left
    home = tmp_path / "lepton-home" / "keys"
    for target in (bundle, out / "digits_cnn.cpu-avx.lepton.zip"):
        verified = run_cli("verify", target, "--trust", home / "signing-public.pem", "--json")
        assert verified.code == 0, verified.stderr
        assert json.loads(verified.stdout)["version"] == 3
    ran = run_cli(
        "run",
        bundle,
        "--key",
        home / "encryption-private.pem",
        "--trust",
        home / "signing-public.pem",
        "--inputs",
        DIGITS / "eval.npz",
        "-o",
        tmp_path / "pred.npz",
        "--json",
    )
    assert ran.code == 0, ran.stderr
    doc = json.loads(ran.stdout)
    logits = np.load(tmp_path / "pred.npz")["logits"]
    labels = np.load(DIGITS / "eval.npz")["labels"]
    assert logits.shape == (len(labels), 10)
    assert doc["top1_accuracy_pct"] > 90  # the compiled digits model still classifies
    again = run_cli("compile", DIGITS_MODEL, "--target", "cpu-avx", "-o", out, "--quiet")
    assert again.code == 0 and "created a development key set" not in again.stderr
    rolled = run_cli("run", bundle, "--inputs", DIGITS / "eval.npz")  # version 0 after version 3 was run
    assert rolled.code == 4 and "rollback" in rolled.stderr
    shown = run_cli("inspect", bundle, "--json")
    assert shown.code == 0 and json.loads(shown.stdout)["manifest"]["target"]["name"] == "cpu-avx"


def test_compile_with_explicit_keys_from_environment(run_cli, tmp_path, monkeypatch, keys):
    monkeypatch.setenv("LEPTON_SIGNING_KEY", Path(keys.sign_priv).read_text())  # PEM text, as CI secrets are
    monkeypatch.setenv("LEPTON_RECIPIENT", keys.enc_pub)
    result = run_cli(
        "compile", DIGITS_MODEL, "--target", "cpu-avx", "-o", tmp_path / "o", "--quiet", "--expires", "2099-12-31"
    )
    assert result.code == 0, result.stderr
    assert "development key" not in result.stderr
    bundle = tmp_path / "o" / "digits_cnn.cpu-avx.lepton"
    manifest = verify_bundle(bundle, trust=keys.sign_pub, state_path=tmp_path / "s.json")
    assert manifest["expires"] == "2099-12-31" and manifest["signer"] == keys.set.signing_id


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bundle-version", "-1"], "--bundle-version"),
        (["--expires", "next tuesday"], "--expires"),
        (["--expires", "2030-01-01T00:00:00"], "time zone"),
    ],
)
def test_bad_bundle_options_fail_before_compiling(run_cli, tmp_path, args, needle):
    result = run_cli("compile", DIGITS_MODEL, "--target", "cpu-avx", "-o", tmp_path / "o", *args)
    assert result.code == 2 and needle in result.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


_KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = {tests!r}  # this folder and tests/ (conftest)
from test_bundle import make_bundle, make_keys
keys = make_keys(Path({keys!r}))
big = Path({model!r}).read_bytes() * 40  # ~6 MB: the write takes long enough to be interrupted
print("ready", flush=True)
i = 0
while True:
    make_bundle(Path({dest!r}), keys, model=big, version=i)
    i += 1
"""


def test_sigkill_at_any_moment_leaves_no_partial_bundle(tmp_path):
    dest = tmp_path / "out" / "m.lepton"
    script = _KILL_SCRIPT.format(
        tests=[str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])],
        keys=str(tmp_path / "keys"),
        model=str(DIGITS_MODEL),
        dest=str(dest),
    )
    for delay in (0.15, 0.4, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if dest.exists():  # either absent or complete and valid, never partial
            verify_bundle(dest, trust=str(tmp_path / "keys" / "signing-public.pem"), state_path=tmp_path / "s.json")
        shutil.rmtree(tmp_path / "keys", ignore_errors=True)


def test_sigkill_during_a_real_compile_leaves_old_or_new_bundle(tmp_path):
    """`lepton compile` killed at moments spread over its run: the previous bundle stays, or the new one
    replaced it whole; never a partial or missing bundle."""
    env = {**os.environ, "LEPTON_HOME": str(tmp_path / "home"), "NO_COLOR": "1"}
    out = tmp_path / "out"
    bundle = out / "digits_cnn.cpu-avx.lepton"
    args = [
        sys.executable,
        "-m",
        "lepton_cli",
        "compile",
        str(DIGITS_MODEL),
        "-t",
        "cpu-avx",
        "-o",
        str(out),
        "--quiet",
    ]
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    duration = time.perf_counter() - start
    for fraction in (0.5, 0.8, 0.9, 0.95, 0.99):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        verify_bundle(
            bundle, trust=str(tmp_path / "home" / "keys" / "signing-public.pem"), state_path=tmp_path / "s.json"
        )
        assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [bundle.name]


def test_run_with_single_npy_inputs(run_cli, tmp_path, keys):
    bundle = make_bundle(tmp_path / "m.lepton", keys)
    x = np.load(DIGITS / "eval.npz")["image"][:4]
    np.save(tmp_path / "x.npy", x)
    result = run_cli(
        "run",
        bundle,
        "--key",
        keys.enc_priv,
        "--trust",
        keys.sign_pub,
        "--state",
        tmp_path / "s.json",
        "--input",
        f"image={tmp_path / 'x.npy'}",
        "-o",
        tmp_path / "y.npz",
    )
    assert result.code == 0, result.stderr
    assert np.load(tmp_path / "y.npz")["logits"].shape == (4, 10)
    wrong = run_cli(
        "run",
        bundle,
        "--key",
        keys.enc_priv,
        "--trust",
        keys.sign_pub,
        "--state",
        tmp_path / "s.json",
        "--input",
        f"pixels={tmp_path / 'x.npy'}",
    )
    assert wrong.code == 2 and "names no input" in wrong.stderr


@pytest.mark.parametrize(
    "tensor,needle",
    [
        (lambda x: x.astype(np.int64), "has dtype int64, the input expects float32"),
        (lambda x: x[:, :, :4], "has shape [4, 1, 4, 8], the input takes ['N', 1, 8, 8]"),
        (lambda x: x[0], "has shape [1, 8, 8], the input takes ['N', 1, 8, 8]"),
    ],
    ids=["integer pixels", "cropped", "no batch axis"],
)
def test_run_refuses_a_tensor_the_model_does_not_take(run_cli, tmp_path, keys, tensor, needle):
    """ONNX Runtime's own refusal of such a tensor was an internal error (exit 1)."""
    bundle = make_bundle(tmp_path / "m.lepton", keys)
    np.save(tmp_path / "x.npy", tensor(np.load(DIGITS / "eval.npz")["image"][:4]))
    args = ["--key", keys.enc_priv, "--trust", keys.sign_pub, "--state", tmp_path / "s.json"]
    result = run_cli("run", bundle, *args, "--input", f"image={tmp_path / 'x.npy'}", "-o", tmp_path / "y.npz")
    assert result.code == 2 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "y.npz").exists()


def _record_many(args):
    from lepton_cli.bundle import state

    path, worker = args
    for i in range(25):
        state.record(Path(path), f"signer/model-{worker}-{i}/cpu-avx", i + 1)


def test_rollback_state_keeps_every_concurrent_update(tmp_path):
    """Several `lepton run` processes on one device: no recorded version is lost (the state file is locked)."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    path = tmp_path / "state.json"
    with ProcessPoolExecutor(max_workers=6) as pool:
        list(pool.map(_record_many, [(str(path), w) for w in range(6)]))
    assert len(json.loads(path.read_text())) == 6 * 25
