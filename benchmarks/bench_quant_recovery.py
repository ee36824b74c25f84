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

from lepton_cli.evaluate.accuracy import scoring_opt_level  # noqa: E402
from lepton_cli.host.detect import detect_host  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.run import PassContext  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import load_samples  # noqa: E402

INT8_HEADS = {"head_precision": "int8"}  # heads found but left int8: the step's effect alone
STEPS = {
    "none": INT8_HEADS,
    "cle": INT8_HEADS | {"equalize": True},
    "bias": INT8_HEADS | {"bias_correction": True},
    "adaround": INT8_HEADS | {"adaround": True},
    "smoothquant": INT8_HEADS | {"smoothquant_alpha": 0.5},
    "heads": {"head_precision": "auto"},
    "heads16": {"head_precision": "int16"},
    "cle+bias": INT8_HEADS | {"equalize": True, "bias_correction": True},
    "cle+adaround+bias": INT8_HEADS | {"equalize": True, "adaround": True, "bias_correction": True},
    "cle+adaround+heads": {"equalize": True, "adaround": True},
}
INT8_TARGETS = ["cpu-avx", "edge-arm", "tpu", "fpga", str(ROOT / "examples" / "targets" / "cuda-int8-trt.toml")]


EVERY_OP = False  # --every-op: quantize every op ORT can (cpu-avx's first search tier) instead of the target's op_types


def quantize(model: onnx.ModelProto, calib, target_name: str, steps: dict) -> tuple[onnx.ModelProto, float, dict]:
    target = load_target(target_name)
    step = next(s for s in target.passes if s.name == "quantize")
    params = dataclasses.replace(step.params, tune=False, **steps)
    if EVERY_OP:
        params = dataclasses.replace(params, op_types=[], fast_op_types=None)
    ctx = PassContext(target=target, calib=calib, eval=None, max_accuracy_drop=1.0, host=detect_host())
    started = time.perf_counter()
    result = get_pass("quantize").fn(onnx.ModelProto.FromString(model.SerializeToString()), ctx, params)
    return result.model, time.perf_counter() - started, result.summary.get("recovery", {})


def outputs(model: onnx.ModelProto, images: np.ndarray, level: str) -> np.ndarray:
    session = make_session(model, opt_level=level)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))])


def ocr_accuracy(values: np.ndarray, texts: list[str], chars: list[str]) -> float:
    return textset.char_accuracy(textset.ctc_greedy(values, chars), texts)


def digits_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(values.argmax(axis=1) == labels))


def photos(count: int, seed: int, size: int = 416) -> np.ndarray:
    """Crops of scikit-learn's two sample photographs at random scales, resized to ``size`` (pixels 0..255, as ddddocr feeds)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = load_sample_images().images[i % 2]
        h, w = image.shape[:2]
        side = int(rng.integers(int(0.35 * min(h, w)), min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop, dtype=np.float32).transpose(2, 0, 1))
    return np.stack(out)


def captchas(count: int, seed: int, size: int = 416) -> np.ndarray:
    """Click-captcha style images (what ddddocr's detector is for): 3-6 large letters or digits drawn on photo crops."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = ["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf"]
    out = []
    for background in photos(count, seed, size):
        image = Image.fromarray(background.transpose(1, 2, 0).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 7))):
            font = ImageFont.truetype(str(textset.FONT_DIR / str(rng.choice(fonts))), int(rng.integers(36, 64)))
            char = chr(int(rng.integers(65, 91)) if rng.random() < 0.7 else int(rng.integers(48, 58)))
            draw.text(
                (int(rng.integers(10, size - 60)), int(rng.integers(10, size - 70))),
                char,
                font=font,
                fill=tuple(int(c) for c in rng.integers(0, 255, 3)),
                stroke_width=2,
                stroke_fill=(255, 255, 255),
            )
        out.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
    return np.stack(out)


