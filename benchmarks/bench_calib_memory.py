"""Peak memory of `lepton compile` while calibrating PP-OCRv4 det at 640x640 on many samples.

Renders N text pages (benchmarks/ocr_textset.py, calibration fonts and words) as PNG files into a
folder and compiles with ``--calib FOLDER --preprocess ...`` (images decoded one at a time), once
per calibration method (min/max; entropy, which builds histograms). Each compile runs in its own
process; its peak RSS is the child's ``ru_maxrss``. The budget is set wide so the search stops at
its first candidate: this measures calibration, not the tuning search. Issue 4's bar: <= 1.5 GB
at 256 samples.

    .venv/bin/python benchmarks/bench_calib_memory.py [--samples 256] [--methods minmax,entropy]

Writes benchmarks/results/bench_calib_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import ocr_textset as textset  # noqa: E402
from conftest import OCR_DET  # noqa: E402

PREPROCESS = "size=640x640,scale=1/255,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,order=RGB,layout=NCHW"


def render(folder: Path, count: int) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        textset.render_page(rng, textset.CALIB_FONTS, textset.CALIB_WORDS).save(folder / f"page{i:04d}.png")


def compile_peak(folder: Path, method: str, work: Path) -> dict:
    """One compile in a child process; its peak RSS (the child is the only one waited for at that moment)."""
    toml = work / f"cpu-avx-{method}.toml"
    toml.write_text(
        f'extends = "cpu-avx"\nname = "cpu-avx-{method}"\n[pass_params.quantize]\nmethods = ["{method}"]\n'
        f"max_calib_samples = 100000\n",
        encoding="utf-8",
    )
    cmd = [
        sys.executable,
        "-m",
        "lepton_cli",
        "compile",
        str(OCR_DET),
        "--target",
        str(toml),
        "--input-shape",
        "x=1,3,640,640",
        "--calib",
        str(folder),
        "--preprocess",
        PREPROCESS,
        "--max-accuracy-drop",
        "100",
        "--no-bench",
        "--quiet",
        "-o",
        str(work / f"out-{method}"),
    ]
    env = {**os.environ, "LEPTON_HOME": str(work / "home")}
    started = time.perf_counter()
    with open(work / f"stderr-{method}.txt", "w+") as err:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "exit": child.returncode,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(seconds, 1),
        "stderr_tail": stderr.strip().splitlines()[-3:],
    }


_CALIBRATE_ONLY = r"""
import resource, sys
sys.path.insert(0, {root!r})
from pathlib import Path
import onnx
from lepton_cli.model.load import upgrade_opset
from lepton_cli.samples.preprocess import load_image_folder
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.model.shapes import bind_input_shapes
model, _ = upgrade_opset(onnx.load({det!r}), 13, 21)
model = bind_input_shapes(model, {{"x": [1, 3, 640, 640]}})
samples = load_image_folder({folder!r}, model, {pre!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
calibrate(model, samples, CalibrationSettings(method={method!r}, max_samples=100000))
print(before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def calibrate_only_peak(folder: Path, method: str) -> dict:
    """The calibration step alone (lepton_cli.passes._quantize.calibration.calibrate over the image folder) in a fresh process."""
    code = _CALIBRATE_ONLY.format(root=str(ROOT), det=str(OCR_DET), folder=str(folder), pre=PREPROCESS, method=method)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = (float(v) for v in out.stdout.split()[-2:])
    return {
        "method": method,
        "step": "calibrate only",
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--methods", default="minmax,entropy")
    ap.add_argument("--calibrate-only", action="store_true", help="skip the whole-compile runs")
    args = ap.parse_args()
    if OCR_DET is None or not Path(OCR_DET).exists():
        print("skipped: rapidocr_onnxruntime models not installed")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-calib-mem-"))
    folder = work / "pages"
    started = time.perf_counter()
    render(folder, args.samples)
    print(f"rendered {args.samples} pages in {time.perf_counter() - started:.0f} s")
    rows = [calibrate_only_peak(folder, method) for method in args.methods.split(",")]
    for row in rows:
        print(
            f"calibrate only, {row['method']}: peak RSS {row['peak_rss_mb']:.0f} MB (process before calibrating "
            f"{row['rss_before_mb']:.0f} MB), {row['seconds']:.0f} s"
        )
    if not args.calibrate_only:
        rows += [compile_peak(folder, method, work) for method in args.methods.split(",")]
    data_mb = args.samples * 3 * 640 * 640 * 4 / 2**20
    print(f"\nPP-OCRv4 det 640x640, {args.samples} calibration images (as float32 they would take {data_mb:.0f} MB)")
    print(f"{'step':<16}{'method':<10}{'exit':>6}{'peak RSS MB':>14}{'seconds':>10}")
    for row in rows:
        print(
            f"{row.get('step', 'whole compile'):<16}{row['method']:<10}{row.get('exit', 0):>6}{row['peak_rss_mb']:>14.1f}{row['seconds']:>10.1f}"
        )
        if row.get("exit", 0) != 0:
            print("   " + " | ".join(row["stderr_tail"]))
    out = ROOT / "benchmarks" / "results" / "bench_calib_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "samples": args.samples,
                "rows": rows,
                "self_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
