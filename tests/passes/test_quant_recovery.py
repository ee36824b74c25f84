"""Accuracy-recovery steps of the quantize pass (lepton_cli/quant/recovery.py and its modules), on real models.

digits (examples/digits: a trained CNN, its own calibration and held-out images) for the fast
invariants; PP-OCRv4 rec (rendered text lines) for the slow ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS, OCR_REC, REPO, needs_ocr
from lepton_cli.passes._quantize import adaround, bias_correction, equalization, layer_stats, schemes
from lepton_cli.passes._quantize.recovery import RecoverySettings, recover
from lepton_cli.passes._quantize.weight_layers import load, to_rows, weight_grid, weight_layers
from onnx import numpy_helper

from lepton_cli.errors import BadInputError
from lepton_cli.model.sessions import make_session
from lepton_cli.pipeline.params import from_table

PER_CHANNEL = schemes.Int8Scheme(per_channel=True)
POW2 = schemes.Int8Scheme(activation_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model = schemes.preprocess(onnx.load(DIGITS / "digits_cnn.onnx"), tmp_path_factory.mktemp("pre"))
    name = model.graph.input[0].name
    calib = np.load(DIGITS / "calib.npz")["image"]
    held = np.load(DIGITS / "eval.npz")["image"]
    return model, [{name: calib[i : i + 1]} for i in range(64)], [{name: held[i : i + 1]} for i in range(128)]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    session = make_session(model)
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def test_patches_reproduce_each_layers_output(digits):
    """im2col columns times the weight rows plus the bias is what ONNX Runtime computes for the layer."""
    model, calib, _ = digits
    for layer in weight_layers(model):
        probe = _copy(model)
        probe.graph.output.extend(
            [
                onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                for t in (layer.node.input[0], layer.node.output[0])
            ]
        )
        x, y = make_session(probe).run([layer.node.input[0], layer.node.output[0]], calib[0])
        weight = load(model, layer.weight)
        cols = layer_stats.patches(layer, x, weight.shape)[0]
        got = to_rows(layer, weight).astype(np.float64) @ cols + load(model, layer.bias)[:, None]
        want = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 0, 2).reshape(y.shape[1], -1) if y.ndim == 4 else y.T
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_equalisation_keeps_the_float_outputs_and_evens_the_ranges(digits):
    model, calib, _ = digits
    pairs = equalization.find_pairs(model)
    assert equalization.describe(pairs) == ["conv1 -> Relu -> conv2"]
    equalised = _copy(model)
    assert equalization.equalize(equalised) == ["conv2"]
    np.testing.assert_allclose(_outputs(equalised, calib[:16]), _outputs(model, calib[:16]), rtol=1e-4, atol=1e-4)
    pair = pairs[0]

    def spread(m: onnx.ModelProto) -> float:  # how unequal conv1's output-channel ranges are
        ranges = np.abs(load(m, pair.first.weight)).reshape(len(load(m, pair.first.weight)), -1).max(axis=1)
        return float(ranges.max() / ranges.min())

    r1 = np.abs(load(equalised, pair.first.weight)).reshape(-1, 9).max(axis=1)
    r2 = np.abs(load(equalised, pair.second.weight)).transpose(1, 0, 2, 3).reshape(len(r1), -1).max(axis=1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)  # each channel's range is the same on both sides
    assert spread(equalised) < spread(model)


def test_bias_correction_lowers_the_mean_output_error_on_held_out_data(digits):
    model, calib, held = digits
    layers = weight_layers(model)
    fitted = layer_stats.collect(model, calib, layers)
    unseen = layer_stats.collect(model, held, layers)
    corrected = _copy(model)
    for layer in weight_layers(corrected):
        rows = to_rows(layer, load(model, layer.weight)).astype(np.float64)
        grid = weight_grid(rows, POW2)
        before = bias_correction.output_shift(rows, grid.quantize(rows), unseen[layer.name])
        assert bias_correction.correct(corrected, layer, rows, grid, fitted[layer.name]) is not None
        # Held-out mean error after correction: the quantized layer's shift minus what the bias now subtracts.
        after = before - (load(model, layer.bias) - load(corrected, layer.bias))
        assert np.abs(after).mean() < 0.5 * np.abs(before).mean(), layer.name


def test_adaround_reconstructs_each_layer_no_worse_than_rounding_to_nearest(digits):
    model, calib, held = digits
    layers = weight_layers(model)
    fitted = layer_stats.collect(model, calib, layers)
    unseen = layer_stats.collect(model, held, layers)
    for layer in layers:
        rows = to_rows(layer, load(model, layer.weight)).astype(np.float64)
        grid = weight_grid(rows, PER_CHANNEL)
        nearest, chosen = (
            grid.quantize(rows),
            adaround.optimise_rounding(rows, grid, fitted[layer.name], adaround.AdaRoundSettings(iterations=150)),
        )
        on_calib = [adaround.reconstruction_error(rows, w, fitted[layer.name]) for w in (nearest, chosen)]
        assert np.all(on_calib[1] <= on_calib[0] + 1e-12), layer.name  # per output channel, by construction
        assert on_calib[1].sum() < 0.95 * on_calib[0].sum(), layer.name
        on_held = [adaround.reconstruction_error(rows, w, unseen[layer.name]).sum() for w in (nearest, chosen)]
        assert on_held[1] < on_held[0], layer.name  # the gain is not fitted to the calibration images
        steps = np.round(chosen / grid.scale[:, None]) - np.floor(rows / grid.scale[:, None])
        assert set(np.unique(steps)) <= {0.0, 1.0}  # only the rounding direction changed


@pytest.mark.parametrize("scheme", [PER_CHANNEL, POW2], ids=["per-channel", "power-of-two"])
def test_onnx_runtime_stores_the_chosen_rounding(digits, tmp_path, scheme):
    """The adjusted float weights sit on ORT's grid: its quantizer keeps them exactly."""
    model, calib, _ = digits
    recovered = recover(model, calib, scheme, RecoverySettings(adaround=True, bias_correction=True, samples=32))
    assert recovered.summary["adaround_layers"] == 4 and recovered.summary["bias_corrected_layers"] == 4
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

    from lepton_cli.samples.sample_set import load_samples

    ranges = calibrate(recovered.quantize_source, load_samples(DIGITS / "calib.npz", model), CalibrationSettings())
    path = schemes.save_ranges(ranges, tmp_path / "ranges.json")
    quantized = schemes.quantize_int8(recovered.quantize_source, path, "minmax", scheme, [], tmp_path)
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    for layer in weight_layers(recovered.quantize_source):
        weight_input = next(n for n in quantized.graph.node if n.name == layer.name).input[1]
        dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == weight_input)
        scale = inits[dq.input[1]].astype(np.float64)
        stored = inits[dq.input[0]].astype(np.float64) * (
            scale.reshape(-1, *[1] * (inits[dq.input[0]].ndim - 1)) if scale.ndim else scale
        )
        np.testing.assert_allclose(stored, load(recovered.quantize_source, layer.weight), rtol=1e-6, atol=1e-9)


