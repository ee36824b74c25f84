"""The source's own input-noise floor: which inputs lie on an 8-bit grid, the dither that keeps them on it, and how
far PP-OCRv4 det's map moves under it on rendered pages."""

from __future__ import annotations

import sys

import numpy as np
import onnx
from conftest import DIGITS, OCR_DET, REPO, needs_ocr

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.evaluate.input_floor import DITHER_FRACTION, dithered, value_grids
from lepton_cli.model.shapes import bind_input_shapes
from lepton_cli.samples.sample_set import load_samples

MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _pages(count: int, seed: int, size: int = 160, capture: bool = False) -> np.ndarray:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    return ocr_textset.make_pages(count, seed, "eval", size=size, capture=capture)


def test_rendered_pages_lie_on_one_pixel_level_per_channel_and_the_dither_rounds_back_to_them():
    pages = _pages(2, 3)
    (grid,) = value_grids([{"x": page[None]} for page in pages])
    assert grid.name == "x" and grid.axis == 1
    np.testing.assert_allclose(grid.steps, 1 / (255 * STD.ravel()), rtol=1e-3)  # one 8-bit level, normalised
    feed = {"x": pages[:1]}
    noisy = dithered(feed, [grid], 0)["x"]
    assert np.abs(noisy - pages[:1]).max() > 0.4 * grid.steps.min()  # the noise is there ...
    pixels = lambda x: np.round((x * STD + MEAN) * 255)  # noqa: E731
    np.testing.assert_array_equal(pixels(noisy[0]), pixels(pages[0]))  # ... and rounds back to the same page
    np.testing.assert_array_equal(noisy, dithered(feed, [grid], 0)["x"])  # seeded by the sample index
    assert not np.array_equal(noisy, dithered(feed, [grid], 1)["x"])
    nhwc = value_grids([{"x": page.transpose(1, 2, 0)[None]} for page in pages])
    assert [g.axis for g in nhwc] == [3]
    assert DITHER_FRACTION < 0.5


def test_inputs_off_any_grid_have_no_floor_and_coarser_grids_are_found():
    rng = np.random.default_rng(0)
    features = {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}  # continuous values: no 8-bit grid
    tokens = {"ids": rng.integers(0, 30000, (1, 1, 8, 8))}  # integers are never dithered
    assert value_grids([features]) == [] and value_grids([tokens]) == []
    assert value_grids([{"x": features["x"][0, 0]}]) == []  # rank 2: not an image batch
    digits = np.load(DIGITS / "calib.npz")["image"][:16]  # sklearn's 8x8 digits: 17 grey levels, 1/16 apart
    (grid,) = value_grids([{"image": digits}])
    np.testing.assert_allclose(grid.steps, [1 / 16])


def _det_evaluator(folder, capture: bool = False) -> tuple[onnx.ModelProto, Evaluator]:
    """PP-OCRv4 det at 160x160 scored on 4 rendered pages (``capture``: as camera frames)."""
    model = bind_input_shapes(onnx.load(OCR_DET), {"x": [1, 3, 160, 160]})
    np.savez(folder / "pages.npz", x=_pages(4, 9, capture=capture))
    return model, Evaluator(model, load_samples(folder / "pages.npz", model))


@needs_ocr
def test_pp_ocrv4_det_map_moves_under_input_noise_below_one_pixel_level(tmp_path):
    model, evaluator = _det_evaluator(tmp_path)
    floor = evaluator.input_floor()
    assert floor is not None and floor.inputs == ["x"]
    assert floor.drop_pct > 0.5  # the worst page's map F1 moves although every page rounds to the same pixels
    assert evaluator.input_floor() is floor  # measured once
    again = _det_evaluator(tmp_path)[1].input_floor()
    assert again is not None and again.drop_pct == floor.drop_pct  # deterministic
    assert evaluator.score(model).drop_pct == 0.0  # undithered, the source agrees with itself


@needs_ocr
def test_the_same_pages_as_camera_frames_leave_a_floor_under_the_budget(tmp_path):
    """A rendered page is flat to the last grey level; with a camera's light falloff, blur and sensor noise the
    detector no longer flips under half a grey level of noise (benchmarks/results/camera_pages.md)."""
    flat = _det_evaluator(tmp_path)[1].input_floor()
    camera_dir = tmp_path / "camera"
    camera_dir.mkdir()
    camera = _det_evaluator(camera_dir, capture=True)[1].input_floor()
    assert flat is not None and camera is not None  # camera frames are still 8-bit images
    assert camera.drop_pct < 1.0 < flat.drop_pct
    frames, pages = _pages(2, 9, capture=True), _pages(2, 9)
    for frame, page in zip(frames, pages):  # the same text, not another page
        assert np.corrcoef(frame.ravel(), page.ravel())[0, 1] > 0.9
    assert np.corrcoef(frames[0].ravel(), pages[1].ravel())[0, 1] < 0.5
    corner = (slice(None), slice(-8, None), slice(-8, None))  # bottom right: no text there on this page
    assert (np.ptp(pages[0][corner], axis=(1, 2)) == 0).all() and (np.ptp(frames[0][corner], axis=(1, 2)) > 0).all()


@needs_ocr
def test_an_exit_3_under_the_floor_says_so_and_names_the_budget_that_accepts_noise(tmp_path):
    from lepton_cli.passes._quantize.tuning import Trial, _no_candidate

    _, evaluator = _det_evaluator(tmp_path)
    floor = evaluator.input_floor()
    assert floor is not None
    tried = [Trial("minmax", [], floor.drop_pct + 2, 0.0, False)]
    under = _no_candidate(tried, floor.drop_pct / 2, "held-out 4 of --calib", evaluator, 48)
    assert f"reads a drop of {floor.drop_pct:.2f} when x moves by under half a step" in under.message
    assert under.fix.startswith(f"raise --max-accuracy-drop to {int(np.ceil(floor.drop_pct))} or more")
    over = _no_candidate(tried, floor.drop_pct + 1, "held-out 4 of --calib", evaluator, 48)
    assert "half a step" not in over.message and "max_float_layers" in over.fix
