"""Table-driven bad inputs: each exits 2 with one clear line, no traceback, nothing written."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from conftest import DIGITS, LIGHT_DIR, ONNX_DATA
from onnx import helper, numpy_helper

from lepton_cli.pipeline.registry import PassResult, register_pass, tolerance

DIGITS_MODEL = DIGITS / "digits_cnn.onnx"


@dataclass(frozen=True)
class _NoParams:
    pass


# A pass that needs static shapes, registered for the "dimension left unbound" case only.
@register_pass(
    "test_needs_static", params=_NoParams, description="test only", exactness=tolerance(0, 0), needs_static_shapes=True
)
def _needs_static(model, ctx, params):
    return PassResult(model, {})


def _external_model(folder: Path, location: str) -> Path:
    """A one-node model whose weight lives in external data at ``location``."""
    weight = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def case_missing_file(tmp: Path) -> list:
    return ["compile", tmp / "nope.onnx", "-t", "cpu-avx", "-o", tmp / "out"]


def case_text_file(tmp: Path) -> list:
    return ["compile", _write(tmp / "model.onnx", "this is not a model\n"), "-t", "cpu-avx", "-o", tmp / "out"]


def case_truncated(tmp: Path) -> list:
    data = DIGITS_MODEL.read_bytes()
    (tmp / "cut.onnx").write_bytes(data[: len(data) // 2])
    return ["compile", tmp / "cut.onnx", "-t", "cpu-avx", "-o", tmp / "out"]


def case_external_dotdot(tmp: Path) -> list:
    inner = tmp / "m"
    inner.mkdir()
    (tmp / "secret.bin").write_bytes(b"\0" * 16)
    return ["compile", _external_model(inner, "../secret.bin"), "-t", "cpu-avx", "-o", tmp / "out"]


def case_external_absolute(tmp: Path) -> list:
    (tmp / "secret.bin").write_bytes(b"\0" * 16)
    return ["compile", _external_model(tmp, str(tmp / "secret.bin")), "-t", "cpu-avx", "-o", tmp / "out"]


def case_external_symlink(tmp: Path) -> list:
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 16)
    inner = tmp / "m"
    inner.mkdir()
    os.symlink(outside / "w.bin", inner / "w.bin")
    return ["compile", _external_model(inner, "w.bin"), "-t", "cpu-avx", "-o", tmp / "out"]


def case_external_hardlink(tmp: Path) -> list:
    (tmp / "secret.bin").write_bytes(b"\0" * 16)
    inner = tmp / "m"
    inner.mkdir()
    os.link(tmp / "secret.bin", inner / "w.bin")
    return ["compile", _external_model(inner, "w.bin"), "-t", "cpu-avx", "-o", tmp / "out"]


def case_unknown_domain(tmp: Path) -> list:
    graph = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["y"], domain="com.example.custom")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example.custom", 1)]
    )
    (tmp / "custom.onnx").write_bytes(model.SerializeToString())
    return ["compile", tmp / "custom.onnx", "-t", "cpu-avx", "-o", tmp / "out"]


def case_toml_key_typo(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "edge-arm"\n[hardware]\npeak_int8_top = 1.0\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_unknown_pass(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "edge-arm"\n[[passes]]\nname = "fuze"\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_bad_param_type(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "edge-arm"\n[pass_params.fuse]\nfold_constants = "yes"\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_bad_budget_value(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "edge-arm"\n[budgets]\nmax_accuracy_drop_pct = 500\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_nan_pass_parameter(tmp: Path) -> list:
    # nan passes every range check written as a comparison: AdaRound's time budget would never run out
    toml = _write(tmp / "mine.toml", 'extends = "cpu-avx"\n[pass_params.quantize]\nadaround_seconds = nan\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_target_name_with_a_path(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "cpu-avx"\nname = "../boards/x"\n')  # it names the bundle file
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_toml_syntax(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "edge-arm"\n[hardware\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_unknown_target(tmp: Path) -> list:
    return ["compile", DIGITS_MODEL, "-t", "quantum-9000", "-o", tmp / "out"]


def case_input_shape_no_input(tmp: Path) -> list:
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--input-shape", "pixels=1,1,8,8", "-o", tmp / "out"]


def case_input_shape_malformed(tmp: Path) -> list:
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--input-shape", "image=1,x,8", "-o", tmp / "out"]


def case_dim_unbound(tmp: Path) -> list:
    toml = _write(tmp / "mine.toml", 'extends = "cpu-avx"\n[[passes]]\nname = "test_needs_static"\n')
    return ["compile", DIGITS_MODEL, "-t", toml, "-o", tmp / "out"]


def case_unwritable_output(tmp: Path) -> list:
    blocker = _write(tmp / "a-file", "x")
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "-o", blocker / "sub"]


def case_calib_wrong_name(tmp: Path) -> list:
    np.savez(tmp / "calib.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp / "calib.npz", "-o", tmp / "out"]


def case_calib_nan(tmp: Path) -> list:
    data = np.zeros((4, 1, 8, 8), np.float32)
    data[1, 0, 2, 2] = np.nan
    np.savez(tmp / "calib.npz", image=data)
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp / "calib.npz", "-o", tmp / "out"]


def case_calib_wrong_shape(tmp: Path) -> list:
    np.savez(tmp / "calib.npz", image=np.zeros((4, 1, 9, 9), np.float32))
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp / "calib.npz", "-o", tmp / "out"]


def case_calib_empty(tmp: Path) -> list:
    np.savez(tmp / "calib.npz", image=np.zeros((0, 1, 8, 8), np.float32))
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp / "calib.npz", "-o", tmp / "out"]


def case_calib_placeholder(tmp: Path) -> list:
    np.savez(tmp / "calib.npz", image=np.zeros((16, 1, 8, 8), np.float32))  # a blank image in every sample
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp / "calib.npz", "-o", tmp / "out"]


def case_eval_placeholder(tmp: Path) -> list:
    np.savez(tmp / "eval.npz", image=np.zeros((16, 1, 8, 8), np.float32), labels=np.zeros(16, np.int64))
    args = ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", DIGITS / "calib.npz"]
    return args + ["--eval", tmp / "eval.npz", "-o", tmp / "out"]


def case_eval_labels_not_classes(tmp: Path) -> list:
    real = np.load(DIGITS / "eval.npz")
    np.savez(tmp / "eval.npz", image=real["image"], labels=real["labels"] + 100)  # 1-based or offset class ids
    args = ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", DIGITS / "calib.npz"]
    return args + ["--eval", tmp / "eval.npz", "-o", tmp / "out"]


def case_negative_budget(tmp: Path) -> list:
    args = ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", DIGITS / "calib.npz"]
    return args + ["--max-accuracy-drop", "-1", "-o", tmp / "out"]


def case_zero_bench_seconds(tmp: Path) -> list:
    args = ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", DIGITS / "calib.npz"]
    return args + ["--bench-seconds", "0", "-o", tmp / "out"]


def case_negative_seed(tmp: Path) -> list:
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", DIGITS / "calib.npz", "--seed", "-1", "-o", tmp / "o"]


def case_calib_npy(tmp: Path) -> list:
    np.save(tmp / "calib.npy", np.load(DIGITS / "calib.npz")["image"])  # the real images, without their input name
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--calib", tmp / "calib.npy", "-o", tmp / "out"]


def case_input_shape_past_memory(tmp: Path) -> list:
    # 238 GiB of float32 images: the compile failed allocating its check inputs (exit 1)
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--input-shape", "image=1000000000,1,8,8", "-o", tmp / "out"]


def case_expires_past(tmp: Path) -> list:
    return ["compile", DIGITS_MODEL, "-t", "cpu-avx", "--expires", "2001-01-01", "-o", tmp / "out"]


def case_bench_input_shape_past_memory(tmp: Path) -> list:
    return ["bench", DIGITS_MODEL, "--input-shape", "image=1000000000,1,8,8", "--seconds", "1"]


def case_op_without_ort_kernel(tmp: Path) -> list:
    # opset 20's ImageDecoder on a JPEG's bytes: ONNX Runtime has no kernel, and fuse's check failed (exit 1)
    node = helper.make_node("ImageDecoder", ["encoded"], ["image"], pixel_format="RGB")
    graph = helper.make_graph(
        [node],
        "decode",
        [helper.make_tensor_value_info("encoded", onnx.TensorProto.UINT8, ["bytes"])],
        [helper.make_tensor_value_info("image", onnx.TensorProto.UINT8, ["h", "w", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    try:
        import onnxruntime

        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip("this ONNX Runtime runs ImageDecoder: no op left to refuse")
    except onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented:
        pass
    onnx.save(model, tmp / "decode.onnx")
    return ["compile", tmp / "decode.onnx", "-t", "cpu-avx", "-o", tmp / "out"]


def case_calib_index_past_the_vocabulary(tmp: Path) -> list:
    embedding = ONNX_DATA / "pytorch-converted" / "test_Embedding"  # real weights: 4 rows, int64 indices [1, 4]
    tensor = onnx.TensorProto()
    tensor.ParseFromString((embedding / "test_data_set_0" / "input_0.pb").read_bytes())
    ids = np.repeat(numpy_helper.to_array(tensor), 6, axis=0)
    ids[3, 1] = 9  # sample 3 reads a row the table does not have
    np.savez(tmp / "calib.npz", **{"0": ids})
    return ["compile", embedding / "model.onnx", "-t", "cpu-avx", "--calib", tmp / "calib.npz", "-o", tmp / "out"]


def case_inspect_text_file(tmp: Path) -> list:
    return ["inspect", _write(tmp / "model.onnx", "not a model")]


CASES: list[tuple[str, Callable[[Path], list], str]] = [
    ("missing file", case_missing_file, "does not exist"),
    ("text file named .onnx", case_text_file, "not an ONNX model"),
    ("truncated model", case_truncated, "not an ONNX model"),
    ("external data ..", case_external_dotdot, "escapes the model's folder"),
    ("external data absolute", case_external_absolute, "escapes the model's folder"),
    ("external data symlink", case_external_symlink, "symbolic link"),
    ("external data hard link", case_external_hardlink, "hard link"),
    ("unknown op domain", case_unknown_domain, "outside the allowlist"),
    ("TOML key typo", case_toml_key_typo, "unknown key hardware.peak_int8_top"),
    ("unknown pass", case_unknown_pass, "unknown pass 'fuze'"),
    ("bad parameter type", case_bad_param_type, "passes[0] (fuse).fold_constants"),
    ("bad budget value", case_bad_budget_value, "budgets.max_accuracy_drop_pct"),
    ("nan pass parameter", case_nan_pass_parameter, "quantize).adaround_seconds = nan is not a finite number"),
    ("target name with a path", case_target_name_with_a_path, "target name '../boards/x' is not letters"),
    ("TOML syntax", case_toml_syntax, "not valid TOML"),
    ("unknown target", case_unknown_target, "unknown target 'quantum-9000'"),
    ("--input-shape names no input", case_input_shape_no_input, "'pixels', which is not an input"),
    ("--input-shape malformed", case_input_shape_malformed, "is not NAME=D1,D2"),
    ("dimension left unbound", case_dim_unbound, "image[0] ('N')"),
    ("unwritable output folder", case_unwritable_output, "not writable"),
    ("calib names no input", case_calib_wrong_name, "'pixels' names no input"),
    ("calib NaN", case_calib_nan, "NaN/Inf"),
    ("calib wrong shape", case_calib_wrong_shape, "samples have shape"),
    ("calib empty", case_calib_empty, "holds no samples"),
    ("calib placeholder", case_calib_placeholder, "calib.npz: every input holds one value in every sample"),
    ("eval placeholder", case_eval_placeholder, "eval.npz: every input holds one value in every sample"),
    ("eval labels not classes", case_eval_labels_not_classes, "397 of 397 labels are not class indices"),
    ("calib index past the vocabulary", case_calib_index_past_the_vocabulary, "the model cannot run sample 3"),
    ("calib .npy", case_calib_npy, "is a single .npy array, not an .npz keyed by input name"),
    ("input shape past memory", case_input_shape_past_memory, "over a quarter of this host's"),
    ("bench input shape past memory", case_bench_input_shape_past_memory, "over a quarter of this host's"),
    ("expired bundle", case_expires_past, "--expires 2001-01-01 has passed"),
    ("op without an ONNX Runtime kernel", case_op_without_ort_kernel, "cannot load the model, and every pass is"),
    ("negative budget", case_negative_budget, "--max-accuracy-drop -1 is out of range"),
    ("zero bench seconds", case_zero_bench_seconds, "--bench-seconds 0 is out of range"),
    ("negative seed", case_negative_seed, "--seed -1 is out of range"),
    ("inspect text file", case_inspect_text_file, "not an ONNX model"),
]


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name,make_args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, make_args, expected, tmp_path, run_cli):
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(work)
    before = _snapshot(work)
    result = run_cli(*args)
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0], error_lines[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert _snapshot(work) == before, f"{name}: files were written: {_snapshot(work) - before}"


def test_light_models_present():
    # The real-model suites depend on these; fail loudly rather than skip if onnx stops shipping them.
    assert len(list(LIGHT_DIR.glob("*.onnx"))) == 9
    assert shutil.which("python3")