def test_smoothquant_inserts_a_float_scale_where_nothing_absorbs_it(digits):
    """digits' fc layers read a ReLU, no LayerNorm: folding finds no producer, inserting a Mul on the layer's input
    keeps the float outputs and is left float (its per-channel constants)."""
    model, calib, _ = digits
    folded = recover(model, calib[:16], PER_CHANNEL, RecoverySettings(smoothquant_alpha=0.8, samples=16))
    assert folded.summary["smoothquant_layers"] == 0 and not folded.float_nodes
    settings = RecoverySettings(smoothquant_alpha=0.8, smoothquant_insert=True, samples=16)
    inserted = recover(model, calib[:16], PER_CHANNEL, settings)
    fc = [layer.name for layer in weight_layers(model) if layer.kind != "conv"]
    assert fc and inserted.summary["smoothquant_inserted"] == len(fc)
    assert inserted.float_nodes == [f"{name}_smooth" for name in fc]
    assert {n.name for n in inserted.reference.graph.node if n.op_type == "Mul"} >= set(inserted.float_nodes)
    np.testing.assert_allclose(_outputs(inserted.reference, calib[:16]), _outputs(model, calib[:16]), atol=1e-4)
    for layer in weight_layers(model):  # the fc weights carry the scale, the convs are untouched
        same = np.allclose(load(inserted.reference, layer.weight), load(model, layer.weight))
        assert same == (layer.kind == "conv"), layer.name