def yolox_boxes(raw: np.ndarray, size: int = 416, threshold: float = 0.3) -> list[np.ndarray]:
    """ddddocr det's decoding: grid offsets and exp sizes per stride 8/16/32, score = objectness x class, then NMS."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((n * n, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    result = []
    for pred in raw:
        xy, wh = (pred[:, :2] + grid) * stride, np.exp(np.clip(pred[:, 2:4], -10, 10)) * stride
        score = pred[:, 4] * pred[:, 5]
        keep = score >= threshold
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)[keep]
        order = np.argsort(-score[keep])
        chosen: list[np.ndarray] = []
        for box in boxes[order]:
            if all(_iou(box, other) < 0.45 for other in chosen):
                chosen.append(box)
        result.append(np.array(chosen).reshape(-1, 4))
    return result


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def detection_f1(reference: list[np.ndarray], values: np.ndarray) -> float:
    """100 x F1 of the int8 model's boxes matched (IoU >= 0.5) to the fp32 model's on each image."""
    matched = total_ref = total_got = 0
    for ref, got in zip(reference, yolox_boxes(values)):
        used: set[int] = set()
        for box in got:
            best = max(
                ((i, _iou(box, r)) for i, r in enumerate(ref) if i not in used), key=lambda t: t[1], default=None
            )
            if best is not None and best[1] >= 0.5:
                used.add(best[0])
                matched += 1
        total_ref, total_got = total_ref + len(ref), total_got + len(got)
    return 100.0 * 2 * matched / max(1, total_ref + total_got)


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
            row = {
                "model": label,
                "target": Path(target_name).stem + (" (every op)" if EVERY_OP else ""),
                "steps": step_name,
                "fp32": round(reference, 2),
                "accuracy": round(accuracy, 2),
                "drop": round(reference - accuracy, 2),
                "output_error_pct": round(relative_error(float_values, values), 3),
                "seconds": round(seconds, 1),
                "recovery": recovery,
            }
            print(
                f"{label:<14} {row['target']:<14} {step_name:<18} acc {accuracy:6.2f} drop {row['drop']:6.2f} "
                f"err {row['output_error_pct']:7.3f}% {seconds:6.1f} s",
                flush=True,
            )
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
    ap.add_argument("--det", type=Path, help="ddddocr's common_det.onnx (pip download --no-deps ddddocr; unzip)")
    ap.add_argument("--det-targets", default="cpu-avx,fpga")
    ap.add_argument("--det-steps", default="none,heads,cle+adaround+heads")
    ap.add_argument("--every-op", action="store_true", help="op_types = [] (every op ORT quantizes) on every target")
    args = ap.parse_args()
    global EVERY_OP
    EVERY_OP = args.every_op
    host_isa = list(detect_host().pass_context().get("isa") or [])
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    rows: list[dict] = []

    digits = onnx.load(DIGITS / "digits_cnn.onnx")
    held = np.load(DIGITS / "eval.npz")
    rows += (
        []
        if args.skip_digits
        else run(
            "digits",
            digits,
            load_samples(DIGITS / "calib.npz", digits),
            INT8_TARGETS,
            args.digits_steps.split(","),
            held["image"],
            lambda values: digits_accuracy(values, held["labels"]),
            host_isa,
        )
    )

    if not args.skip_rec:
        source = onnx.load(OCR_REC)
        chars = textset.charset(source)
        rec, _ = upgrade_opset(source, 13, 21)
        rec = bind_input_shapes(rec, {"x": [1, 3, 48, args.width]})
        calib_images, _ = textset.make_set(args.calib, 1, "calib", width=args.width)
        np.savez(work / "calib.npz", x=calib_images)
        test_images, test_texts = textset.make_set(args.test, 3, "eval", width=args.width)
        rows += run(
            f"PP-OCRv4 rec 48x{args.width}",
            rec,
            load_samples(work / "calib.npz", rec),
            args.rec_targets.split(","),
            args.rec_steps.split(","),
            test_images,
            lambda values: ocr_accuracy(values, test_texts, chars),
            host_isa,
        )

    if args.det is not None:
        det, _ = upgrade_opset(onnx.load(args.det), 13, 21)
        np.savez(work / "det-calib.npz", images=captchas(16, 1))
        test_photos = captchas(12, 2)
        reference = yolox_boxes(outputs(det, test_photos, "all"))
        rows += run(
            "ddddocr det",
            det,
            load_samples(work / "det-calib.npz", det),
            args.det_targets.split(","),
            args.det_steps.split(","),
            test_photos,
            lambda values: detection_f1(reference, values),
            host_isa,
        )

    parts = [
        name
        for name, skip in (("digits", args.skip_digits), ("rec", args.skip_rec), ("det", args.det is None))
        if not skip
    ]
    out = (
        ROOT / "benchmarks" / "results" / f"quant_recovery-{'-'.join(parts)}{'-every-op' if args.every_op else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args), "rows": rows, "host": detect_host().pass_context()}, indent=2, default=str)
    )
    lines = [
        "| model | target | steps | fp32 | int8 | drop | output error % | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['target']} | {r['steps']} | {r['fp32']:.2f} | {r['accuracy']:.2f} | {r['drop']:.2f} "
        f"| {r['output_error_pct']:.3f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    print("\n".join(lines))
    (out.with_suffix(".table.md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
