"""Models whose weights live in ONNX external data: compiled with the weights left on disk, bundled as
a model plus its encrypted data file when too large for one protobuf, verified and run.

The fast cases use a few-MB MatMul stack saved as external data; the slow one compiles the 2.5 GiB
stack of ``benchmarks/large_model.py`` and measures the compile's peak RSS in a child process.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import large_model  # noqa: E402

LAYERS, WIDTH = 3, 512  # 3 MiB of external data


@pytest.fixture
def stack(tmp_path) -> Path:
    return large_model.build_matmul_stack(tmp_path / "model", layers=LAYERS, width=WIDTH)


def _run_variant(run_cli, bundle: Path, x_path: Path, out: Path, variant: str) -> np.ndarray:
    result = run_cli("run", bundle, "--input", f"x={x_path}", "--variant", variant, "-o", out)
    assert result.code == 0, result.stderr
    return np.load(out)["y"]


@pytest.mark.parametrize("target", ["cpu-avx", "edge-arm"])
def test_external_data_model_compiles_verifies_and_runs(run_cli, stack, tmp_path, target):
    result = run_cli("compile", stack, "-t", target, "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "onnxsim could not simplify this model (the weights are kept in external data" in result.stderr
    bundle = tmp_path / "out" / f"stack.{target}.lepton"
    report = json.loads((bundle / "report.json").read_text())
    data = stack.parent / "stack.onnx.data"
    assert report["source_external_data"] == {"stack.onnx.data": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert report["source"]["size_bytes"] >= data.stat().st_size  # external data counted in the model's size
    assert run_cli("verify", bundle).code == 0

    x = np.random.default_rng(3).uniform(-1, 1, (1, WIDTH)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = large_model.reference_output(x, layers=LAYERS, width=WIDTH)
    scale = np.abs(expected).max()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for variant in [v["name"] for v in manifest["variants"]]:
        got = _run_variant(run_cli, bundle, tmp_path / "x.npy", tmp_path / f"y-{variant}.npz", variant)
        tolerance = 1e-5 if variant == "fp32" else 0.05  # int8 weight-only: per-channel rounding of every weight
        assert np.abs(got - expected).max() <= tolerance * scale, variant


def test_bundle_stores_large_models_as_graph_plus_encrypted_data(run_cli, stack, tmp_path, monkeypatch):
    from lepton_cli.model import external_data

    monkeypatch.setattr(external_data, "BUNDLE_INLINE_LIMIT", 0)  # every model as a pair, as above 1 GiB
    assert run_cli("compile", stack, "-t", "cpu-avx", "-o", tmp_path / "out").code == 0
    bundle = tmp_path / "out" / "stack.cpu-avx.lepton"
    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = {e["path"]: e for e in manifest["files"]}
    data = entries["variants/fp32.onnx.data.enc"]
    assert data["role"] == "model_data" and data["encrypted"] and data["model"] == "variants/fp32.onnx"
    assert entries["variants/fp32.onnx.enc"]["external_data"] == "variants/fp32.onnx.data"
    assert data["plain_size"] >= LAYERS * WIDTH * WIDTH * 4
    plain = (stack.parent / "stack.onnx.data").read_bytes()
    assert plain[:4096] not in (bundle / "variants/fp32.onnx.data.enc").read_bytes()  # encrypted, not copied
    assert run_cli("verify", bundle).code == 0

    x = np.random.default_rng(4).uniform(-1, 1, (1, WIDTH)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    import onnxruntime as ort

    direct = ort.InferenceSession(str(stack), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = _run_variant(run_cli, bundle, tmp_path / "x.npy", tmp_path / "y.npz", "fp32")
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)

    # One flipped byte in the data file: verification fails (exit 4), and run refuses too.
    path = bundle / "variants/fp32.onnx.data.enc"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    assert run_cli("verify", bundle).code == 4
    assert run_cli("run", bundle, "--input", f"x={tmp_path / 'x.npy'}", "--variant", "fp32").code == 4


def test_static_int8_reads_small_external_data_in(run_cli, stack, tmp_path):
    """Under the limit, ORT's calibrator gets an in-memory copy: --calib works as for any model."""
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).uniform(-1, 1, (16, 1, WIDTH)).astype(np.float32))
    result = run_cli("compile", stack, "-t", "cpu-avx", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "stack.cpu-avx.lepton" / "report.json").read_text())
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")
    assert quantize["summary"]["scheme"] == "int8" and "fallback" not in quantize["summary"]
    assert run_cli("verify", tmp_path / "out" / "stack.cpu-avx.lepton").code == 0


