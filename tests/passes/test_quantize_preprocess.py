"""--calib FOLDER --preprocess: image folders as calibration data, validated up front (exit 2)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import onnx
import pytest
from conftest import DIGITS
from PIL import Image

from lepton_cli.errors import BadInputError
from lepton_cli.samples.preprocess import load_image_folder


def _write_digits(folder, count=24):
    images = np.load(DIGITS / "calib.npz")["image"][:count, 0]  # [N, 8, 8] in [0, 1]
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")
    return images


def test_folder_feeds_match_the_npz_preprocessing(tmp_path):
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    images = _write_digits(tmp_path / "imgs")
    samples = load_image_folder(tmp_path / "imgs", model, "size=8x8,scale=1/255")
    assert len(samples) == 24 and samples.shapes() == {"image": [1, 1, 8, 8]}
    feed = samples.feed(3)["image"]
    assert feed.shape == (1, 1, 8, 8) and feed.dtype == np.float32
    np.testing.assert_allclose(feed[0, 0], images[3], atol=1 / 255)
    kept, held = samples.split(0.25)
    assert len(kept) + len(held) == 24 and len(held) == 6


@pytest.mark.parametrize(
    "spec, message",
    [
        ("size=8x8,std=0:1", "std has 2 values"),
        ("size=9x9", "expects"),
        ("colour=red", "cannot read"),
        ("layout=NCWH", "layout"),
        ("size=8x8,scale=1/0", "scale='1/0' is not a number"),  # was ZeroDivisionError, exit 1
        ("size=0x0", "size='0x0'"),
    ],
)
def test_bad_settings_exit_2(tmp_path, spec, message):
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    _write_digits(tmp_path / "imgs", 2)
    with pytest.raises(BadInputError, match=message):
        load_image_folder(tmp_path / "imgs", model, spec)


def test_empty_folder_and_unreadable_image_exit_2(tmp_path):
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="holds no images"):
        load_image_folder(tmp_path / "empty", model, None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="cannot be read"):
        load_image_folder(tmp_path / "bad", model, None)


def test_a_decompression_bomb_among_real_images_exits_2(run_cli, tmp_path):
    """A PNG whose header claims 20000x20000: Pillow refuses it from the header (exit 1 before, its own error)."""
    _write_digits(tmp_path / "imgs", 12)
    png = bytearray((tmp_path / "imgs" / "000.png").read_bytes())
    png[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width and height, then its CRC
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (tmp_path / "imgs" / "999.png").write_bytes(bytes(png))
    args = ["--calib", tmp_path / "imgs", "--preprocess", "size=8x8,scale=1/255", "-o", tmp_path / "out"]
    res = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", "cpu-avx", *args)
    assert res.code == 2 and "999.png: Image size (400000000 pixels) exceeds limit" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_of_blank_images_is_refused(run_cli, tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(6):  # a scanner's empty pages: one grey level everywhere
        Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(tmp_path / "imgs" / f"{i}.png")
    args = ["--calib", tmp_path / "imgs", "--preprocess", "scale=1/255", "-o", tmp_path / "out"]
    res = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", "cpu-avx", *args)
    assert res.code == 2 and "every input holds one value in every sample" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_compile_with_an_image_folder(run_cli, tmp_path):
    _write_digits(tmp_path / "imgs", 40)
    res = run_cli(
        "compile",
        DIGITS / "digits_cnn.onnx",
        "--target",
        "cpu-avx",
        "--calib",
        tmp_path / "imgs",
        "--preprocess",
        "scale=1/255",
        "--eval",
        DIGITS / "eval.npz",
        "--max-accuracy-drop",
        "1",
        "-o",
        tmp_path / "out",
        "--json",
    )
    assert res.code == 0, res.stderr
    import json

    doc = json.loads(res.stdout)
    assert doc["accuracy"]["drop_pct"] <= 1.0
