"""A log-spectrogram front end stays out of int8 (quantize heads.py): Microsoft's DNSMOS speech-quality model
(the ``speechmos`` wheel's sig_bak_ovr.onnx) frames raw 16 kHz audio with two Convs (the STFT's real and imaginary
parts), takes magnitudes and a floor, then a Log, and scores three MOS values with a CNN. On one 8-bit grid its
power spectrum loses every bin under 1/255 of the loudest, and int8 read the MOS off by up to 2.4 (SNR 4 dB)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from audio_speech import HELD_OUT_SENTENCES, espeak_available, speech
from conftest import OCR_DIR
from lepton_cli.passes._quantize.heads import find_heads
from wheel_models import DNSMOS, wheel_member

WINDOW = 144160  # DNSMOS scores 9.01 s at 16 kHz


@pytest.fixture(scope="module")
def dnsmos() -> onnx.ModelProto:
    return onnx.load(wheel_member(*DNSMOS))


def test_the_log_spectrogram_front_end_is_found(dnsmos):
    heads = [h for h in find_heads(dnsmos, []) if h.front_end]
    assert len(heads) == 1, heads
    nodes = set(heads[0].nodes)
    framing = {n.name for n in dnsmos.graph.node if n.op_type == "Conv" and n.name.startswith("stft")}
    log = next(n.name for n in dnsmos.graph.node if n.op_type == "Log")
    assert framing == {"stft-real", "stft-imag"} and framing | {log} <= nodes
    # the CNN that scores the spectrogram is not part of it: it stays int8
    assert not any(
        n.op_type in ("Conv", "MatMul") and n.name in nodes for n in dnsmos.graph.node if n.name not in framing
    )
    assert "front end from the graph input" in heads[0].why


@pytest.mark.skipif(OCR_DIR is None, reason="rapidocr-onnxruntime (PP-OCRv4 models) not installed")
def test_a_network_without_a_log_has_no_front_end():
    det = onnx.load(OCR_DIR / "ch_PP-OCRv4_det_infer.onnx")
    assert not [h for h in find_heads(det, []) if h.front_end]


def _windows(sentences: list[str] | None, count: int) -> np.ndarray:
    audio = speech(sentences) if sentences else speech()
    hop = max(1, (len(audio) - WINDOW) // max(1, count - 1))
    return np.stack([audio[k * hop : k * hop + WINDOW] for k in range(count)])


@pytest.mark.slow
def test_dnsmos_compiles_int8_on_speech(dnsmos, tmp_path, run_cli):
    """Spoken sentences (espeak-ng), calibration and held-out sentences disjoint: every weight layer after the front end
    int8, nothing else kept float, and the MOS values within a tenth of the source's."""
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to score")
    model = tmp_path / "sig_bak_ovr.onnx"
    onnx.save(dnsmos, model)
    np.savez(tmp_path / "calib.npz", input_1=_windows(None, 8))
    np.savez(tmp_path / "eval.npz", input_1=_windows(HELD_OUT_SENTENCES, 8))
    result = run_cli(
        "compile", model, "--target", "cpu-avx", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
        "--no-bench", "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    report = json.loads(next((tmp_path / "out").glob("*.lepton/report.json")).read_text())
    quantize = next(p for p in report["pipeline"] if p.get("name") == "quantize")["summary"]
    assert quantize["heads"][0]["precision"] == "float" and not quantize["float_kept"]
    assert quantize["int8_weights"] >= 10  # the scoring CNN's 7 convs and 3 dense layers
    agreement = report["accuracy"]["agreement"]
    assert agreement["snr_db"] > 30 and agreement["max_abs"] < 0.15, agreement
