"""Each target's device file against its ONNX model: what the device runs, how big, how accurate, what falls back.

Compiles the digits example for mobile, tpu and fpga (and, with ``--rec``, PP-OCRv4 rec at 48x160 on
rendered text lines for mobile and tpu), then runs ``lepton run --format`` on each device file and
reads the compile report: the ONNX model's accuracy (ONNX Runtime), the device file's (ORT format or
LiteRT), the largest output difference, the Edge TPU mapping, the NNAPI partitioning, the DPU check.

    .venv/bin/python benchmarks/bench_device_files.py [--rec]

The .tflite rows need the extra lepton-cli[tflite]; without it they say "not produced".
Writes benchmarks/results/bench_device_files.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LEPTON = [sys.executable, "-m", "lepton_cli"]
FORMATS = {"mobile": "ort", "tpu": "tflite", "fpga": None}


def _lepton(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*LEPTON, *args], capture_output=True, text=True, env=env, cwd=REPO)


def _rec_data(folder: Path) -> tuple[Path, Path, Path, list[str]]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "tests"))
    import ocr_textset as textset
    import onnx
    from conftest import OCR_REC

    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes

    if OCR_REC is None:
        sys.exit("--rec needs the PP-OCRv4 models: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    model, _ = upgrade_opset(onnx.load(OCR_REC), 13, 21)
    onnx.save(bind_input_shapes(model, {"x": [1, 3, 48, 160]}), folder / "rec160.onnx")
    calib, _ = textset.make_set(32, 1, "calib", width=160)
    evaluation, texts = textset.make_set(60, 2, "eval", width=160)
    np.savez(folder / "calib.npz", x=calib)
    np.savez(folder / "eval.npz", x=evaluation, labels=np.array(texts))
    return folder / "rec160.onnx", folder / "calib.npz", folder / "eval.npz", texts


def _device_accuracy(
    bundle: Path, fmt: str, evaluation: Path, texts: list[str] | None, model: Path, env: dict[str, str]
) -> float | None:
    out = bundle.parent / f"{bundle.name}.{fmt}.npz"
    run = _lepton("run", str(bundle), "--inputs", str(evaluation), "--format", fmt, "-o", str(out), "--json", env=env)
    if run.returncode != 0:
        return None
    if texts is None:
        return json.loads(run.stdout).get("top1_accuracy_pct")
    import ocr_textset as textset
    import onnx

    probs = np.load(out)[np.load(out).files[0]]
    return round(textset.char_accuracy(textset.ctc_greedy(probs, textset.charset(onnx.load(model))), texts), 4)


def _row(
    name: str,
    target: str,
    model: Path,
    calib: Path,
    evaluation: Path,
    texts: list[str] | None,
    folder: Path,
    env: dict[str, str],
    budget: str,
) -> dict:
    result = _lepton(
        "compile",
        str(model),
        "--target",
        target,
        "--calib",
        str(calib),
        "--eval",
        str(evaluation),
        "-o",
        str(folder),
        "--no-bench",
        "--quiet",
        "--max-accuracy-drop",
        budget,
        env=env,
    )
    row: dict = {"model": name, "target": target, "compile_exit": result.returncode}
    if result.returncode != 0:
        row["error"] = result.stderr.strip().splitlines()[-1][:200]
        return row
    bundle = folder / f"{model.stem}.{target}.lepton"
    report = json.loads((bundle / "report.json").read_text())
    device, accuracy = report.get("device", {}), report["accuracy"]
    row.update(
        {
            "metric": accuracy["metric"],
            "source": accuracy["source_value"],
            "onnx": accuracy["value"],
            "onnx_bytes": (bundle / "model.onnx.enc").stat().st_size,
        }
    )
    fmt = FORMATS[target]
    if fmt == "ort" and device.get("ort", {}).get("produced"):
        row.update(
            {
                "device_file": "model.ort",
                "device_bytes": device["ort"]["files"]["model.ort"],
                "device_value": _device_accuracy(bundle, "ort", evaluation, texts, model, env),
            }
        )
        nnapi = device["ort"]["usability"]["eps"]["NNAPI"]
        row["fallback"] = f"NNAPI {nnapi['partitions']} partitions {nnapi['supported_nodes']}/{nnapi['nodes']}"
    elif fmt == "tflite":
        tfl = device.get("tflite", {})
        if tfl.get("produced"):
            tpu = tfl["edgetpu"]
            row.update(
                {
                    "device_file": "model.tflite",
                    "device_bytes": tfl["size_bytes"],
                    "report_device_value": tfl["accuracy"]["value"],
                    "device_value": _device_accuracy(bundle, "tflite", evaluation, texts, model, env),
                    "max_abs_diff_vs_onnx": tfl["vs_onnx"]["max_abs_diff_vs_onnx"],
                    "fallback": f"Edge TPU {tpu['edgetpu_ops']}/{tpu['ops']} ops",
                }
            )
        else:
            row.update({"device_file": "not produced", "fallback": tfl.get("reason", "")[:80]})
    elif "dpu" in device:
        row.update({"device_file": "model.onnx", "fallback": f"DPU violations {len(device['dpu']['violations'])}"})
    return row


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rec", action="store_true", help="also PP-OCRv4 rec 48x160 for mobile and tpu (minutes)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "LEPTON_HOME": str(folder / "home"), "TF_CPP_MIN_LOG_LEVEL": "3"}
        digits = REPO / "examples" / "digits"
        for target in ("mobile", "tpu", "fpga"):
            rows.append(
                _row(
                    "digits",
                    target,
                    digits / "digits_cnn.onnx",
                    digits / "calib.npz",
                    digits / "eval.npz",
                    None,
                    folder,
                    env,
                    "1",
                )
            )
        if args.rec:
            model, calib, evaluation, texts = _rec_data(folder)
            for target in ("mobile", "tpu"):  # tpu: full int8 of rec costs ~3 points, over the default 1-point budget
                rows.append(_row("PP-OCRv4 rec 48x160", target, model, calib, evaluation, texts, folder, env, "6"))
    print(
        f"{'model':22} {'target':7} {'metric':13} {'source':>7} {'onnx':>7} {'device file':13} {'device':>7} {'size':>10}  fallback"
    )
    for r in rows:
        print(
            f"{r['model']:22} {r['target']:7} {r.get('metric', '-'):13} {r.get('source', 0):7.2f} {r.get('onnx', 0):7.2f} "
            f"{r.get('device_file', '-'):13} {_num(r.get('device_value')):>7} {r.get('device_bytes', 0):10,}  {r.get('fallback', r.get('error', ''))}"
        )
    out = REPO / "benchmarks" / "results" / "bench_device_files.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
