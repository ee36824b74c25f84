"""``lepton build``: 3 real models x 3 targets on the process pool and on a local Ray cluster, the cache, bad build files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DIGITS, LIGHT_DIR

from lepton_cli.bundle import open_bundle, verify_bundle
from lepton_cli.compile.compiler import CompileOptions, compile_model

MODELS = ("digits_cnn", "light_squeezenet", "light_shufflenet")
TARGETS = ("cpu-avx", "edge-arm", "my-board")
# The smallest build file, plus two zoo models (real architectures, no data: the latency benchmark is off to keep it quick).
BUILD_TOML = """
[defaults]                      # any `compile` option by its long name, dashes as underscores
max_accuracy_drop = 1.0
no_bench = true
[[model]]
path = "models/digits_cnn.onnx" # paths relative to the build file
calib = "data/calib.npz"
eval = "data/eval.npz"
targets = ["cpu-avx", "edge-arm", "boards/my-board.toml"]
[[model]]
path = "models/light_squeezenet.onnx"
targets = ["cpu-avx", "edge-arm", "boards/my-board.toml"]
[[model]]
path = "models/light_shufflenet.onnx"
targets = ["cpu-avx", "edge-arm", "boards/my-board.toml"]
"""
BOARD_TOML = """
extends = "edge-arm"
name = "my-board"
description = "an Arm board with a little more memory"
[hardware]
memory_mb = 2048.0
"""


def make_project(root: Path, build_toml: str = BUILD_TOML) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "boards").mkdir()
    shutil.copy(DIGITS / "digits_cnn.onnx", root / "models")
    for name in MODELS[1:]:
        shutil.copy(LIGHT_DIR / f"{name}.onnx", root / "models")
    shutil.copy(DIGITS / "calib.npz", root / "data")
    shutil.copy(DIGITS / "eval.npz", root / "data")
    (root / "boards" / "my-board.toml").write_text(BOARD_TOML)
    (root / "BUILD.toml").write_text(build_toml)
    return root / "BUILD.toml"


def lepton(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lepton_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", **env},
        timeout=900,
    )


def models_of(bundle: Path, home: Path) -> dict[str, bytes]:
    keys = home / "keys"
    return open_bundle(
        bundle, key=keys / "encryption-private.pem", trust=keys / "signing-public.pem", record=False
    ).models


@pytest.fixture(scope="module")
def pool_build(tmp_path_factory):
    """One 3 x 3 build on two pinned local workers, then the same build again (served from the cache)."""
    root = tmp_path_factory.mktemp("project")
    build_file = make_project(root)
    env = {
        "LEPTON_HOME": str(root / "home"),
        "LEPTON_CACHE": str(root / "cache"),
        "GITHUB_STEP_SUMMARY": str(root / "summary.md"),
    }
    first = lepton("build", build_file, "--workers", "2", "--json", env=env)
    assert first.returncode == 0, first.stderr
    started = time.perf_counter()
    second = lepton("build", build_file, "--workers", "2", "--json", env=env)
    return {
        "root": root,
        "env": env,
        "first": json.loads(first.stdout),
        "second": json.loads(second.stdout),
        "second_code": second.returncode,
        "second_wall": time.perf_counter() - started,
    }


def test_pool_builds_every_model_for_every_target(pool_build):
    doc, root = pool_build["first"], pool_build["root"]
    assert doc["format"] == "lepton-build/1" and doc["exit_code"] == 0
    assert sorted((r["model"], r["target"]) for r in doc["results"]) == sorted(
        (f"{m}.onnx", t) for m in MODELS for t in TARGETS
    )
    for result in doc["results"]:
        assert set(result) >= {"model", "target", "exit_code", "bundle", "cached", "seconds", "summary"}
        assert result["exit_code"] == 0 and result["cached"] is False and result["seconds"] > 0
        assert result["summary"]["size_ratio"] > 0
        bundle = Path(result["bundle"])
        assert (
            bundle.parent == root / "out" and bundle.name == f"{Path(result['model']).stem}.{result['target']}.lepton"
        )
        manifest = verify_bundle(bundle, trust=root / "home" / "keys" / "signing-public.pem")
        assert "provenance.intoto.json" in {f["path"] for f in manifest["files"]}
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".")]  # no staging folders left
    # Each worker pinned to its own share of the cores, with as many ORT threads: shares are disjoint, never oversubscribed.
    shares = {tuple(r["worker"]["affinity"]) for r in doc["results"]}
    assert all(r["worker"]["cores"] == len(r["worker"]["affinity"]) for r in doc["results"])
    assert all(set(a).isdisjoint(b) for a in shares for b in shares if a != b) and len(shares) <= 2
    digits = next(r for r in doc["results"] if r["model"] == "digits_cnn.onnx" and r["target"] == "edge-arm")
    assert digits["summary"]["accuracy_drop_pct"] <= 1.0  # the build file's budget reached the compile


def test_github_step_summary_gets_one_table_for_the_build(pool_build):
    text = (pool_build["root"] / "summary.md").read_text()
    assert text.count("### lepton build: 9 compile(s), exit 0") == 2  # one per build run, none per compile
    assert "| digits_cnn | my-board | built |" in text and "| light_shufflenet | cpu-avx | cached |" in text
    assert not [line for line in text.splitlines() if line.startswith("## ")]  # no per-compile report sections


def test_second_run_is_served_from_the_cache(pool_build):
    second = pool_build["second"]
    assert pool_build["second_code"] == 0 and second["exit_code"] == 0
    assert all(r["cached"] is True for r in second["results"])
    assert max(r["seconds"] for r in second["results"]) < 1.0, [r["seconds"] for r in second["results"]]
    first = {(r["model"], r["target"]): r["summary"] for r in pool_build["first"]["results"]}
    assert all(first[(r["model"], r["target"])] == r["summary"] for r in second["results"])


@pytest.mark.parametrize(
    "model,target", [("digits_cnn", "edge-arm"), ("light_squeezenet", "my-board"), ("light_shufflenet", "cpu-avx")]
)
def test_build_models_are_byte_identical_to_single_compiles(pool_build, model, target, tmp_path):
    root = pool_build["root"]
    calib = {"calib": root / "data" / "calib.npz", "eval": root / "data" / "eval.npz"} if model == "digits_cnn" else {}
    spec = str(root / "boards" / "my-board.toml") if target == "my-board" else target
    single = compile_model(
        CompileOptions(
            model=root / "models" / f"{model}.onnx",
            target=spec,
            output_dir=tmp_path,
            max_accuracy_drop=1.0,
            bench=False,
            **calib,
        )
    )
    built = models_of(root / "out" / f"{model}.{target}.lepton", root / "home")
    assert built.keys() == single.models.keys()
    assert all(built[path] == single.models[path] for path in built)
    # A plain compile carries the same provenance: same inputs, same outputs (the rebuild check `verify --against` makes).
    from lepton_cli.bundle.provenance import compare
    from lepton_cli.commands._provenance import read_provenance

    home = Path(os.environ["LEPTON_HOME"]) / "keys"
    assert (
        compare(
            read_provenance(
                root / "out" / f"{model}.{target}.lepton", str(root / "home" / "keys" / "signing-public.pem")
            ),
            read_provenance(single.bundle_dir, str(home / "signing-public.pem")),
        )
        == []
    )


def test_keys_changed_reseals_cached_bundles(pool_build, tmp_path):
    """A new recipient: every bundle is served from the cache, re-encrypted to it, without a compile."""
    root, env = pool_build["root"], pool_build["env"]
    from lepton_cli.bundle.keys import generate_keys

    generate_keys(tmp_path / "device")
    toml = BUILD_TOML.replace(
        "[defaults]", f'[defaults]\nrecipient = ["{tmp_path / "device" / "encryption-public.pem"}"]\nbundle_version = 2'
    )
    build_file = root / "BUILD-device.toml"
    build_file.write_text(toml)
    done = lepton("build", build_file, "-o", tmp_path / "out", "--json", env=env)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert all(r["cached"] for r in results)
    bundle = tmp_path / "out" / "digits_cnn.edge-arm.lepton"
    opened = open_bundle(
        bundle,
        key=tmp_path / "device" / "encryption-private.pem",
        trust=root / "home" / "keys" / "signing-public.pem",
        record=False,
    )
    assert opened.manifest["version"] == 2
    assert opened.models == models_of(root / "out" / "digits_cnn.edge-arm.lepton", root / "home")


def test_corrupt_cache_entry_is_rebuilt_not_served(pool_build, tmp_path):
    root, env = pool_build["root"], pool_build["env"]
    build_file = tmp_path / "BUILD.toml"
    build_file.write_text(
        f'[[model]]\npath = "{root / "models" / "digits_cnn.onnx"}"\ncalib = "{root / "data" / "calib.npz"}"\n'
        f'eval = "{root / "data" / "eval.npz"}"\nmax_accuracy_drop = 1.0\nno_bench = true\ntargets = ["cpu-avx"]\n'
    )
    entries = root / "cache" / "entries"
    ours = [
        e
        for e in entries.iterdir()
        if json.loads((e / "entry.json").read_text())["report"]["target"]["name"] == "cpu-avx"
        and json.loads((e / "entry.json").read_text())["report"]["model"]["name"] == "digits_cnn.onnx"
    ]
    assert len(ours) == 1
    encrypted = ours[0] / "bundle" / "model.onnx.enc"
    data = bytearray(encrypted.read_bytes())
    data[100] ^= 1
    encrypted.write_bytes(bytes(data))
    rebuilt = lepton("build", build_file, "-o", tmp_path / "out", "--json", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    (result,) = json.loads(rebuilt.stdout)["results"]
    assert result["cached"] is False and "is corrupt" in rebuilt.stderr
    assert models_of(Path(result["bundle"]), root / "home") == models_of(
        root / "out" / "digits_cnn.cpu-avx.lepton", root / "home"
    )
    again = json.loads(lepton("build", build_file, "-o", tmp_path / "out", "--json", env=env).stdout)
    assert again["results"][0]["cached"] is True


def test_provenance_is_signed_printed_and_checks_a_rebuild(pool_build, run_cli, tmp_path):
    root = pool_build["root"]
    trust = root / "home" / "keys" / "signing-public.pem"
    bundle = root / "out" / "digits_cnn.edge-arm.lepton"
    shown = run_cli("verify", bundle, "--trust", trust, "--provenance", "--json")
    assert shown.code == 0, shown.stderr
    stmt = json.loads(shown.stdout)["provenance"]
    assert (
        stmt["_type"] == "https://in-toto.io/Statement/v1" and stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    )
    deps = {d["name"]: d["digest"]["sha256"] for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]}
    from lepton_cli.compile.inputs import sha256_file

    assert deps["model/digits_cnn.onnx"] == sha256_file(root / "models" / "digits_cnn.onnx")
    assert deps["calib/calib.npz"] == sha256_file(root / "data" / "calib.npz")
    assert set(stmt["predicate"]["runDetails"]["builder"]["version"]) >= {
        "lepton-cli",
        "onnx",
        "onnxruntime",
        "onnxsim",
    }
    reproduced = run_cli("verify", bundle, "--trust", trust, "--against", root / "out" / "digits_cnn.edge-arm.lepton")
    assert reproduced.code == 0 and "reproduced" in reproduced.stdout
    other = run_cli("verify", bundle, "--trust", trust, "--against", root / "out" / "digits_cnn.cpu-avx.lepton")
    assert other.code == 4 and "does not reproduce" in other.stderr


def test_standard_model_signing_accepts_a_bundle_with_provenance(pool_build):
    tool = shutil.which("model_signing") or shutil.which("model_signing", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("model_signing CLI not installed (optional)")
    root = pool_build["root"]
    bundle = root / "out" / "light_squeezenet.my-board.lepton"
    ok = subprocess.run(
        [
            tool,
            "verify",
            "key",
            bundle,
            "--signature",
            bundle / "model.sig",
            "--public_key",
            root / "home" / "keys" / "signing-public.pem",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr


def test_ray_build_matches_the_pool_build(pool_build, run_cli, monkeypatch, tmp_path):
    """The same 3 x 3 build as Ray tasks on a local cluster started here: byte-identical models."""
    ray = pytest.importorskip("ray", reason="ray not installed; `make test` installs it (the ray extra)")
    root = pool_build["root"]
    monkeypatch.setenv("LEPTON_HOME", str(root / "home"))
    monkeypatch.setenv("LEPTON_CACHE", str(tmp_path / "cache"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        done = run_cli("build", root / "BUILD.toml", "--ray", "auto", "-o", tmp_path / "out", "--json")
    finally:
        ray.shutdown()
    assert done.code == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len(doc["results"]) == 9 and all(r["exit_code"] == 0 and not r["cached"] for r in doc["results"])
    for model in MODELS:
        for target in TARGETS:
            name = f"{model}.{target}.lepton"
            assert models_of(tmp_path / "out" / name, root / "home") == models_of(root / "out" / name, root / "home"), (
                name
            )


BAD_FILES = [
    (
        "[defaults]\nmax_acuracy_drop = 1.0\n[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\n",
        "unknown key defaults.max_acuracy_drop",
    ),
    (
        "[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx', 'no-such-target']\n",
        "model[0].targets[1]: unknown target 'no-such-target'",
    ),
    (
        "[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\n[[model]]\npath = 'missing.onnx'\ntargets = ['cpu-avx']\n",
        "model[1].path: model file",
    ),
    ("[[model]]\npath = 'm.onnx'\ntargets = []\n", "model[0].targets must list at least one target"),
    ("[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\nseed = 'one'\n", "model[0].seed = 'one' has the wrong type"),
    ("[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\ncalib = 'nope.npz'\n", "model[0].calib: calib"),
    (
        "[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\nsign_key = 'k.pem'\n",
        "model[0].sign_key: keys and bundle versions are set once",
    ),
    (
        "[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx', 'cpu-avx']\n",
        "model[0].targets[1]: bundle m.cpu-avx.lepton is also built by model[0].targets[0]",
    ),
    ("[[model]]\npath = 'm.onnx'\ntargets = ['boards/x.toml']\n", "model[0].targets[0]: target file"),
    ("[[model]]\npath = 'm.onnx'\neval_metric = 'top5'\ntargets = ['cpu-avx']\n", "model[0].eval_metric"),
    (
        "[defaults]\nmax_accuracy_drop = -1.0\n[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\n",
        "defaults.max_accuracy_drop: --max-accuracy-drop -1 is out of range",
    ),
    (
        "[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\nmax_accuracy_drop = nan\n",
        "model[0].max_accuracy_drop = nan is not a finite number",
    ),
    (
        "[defaults]\nbaseline_tolerance = -5.0\n[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\n",
        "defaults.baseline_tolerance: --baseline-tolerance -5 is out of range",
    ),
    ("[target]\nname = 'x'\n", "unknown key 'target'"),
    ("[defaults]\nseed = 1\n", "no models: a build file needs at least one model table"),
    ("[[model]\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_build_files_exit_2_naming_the_key(run_cli, tmp_path, text, message):
    shutil.copy(DIGITS / "digits_cnn.onnx", tmp_path / "m.onnx")
    (tmp_path / "BUILD.toml").write_text(text)
    result = run_cli("build", tmp_path / "BUILD.toml")
    assert result.code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_worst_exit_code_wins_and_failures_do_not_stop_the_others(run_cli, tmp_path):
    """A quality-gate failure (3) and a bad-input failure (2) in one build: exit 2, the good compile still written."""
    shutil.copy(DIGITS / "digits_cnn.onnx", tmp_path / "digits_cnn.onnx")
    shutil.copy(LIGHT_DIR / "light_squeezenet.onnx", tmp_path / "light_squeezenet.onnx")
    (tmp_path / "BUILD.toml").write_text(
        "[defaults]\nbench_seconds = 0.2\n"
        f"[[model]]\npath = 'digits_cnn.onnx'\ncalib = '{DIGITS / 'calib.npz'}'\ntargets = ['cpu-avx']\nmax_latency_ratio = 0.001\n"
        "[[model]]\npath = 'light_squeezenet.onnx'\nno_bench = true\ntargets = ['tpu']\n"
    )  # tpu needs --calib: exit 2
    result = run_cli("build", tmp_path / "BUILD.toml", "--workers", "2", "--no-cache", "--json")
    doc = json.loads(result.stdout)
    assert result.code == 2 and doc["exit_code"] == 2
    codes = {(r["model"], r["target"]): r["exit_code"] for r in doc["results"]}
    assert codes == {("digits_cnn.onnx", "cpu-avx"): 3, ("light_squeezenet.onnx", "tpu"): 2}
    assert not list((tmp_path / "out").glob("*.lepton"))  # a failed compile writes nothing
    fast = run_cli("build", tmp_path / "BUILD.toml", "--workers", "1", "--no-cache", "--fail-fast", "--json")
    states = [r["state"] for r in json.loads(fast.stdout)["results"]]
    assert fast.code == 3 and states[0] == "failed" and states[-1] == "skipped", states


def test_ray_asked_for_without_ray_exits_2(run_cli, tmp_path, monkeypatch):
    shutil.copy(DIGITS / "digits_cnn.onnx", tmp_path / "m.onnx")
    (tmp_path / "BUILD.toml").write_text("[[model]]\npath = 'm.onnx'\ntargets = ['cpu-avx']\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = run_cli("build", tmp_path / "BUILD.toml", "--ray", "auto")
    assert result.code == 2 and "--ray needs the ray package" in result.stderr and "pip install ray" in result.stderr


def test_core_shares_are_disjoint_and_cover_the_cores():
    from lepton_cli.build.pool import core_shares

    assert core_shares([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert core_shares([0, 1], 2) == [[0], [1]]
    assert core_shares([0, 1], 3) == [[0], [1], [0]]


def test_cache_evicts_least_recently_used(tmp_path, monkeypatch):
    from lepton_cli.build.cache import BuildCache

    monkeypatch.setenv("LEPTON_HOME", str(tmp_path / "home"))
    cache = BuildCache(tmp_path / "cache", max_bytes=10**9)
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "model.onnx.enc").write_bytes(os.urandom(4000))
    for index, key in enumerate(("a" * 64, "b" * 64, "c" * 64)):
        cache.store(
            key,
            bundle_dir=bundle,
            models={"model.onnx": os.urandom(3000)},
            report={"n": index},
            manifest_fields={},
            inputs={},
            seal={},
        )
        os.utime(cache.entries / key / "entry.json", (1000 + index, 1000 + index))
    assert cache.lookup("a" * 64) is not None  # touched: now the most recent
    cache.max_bytes = 2 * 7500
    assert cache.evict() == ["b" * 64]
    assert cache.lookup("b" * 64) is None and cache.lookup("c" * 64) is not None
    hit = cache.lookup("a" * 64)
    assert (
        hit.models(cache.cache_key())["model.onnx"]
        and hit.bundle_files["model.onnx.enc"] == (bundle / "model.onnx.enc").read_bytes()
    )


@pytest.mark.slow  # ~12 s idle, ~25 s on a loaded host: two build processes and three compiles
def test_kill_9_leaves_no_partial_bundle_and_a_rerun_resumes(tmp_path):
    """SIGKILL the driver once its first bundle exists: what is there verifies; the rerun serves it from the cache."""
    import signal

    shutil.copy(DIGITS / "digits_cnn.onnx", tmp_path / "digits_cnn.onnx")
    (tmp_path / "BUILD.toml").write_text(
        f"[defaults]\nno_bench = true\ncalib = '{DIGITS / 'calib.npz'}'\n"
        "[[model]]\npath = 'digits_cnn.onnx'\ntargets = ['mobile', 'cpu-avx', 'edge-arm']\n"
    )
    env = {
        **os.environ,
        "LEPTON_HOME": str(tmp_path / "home"),
        "LEPTON_CACHE": str(tmp_path / "cache"),
        "NO_COLOR": "1",
    }
    driver = subprocess.Popen(
        [sys.executable, "-m", "lepton_cli", "build", str(tmp_path / "BUILD.toml"), "--workers", "1", "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 300
        entries = tmp_path / "cache" / "entries"
        while (
            not (entries.is_dir() and any(entries.iterdir())) and driver.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the pool's workers, orphaned by the kill
        except ProcessLookupError:
            pass
    stored = len(list(entries.iterdir()))
    finished = sorted(p.name for p in out.glob("*.lepton"))
    assert 1 <= stored <= len(finished) < 3, (stored, finished)
    for bundle in out.glob("*.lepton"):  # each bundle there is whole: it verifies
        verify_bundle(bundle, trust=tmp_path / "home" / "keys" / "signing-public.pem")
    rerun = lepton("build", tmp_path / "BUILD.toml", "--workers", "1", "--json", env=env)
    assert rerun.returncode == 0, rerun.stderr
    cached = [r["cached"] for r in json.loads(rerun.stdout)["results"]]
    assert sum(cached) == stored, cached  # what finished before the kill is not compiled again


def test_ray_inputs_travel_by_content_and_keep_their_layout(tmp_path, monkeypatch):
    """What a Ray task rebuilds on its node from the shipped blobs: the same names, folders and bytes, written once."""
    from lepton_cli.build.ray_engine import _materialise, _role_files, memory_estimate
    from lepton_cli.compile.inputs import sha256_file

    images = tmp_path / "calib_images"
    (images / "a").mkdir(parents=True)
    (images / "a" / "1.png").write_bytes(b"png-1")
    (images / "2.png").write_bytes(b"png-2")
    shutil.copy(DIGITS / "digits_cnn.onnx", tmp_path / "m.onnx")
    files, blobs = {}, {}
    for role, path in (("model", tmp_path / "m.onnx"), ("calib", images)):
        files[role] = []
        for name, local in _role_files(path, role):
            blobs[sha256_file(local)] = local.read_bytes()
            files[role].append((name, sha256_file(local), local.stat().st_size))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node"))
    local = _materialise(files, blobs)
    assert local["model"].name == "m.onnx" and local["model"].read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert local["calib"].name == "calib_images" and (local["calib"] / "a" / "1.png").read_bytes() == b"png-1"
    assert _materialise(files, {}) == local  # already on this node: nothing shipped is needed again
    assert memory_estimate(files) > (tmp_path / "m.onnx").stat().st_size * 10


def test_ctrl_c_exits_130_not_0(run_cli, tmp_path, monkeypatch):
    """Typer turns Ctrl-C into a returned 130 when not standalone; the CLI must exit with it, not 0."""

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("lepton_cli.commands.build.load_build_file", interrupted)
    (tmp_path / "BUILD.toml").write_text("")
    result = run_cli("build", tmp_path / "BUILD.toml")
    assert result.code == 130 and "interrupted" in result.stderr


def test_cache_key_from_the_environment(tmp_path, monkeypatch):
    """$LEPTON_CACHE_KEY seals the cached models; another key cannot decrypt them (the driver then rebuilds)."""
    from lepton_cli.build.cache import BuildCache
    from lepton_cli.errors import BadInputError, VerificationError

    monkeypatch.setenv("LEPTON_CACHE_KEY", "11" * 32)
    cache = BuildCache(tmp_path / "cache")
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "report.json").write_text("{}")
    cache.store(
        "d" * 64,
        bundle_dir=bundle,
        models={"model.onnx": b"weights"},
        report={},
        manifest_fields={},
        inputs={},
        seal={},
    )
    assert cache.lookup("d" * 64).models(cache.cache_key()) == {"model.onnx": b"weights"}
    assert not (tmp_path / "home" / "cache.key").exists()
    monkeypatch.setenv("LEPTON_CACHE_KEY", "22" * 32)
    with pytest.raises(VerificationError):
        cache.lookup("d" * 64).models(cache.cache_key())
    monkeypatch.setenv("LEPTON_CACHE_KEY", "not-hex")
    with pytest.raises(BadInputError, match="LEPTON_CACHE_KEY"):
        cache.cache_key()
