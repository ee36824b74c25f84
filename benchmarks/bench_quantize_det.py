"""PP-OCRv4 det at 640x640, int8 on cpu-avx: latency vs fp32 and thresholded-map agreement (pixel F1).

Rendered text pages (benchmarks/ocr_textset.py): calibration pages (seed 1), tuning pages scored by
Lepton's search (seed 2), test pages only this script looks at (seed 3). Latency: ORT, all
optimisations, same thread count, interleaved runs. Lepton's pass runs with the cpu-avx target's
parameters and ``--budget`` in points of ``--eval-metric`` (default ``mask-f1@0.3``: pixel F1 of the
0.3-thresholded map, so 5 points = F1 >= 0.95 on the tuning pages).

    .venv/bin/python benchmarks/bench_quantize_det.py [--calib 16 --tune 8 --test 8 --budget 5 --metric mask-f1@0.3]
"""

from __future__ import annotations

import argparse
import json
import resource
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
from conftest import OCR_DET  # noqa: E402

from lepton_cli.errors import QualityGateError  # noqa: E402
from lepton_cli.evaluate.latency import Candidate, StopRule, host_latency  # noqa: E402
from lepton_cli.host.detect import detect_host  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import load_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--tune", type=int, default=8)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--metric", default="mask-f1@0.3")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-det-"))
    model, _ = upgrade_opset(onnx.load(OCR_DET), 13, 21)
    model = bind_input_shapes(model, {"x": [1, 3, 640, 640]})
    np.savez(work / "calib.npz", x=textset.make_pages(args.calib, 1, "calib"))
    np.savez(work / "tune.npz", x=textset.make_pages(args.tune, 2, "eval"))
    test = textset.make_pages(args.test, 3, "eval")
    target = load_target("cpu-avx")
    step = next(s for s in target.passes if s.name == "quantize")
    ctx = PassContext(
        target=target,
        calib=load_samples(work / "calib.npz", model),
        eval=load_samples(work / "tune.npz", model, role="--eval"),
        max_accuracy_drop=args.budget,
        eval_metric=args.metric,
        host=detect_host(),
    )
    started = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        result = get_pass("quantize").fn(onnx.ModelProto.FromString(model.SerializeToString()), ctx, step.params)
    except QualityGateError as exc:
        print(f"lepton: exit 3: {exc.message}")
        return
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: peak of the whole process
    # F1 as the target computes it: unfused (exact integer) where this host's int8 kernels saturate (accuracy.scoring_opt_level)
    ref_s, q_s = make_session(model, opt_level="all"), make_session(result.model, opt_level=ctx.scoring_opt_level)
    f1 = [
        textset.pixel_f1(ref_s.run(None, {"x": test[i : i + 1]})[0], q_s.run(None, {"x": test[i : i + 1]})[0])
        for i in range(len(test))
    ]
    feeds = [{"x": test[i : i + 1]} for i in range(min(4, len(test)))]
    timing = host_latency(
        [Candidate("fp32", model, feeds), Candidate("lepton", result.model, feeds)],
        StopRule(runs=30, seconds=30.0, min_runs=8, warmup=2),
        threads=args.threads,
        providers=["CPUExecutionProvider"],
        keep_samples=False,
    )
    p50 = {k: v["p50_ms"] for k, v in timing["models"].items()}
    row = {
        "pixel_f1_min": round(min(f1), 4),
        "pixel_f1_mean": round(float(np.mean(f1)), 4),
        "latency_ratio": round(p50["lepton"] / p50["fp32"], 3),
        "p50_ms": p50,
        "size_ratio": round(result.model.ByteSize() / model.ByteSize(), 3),
        "compile_seconds": round(seconds, 1),
        "peak_rss_mb_process": round(rss / 1024, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
        "method": result.summary.get("method"),
        "float_kept": len(result.summary.get("float_kept", [])),
        "drop_pct": result.summary.get("drop_pct"),
        "warnings": ctx.warnings,
    }
    print(json.dumps(row, indent=1))
    out = ROOT / "benchmarks" / "results" / "bench_quantize_det.json"
    out.write_text(json.dumps({"args": vars(args), "result": row, "latency": timing}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