def test_recovery_parameters_are_checked_when_the_target_loads():
    from lepton_cli.pipeline.registry import get_pass

    QuantizeParams = get_pass("quantize").params_cls  # noqa: N806
    params = from_table(
        QuantizeParams,
        {"equalize": True, "bias_correction": True, "adaround": True, "adaround_seconds": 30},
        "passes[quantize]",
    )
    assert params.adaround and params.adaround_seconds == 30.0
    with pytest.raises(BadInputError, match="adaround_seconds"):
        from_table(QuantizeParams, {"adaround_seconds": 0}, "passes[quantize]")
    with pytest.raises(BadInputError, match="unknown key"):
        from_table(QuantizeParams, {"adaroundd": True}, "passes[quantize]")


def test_report_says_what_each_recovery_step_gained(run_cli, tmp_path):
    """The report scores the chosen method's fully quantized model with the steps added one at a time: its first
    row is what the same target without the steps scores, its last the search's own trial, and the Markdown report
    shows the table."""
    import json

    def quantize_summary(target: str | Path, out: Path) -> tuple[dict, Path]:
        args = ("--calib", DIGITS / "calib.npz", "-o", out, "--no-bench")
        res = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", target, *args)
        assert res.code == 0, res.stderr
        bundle = next(out.glob("*.lepton"))
        report = json.loads((bundle / "report.json").read_text())
        return next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"], bundle

    def fully_quantized(summary: dict, method: str, ops: list[str]) -> dict:
        return next(
            t for t in summary["tried"] if t["method"] == method and t["float_kept"] == 0 and t["op_types"] == ops
        )

    target = tmp_path / "recovery.toml"
    target.write_text(
        'extends = "cpu-avx"\nname = "cpu-avx-recovery"\ndescription = "recovery steps"\n'
        "[pass_params.quantize]\nequalize = true\nbias_correction = true\n"
    )
    summary, bundle = quantize_summary(target, tmp_path / "steps")
    gains = summary["recovery"]["gains"]
    rows = gains["rows"]
    assert [r["steps"] for r in rows] == [[], ["equalize"], ["equalize", "bias_correction"]]
    plain, _ = quantize_summary("cpu-avx", tmp_path / "plain")
    without = fully_quantized(plain, gains["method"], gains["op_types"])
    assert rows[0]["drop_pct"] == pytest.approx(without["drop_pct"], abs=1e-3)
    assert rows[0]["snr_db"] == pytest.approx(without["agreement"]["snr_db"], abs=0.01)
    searched = fully_quantized(summary, gains["method"], gains["op_types"])
    assert rows[-1]["snr_db"] == pytest.approx(searched["agreement"]["snr_db"], abs=0.01)
    assert len({r["snr_db"] for r in rows}) == 3  # each step changed the int8 model
    markdown = (bundle / "report.md").read_text()
    assert "### Quantization recovery" in markdown and "| equalize + bias_correction | 4 layers |" in markdown