@pytest.mark.parametrize("target, calib", [("cpu-avx", True), ("cuda", False)])
def test_whole_protobuf_schemes_refuse_external_data_over_the_limit(
    run_cli, stack, tmp_path, monkeypatch, target, calib
):
    """Static int8 (ORT's calibrator) and fp16 need one protobuf: above the limit, exit 2 naming the scheme."""
    from lepton_cli.model import external_data

    monkeypatch.setattr(external_data, "INLINE_LIMIT", 1 << 20)  # the 3 MiB stack stands for a model over 1 GiB
    args = ["compile", stack, "-t", target, "-o", tmp_path / "out"]
    if calib:
        np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).uniform(-1, 1, (16, 1, WIDTH)).astype(np.float32))
        args += ["--calib", tmp_path / "calib.npz"]
    result = run_cli(*args)
    assert result.code == 2, result.stderr
    assert "needs the whole model in one protobuf" in result.stderr and "quantize scheme" in result.stderr


def test_model_data_entry_must_name_its_model():
    from lepton_cli.bundle.manifest import _check_model_data
    from lepton_cli.errors import VerificationError

    model = {
        "path": "model.onnx.enc",
        "role": "model",
        "encrypted": True,
        "plain_path": "model.onnx",
        "external_data": "model.onnx.data",
    }
    data = {
        "path": "model.onnx.data.enc",
        "role": "model_data",
        "encrypted": True,
        "plain_path": "model.onnx.data",
        "model": "model.onnx",
    }
    _check_model_data([model, data])
    with pytest.raises(VerificationError):
        _check_model_data([model])  # the model names data the bundle does not list
    with pytest.raises(VerificationError):
        _check_model_data([model, data | {"model": "other.onnx"}])
    with pytest.raises(VerificationError):
        _check_model_data([model, data | {"plain_path": "elsewhere.data"}])


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin"])
def test_hostile_external_location_is_refused(run_cli, tmp_path, location):
    path = large_model.build_matmul_stack(tmp_path / "m", layers=1, width=16)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())
    result = run_cli("compile", path, "-t", "cpu-avx", "-o", tmp_path / "out")
    assert result.code == 2, result.stderr
    assert "escapes the model's folder" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tensor_array_reads_only_inside_the_weights_folder(stack, tmp_path):
    from lepton_cli.errors import BadInputError, InternalError
    from lepton_cli.model.external_data import tensor_array, weights_folder
    from lepton_cli.model.load import load_model

    loaded = load_model(stack, keep_external=True)
    weight = next(t for t in loaded.model.graph.initializer if t.name == "w1")
    assert weight.data_location == onnx.TensorProto.EXTERNAL and not weight.raw_data  # not read at load
    with pytest.raises(InternalError):
        tensor_array(weight)  # outside a compile there is no folder to read from
    with weights_folder(loaded.weights_folder):
        np.testing.assert_array_equal(tensor_array(weight), large_model.layer_weights(1, WIDTH)[0])
        weight.external_data[0].value = "../stack.onnx.data"
        with pytest.raises(BadInputError):
            tensor_array(weight)


@pytest.mark.slow
def test_model_over_2gib_compiles_within_twice_its_size(tmp_path):
    """The 2.5 GiB stack compiles for cpu-avx in a child process whose peak RSS stays within 2x the model;
    the bundle (an int8 weight-only model, and the fp32 one as a graph plus encrypted data) verifies and runs."""
    model = large_model.build_matmul_stack(tmp_path / "model", layers=10, width=8192)
    size = model.stat().st_size + (model.parent / "stack.onnx.data").stat().st_size
    assert size > 2**31
    try:
        result = large_model.compile_measured(model, tmp_path / "out")
        assert result["exit_code"] == 0, result.get("output")
        assert result["peak_rss_gib"] * 2**30 <= 2 * size, result
        bundle = tmp_path / "out" / "stack.cpu-avx.lepton"
        assert (bundle / "variants" / "fp32.onnx.data.enc").stat().st_size >= size - 2**20
        checks = large_model.check_bundle(bundle, tmp_path, layers=10, width=8192)
        assert all(row["exit_code"] == 0 for row in checks.values()), checks
        assert checks["run fp32"]["max_abs_error_rel"] < 1e-4
        assert checks["run int8"]["max_abs_error_rel"] < 0.05
    finally:
        for folder in (tmp_path / "model", tmp_path / "out"):
            __import__("shutil").rmtree(folder, ignore_errors=True)


def test_archive_refuses_bundles_beyond_zip_without_zip64():
    from lepton_cli.compile.compiler import _check_archive_size
    from lepton_cli.errors import BadInputError
    from lepton_cli.model.external_data import ModelPayload

    _check_archive_size({"model.onnx": ModelPayload(b"graph", "model.onnx.data", [(None, 0, 2**30)])})
    with pytest.raises(BadInputError, match="--archive"):
        _check_archive_size({"model.onnx": ModelPayload(b"graph", "model.onnx.data", [(None, 0, 2**31)])})
