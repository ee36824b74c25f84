"""The tpu bundle's .tflite in LiteRT against what its compile report claims: digits, PP-OCRv4 rec, ddddocr's detector.

Compiles each model for ``--target tpu`` with ``--calib``/``--eval`` and ``--no-bench`` (budgets tried in order until
the gate passes; every attempt is recorded), then runs ``lepton run BUNDLE --format tflite`` and ``--format onnx`` on the
eval set and scores their outputs as the gate does: digits top-1 against labels, PP-OCRv4 rec (48x160, rendered
lines of benchmarks/ocr_textset.py) character accuracy against the text, ddddocr's YOLOX detector (416x416 click-captcha
scenes on photographs, benchmarks/corpus/data.py) detection F1 at IoU 0.5 against the source model's own detections
(decoded + NMS by lepton_cli/evaluate/output_scores.py). Also the report's Edge TPU op check and the compile time.

    .venv/bin/python benchmarks/bench_tflite_device.py --det PATH/common_det.onnx [--skip digits,rec]

common_det.onnx: ``pip download --no-deps ddddocr==1.6.1`` and unzip. Needs the extra lepton-cli[tflite].
Writes benchmarks/results/tflite_device.json and .md.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
LEPTON = [sys.executable, "-m", "lepton_cli"]
RESULTS = REPO / "benchmarks" / "results"


def _lepton(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*LEPTON, *args], capture_output=True, text=True, env=env, cwd=REPO)


def _det_data(model: Path, folder: Path, calib_count: int, eval_count: int) -> tuple[Path, Path]:
    """Disjoint calib/eval scenes from the corpus builder (different photographs, fonts and seeds)."""
    from benchmarks.corpus import data, manifest

    spec = next(m for m in manifest.OCR_MODELS if m.name == "ddddocr_det")
    paths = []
    for role, count in (("calib", calib_count), ("eval", eval_count)):
        path = folder / f"det_{role}.npz"
        np.savez(path, **data.BUILDERS[spec.data](spec, model, role, count))
        paths.append(path)
    return paths[0], paths[1]


def _outputs(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        return npz[npz.files[0]]


def _score_detections(source: Path, evaluation: Path, got: np.ndarray) -> tuple[float, dict]:
    """Detection F1 of ``got`` against the source model's detections, with the gate's role, decoding and NMS."""
    import onnxruntime as ort

    from lepton_cli.evaluate import output_roles
    from lepton_cli.evaluate.output_scores import DetectionTally

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with np.load(evaluation) as npz:
        images = npz[name]
    refs = [session.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))]
    role = output_roles.recognise(onnx.load(str(source)), 0, session.get_outputs()[0].name, refs)
    if role.metric != "detection_f1":
        raise SystemExit(f"{source.name}: output not recognised as a detector head ({role.why})")
    tally = DetectionTally(role.layout, role.detection_confidences())
    for i, ref in enumerate(refs):
        tally.add(ref, got[i : i + 1].reshape(ref.shape))
    result = tally.result()
    return round(result.value, 4), {"layout": role.layout, **result.extra}


def _score(kind: str, out: Path, run_json: dict, context: dict) -> tuple[float | None, dict]:
    if kind == "digits":
        return run_json.get("top1_accuracy_pct"), {}
    if kind == "rec":
        import ocr_textset as textset

        charset = textset.charset(onnx.load(str(context["model"])))
        return round(textset.char_accuracy(textset.ctc_greedy(_outputs(out), charset), context["texts"]), 4), {}
    return _score_detections(context["model"], context["eval"], _outputs(out))


def _run_format(bundle: Path, fmt: str, kind: str, context: dict, env: dict[str, str]) -> dict:
    out = bundle.parent / f"{bundle.name}.{fmt}.npz"
    start = time.perf_counter()
    run = _lepton(
        "run", str(bundle), "--inputs", str(context["eval"]), "--format", fmt, "-o", str(out), "--json", env=env
    )
    if run.returncode != 0:
        return {"exit": run.returncode, "error": (run.stderr.strip().splitlines() or [""])[-1][:300]}
    info = json.loads(run.stdout)
    value, extra = _score(kind, out, info, context)
    return {
        "exit": 0,
        "file": info.get("model"),
        "runtime": info.get("runtime"),
        "value": value,
        "seconds": round(time.perf_counter() - start, 1),
        **extra,
    }


def _compile(
    name: str, model: Path, context: dict, budgets: list[str], folder: Path, env: dict[str, str]
) -> tuple[Path | None, dict]:
    attempts = []
    for budget in budgets:
        args = [
            "compile",
            str(model),
            "--target",
            "tpu",
            "--calib",
            str(context["calib"]),
            "--eval",
            str(context["eval"]),
            "-o",
            str(folder),
            "--no-bench",
            "--quiet",
        ] + (["--max-accuracy-drop", budget] if budget != "default" else [])
        start = time.perf_counter()
        result = _lepton(*args, env=env)
        attempt = {
            "max_accuracy_drop": budget,
            "exit": result.returncode,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if result.returncode != 0:
            attempt["error"] = (result.stderr.strip().splitlines() or [""])[-1][:300]
        attempts.append(attempt)
        print(
            f"  {name}: compile --max-accuracy-drop {budget}: exit {result.returncode} in {attempt['seconds']} s {attempt.get('error', '')}",
            flush=True,
        )
        if result.returncode != 3:
            break
    bundle = folder / f"{model.stem}.tpu.lepton"
    return (bundle if attempts[-1]["exit"] == 0 else None), {"attempts": attempts}


def _report_claims(bundle: Path) -> dict:
    report = json.loads((bundle / "report.json").read_text())
    tfl = report.get("device", {}).get("tflite", {})
    row = {
        "metric": report["accuracy"]["metric"],
        "source_value": report["accuracy"].get("source_value"),
        "report_onnx": report["accuracy"].get("value"),
        "tflite_produced": bool(tfl.get("produced")),
    }
    if not tfl.get("produced"):
        row["tflite_reason"] = tfl.get("reason", "")
        return row
    tpu = tfl["edgetpu"]
    row.update(
        {
            "report_tflite": tfl["accuracy"].get("value"),
            "report_tflite_accuracy": tfl["accuracy"],
            "max_abs_diff_vs_onnx": (tfl.get("vs_onnx") or {}).get("max_abs_diff_vs_onnx"),
            "tflite_bytes": tfl.get("size_bytes"),
            "edgetpu_ops": tpu["edgetpu_ops"],
            "ops": tpu["ops"],
            "cpu_ops": [f"#{c['index']} {c['op']}: {c['reason']}" for c in tpu["cpu_ops"]],
            "params_streamed": tpu.get("params_streamed"),
        }
    )
    return row


def _row(
    name: str, kind: str, model: Path, context: dict, budgets: list[str], folder: Path, env: dict[str, str]
) -> dict:
    context = {**context, "model": model}
    bundle, compiled = _compile(name, model, context, budgets, folder, env)
    row = {"model": name, **compiled}
    if bundle is None:
        return row
    row["compile_seconds"] = compiled["attempts"][-1]["seconds"]
    row.update(_report_claims(bundle))
    row["run_onnx"] = _run_format(bundle, "onnx", kind, context, env)
    if row["tflite_produced"]:
        row["run_tflite"] = _run_format(bundle, "tflite", kind, context, env)
    return row


def _rec_context(folder: Path) -> tuple[Path, dict]:
    from bench_device_files import _rec_data

    model, calib, evaluation, texts = _rec_data(folder)
    return model, {"calib": calib, "eval": evaluation, "texts": texts}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | metric | budget used | report: ONNX | report: .tflite | `run --format onnx` | `run --format tflite` "
        "| Edge TPU ops | first CPU op | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        budget = r["attempts"][-1]["max_accuracy_drop"] if r.get("attempts") else "-"
        if "metric" not in r:
            lines.append(
                f"| {r['model']} | - | {budget} | compile failed: {r['attempts'][-1].get('error', '')} | | | | | | |"
            )
            continue
        tpu = (
            f"{r['edgetpu_ops']}/{r['ops']}"
            if r.get("tflite_produced")
            else f"not produced: {r.get('tflite_reason', '')}"
        )
        first_cpu = r["cpu_ops"][0] if r.get("cpu_ops") else "none"
        lines.append(
            f"| {r['model']} | {r['metric']} | {budget} | {_num(r.get('report_onnx'))} | {_num(r.get('report_tflite'))} "
            f"| {_num(r.get('run_onnx', {}).get('value'))} | {_num(r.get('run_tflite', {}).get('value'))} "
            f"| {tpu} | {first_cpu[:90]} | {r.get('compile_seconds', '-')} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--det", type=Path, help="ddddocr's common_det.onnx (pip download --no-deps ddddocr==1.6.1; unzip)"
    )
    parser.add_argument(
        "--det-budgets", default="default,2,5,10", help="--max-accuracy-drop values tried in order for the detector"
    )
    parser.add_argument("--det-samples", default="16,24", help="calib,eval scene counts")
    parser.add_argument("--skip", default="", help="comma list of digits,rec,det")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "LEPTON_HOME": str(folder / "home"), "TF_CPP_MIN_LOG_LEVEL": "3"}
        digits = REPO / "examples" / "digits"
        if "digits" not in skip:
            rows.append(
                _row(
                    "digits",
                    "digits",
                    digits / "digits_cnn.onnx",
                    {"calib": digits / "calib.npz", "eval": digits / "eval.npz"},
                    ["default"],
                    folder,
                    env,
                )
            )
        if "rec" not in skip:
            model, context = _rec_context(folder)  # full int8 of rec costs ~3 points: over the default 1-point budget
            rows.append(_row("PP-OCRv4 rec 48x160", "rec", model, context, ["default", "6"], folder, env))
        if "det" not in skip and args.det is not None:
            model = folder / "ddddocr_det.onnx"
            model.write_bytes(args.det.read_bytes())
            calib, evaluation = _det_data(model, folder, *(int(n) for n in args.det_samples.split(",")))
            rows.append(
                _row(
                    "ddddocr det 416x416",
                    "det",
                    model,
                    {"calib": calib, "eval": evaluation},
                    args.det_budgets.split(","),
                    folder,
                    env,
                )
            )
    lines = _table(rows)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tflite_device.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (RESULTS / "tflite_device.md").write_text(
        "# tpu bundle's .tflite in LiteRT vs its compile report\n\n"
        "`.venv/bin/python benchmarks/bench_tflite_device.py --det common_det.onnx`\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {RESULTS / 'tflite_device.json'}")


if __name__ == "__main__":
    main()