@needs_ocr
@pytest.mark.slow
def test_recovery_on_pp_ocrv4_rec(tmp_path):
    """Equalisation is exact on the real recogniser; rounding and bias correction lower its output error."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset as textset

    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes

    model, _ = upgrade_opset(onnx.load(OCR_REC), 13, 21)
    model = schemes.preprocess(bind_input_shapes(model, {"x": [1, 3, 48, 160]}), tmp_path)
    calib = [{"x": x[None]} for x in textset.make_set(16, 1, "calib", width=160)[0]]
    held = [{"x": x[None]} for x in textset.make_set(8, 3, "eval", width=160)[0]]
    recovered = recover(
        model,
        calib,
        POW2,
        RecoverySettings(equalize=True, adaround=True, bias_correction=True, adaround_iterations=100, samples=16),
    )
    assert recovered.summary["equalized_pairs"] >= 3
    np.testing.assert_allclose(_outputs(recovered.reference, held), _outputs(model, held), atol=1e-4)
    assert recovered.summary["adaround_error_ratio_median"] < 0.95


@needs_ocr
@pytest.mark.slow
def test_smoothquant_on_pp_ocrv4_rec_is_exact_and_flattens_the_gemm_inputs(tmp_path):
    """The SVTR neck's LayerNorm -> Gemm inputs: 1/s folds into gamma and beta, outputs unchanged, channel ranges flatter."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset as textset

    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes

    model, _ = upgrade_opset(onnx.load(OCR_REC), 13, 21)
    model = schemes.preprocess(bind_input_shapes(model, {"x": [1, 3, 48, 160]}), tmp_path)
    calib = [{"x": x[None]} for x in textset.make_set(8, 1, "calib", width=160)[0]]
    held = [{"x": x[None]} for x in textset.make_set(6, 3, "eval", width=160)[0]]
    recovered = recover(model, calib, PER_CHANNEL, RecoverySettings(smoothquant_alpha=0.5, samples=8))
    assert recovered.summary["smoothquant_layers"] == 4  # the four Gemms that read a LayerNorm
    np.testing.assert_allclose(_outputs(recovered.reference, held), _outputs(model, held), atol=1e-4)
    gemms = [layer for layer in weight_layers(model) if layer.kind != "conv"]
    before = layer_stats.collect(model, held, gemms, max_positions=1)
    after = layer_stats.collect(recovered.reference, held, weight_layers(recovered.reference), max_positions=1)
    flatter = [
        name
        for name, stats in before.items()
        if after[name].absmax.max() / np.median(after[name].absmax) < stats.absmax.max() / np.median(stats.absmax)
    ]
    assert len(flatter) >= 4


@needs_ocr
@pytest.mark.slow
def test_heads_found_in_pp_ocrv4_rec_and_kept_out_of_int8(tmp_path):
    """The recogniser's decoding Softmax is found without a scope; quantize leaves it (and its output) float."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset as textset
    from lepton_cli.passes._quantize.heads import find_heads

    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes

    model, _ = upgrade_opset(onnx.load(OCR_REC), 13, 21)
    model = schemes.preprocess(bind_input_shapes(model, {"x": [1, 3, 48, 160]}), tmp_path)
    calib = [{"x": x[None]} for x in textset.make_set(4, 1, "calib", width=160)[0]]
    heads = find_heads(model, calib)
    assert len(heads) == 1 and "Softmax" in heads[0].why
    softmax = heads[0].nodes[-1]
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in calib]))
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

    from lepton_cli.samples.sample_set import load_samples

    path = schemes.save_ranges(
        calibrate(model, load_samples(tmp_path / "calib.npz", model), CalibrationSettings()), tmp_path / "ranges.json"
    )
    quantized = schemes.quantize_int8(model, path, "minmax", PER_CHANNEL, heads[0].nodes, tmp_path)
    producer = {o: n for n in quantized.graph.node for o in n.output}
    assert producer[quantized.graph.output[0].name].name in heads[0].nodes  # float from the Softmax on
    head_outputs = {o for n in quantized.graph.node if n.name in heads[0].nodes for o in n.output}
    assert softmax in {n.name for n in quantized.graph.node}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in head_outputs for n in quantized.graph.node)


DDDDOCR_DET = Path(
    os.environ.get("LEPTON_DDDDOCR_DET", Path.home() / ".cache" / "lepton-test" / "ddddocr" / "common_det.onnx")
)


@pytest.mark.slow
@pytest.mark.skipif(
    not DDDDOCR_DET.exists(),
    reason="pip download --no-deps ddddocr, unzip ddddocr/common_det.onnx to "
    "~/.cache/lepton-test/ddddocr/ (or set LEPTON_DDDDOCR_DET)",
)
def test_detector_head_concat_of_boxes_and_scores_is_found():
    """ddddocr's YOLOX-style head concatenates box offsets with sigmoid scores per scale, then the scales."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_quant_recovery import captchas
    from lepton_cli.passes._quantize.heads import find_heads

    model = onnx.load(DDDDOCR_DET)
    heads = find_heads(model, [{"images": x[None]} for x in captchas(2, 1)])
    assert len(heads) == 1 and heads[0].why.startswith("Concat")
    assert sum(n.startswith("Concat") for n in heads[0].nodes) == 4  # the three per-scale Concats and the final one
    assert len(heads[0].ranges) == 9  # boxes, objectness and class of each scale, each with its own range


