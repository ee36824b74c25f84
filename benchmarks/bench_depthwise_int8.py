"""Depthwise convolutions in int8 against fp32 on ONNX Runtime's CPU EP: why int8 does not speed up PP-LCNet.

    python benchmarks/bench_depthwise_int8.py [--rounds 9] [--out benchmarks/results/depthwise_int8]

Each case is one depthwise Conv (per-channel int8 weights, u8 activations as a QDQ model, the form Lepton ships for
cpu-avx) and the same Conv in fp32, at the shapes PP-OCR's direction classifier and detector run them (5x5 kernels
on 2-3-row text-line maps, 3x3 on page maps). A QDQ model of one conv also pays a Q, a DQ and the NHWC layout
transposes ORT inserts around its QLinearConv; inside a network those are shared, so the table also holds the
in-network kernel times of ppocr_cls from ORT's profiler where the corpus is fetched (``--cls-int8``: a compiled
model to profile against the source). 1 thread, the two models interleaved round by round, median of ``--rounds``.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from md_table import markdown_table  # noqa: E402

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


def interleaved(sessions: list[ort.InferenceSession], feed: dict, rounds: int, runs: int = 200) -> list[float]:
    """Median microseconds per run of each session, the sessions taking turns each round."""
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for k, s in enumerate(sessions):
            start = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            times[k].append((time.perf_counter() - start) / runs * 1e6)
    return [float(np.median(t)) for t in times]


def kernel_times(model: str, feed: dict, runs: int = 300) -> dict[str, tuple[str, float]]:
    """Per node of ORT's optimised graph: (op, microseconds per run) from its profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "bench_depthwise_profile")
    options.log_severity_level = 3
    s = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, feed)
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    out: dict[str, tuple[str, float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            op, total = out.get(name, (e["args"]["op_name"], 0.0))
            out[name] = (op, total + e["dur"] / runs)
    return out


def network_rows(source: str, compiled: str, calib: str) -> list[list]:
    """ppocr_cls's conv kernels per op type in both graphs (fp32 NCHWc Conv vs int8 NHWC QLinearConv)."""
    with np.load(calib) as npz:
        feed = {"x": npz["x"][:1]}
    rows = []
    for label, path in (("source fp32", source), ("compiled int8", compiled)):
        by_op: dict[str, float] = {}
        for op, us in kernel_times(path, feed).values():
            by_op[op] = by_op.get(op, 0.0) + us
        total = sum(by_op.values())
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:4]
        rows.append([label, f"{total:.0f}", ", ".join(f"{op} {us:.0f}" for op, us in top)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cls-source", help="ppocr_cls.onnx (the corpus's) for the in-network profile")
    parser.add_argument("--cls-int8", help="its cpu-avx compile (compile_child --save-model)")
    parser.add_argument("--cls-calib", help="its calibration .npz (one line is profiled)")
    parser.add_argument("--out", default="benchmarks/results/depthwise_int8")
    args = parser.parse_args()
    rows = []
    for channels, height, width, kernel, stride, where in CASES:
        x = np.random.default_rng(1).normal(size=(1, channels, height, width)).astype(np.float32)
        fp32, int8 = interleaved(
            [session(depthwise(channels, height, width, kernel, stride, q)) for q in (False, True)],
            {"x": x},
            args.rounds,
        )
        rows.append(
            [f"{channels}x{height}x{width}", f"{kernel}x{kernel}/{stride}", where, f"{fp32:.1f}", f"{int8:.1f}"]
        )
        rows[-1].append(f"{int8 / fp32:.2f}")
        print(" | ".join(rows[-1]), flush=True)
    header = ["input C×H×W", "kernel/stride", "where", "fp32 µs", "int8 QDQ µs", "int8 / fp32"]
    lines = [f"ONNX Runtime {ort.__version__}, {platform.processor() or platform.machine()}, 1 thread", ""]
    lines += markdown_table(header, rows)
    doc = {"onnxruntime": ort.__version__, "rounds": args.rounds, "header": header, "rows": rows}
    if args.cls_source and args.cls_int8 and args.cls_calib:
        network = network_rows(args.cls_source, args.cls_int8, args.cls_calib)
        lines += ["", *markdown_table(["ppocr_cls 1x3x48x192", "kernel µs per run", "largest op types (µs)"], network)]
        doc["network"] = network
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
