"""What each accuracy-recovery step of the quantize pass gains, with no layer kept in float.

For each target and each step set (none; cross-layer equalisation; bias correction; AdaRound
rounding; combinations), the quantize pass runs with the target's own parameters, ``tune = false``
(its first calibration method, every op quantized: the drop the steps face before any float
fallback) and the steps switched on. Reported: accuracy on held-out data and its drop against
fp32, and the pass's seconds (calibration, recovery, quantization).

* PP-OCRv4 rec at 48 x ``--width``: rendered text lines (benchmarks/ocr_textset.py), calibration
  seed 1 (its own fonts and words), test seed 3 (other fonts, other words); character accuracy of
  CTC greedy decoding against the text.
* digits (examples/digits): top-1 on the 397 held-out images, calibrated on calib.npz.

Accuracy is scored as the target computes it (``accuracy.scoring_opt_level``: unfused, exact
integer arithmetic where this host's kernels would saturate and the target's do not).

    .venv/bin/python benchmarks/bench_quant_recovery.py [--width 160 --calib 64 --test 200]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import ocr_textset as textset  # noqa: E402
from conftest import DIGITS, OCR_REC  # noqa: E402
from lepton_cli.accuracy import scoring_opt_level  # noqa: E402
from lepton_cli.data import load_samples  # noqa: E402
from lepton_cli.hostinfo import detect_host  # noqa: E402
from lepton_cli.model_io import upgrade_opset  # noqa: E402
from lepton_cli.ort import make_session  # noqa: E402
from lepton_cli.pass_registry import get_pass  # noqa: E402
from lepton_cli.pipeline import PassContext  # noqa: E402
from lepton_cli.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.targets import load_target  # noqa: E402

STEPS = {
    "none": {},
    "cle": {"equalize": True},
    "bias": {"bias_correction": True},
    "adaround": {"adaround": True},
    "cle+bias": {"equalize": True, "bias_correction": True},
    "cle+adaround+bias": {"equalize": True, "adaround": True, "bias_correction": True},
}
INT8_TARGETS = ["cpu-avx", "edge-arm", "tpu", "fpga", str(ROOT / "examples" / "targets" / "cuda-int8-trt.toml")]


def quantize(model: onnx.ModelProto, calib, target_name: str, steps: dict) -> tuple[onnx.ModelProto, float, dict]:
    target = load_target(target_name)
    step = next(s for s in target.passes if s.name == "quantize")
    params = dataclasses.replace(step.params, tune=False, **steps)
    ctx = PassContext(target=target, calib=calib, eval=None, max_accuracy_drop=1.0, host=detect_host().pass_context())
    started = time.perf_counter()
    result = get_pass("quantize").fn(onnx.ModelProto.FromString(model.SerializeToString()), ctx, params)
    return result.model, time.perf_counter() - started, result.summary.get("recovery", {})


def outputs(model: onnx.ModelProto, images: np.ndarray, level: str) -> np.ndarray:
    session = make_session(model, opt_level=level)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))])


def ocr_accuracy(values: np.ndarray, texts: list[str], chars: list[str]) -> float:
    return textset.char_accuracy(textset.ctc_greedy(values, chars), texts)


def digits_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(values.argmax(axis=1) == labels))


def relative_error(reference: np.ndarray, values: np.ndarray) -> float:
    """||int8 - fp32|| / ||fp32|| over the test outputs, in percent: resolves what one label flip cannot."""
    return 100.0 * float(np.linalg.norm(values - reference) / max(np.linalg.norm(reference), 1e-30))


def run(label: str, model, calib, targets, steps, images, score, host_isa) -> list[dict]:
    rows = []
    float_values = outputs(model, images, "all")
    reference = score(float_values)
    for target_name in targets:
        level = scoring_opt_level(list(load_target(target_name).hardware.isa), host_isa)
        for step_name in steps:
            built, seconds, recovery = quantize(model, calib, target_name, STEPS[step_name])
            values = outputs(built, images, level)
            accuracy = score(values)
            row = {"model": label, "target": Path(target_name).stem, "steps": step_name, "fp32": round(reference, 2),
                   "accuracy": round(accuracy, 2), "drop": round(reference - accuracy, 2),
                   "output_error_pct": round(relative_error(float_values, values), 3), "seconds": round(seconds, 1),
                   "recovery": recovery}
            print(f"{label:<14} {row['target']:<14} {step_name:<18} acc {accuracy:6.2f} drop {row['drop']:6.2f} "
                  f"err {row['output_error_pct']:7.3f}% {seconds:6.1f} s", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--rec-targets", default="cpu-avx,fpga")
    ap.add_argument("--rec-steps", default=",".join(STEPS))
    ap.add_argument("--digits-steps", default="none,cle+bias,cle+adaround+bias")
    ap.add_argument("--skip-rec", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    args = ap.parse_args()
    host_isa = list(detect_host().pass_context().get("isa") or [])
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    rows: list[dict] = []

    digits = onnx.load(DIGITS / "digits_cnn.onnx")
    held = np.load(DIGITS / "eval.npz")
    rows += [] if args.skip_digits else run("digits", digits, load_samples(DIGITS / "calib.npz", digits), INT8_TARGETS, args.digits_steps.split(","),
                held["image"], lambda values: digits_accuracy(values, held["labels"]), host_isa)

    if not args.skip_rec:
        source = onnx.load(OCR_REC)
        chars = textset.charset(source)
        rec, _ = upgrade_opset(source, 13, 21)
        rec = bind_input_shapes(rec, {"x": [1, 3, 48, args.width]})
        calib_images, _ = textset.make_set(args.calib, 1, "calib", width=args.width)
        np.savez(work / "calib.npz", x=calib_images)
        test_images, test_texts = textset.make_set(args.test, 3, "eval", width=args.width)
        rows += run(f"PP-OCRv4 rec 48x{args.width}", rec, load_samples(work / "calib.npz", rec),
                    args.rec_targets.split(","), args.rec_steps.split(","),
                    test_images, lambda values: ocr_accuracy(values, test_texts, chars), host_isa)

    out = ROOT / "benchmarks" / "results" / ("quant_recovery.json" if not args.skip_digits and not args.skip_rec
                                             else f"quant_recovery-{'rec' if args.skip_digits else 'digits'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "host": detect_host().pass_context()}, indent=2, default=str))
    lines = ["| model | target | steps | fp32 | int8 | drop | output error % | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['target']} | {r['steps']} | {r['fp32']:.2f} | {r['accuracy']:.2f} | {r['drop']:.2f} "
              f"| {r['output_error_pct']:.3f} | {r['seconds']:.1f} |" for r in rows]
    print("\n".join(lines))
    (out.with_suffix(".table.md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