def test_power_of_two_weight_scales_take_the_finer_grid_where_clipping_costs_less(digits, tmp_path):
    """fpga (per-tensor power-of-two weights): a weight's scale is the power of two with the least int8 error, not
    always the smallest that clips nothing; the DQ scales ORT stores are the ones ``weight_grid`` simulates."""
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

    from lepton_cli.samples.sample_set import load_samples

    model, _, _ = digits
    data = calibrate(model, load_samples(DIGITS / "calib.npz", model), CalibrationSettings(), None, None)
    quantized = schemes.quantize_int8(
        model, schemes.save_ranges(data, tmp_path / "r.json"), "minmax", POW2, [], tmp_path
    )
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    dqs = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    stored = {n.input[0]: float(inits[n.input[1]].ravel()[0]) for n in dqs if inits[n.input[1]].size == 1}
    finer = 0
    for layer in weight_layers(model):
        rows = to_rows(layer, load(model, layer.weight)).astype(np.float64)
        scale = float(weight_grid(rows, POW2).scale[0])
        assert np.log2(scale) == round(np.log2(scale))
        int8_weight = next(name for name in stored if name.startswith(layer.weight))
        assert stored[int8_weight] == scale, layer.name
        clip_free = 2.0 ** np.ceil(np.log2(np.abs(rows).max() / 127))

        def error(s: float) -> float:
            return float(np.square(np.clip(np.round(rows / s), -127, 127) * s - rows).sum())

        assert error(scale) <= error(clip_free)
        finer += scale < clip_free
    assert finer >= 1  # digits' fc1: a coarser grid for its few largest weights would cost every other weight


def test_mse_calibration_for_a_power_of_two_target_returns_fix_point_ranges(digits):
    """fpga with ``mse``: each activation range is ±127·2^k, the power of two with the least expected error on the
    tensor's histogram, at most the clip-free one; some digits tensors take a finer one (a long thin tail)."""
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

    from lepton_cli.samples.sample_set import load_samples

    model, _, _ = digits
    samples = load_samples(DIGITS / "calib.npz", model)
    settings = CalibrationSettings(method="mse", power_of_two=True, max_samples=64)
    ranges = calibrate(model, samples, settings, None, None)
    plain = calibrate(model, samples, CalibrationSettings(method="minmax", max_samples=64), None, None)
    finer = 0
    for name, data in ranges.items():
        low, high = (float(np.asarray(v).ravel()[0]) for v in data.range_value)
        step = high / 127
        assert low == -high and step > 0 and np.log2(step) == round(np.log2(step)), name
        observed = max(abs(float(np.asarray(v).ravel()[0])) for v in plain[name].range_value)
        clip_free = 2.0 ** np.ceil(np.log2(observed / 127))
        assert step <= clip_free * (1 + 1e-6), name
        finer += step < clip_free * (1 - 1e-6)
    assert finer >= 1
