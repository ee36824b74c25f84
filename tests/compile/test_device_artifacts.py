"""Each target's device file in the bundle, run by that device's runtime: mobile .ort, tpu .tflite, fpga DPU check."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS, OCR_REC, needs_ocr

needs_tflite = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("ai_edge_litert") is None,
    reason="the lepton-cli[tflite] extra (tensorflow-cpu, ai-edge-litert) is not installed",
)


def _compile(
    run_cli,
    tmp_path,
    target,
    model=DIGITS / "digits_cnn.onnx",
    calib=DIGITS / "calib.npz",
    evaluation=DIGITS / "eval.npz",
    name=None,
):
    result = run_cli(
        "compile",
        model,
        "--target",
        target,
        "--calib",
        calib,
        "--eval",
        evaluation,
        "-o",
        tmp_path,
        "--no-bench",
        "--quiet",
    )
    assert result.code == 0, result.stderr
    bundle = tmp_path / f"{model.stem}.{name or target}.lepton"
    return bundle, json.loads((bundle / "report.json").read_text()), result


def _open(bundle):
    from lepton_cli.bundle import open_bundle
    from lepton_cli.bundle.keys import dev_keys

    keys, _ = dev_keys(create=False)
    return open_bundle(
        bundle, key=str(keys.path("encryption", "private")), trust=str(keys.path("signing", "public")), record=False
    )


def _ort_session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _nhwc_frames(count: int) -> np.ndarray:
    return np.load(DIGITS / "eval.npz")["image"][:count].transpose(0, 2, 3, 1).astype(np.float32)


def test_mobile_bundle_carries_a_loadable_ort_per_model_and_the_operator_config(run_cli, tmp_path):
    bundle, report, _ = _compile(run_cli, tmp_path, "mobile")
    assert run_cli("verify", bundle).code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {e["path"]: e for e in manifest["device_artifacts"]}
    assert set(listed) == {"model.ort", "variants/fp32.ort"} and listed["model.ort"]["from"] == "model.onnx"
    assert (bundle / "model.ort.enc").is_file() and not (bundle / "model.ort").exists()  # encrypted like model.onnx
    config = (bundle / "required_operators_and_types.config").read_text()
    assert "ai.onnx;" in config and "Conv" in config and "/tmp" not in config
    opened = _open(bundle)
    frames = _nhwc_frames(16)
    for ort_path, entry in listed.items():
        session, reference = (
            _ort_session(opened.models[ort_path]),
            ort.InferenceSession(opened.models[entry["from"]], providers=["CPUExecutionProvider"]),
        )
        assert session.get_modelmeta().custom_metadata_map["lepton.io_layout.image"] == "NHWC"
        got = np.concatenate([session.run(None, {"image": f[None]})[0] for f in frames])
        want = np.concatenate([reference.run(None, {"image": f[None]})[0] for f in frames])
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
        assert (got.argmax(1) == want.argmax(1)).all()
    usability = report["device"]["ort"]["usability"]["eps"]
    assert set(usability) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    for entry in usability.values():
        assert entry["partitions"] >= 1 and 0 < entry["supported_nodes"] <= entry["nodes"]
        assert sum(entry["cpu_ops"].values()) == entry["nodes"] - entry["supported_nodes"]
    assert "### Device" in (bundle / "report.md").read_text()


def test_run_format_ort_reports_file_and_runtime_and_scores_like_onnx(run_cli, tmp_path):
    bundle, _, _ = _compile(run_cli, tmp_path, "mobile")
    result = run_cli(
        "run", bundle, "--inputs", DIGITS / "eval.npz", "--format", "ort", "--json", "-o", tmp_path / "o.npz"
    )
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "ort" and doc["model"] == "model.ort" and doc["runtime"].startswith("ONNX Runtime")
    onnx_doc = json.loads(run_cli("run", bundle, "--inputs", DIGITS / "eval.npz", "--variant", "fp16", "--json").stdout)
    assert abs(doc["top1_accuracy_pct"] - onnx_doc["top1_accuracy_pct"]) <= 0.26  # one image in 397


def test_run_format_ort_verifies_the_whole_bundle_first(run_cli, tmp_path):
    bundle, _, _ = _compile(run_cli, tmp_path, "mobile")
    data = bytearray((bundle / "model.ort.enc").read_bytes())
    data[100] ^= 1
    (bundle / "model.ort.enc").write_bytes(bytes(data))
    result = run_cli("run", bundle, "--inputs", DIGITS / "eval.npz", "--format", "ort")
    assert result.code == 4 and "model.ort.enc" in result.stderr


def test_run_format_errors_are_exit_2(run_cli, tmp_path):
    bundle, _, _ = _compile(run_cli, tmp_path, "fpga")
    missing = run_cli("run", bundle, "--inputs", DIGITS / "eval.npz", "--format", "ort")
    assert missing.code == 2 and "has no ort file" in missing.stderr and "Traceback" not in missing.stderr
    bad = run_cli("run", bundle, "--inputs", DIGITS / "eval.npz", "--format", "coreml")
    assert bad.code == 2 and "--format" in bad.stderr


def test_run_format_tflite_without_litert_is_exit_2_naming_the_extra(run_cli, tmp_path, monkeypatch):
    bundle, _, _ = _compile(run_cli, tmp_path, "fpga")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    result = run_cli("run", bundle, "--inputs", DIGITS / "eval.npz", "--format", "tflite")
    assert result.code == 2 and "lepton-cli[tflite]" in result.stderr


def test_manifest_device_artifacts_are_validated_strictly():
    from lepton_cli.bundle.manifest import _validate_device_artifacts
    from lepton_cli.errors import VerificationError

    files = [
        {"path": "model.onnx.enc", "encrypted": True, "plain_path": "model.onnx"},
        {"path": "model.ort.enc", "encrypted": True, "plain_path": "model.ort"},
        {"path": "ops.config", "encrypted": False},
    ]
    good = {"format": "ort", "path": "model.ort", "from": "model.onnx", "runtime": "ORT", "ops_config": "ops.config"}
    _validate_device_artifacts([good], files)
    for bad in (
        {**good, "format": "coreml"},
        {**good, "path": "model.tflite"},
        {**good, "from": "other.onnx"},
        {**good, "ops_config": "missing.config"},
        {**good, "path": "../model.ort"},
        {**good, "format": "tflite", "io_names": {"inputs": {"x": 1}, "outputs": {}}},
    ):
        with pytest.raises(VerificationError):
            _validate_device_artifacts([bad], files)
    with pytest.raises(VerificationError):
        _validate_device_artifacts([good, good], files)


# -- fpga: the DPU's limits ----------------------------------------------------------------------------------------


def test_fpga_digits_meets_every_dpu_limit_and_the_report_says_so(run_cli, tmp_path):
    _, report, _ = _compile(run_cli, tmp_path, "fpga")
    dpu = report["device"]["dpu"]
    assert dpu["ok"] and dpu["violations"] == [] and dpu["nodes_checked"] >= 7
    assert "DPUCZDX8G" in dpu["reference"]


def test_dpu_check_names_each_violation_on_a_tpu_compiled_graph(run_cli, tmp_path):
    """The tpu target's int8 (asymmetric, per-channel, non-power-of-two scales) breaks the DPU's fixed point."""
    from lepton_cli.device_artifacts import dpu
    from lepton_cli.pipeline.targets import load_target

    bundle, _, _ = _compile(run_cli, tmp_path, "tpu")
    model = onnx.load_from_string(_open(bundle).models["model.onnx"])
    violations, _ = dpu.check(model, list(load_target("fpga").runtime.supported_ops))
    rules = {v.rule for v in violations}
    assert {"power-of-two", "symmetric", "per-tensor"} <= rules
    assert all(v.node and v.detail for v in violations)
    # The compile's lines: one per kind of violation, every violation counted once (not the first 20 nodes).
    from lepton_cli.device_artifacts.summary import device_lines

    section = {"ok": False, "reference": "DPU", "violations": [v.to_dict() for v in violations]}
    kinds = device_lines({"device": {"dpu": section}})[1:]
    assert len(kinds) == len({(v.op, v.rule) for v in violations}) < len(violations)
    assert sum(int(line.split(" x ")[0].removeprefix("DPU: ")) for line in kinds) == len(violations)


def test_dpu_geometry_and_shift_rules():
    from onnx import helper, numpy_helper

    from lepton_cli.device_artifacts import dpu

    def qdq(name, scale, zp=0, dtype=np.int8):
        return [
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}.s"),
            numpy_helper.from_array(np.array(zp, dtype), f"{name}.z"),
        ]

    w = numpy_helper.from_array(np.ones((32, 8, 17, 1), np.int8), "w")
    b = numpy_helper.from_array(np.full(32, 2**30, np.int32), "b")
    inits = [
        w,
        b,
        *qdq("x", 2.0**-4),
        *qdq("w", 2.0**-7),
        *qdq("y", 2.0**-12),
        numpy_helper.from_array(np.array(2.0**-11, np.float32), "b.s"),
        numpy_helper.from_array(np.array(0, np.int32), "b.z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.s", "x.z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x.s", "x.z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w.s", "w.z"], ["wd"]),
        helper.make_node("DequantizeLinear", ["b", "b.s", "b.z"], ["bd"]),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="tall", strides=[1, 9], pads=[0, 1, 0, 0]),
        helper.make_node("QuantizeLinear", ["y", "y.s", "y.z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y.s", "y.z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 40, 40])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    violations, _ = dpu.check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), [])
    found = {(v.node, v.rule) for v in violations}
    # kernel 17 > 16; stride 9 > 8; pad_w 1 > kernel_w-1 = 0; shift_cut 4+7-12 = -1 < 0;
    # bias 2^30 * 2^-11 = 2^19 needs fix position <= -13 in 8 bits, the shift limit allows >= 4+7-15 = -4
    assert {
        ("tall", "kernel"),
        ("tall", "stride"),
        ("tall", "pad"),
        ("tall", "shift_cut"),
        ("tall", "shift_bias"),
    } <= found


@pytest.mark.parametrize("name", ["test_AvgPool3d_stride", "test_MaxPool1d", "test_MaxPool3d_stride_padding"])
def test_dpu_check_names_1d_and_3d_pooling_instead_of_crashing(name):
    """pytorch-converted 1-D/3-D pools made the fpga compile exit 1 (it unpacked kernel_shape as two values)."""
    from conftest import ONNX_DATA

    from lepton_cli.device_artifacts import dpu
    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.pipeline.targets import load_target

    model, _ = upgrade_opset(onnx.load(str(ONNX_DATA / "pytorch-converted" / name / "model.onnx")), 13, 17)
    violations, checked = dpu.check(
        onnx.shape_inference.infer_shapes(model), list(load_target("fpga").runtime.supported_ops)
    )
    pools = [v for v in violations if v.op.endswith("Pool")]
    assert checked >= 1 and pools and all(v.rule == "pool2d" and "-D pooling" in v.detail for v in pools)


@needs_tflite
def test_tflite_export_refuses_1d_pooling_instead_of_crashing():
    """pytorch-converted MaxPool1d made the tpu compile exit 1 (TensorFlow refused a 4-D transpose of a 3-D tensor)."""
    from conftest import ONNX_DATA

    from lepton_cli.device_artifacts import tflite_export
    from lepton_cli.model.load import upgrade_opset

    model, _ = upgrade_opset(onnx.load(str(ONNX_DATA / "pytorch-converted" / "test_MaxPool1d" / "model.onnx")), 13, 17)
    with pytest.raises(tflite_export.UnsupportedOp, match="only 2-D pooling"):
        tflite_export.convert(onnx.shape_inference.infer_shapes(model), False)


# -- tpu: the .tflite ---------------------------------------------------------------------------------------------


def test_tpu_without_the_extra_writes_the_onnx_bundle_and_says_how_to_get_the_tflite(run_cli, tmp_path, monkeypatch):
    from lepton_cli.device_artifacts import tflite_artifact

    monkeypatch.setattr(tflite_artifact, "_missing_packages", lambda: ["tensorflow-cpu", "ai-edge-litert"])
    bundle, report, result = _compile(run_cli, tmp_path, "tpu")
    section = report["device"]["tflite"]
    assert section["produced"] is False and "lepton-cli[tflite]" in section["reason"]
    assert "no model.tflite" in result.stderr and not (bundle / "model.tflite.enc").exists()
    assert (bundle / "model.onnx.enc").is_file()


@needs_tflite
def test_tpu_tflite_runs_in_litert_with_the_accuracy_the_report_states(run_cli, tmp_path):
    bundle, report, _ = _compile(run_cli, tmp_path, "tpu")
    section = report["device"]["tflite"]
    assert section["produced"] and (bundle / "model.tflite.enc").is_file()
    assert section["vs_onnx"]["max_abs_diff_vs_onnx"] <= 0.05  # same int8 ranges: ORT's QDQ result to rounding
    accuracy = section["accuracy"]
    assert accuracy["metric"] == "top1" and accuracy["drop_pct"] <= accuracy["budget_pct"]
    result = run_cli("run", bundle, "--inputs", DIGITS / "eval.npz", "--format", "tflite", "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["runtime"].startswith("LiteRT") and doc["model"] == "model.tflite"
    assert abs(doc["top1_accuracy_pct"] - accuracy["value"]) < 0.01
    tpu = section["edgetpu"]
    assert tpu["ops"] == tpu["edgetpu_ops"] + len(tpu["cpu_ops"]) and "CONV_2D" in tpu["op_counts"]


@needs_tflite
def test_tflite_keeps_lepton_ranges_not_recalibrated(run_cli, tmp_path):
    """Every activation scale in the .tflite is one of the ONNX model's Q/DQ scales."""
    from ai_edge_litert.interpreter import Interpreter
    from onnx import numpy_helper

    bundle, _, _ = _compile(run_cli, tmp_path, "tpu")
    opened = _open(bundle)
    model = onnx.load_from_string(opened.models["model.onnx"])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    onnx_scales = {float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    interpreter = Interpreter(model_content=opened.models["model.tflite"])
    scales = {
        float(t["quantization_parameters"]["scales"][0])
        for t in interpreter.get_tensor_details()
        if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) == 1
    }
    assert scales and all(any(abs(s - o) <= 1e-6 * o for o in onnx_scales) for s in scales)


