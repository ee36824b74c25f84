"""Real speech for audio models: sentences spoken by espeak-ng (a Debian package), resampled to 16 kHz.

Silero VAD (the ``silero-vad`` wheel's ``silero_vad.onnx``) is stateful: each call takes a 512-sample
window at 16 kHz with the previous 64 samples in front (576), the LSTM state ``[2, 1, 128]`` from the
call before, and the sample rate ``sr`` as an int64 scalar. ``vad_samples`` runs the model over the
speech (and the silence between sentences) to record the state each window really sees.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

SENTENCES = [
    "The invoice was paid on the third of March.",
    "Please keep the receipt until the order arrives.",
    "Platform seven, the train to the north is late.",
    "Her phone number ends with four four two.",
    "Turn left at the river and walk past the garden.",
    "The meeting moved to room twelve after lunch.",
]
HELD_OUT_SENTENCES = [  # other words and voices' order for held-out speech
    "The library closes early on the first Friday of the month.",
    "Bring two copies of the form and a pen that works.",
    "A storm is expected over the coast later tonight.",
    "The printer on the second floor is out of paper again.",
    "We will need a larger room for the workshop next week.",
    "His flight landed forty minutes ahead of schedule.",
]
RATE, WINDOW, CONTEXT = 16000, 512, 64


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speech(sentences: list[str] = SENTENCES, gap_s: float = 0.4) -> np.ndarray:
    """float32 mono at 16 kHz: each sentence spoken (voices varied), with silence between them."""
    from scipy.signal import resample_poly

    pieces = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, text in enumerate(sentences):
            path = Path(tmp) / f"s{index}.wav"
            voice = ("en", "en-us", "en+f3", "en-gb")[index % 4]
            subprocess.run(
                ["espeak-ng", "-v", voice, "-s", str(150 + 10 * (index % 3)), "-w", str(path), text],
                check=True,
                capture_output=True,
            )
            with wave.open(str(path)) as handle:
                rate = handle.getframerate()
                data = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16).astype(np.float32) / 32768
            pieces += [resample_poly(data, RATE, rate).astype(np.float32), np.zeros(int(gap_s * RATE), np.float32)]
    return np.concatenate(pieces)


def vad_samples(model_path: Path, audio: np.ndarray, every: int = 1) -> dict[str, np.ndarray]:
    """The .npz arrays for --calib: input [N, 1, 576], state [N, 2, 1, 128] as the model saw them, sr () = 16000."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    inputs, states = [], []
    for index, start in enumerate(range(0, len(audio) - WINDOW + 1, WINDOW)):
        window = np.concatenate([context, audio[start : start + WINDOW]])[None]
        if index % every == 0:
            inputs.append(window)
            states.append(state)
        _, state = session.run(None, {"input": window, "state": state, "sr": np.array(RATE, np.int64)})
        context = window[0, -CONTEXT:]
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": np.array(RATE, np.int64)}
