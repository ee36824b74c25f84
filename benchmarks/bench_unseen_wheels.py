"""Unseen real models from PyPI packages through the default path, each output read independently of the gate.

    python benchmarks/bench_unseen_wheels.py [--models dnsmos basic_pitch mtcnn_pnet]
                                             [--targets cpu-avx] [--before CHECKOUT]
                                             [--out benchmarks/results/unseen_wheels]

Each model: ``lepton compile MODEL --target T --calib C --eval E --no-bench`` in a child process (calibration and
held-out data disjoint), then the compiled model and its source run on E here: every output's SNR and largest
error against the source, and what its application reads (DNSMOS: the three MOS values; basic-pitch: F1 of the
note, onset and contour decisions at 0.3 and 0.5; PNet: the face/background decision per cell). Beside them the
compile's own report: exit code, seconds, int8 weight layers, nodes kept float, heads and front ends left out of
int8, each output's metric and drop. ``--before DIR``: the same compiles with another checkout's ``lepton_cli``
first (run from that folder, on PYTHONPATH; ``lepton_cli/passes`` and ``lepton_cli/targets`` linked to its
top-level folders), model by model. Writes OUT.json and OUT.md.

Data: DNSMOS scores 9.01 s of 16 kHz speech spoken by espeak-ng (sentences differ between the two sets; without
espeak-ng the model is skipped); basic-pitch two-second harmonic tones at 22.05 kHz (seeds differ); PNet crops of
scikit-learn's two photographs at 120x160 (seeds differ); slider (captcha-recognizer's YOLO11s-seg) slider captchas
cut from the same photographs with a jigsaw gap (``wheel_models.slider_captchas``, seeds differ), read as the slide
distance: the best gap box's x centre.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]
from audio_speech import HELD_OUT_SENTENCES, SENTENCES  # noqa: E402
from md_table import markdown_table  # noqa: E402
from wheel_models import BASIC_PITCH, DNSMOS, MTCNN_PNET, SLIDER, photo_frames, slider_captchas, tones, wheel_member  # noqa: E402

from lepton_cli.model.sessions import make_session  # noqa: E402


def _speech_windows(sentences: list[str], count: int) -> np.ndarray | None:
    from audio_speech import espeak_available, speech

    if not espeak_available():
        return None
    audio, window = speech(sentences), 144160
    hop = max(1, (len(audio) - window) // (count - 1))
    return np.stack([audio[k * hop : k * hop + window] for k in range(count)])


def _f1(want: np.ndarray, have: np.ndarray) -> float:
    tp, fp, fn = int(np.sum(want & have)), int(np.sum(~want & have)), int(np.sum(want & ~have))
    return 100.0 if 2 * tp + fp + fn == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)


def _mos(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> str:
    err = np.abs(np.concatenate([g[0] for g in got]) - np.concatenate([r[0] for r in ref]))
    return f"MOS (sig, bak, ovr) largest error {err.max():.3f}, mean {err.mean():.3f}"


def _notes(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> str:
    parts = []
    for k in range(len(ref[0])):
        a, b = np.concatenate([r[k] for r in ref]), np.concatenate([g[k] for g in got])
        parts.append("/".join(f"{_f1(a > t, b > t):.1f}" for t in (0.3, 0.5)))
    return "decision F1 at 0.3/0.5 per output: " + ", ".join(parts)


def _faces(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> str:
    a = np.concatenate([r[1].argmax(-1) for r in ref])
    b = np.concatenate([g[1].argmax(-1) for g in got])
    return f"face/background per cell agree {100.0 * np.mean(a == b):.2f} %"


def _gap(outs: list[np.ndarray]) -> float | None:
    """The slider's target: the x centre of the best gap box over ultralytics' 0.25, or None when none is."""
    scores = outs[0][0, 4]
    return float(outs[0][0, 0, scores.argmax()]) if scores.max() > 0.25 else None


def _slider(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> str:
    pairs = [(_gap(r), _gap(g)) for r, g in zip(ref, got)]
    shifts = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    lost = sum(a is not None and b is None for a, b in pairs)
    worst = f"{max(shifts):.1f}" if shifts else "-"
    return f"gap x centre (the slide distance) off by at most {worst} px of 640, {lost} of {len(pairs)} gaps lost"


MODELS = {
    "dnsmos": (DNSMOS, "input_1", lambda: _speech_windows(SENTENCES, 8), lambda: _speech_windows(HELD_OUT_SENTENCES, 8), [], _mos),
    "basic_pitch": (BASIC_PITCH, "serving_default_input_2:0", lambda: tones(16, 0), lambda: tones(8, 1), ["--input-shape", "serving_default_input_2:0=1,43844,1"], _notes),
    "mtcnn_pnet": (MTCNN_PNET, "input_1", lambda: photo_frames(16, 0), lambda: photo_frames(16, 1), [], _faces),
    "slider": (SLIDER, "images", lambda: slider_captchas(32, 1)[0], lambda: slider_captchas(32, 2)[0], [], _slider),
}  # fmt: skip


def _outputs(model: onnx.ModelProto | str, name: str, data: np.ndarray) -> list[list[np.ndarray]]:
    session = make_session(onnx.load(model) if isinstance(model, str) else model)
    return [session.run(None, {name: x[None] if x.ndim < len(session.get_inputs()[0].shape) else x}) for x in data]


def run(key: str, target: str, work: Path, checkout: Path | None = None) -> dict:
    spec, name, calib, held_out, extra, read = MODELS[key]
    path, calib_data, eval_data = str(wheel_member(*spec)), calib(), held_out()
    if calib_data is None or eval_data is None:
        return {"model": key, "target": target, "skipped": "espeak-ng not installed"}
    np.savez(work / f"{key}-calib.npz", **{name: calib_data})
    np.savez(work / f"{key}-eval.npz", **{name: eval_data})
    code = "before" if checkout else "after"
    label = Path(target).stem  # a target file's path names no folder under ``work``
    out, saved = work / f"{key}-{label}-{code}", work / f"{key}-{label}-{code}.onnx"
    argv = [sys.executable, "-m", "benchmarks.corpus.compile_child", "--save-model", str(saved), "--", path]
    argv += ["--target", target, "--calib", str(work / f"{key}-calib.npz"), "--eval", str(work / f"{key}-eval.npz")]
    argv += [*extra, "-o", str(out), "--quiet", "--no-bench"]
    started = time.perf_counter()
    env = os.environ | ({"PYTHONPATH": str(checkout)} if checkout else {})
    proc = subprocess.run(argv, cwd=checkout or REPO, capture_output=True, text=True, env=env)  # -m puts cwd first
    row = {"model": key, "target": target, "code": code, "exit": proc.returncode}
    row["seconds"] = round(time.perf_counter() - started)
    reports = sorted(out.rglob("report.json")) if out.exists() else []
    if not reports or not saved.exists():
        return row | {"message": (proc.stderr.strip().splitlines() or [""])[-1][:300]}
    report = json.loads(reports[0].read_text())
    quantize = next((p["summary"] for p in report["pipeline"] if p.get("name") == "quantize"), {})
    ref, got = _outputs(path, name, eval_data), _outputs(str(saved), name, eval_data)
    snr = []
    for k in range(len(ref[0])):
        a = np.concatenate([r[k].ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([g[k].ravel() for g in got]).astype(np.float64)
        snr.append(round(10 * np.log10(np.sum(a * a) / max(np.sum((a - b) ** 2), 1e-30)), 1))
    return row | {
        "int8_weights": quantize.get("int8_weights"),
        "float_kept": len(quantize.get("float_kept") or []),
        "left_out": [f"{len(h['nodes'])} nodes: {h['why'].split(' (')[0]}" for h in quantize.get("heads", [])],
        "gate": [f"{o['name']}: {o['metric']} drop {o['drop_pct']:.2f}" for o in report["accuracy"]["outputs"]],
        "snr_db": snr,
        "application": read(ref, got),
        "warnings": [w for w in report.get("warnings", []) if "compressed nothing" in w],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", default=["cpu-avx"])
    parser.add_argument("--before", type=Path, help="another checkout whose lepton_cli compiles first")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "unseen_wheels"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkouts = [args.before, None] if args.before else [None]
        rows = [run(m, t, Path(tmp), c) for m in args.models for t in args.targets for c in checkouts]
    header = ["model", "target", "code", "exit", "s", "int8 weight layers", "kept float", "left out of int8", "gate", "SNR dB", "read as the application does"]  # fmt: skip
    table = [
        [r["model"], r["target"], r.get("code", ""), r.get("exit", "-"), r.get("seconds", "-"), r.get("int8_weights", "-"),
         r.get("float_kept", "-"), "; ".join(r.get("left_out", [])) or "-", "; ".join(r.get("gate", [])) or r.get("message", r.get("skipped", "")),
         ", ".join(map(str, r.get("snr_db", []))), r.get("application", "")]
        for r in rows
    ]  # fmt: skip
    lines = markdown_table(header, table)
    print("\n".join(lines))
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    Path(args.out + ".md").write_text(
        "# Unseen wheel models, default path\n\n`python benchmarks/bench_unseen_wheels.py "
        + " ".join(
            ["--models", *args.models, "--targets", *args.targets] + (["--before", "CHECKOUT"] if args.before else [])
        )
        + "`\n\n"
        + "\n".join(lines)
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