@needs_tflite
def test_tpu_integer_io_tflite_takes_int8(run_cli, tmp_path):
    target = tmp_path / "tpu-int.toml"
    target.write_text('extends = "tpu"\nname = "tpu-int"\n[pass_params.quantize]\ninteger_io = true\n')
    bundle, report, _ = _compile(run_cli, tmp_path, str(target), name="tpu-int")
    io = report["device"]["tflite"]["io"]
    assert io["inputs"][0]["type"] == "tensor(int8)" and io["outputs"][0]["type"] == "tensor(int8)"
    assert report["device"]["tflite"]["accuracy"]["drop_pct"] <= 1.0


@pytest.mark.slow
@needs_ocr
def test_mobile_ppocr_rec_ort_matches_onnx(run_cli, tmp_path):
    _, model_path, _ = _rec_set(tmp_path)
    bundle, report, _ = _compile(run_cli, tmp_path, "mobile", model_path, tmp_path / "calib.npz", tmp_path / "eval.npz")
    opened = _open(bundle)
    session = _ort_session(opened.models["model.ort"])
    reference = ort.InferenceSession(opened.models["model.onnx"], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    frames = np.load(tmp_path / "eval.npz")["x"].transpose(0, 2, 3, 1)[:8]
    got = np.concatenate([session.run(None, {name: f[None]})[0] for f in frames])
    want = np.concatenate([reference.run(None, {name: f[None]})[0] for f in frames])
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    nnapi = report["device"]["ort"]["usability"]["eps"]["NNAPI"]
    assert nnapi["nodes"] > 100 and nnapi["cpu_ops"]  # HardSigmoid and LayerNormalization stay on the CPU


def _rec_set(tmp_path, width=160):
    sys.path.insert(0, str(DIGITS.parent.parent / "benchmarks"))
    import ocr_textset as textset

    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes

    model, _ = upgrade_opset(onnx.load(OCR_REC), 13, 21)
    onnx.save(bind_input_shapes(model, {"x": [1, 3, 48, width]}), tmp_path / f"rec{width}.onnx")
    calib, _ = textset.make_set(32, 1, "calib", width=width)
    evaluation, texts = textset.make_set(60, 2, "eval", width=width)
    np.savez(tmp_path / "calib.npz", x=calib)
    np.savez(tmp_path / "eval.npz", x=evaluation, labels=np.array(texts))
    return textset, tmp_path / f"rec{width}.onnx", texts


@pytest.mark.slow
@needs_ocr
def test_fpga_ppocr_rec_dpu_check_names_real_nodes(run_cli, tmp_path):
    """The check is on the graph: the budget is opened because power-of-two int8 costs rec most of its accuracy."""
    _, model_path, _ = _rec_set(tmp_path)
    result = run_cli(
        "compile",
        model_path,
        "--target",
        "fpga",
        "--calib",
        tmp_path / "calib.npz",
        "--eval",
        tmp_path / "eval.npz",
        "-o",
        tmp_path,
        "--no-bench",
        "--quiet",
        "--max-accuracy-drop",
        "100",
    )
    assert result.code == 0, result.stderr
    bundle = tmp_path / "rec160.fpga.lepton"
    dpu = json.loads((bundle / "report.json").read_text())["device"]["dpu"]
    assert dpu["nodes_checked"] > 100
    names = {n.name for n in onnx.load_from_string(_open(bundle).models["model.onnx"]).graph.node}
    assert all(v["node"] in names and v["rule"] and v["detail"] for v in dpu["violations"])
    assert (not dpu["violations"]) == dpu["ok"]
    if dpu["violations"]:
        assert "DPU check:" in result.stderr


@pytest.mark.slow
@needs_ocr
@needs_tflite
def test_tpu_ppocr_rec_tflite_character_accuracy_matches_the_report(run_cli, tmp_path):
    textset, model_path, texts = _rec_set(tmp_path)
    result = run_cli(
        "compile",
        model_path,
        "--target",
        "tpu",
        "--calib",
        tmp_path / "calib.npz",
        "--eval",
        tmp_path / "eval.npz",
        "-o",
        tmp_path,
        "--no-bench",
        "--quiet",
        "--max-accuracy-drop",
        "6",
    )
    assert result.code == 0, result.stderr
    bundle = tmp_path / "rec160.tpu.lepton"
    section = json.loads((bundle / "report.json").read_text())["device"]["tflite"]
    assert section["produced"], section.get("reason")
    out = tmp_path / "rec.npz"
    assert run_cli("run", bundle, "--inputs", tmp_path / "eval.npz", "--format", "tflite", "-o", out).code == 0
    probs = np.load(out)[next(iter(np.load(out).files))]
    chars = textset.charset(onnx.load(model_path))
    assert abs(textset.char_accuracy(textset.ctc_greedy(probs, chars), texts) - section["accuracy"]["value"]) < 0.01
    # its LayerNorms run as the chip's MEAN, SUB, L2_NORMALIZATION (no float op on the host); the Edge TPU run ends in
    # attention, whose activation-by-activation BATCH_MATMUL it has no op for (named)
    quantize = next(s for s in json.loads((bundle / "report.json").read_text())["pipeline"] if s["name"] == "quantize")
    assert not quantize["summary"].get("float_ops") and section["edgetpu"]["op_counts"]["L2_NORMALIZATION"] == 5
    assert "BATCH_MATMUL" in {op["op"] for op in section["edgetpu"]["cpu_ops"]}


@needs_ocr
@needs_tflite
def test_tpu_direction_classifier_runs_on_the_edge_tpu_up_to_its_float_output(run_cli, tmp_path):
    """PP-LCNet's hard-swish (Div 6) and squeeze-excite HardSigmoids have no Edge TPU op: the first DIV took every
    op after it to the host. Written as Add/Clip/Mul by fuse, every op maps but the float output's DEQUANTIZE, and the
    report names no host op (the frame's own layout Transpose is none)."""
    from test_direction_classifier import OCR_CLS, direction_lines

    np.savez(tmp_path / "calib.npz", x=direction_lines(64, 31, "calib")[0])
    lines, labels = direction_lines(128, 7, "eval")
    np.savez(tmp_path / "eval.npz", x=lines, labels=labels)
    bundle, report, _ = _compile(
        run_cli, tmp_path, "tpu", model=OCR_CLS, calib=tmp_path / "calib.npz", evaluation=tmp_path / "eval.npz"
    )
    quantize = next(step for step in report["pipeline"] if step["name"] == "quantize")
    assert not quantize["summary"].get("float_ops")  # the NHWC frame's Transpose is a layout move, not a host op
    section = report["device"]["tflite"]
    assert section["produced"], section.get("reason")
    tpu = section["edgetpu"]
    assert [op["op"] for op in tpu["cpu_ops"]] == ["DEQUANTIZE"] and tpu["edgetpu_ops"] == tpu["ops"] - 1
    assert section["accuracy"]["drop_pct"] <= section["accuracy"]["budget_pct"]


def _focus_upsample_graph(resize_attrs: dict, scales: list[float]) -> onnx.ModelProto:
    """YOLOX's Focus (four stride-2 Slices, Concat) then a 1x1 Conv and a nearest Resize: the ops ddddocr's detector adds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(v, np.int64), n)
        for n, v in (("zero", [0]), ("one", [1]), ("end", [2**62]), ("two", [2]), ("ax2", [2]), ("ax3", [3]))
    ]
    inits += [
        numpy_helper.from_array(rng.normal(size=(8, 12, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array(scales, np.float32), "scales"),
    ]
    nodes = []
    for i, (row, col) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        start_r, start_c = ("zero", "one")[row], ("zero", "one")[col]
        nodes += [
            helper.make_node("Slice", ["x", start_r, "end", "ax2", "two"], [f"r{i}"]),
            helper.make_node("Slice", [f"r{i}", start_c, "end", "ax3", "two"], [f"s{i}"]),
        ]
    nodes += [
        helper.make_node("Concat", [f"s{i}" for i in range(4)], ["focus"], axis=1),
        helper.make_node("Conv", ["focus", "w"], ["c"]),
        helper.make_node("Resize", ["c", "roi", "scales"], ["y"], **resize_attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "focus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@needs_tflite
@pytest.mark.parametrize("modes", [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor")])
def test_tflite_export_maps_strided_slice_and_whole_factor_nearest_resize_exactly(modes):
    from ai_edge_litert.interpreter import Interpreter

    from lepton_cli.device_artifacts.tflite_export import convert

    model = _focus_upsample_graph(
        {"mode": "nearest", "coordinate_transformation_mode": modes[0], "nearest_mode": modes[1]}, [1.0, 1.0, 2.0, 2.0]
    )
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tfl = convert(model, integer_io=False, quantize=False)
    got = Interpreter(model_content=tfl.data).get_signature_runner()(**{tfl.inputs["x"]: x})[tfl.outputs["y"]]
    assert want.shape == (1, 8, 16, 16) and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


@needs_tflite
def test_tflite_export_names_a_resize_it_cannot_map():
    from lepton_cli.device_artifacts.tflite_export import UnsupportedOp, convert

    model = _focus_upsample_graph({"mode": "linear"}, [1.0, 1.0, 1.5, 1.5])
    with pytest.raises(UnsupportedOp, match="Resize other than nearest-neighbour by whole factors"):
        convert(model, integer_io=False, quantize=False)


@needs_tflite
def test_tflite_export_maps_space_to_depth_and_a_channel_gather_exactly():
    """SpaceToDepth then a constant channel Gather (the tpu channel padding's restore): ONNX Runtime's values."""
    from ai_edge_litert.interpreter import Interpreter
    from onnx import TensorProto, helper, numpy_helper

    from lepton_cli.device_artifacts.tflite_export import convert

    order = np.array([4, 0, 11, 5, 2, 9, 1, 3], np.int64)
    graph = helper.make_graph(
        [
            helper.make_node("SpaceToDepth", ["x"], ["s"], blocksize=2),
            helper.make_node("Gather", ["s", "order"], ["g"], axis=1),
            helper.make_node("Conv", ["g", "w"], ["y"]),
        ],
        "s2d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(order, "order"),
            numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 8, 1, 1)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tfl = convert(model, integer_io=False, quantize=False)
    got = Interpreter(model_content=tfl.data).get_signature_runner()(**{tfl.inputs["x"]: x})[tfl.outputs["y"]]
    np.testing.assert_allclose(got, want, atol=1e-5)


def _qdq_concat_graph() -> onnx.ModelProto:
    """Two int8 convs at different activation scales, concatenated and requantized at a third: ONNX Runtime's QDQ form."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def qdq(x: str, scale: float, zero: int, out: str) -> str:
        inits.extend(
            [numpy_helper.from_array(np.float32(scale), f"{out}_s"), numpy_helper.from_array(np.int8(zero), f"{out}_z")]
        )
        nodes.extend(
            [
                helper.make_node("QuantizeLinear", [x, f"{out}_s", f"{out}_z"], [f"{out}_q"]),
                helper.make_node("DequantizeLinear", [f"{out}_q", f"{out}_s", f"{out}_z"], [out]),
            ]
        )
        return out

    def conv(x: str, cin: int, cout: int, out: str) -> str:
        w = rng.normal(size=(cout, cin, 1, 1)).astype(np.float32)
        s = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
        inits.extend(
            [
                numpy_helper.from_array(np.round(w / s[:, None, None, None]).astype(np.int8), f"{out}_wq"),
                numpy_helper.from_array(s, f"{out}_ws"),
                numpy_helper.from_array(np.zeros(cout, np.int8), f"{out}_wz"),
            ]
        )
        nodes.extend(
            [
                helper.make_node("DequantizeLinear", [f"{out}_wq", f"{out}_ws", f"{out}_wz"], [f"{out}_w"], axis=0),
                helper.make_node("Conv", [x, f"{out}_w"], [out]),
            ]
        )
        return out

    x = qdq("x", 0.02, 0, "xq")
    a, b = qdq(conv(x, 3, 4, "a"), 0.0688, -120, "aq"), qdq(conv(x, 3, 4, "b"), 0.1309, -126, "bq")
    nodes.append(helper.make_node("Concat", [a, b], ["cat"], axis=1))
    y = qdq(conv(qdq("cat", 0.1, -100, "catq"), 8, 2, "y"), 0.05, 0, "out")
    graph = helper.make_graph(
        nodes,
        "qcat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@needs_tflite
def test_tflite_export_requantizes_a_concat_of_differently_scaled_inputs():
    """TFLite's int8 CONCATENATION takes one scale; the export requantizes its inputs and keeps ONNX Runtime's values."""
    from ai_edge_litert.interpreter import Interpreter

    from lepton_cli.device_artifacts.tflite_export import convert

    model = _qdq_concat_graph()
    x = np.random.default_rng(1).uniform(-2, 2, size=(1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tfl = convert(model, integer_io=False)
    got = Interpreter(model_content=tfl.data).get_signature_runner()(**{tfl.inputs["x"]: x})[tfl.outputs["out"]]
    assert (
        np.max(np.abs(got - want)) <= 2 * 0.05
    )  # fixed-point requantization: at most a step or two of the output scale


@needs_ocr
def test_mobile_usability_reads_no_weights_and_matches_ort_own_loader(tmp_path):
    """The NNAPI / Core ML partitioning from the optimised graph without its weights loaded is the one ORT's
    checker computes on the fully loaded model (ModelProtoWithShapeInfo), on PP-OCRv4 rec."""
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    from lepton_cli.device_artifacts import ort_format

    data = OCR_REC.read_bytes()
    (tmp_path / "m.onnx").write_bytes(data)
    optimize_model(tmp_path / "m.onnx", tmp_path / "basic.onnx", use_external_initializers=True)
    reference = ort_format.partitions_per_ep(ModelProtoWithShapeInfo(tmp_path / "basic.onnx").model_with_shape_info)
    with ort_format.written({"model.onnx": data}) as sources:
        got = ort_format.mobile_usability(sources["model.onnx"])
    assert got == reference
    assert got["eps"]["NNAPI"]["supported_nodes"] > 0 and got["eps"]["NNAPI"]["cpu_ops"]


@needs_ocr
@pytest.mark.parametrize("model", ["digits", "ppocr_rec"])
def test_ort_conversion_matches_onnx_runtime_own_tool(tmp_path, model):
    """Lepton's .ort conversion (weights mapped, no prepacking, one config reader at a time) writes the operator
    config ORT's convert_onnx_models_to_ort writes, and a .ort that gives the tool's outputs on real inputs:
    digits (weights as initializers, written to an external file) and PP-OCRv4 rec (weights in Constant nodes)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from lepton_cli.device_artifacts import ort_format

    if model == "digits":
        model_path, name, frames = DIGITS / "digits_cnn.onnx", "image", np.load(DIGITS / "eval.npz")["image"][:8]
    else:
        _, model_path, _ = _rec_set(tmp_path)
        name, frames = "x", np.load(tmp_path / "eval.npz")["x"][:8]
    with ort_format.written({"model.onnx": model_path.read_bytes()}) as sources:
        ours = ort_format.convert(sources)
    (tmp_path / "tool_src").mkdir()
    (tmp_path / "tool_src" / "model.onnx").write_bytes(model_path.read_bytes())
    convert_onnx_models_to_ort(
        tmp_path / "tool_src",
        output_dir=tmp_path / "tool_out",
        optimization_styles=[OptimizationStyle.Runtime],
        target_platform="arm",
        enable_type_reduction=True,
    )
    tool_config = (tmp_path / "tool_out" / "required_operators_and_types.with_runtime_opt.config").read_text()

    def body(text):
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert body(ours.ops_config.decode()) == body(tool_config) and "Conv" in tool_config
    tool_ort = (tmp_path / "tool_out" / "model.with_runtime_opt.ort").read_bytes()
    assert abs(len(ours.files["model.ort"]) - len(tool_ort)) < 1024  # same graph and weights, ids aside
    got, want = (_ort_session(data) for data in (ours.files["model.ort"], tool_ort))
    for frame in frames.astype(np.float32):
        np.testing.assert_array_equal(got.run(None, {name: frame[None]})[0], want.run(None, {name: frame[None]})[0])
