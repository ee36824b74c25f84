"""fp16 vs fp32 latency on ONNX Runtime's CUDA execution provider, and the variant runtime_select picks there.

Needs onnxruntime-gpu and an NVIDIA GPU; without them it prints why it skipped and exits 0 (``make bench``
runs every script). ``--provider CPUExecutionProvider`` runs the same comparison on the CPU, to check the
script itself (ORT's CPU EP lacks most fp16 kernels, so fp16 there is expected to be slower).

fp16 conversion: ``onnxruntime.transformers.float16.convert_float_to_float16`` (keep_io_types: fp32 I/O,
as the cuda target's quantize pass produces). Timing: sessions created once, warm-up runs, then
rounds alternating fp32 / fp16 (A/B interleaved so clock and thermal drift hit both); the table gives
p50/p90 per precision, the fp32/fp16 speed ratio and fp16's max abs error against fp32.

    .venv/bin/python benchmarks/bench_cuda_precision.py [--model PATH] [--shape 1,3,640,640] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lepton_cli.host.detect import detect_host  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs  # noqa: E402
from lepton_cli.runtime.select import select_session  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def default_model() -> tuple[Path, str]:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec and spec.origin:
        det = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
        if det.exists():
            return det, "1,3,640,640"
    return Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx", ""


def session(blob: bytes, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        blob, sess_options=options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    )


def timed(sess: ort.InferenceSession, feed: dict, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_path, shape = default_model()
    parser.add_argument("--model", type=Path, default=model_path)
    parser.add_argument("--shape", default=shape, help="bind the first input's dims, e.g. 1,3,640,640")
    parser.add_argument("--provider", default="CUDAExecutionProvider")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs-per-round", type=int, default=5)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / "cuda_precision.json"
    host = detect_host()
    if args.provider not in host.providers or (args.provider != "CPUExecutionProvider" and not host.gpus):
        why = (
            f"skipped: {args.provider} not in this onnxruntime ({', '.join(host.providers)})"
            if args.provider not in host.providers
            else "skipped: no GPU visible (nvidia-smi / ORT device list)"
        )
        print(why)
        result_file.write_text(json.dumps({"skipped": why, "host": host.to_dict()}, indent=2))
        return 0

    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(args.model)
    first = graph_inputs(model)[0]  # initializers listed as inputs (old opsets) are not feeds
    if args.shape:
        model = bind_input_shapes(model, {first.name: [int(d) for d in args.shape.split(",")]})
    dims = [d if isinstance(d, int) else 1 for d in graph_inputs(model)[0].dims]
    fp32 = model.SerializeToString()
    fp16 = convert_float_to_float16(model, keep_io_types=True).SerializeToString()
    feed = {first.name: np.random.default_rng(0).uniform(-1, 1, size=dims).astype(np.float32)}
    sessions = {"fp32": session(fp32, args.provider), "fp16": session(fp16, args.provider)}
    used = {k: s.get_providers()[0] for k, s in sessions.items()}
    ref = sessions["fp32"].run(None, feed)[0]
    err = float(np.max(np.abs(sessions["fp16"].run(None, feed)[0].astype(np.float64) - ref)))
    for s in sessions.values():
        timed(s, feed, 5)  # warm-up: cuDNN algorithm search, allocator growth
    times: dict[str, list[float]] = {"fp32": [], "fp16": []}
    for _ in range(args.rounds):
        for name in ("fp32", "fp16"):
            times[name] += timed(sessions[name], feed, args.runs_per_round)

    # What the device-side choice does on this host with a cuda-style two-variant bundle.
    manifest = {
        "execution_providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "variants": [
            {
                "name": "fp16",
                "path": "model.onnx",
                "precision": "fp16",
                "requires_providers": ["CUDAExecutionProvider|TensorrtExecutionProvider"],
            },
            {"name": "fp32", "path": "variants/fp32.onnx", "precision": "fp32"},
        ],
    }
    chosen = select_session({"model.onnx": fp16, "variants/fp32.onnx": fp32}, manifest, host=host)

    rows = {}
    print(
        f"model {args.model.name} {dims} on {args.provider} ({', '.join(g.name for g in host.gpus) or host.cpu_model}), "
        f"ORT {ort.__version__}, {len(times['fp32'])} runs each, interleaved"
    )
    print(f"{'precision':<10}{'EP used':<26}{'p50 ms':>10}{'p90 ms':>10}")
    for name, values in times.items():
        p50, p90 = np.percentile(values, [50, 90])
        rows[name] = {"p50_ms": p50, "p90_ms": p90, "runs": len(values), "provider": used[name]}
        print(f"{name:<10}{used[name]:<26}{p50:>10.3f}{p90:>10.3f}")
    ratio = rows["fp32"]["p50_ms"] / rows["fp16"]["p50_ms"]
    print(f"fp16 speed-up (fp32 p50 / fp16 p50): {ratio:.2f}x   fp16 max abs error vs fp32: {err:.3g}")
    print(f"runtime_select chose: {chosen.variant.name} on {', '.join(chosen.providers)}")
    result_file.write_text(
        json.dumps(
            {
                "model": str(args.model),
                "shape": dims,
                "provider": args.provider,
                "ort": ort.__version__,
                "gpus": [g.name for g in host.gpus],
                "rows": rows,
                "speedup_fp16": ratio,
                "fp16_max_abs_error": err,
                "runtime_select": chosen.to_dict(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
