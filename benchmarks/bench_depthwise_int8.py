"""Depthwise convolutions in int8 against fp32 on ONNX Runtime's CPU EP: why int8 does not speed up PP-LCNet.

    python benchmarks/bench_depthwise_int8.py [--runs 1000] [--cls-source M --cls-int8 M --cls-calib C]
        [--out benchmarks/results/depthwise_int8]

Each case is one depthwise Conv (per-channel int8 weights, u8 activations as a QDQ model, the form Lepton ships for
cpu-avx) and the same Conv in fp32, at the shapes PP-OCR's direction classifier and detector run them (5x5 kernels
on 2-3-row text-line maps, 3x3 on page maps). A QDQ model of one conv also pays a Q, a DQ and the NHWC layout
transposes ORT inserts around its QLinearConv; inside a network those are shared, so the table also holds the
in-network kernel times of ppocr_cls from ORT's profiler (``profile_ops.profile``; ``--cls-int8``: a compiled model
to profile against the source). 1 thread, the two models in ABBA turns (``measure_interleaved``), median per run.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from md_table import markdown_table  # noqa: E402
from profile_ops import profile, render  # noqa: E402

from lepton_cli.evaluate.latency import StopRule, measure_interleaved  # noqa: E402

CASES = [  # (channels, height, width, kernel, stride, where it occurs)
    (200, 2, 96, 5, 1, "ppocr_cls last stage"),
    (88, 3, 96, 5, 1, "ppocr_cls stage 4"),
    (200, 2, 96, 3, 1, "the same map, 3x3"),
    (96, 12, 96, 3, 1, "ppocr_cls stage 2"),
    (64, 80, 80, 3, 1, "page map, 1/4 of 320"),
    (64, 80, 80, 5, 1, "page map, 5x5"),
    (32, 160, 160, 3, 2, "PP-OCRv4 det stem, stride 2"),
    (256, 20, 20, 3, 1, "page map, 1/16"),
]


def depthwise(channels: int, height: int, width: int, kernel: int, stride: int, int8: bool) -> bytes:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(channels, 1, kernel, kernel)).astype(np.float32)
    attrs = {"group": channels, "kernel_shape": [kernel, kernel], "pads": [kernel // 2] * 4, "strides": [stride] * 2}
    inits = [numpy_helper.from_array(np.zeros(channels, np.float32), "b")]
    if int8:
        w_scale = (np.abs(w).reshape(channels, -1).max(1) / 127).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_s"),
            numpy_helper.from_array(np.zeros(channels, np.int8), "w_z"),
            numpy_helper.from_array(np.array(0.02, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
            helper.make_node("Conv", ["x_dq", "w", "b"], ["y_f"], **attrs),
            helper.make_node("QuantizeLinear", ["y_f", "s", "z"], ["y_q"]),
            helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"]),
        ]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)]
    graph = helper.make_graph(
        nodes,
        "depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def session(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def medians_us(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int) -> dict[str, float]:
    """Median microseconds per run of each session, run in ABBA turns (``latency.measure_interleaved``)."""
    runners = {name: (lambda s: lambda _i: s.run(None, feed))(s) for name, s in sessions.items()}
    samples = measure_interleaved(runners, StopRule(runs=runs, seconds=60.0, min_runs=runs, warmup=20))
    return {name: float(np.median(seconds)) * 1e6 for name, seconds in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="timed runs of each model, taking turns")
    parser.add_argument("--cls-source", help="ppocr_cls.onnx (the corpus's) for the in-network profile")
    parser.add_argument("--cls-int8", help="its cpu-avx compile (compile_child --save-model)")
    parser.add_argument("--cls-calib", help="its calibration .npz (one line is profiled)")
    parser.add_argument("--out", default="benchmarks/results/depthwise_int8")
    args = parser.parse_args()
    rows = []
    for channels, height, width, kernel, stride, where in CASES:
        x = np.random.default_rng(1).normal(size=(1, channels, height, width)).astype(np.float32)
        shape = (channels, height, width, kernel, stride)
        sessions = {name: session(depthwise(*shape, name == "int8")) for name in ("fp32", "int8")}
        us = medians_us(sessions, {"x": x}, args.runs)
        case = [f"{channels}x{height}x{width}", f"{kernel}x{kernel}/{stride}", where]
        rows.append([*case, f"{us['fp32']:.1f}", f"{us['int8']:.1f}", f"{us['int8'] / us['fp32']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    header = ["input C×H×W", "kernel/stride", "where", "fp32 µs", "int8 QDQ µs", "int8 / fp32"]
    lines = [f"ONNX Runtime {ort.__version__}, {platform.processor() or platform.machine()}, 1 thread", ""]
    lines += markdown_table(header, rows)
    doc = {"onnxruntime": ort.__version__, "runs": args.runs, "header": header, "rows": rows}
    if args.cls_source and args.cls_int8 and args.cls_calib:
        network = profile([Path(args.cls_source), Path(args.cls_int8)], dict(np.load(args.cls_calib)), rounds=200)
        lines += ["", "ppocr_cls 1x3x48x192, ORT's profiler (`profile_ops.py`): kernel ms per run by op type", ""]
        lines += render(network).splitlines()
        doc["network"] = network
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
