"""Grid inputs (passes/_quantize/input_grid.py) on PP-OCRv4 det and its rendered pages.

The pages are 8-bit renderings normalised per channel; the first Conv then reads them as integer levels quantized at
scale 1, which int8 holds exactly where a calibrated scale rounds every pixel.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import needs_ocr
from det_int8 import fused_det_and_pages
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.input_grid import grid_inputs, level_overrides

from lepton_cli.model.sessions import make_session
from lepton_cli.samples.sample_set import load_samples

pytestmark = needs_ocr


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    fused, calib_path, held = fused_det_and_pages(tmp_path_factory)
    return fused, calib_path, held


def _run(model: onnx.ModelProto, feeds: list[dict], outputs: list[str] | None = None) -> list[np.ndarray]:
    session = make_session(model)
    return [session.run(outputs, feed)[0] for feed in feeds]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def test_the_stem_reads_integer_levels_and_the_float_map_is_unchanged(det):
    fused, calib_path, held = det
    calib = [{"x": page[None]} for page in np.load(calib_path)["x"]]
    rewritten, found = grid_inputs(fused, calib)
    assert [g.input for g in found] == ["x"]
    assert [n.op_type for n in rewritten.graph.node[:3]] == ["Pad", "Mul", "Add"]
    for got, want in zip(_run(rewritten, held), _run(fused, held)):
        np.testing.assert_allclose(got, want, atol=2e-4)
    levels = _run(_with_output(rewritten, found[0].levels), held[:1], [found[0].levels])[0]
    inside = levels[:, :, 1:-1, 1:-1]  # the Pad's ring is (0 - o) / a - 128: not a pixel
    assert np.abs(inside - np.round(inside)).max() < 1e-3
    assert -128 <= inside.min() and inside.max() <= 127


def test_inputs_off_the_grid_are_left_alone(det):
    fused, calib_path, _ = det
    rng = np.random.default_rng(0)
    pages = np.load(calib_path)["x"]
    noisy = [{"x": (page + rng.uniform(-0.004, 0.004, page.shape)).astype(np.float32)[None]} for page in pages]
    rewritten, found = grid_inputs(fused, noisy)
    assert found == [] and rewritten is fused


def test_int8_on_the_grid_leaves_the_stem_only_its_weight_rounding(det, tmp_path):
    """Conv-only uint8/int8 per-channel QDQ, minmax ranges, with and without the grid: on held-out pages the stem's
    int8 output is nearer its float output, since what is left is weight rounding, not the input's."""
    fused, calib_path, held = det
    calib_feeds = [{"x": page[None]} for page in np.load(calib_path)["x"]]
    stem = next(n for n in fused.graph.node if n.op_type == "Conv" and n.input[0] == "x").output[0]
    reference = np.concatenate(_run(_with_output(fused, stem), held, [stem]))
    errors = {}
    for label, (model, found) in {"plain": (fused, []), "grid": grid_inputs(fused, calib_feeds)}.items():
        overrides = {"TensorQuantOverrides": level_overrides(found, "u8")} if found else {}
        scheme = schemes.Int8Scheme(per_channel=True, op_types=("Conv",), extra=overrides)
        samples = load_samples(calib_path, model)
        ranges = calibrate(model, samples, CalibrationSettings(method="minmax", chunk=6, max_samples=6), None, ["Conv"])
        work = tmp_path / label
        work.mkdir()
        exclude = [n for g in found for n in g.nodes]
        int8 = schemes.quantize_int8(model, schemes.save_ranges(ranges, work / "r.json"), "minmax", scheme, exclude, work)
        if found:  # the levels' Q/DQ at scale 1, zero point 128
            q = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == found[0].levels)
            inits = {i.name: onnx.numpy_helper.to_array(i) for i in int8.graph.initializer}
            assert float(inits[q.input[1]]) == 1.0 and int(inits[q.input[2]]) == 128
        stem_int8 = np.concatenate(_run(_with_output(int8, stem), held, [stem]))
        errors[label] = float(np.abs(stem_int8 - reference).mean())
    assert errors["grid"] < 0.5 * errors["plain"], errors
