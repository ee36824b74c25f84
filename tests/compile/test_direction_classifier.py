"""PP-OCR's text-direction classifier (rapidocr's ``ch_ppocr_mobile_v2.0_cls_infer.onnx``, a small PP-LCNet that
tells upright lines from lines turned 180 degrees), a model none of the corpus's search rules were tuned on,
calibrated as a new user would: 64 rendered lines, ``--calib`` only, judged on held-out lines in other fonts."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import OCR_DET, REPO, needs_ocr

sys.path.insert(0, str(REPO / "benchmarks"))

OCR_CLS = OCR_DET.with_name("ch_ppocr_mobile_v2.0_cls_infer.onnx") if OCR_DET else None
SHAPE = "x=1,3,48,192"


def direction_lines(count: int, seed: int, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(lines [count, 3, 48, 192], labels): every second line turned 180 degrees (the classifier's class 1)."""
    import ocr_textset

    images, _ = ocr_textset.make_set(count, seed, role, width=192)
    images[1::2] = images[1::2, :, ::-1, ::-1]
    return np.ascontiguousarray(images), np.arange(count) % 2


@pytest.fixture(scope="module")
def calib_lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("direction") / "lines64.npz"
    np.savez(path, x=direction_lines(64, 31, "calib")[0])
    return path


def _classes(model: bytes | str, lines: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": line[None]})[0] for line in lines]).argmax(axis=1)


@needs_ocr
def test_input_whose_height_and_width_share_one_unnamed_dim_binds_per_axis():
    """Paddle's export names both spatial dims "?" (and the batch -1): binding 48x192 must not bind both to 48."""
    from lepton_cli.model.shapes import bind_input_shapes, graph_inputs

    raw = onnx.load(OCR_CLS)
    assert [d.dim_param for d in raw.graph.input[0].type.tensor_type.shape.dim][2:] == ["?", "?"]
    bound = bind_input_shapes(raw, {"x": [1, 3, 48, 192]})
    assert graph_inputs(bound)[0].dims == (1, 3, 48, 192)


@needs_ocr
def test_fpga_on_64_lines_stays_within_the_budget_held_out(calib_lines, tmp_path, run_cli):
    """64 lines show a flipped line as 1.6 points, coarser than prune's 0.5-point share: a channel search read 0.00
    on them and shipped a model 2.7 points below the source on 512 held-out lines. Prune now removes only exactly-dead
    channels there and says how many lines a channel search needs."""
    from test_device_artifacts import _open

    result = run_cli(
        "compile", OCR_CLS, "-t", "fpga", "--calib", calib_lines, "--input-shape", SHAPE, "-o", tmp_path, "--no-bench"
    )
    assert result.code == 0, result.stderr[-2000:]
    lines, labels = direction_lines(256, 7, "eval")
    source = _classes(str(OCR_CLS), lines)
    compiled = _classes(_open(tmp_path / f"{OCR_CLS.stem}.fpga.lepton").models["model.onnx"], lines)
    assert np.mean(source == labels) >= 0.98  # the lines are what the classifier reads: a real test set
    assert 100 * np.mean(compiled != source) <= 1.0
    assert "coarser than prune's 0.5-point share" in result.stderr and "at least 200 --calib samples" in result.stderr


@needs_ocr
def test_prune_search_scores_as_many_lines_as_its_share_needs(tmp_path):
    """A 0.5-point share needs 200 lines of one class each: the search widens its 64-line subset to them, and
    refuses (None) a set whose every line together still shows only more than the share."""
    from lepton_cli.passes._prune.scoring import samples_needed, search_scorer

    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.pipeline.context import PassContext
    from lepton_cli.pipeline.targets import load_target
    from lepton_cli.samples.sample_set import load_samples

    model = bind_input_shapes(onnx.load(OCR_CLS), {"x": [1, 3, 48, 192]})
    np.savez(tmp_path / "lines.npz", x=direction_lines(240, 5, "calib")[0])
    ctx = PassContext(target=load_target("fpga"), calib=load_samples(tmp_path / "lines.npz", model))
    scorer, _ = ctx.scorer(model)
    assert scorer.count == 240 and scorer.subset(64).resolution_pct > 0.5
    wider = search_scorer(scorer, 64, 0.5)
    assert wider is not None and wider.count == 200 and wider.resolution_pct <= 0.5
    assert search_scorer(scorer, 64, 2.0).count == 64  # 64 lines show a 2-point share already
    assert search_scorer(scorer.subset(150), 64, 0.5) is None and samples_needed(scorer.subset(150), 0.5) == 200


@needs_ocr
def test_every_layer_int8_and_slower_points_to_the_exact_variant(calib_lines, tmp_path, run_cli):
    """The classifier's convs hold 8-96 channels: fully int8 it measured 1.4x its source on this VNNI host, where the
    old advice (layers kept float, raise the budget) named a cause it did not have."""
    from dataclasses import replace

    from test_device_artifacts import _open

    from lepton_cli.evaluate.latency import compute_layers, slower_than_source
    from lepton_cli.host.detect import HostInfo
    from lepton_cli.pipeline.targets import load_target

    args = ("--calib", calib_lines, "--input-shape", SHAPE, "-o", tmp_path, "--no-bench")
    assert run_cli("compile", OCR_CLS, "-t", "cpu-avx", *args).code == 0
    compiled = onnx.load_from_string(_open(tmp_path / f"{OCR_CLS.stem}.cpu-avx.lepton").models["model.onnx"])
    float_layers, int8_layers = compute_layers(compiled)
    assert float_layers == 0 and int8_layers >= 50
    vnni = replace(HostInfo.unknown(), isa=("avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"))
    slower = {"ratios": {"compiled": {"ratio": 1.4, "ci_low": 1.35, "ci_high": 1.45}}}
    (text,) = slower_than_source(slower, load_target("cpu-avx"), vnni, compiled)
    assert f"all {int8_layers} conv/matmul layers run int8" in text and "lepton run --variant fp32" in text
    assert "--max-accuracy-drop" not in text


@needs_ocr
def test_full_int8_softmax_output_is_read_as_probabilities_not_logits(calib_lines, tmp_path, run_cli):
    """On tpu the Softmax's output is int8 too: its rows sum to 1 only within rounding, and reading them as logits
    (a softmax over [1, 0] is 0.73) warned "confidence collapsed: 1.00 -> 0.73" for a model whose held-out top
    probability matches the source's to 0.01."""
    import json

    from test_device_artifacts import _open

    args = ("--calib", calib_lines, "--input-shape", SHAPE, "-o", tmp_path, "--no-bench")
    result = run_cli("compile", OCR_CLS, "-t", "tpu", *args)
    assert result.code == 0, result.stderr[-2000:]
    assert "confidence collapsed" not in result.stderr
    bundle = tmp_path / f"{OCR_CLS.stem}.tpu.lepton"
    (output,) = json.loads((bundle / "report.json").read_text())["accuracy"]["outputs"]
    source_top, compiled_top = output["detail"]["top_probability"]
    assert abs(source_top - compiled_top) < 1.0
    lines, _ = direction_lines(128, 7, "eval")
    session = ort.InferenceSession(_open(bundle).models["model.onnx"], providers=["CPUExecutionProvider"])
    compiled = np.concatenate(
        [session.run(None, {session.get_inputs()[0].name: x[None].transpose(0, 2, 3, 1)})[0] for x in lines]
    )
    reference = ort.InferenceSession(str(OCR_CLS), providers=["CPUExecutionProvider"]).run(None, {"x": lines})[0]
    assert abs(compiled.max(axis=1).mean() - reference.max(axis=1).mean()) < 0.01
