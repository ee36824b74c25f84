"""The yardstick: every corpus model × lossy target, Lepton beside ONNX Runtime's and NNCF's quantizers.

    python benchmarks/bench_corpus.py [--models digits ddddocr_common] [--targets cpu-avx cuda]
                                      [--tools lepton ort nncf nncf-ac] [--out benchmarks/results/corpus_yardstick]
    python benchmarks/bench_corpus.py --render run1.json run2.json --out benchmarks/results/corpus_yardstick

For each model: the task metric on held-out real data (benchmarks/corpus/metrics.py) for fp32 and
for each candidate, latency ratio to fp32 (interleaved runs, 1 thread and all threads, ONNX Runtime
CPU), size ratio, share of MACs in int8 nodes, compile time, peak RSS and exit code. Every tool
gets the same calibration .npz and none sees the evaluation set; NNCF's accuracy control validates
on the calibration set at the target's budget. Peer tools run in their own venvs in the corpus
cache, never in Lepton's environment. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.corpus.data import charset  # noqa: E402
from benchmarks.corpus.manifest import MODELS, REPO, CorpusModel, by_name  # noqa: E402
from benchmarks.corpus.metrics import AGAINST_SOURCE, BANDED, METRICS  # noqa: E402
from benchmarks.corpus.peers import peer_command  # noqa: E402
from benchmarks.corpus.runner import compiled_outputs, feeds, run_all, session  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model, without_labels  # noqa: E402
from benchmarks.corpus.sweep import TARGETS, run_compile, wait_with_peak_rss  # noqa: E402
from lepton_cli.evaluate.costmodel import MAC_OPS, int8_mac  # noqa: E402
from lepton_cli.model.sessions import model_random_feed  # noqa: E402
from lepton_cli.model.stats import node_macs  # noqa: E402

TOOLS = ["lepton", "ort", "nncf", "nncf-ac"]
BUDGET_PCT = 1.0  # every builtin target's max_accuracy_drop_pct; NNCF's accuracy control gets the same


def run_peer(tool: str, model_path: Path, calib: Path, out: Path, timeout: float) -> dict:
    args = peer_command(tool, model_path, calib, out)
    if tool == "nncf-ac":
        args += [str(calib), str(BUDGET_PCT)]
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        code, peak_mb = wait_with_peak_rss(proc, timeout)
        seconds = time.perf_counter() - start
        log.seek(0)
        lines = [line for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return {
        "code": code,
        "compile_s": round(seconds, 1),
        "peak_rss_mb": round(peak_mb, 1) if peak_mb is not None else None,
        "message": "" if code == 0 else (lines[-1][:2000] if lines else ""),  # the exit-3 line; tables cut it
    }


def _bound(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy with the corpus shapes written into the inputs and shapes inferred (for MAC counting)."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    for value in bound.graph.input:
        dims = shapes.get(value.name)
        if dims is not None and value.type.tensor_type.HasField("shape"):
            for dim, size in zip(value.type.tensor_type.shape.dim, dims):
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    continue  # a compiled model's own static dims: layout_transform made edge-arm's input NHWC
                dim.Clear()
                dim.dim_value = size
    del bound.graph.value_info[:]  # exporters' symbolic dims there would survive inference
    return onnx.shape_inference.infer_shapes(bound)


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
            ]
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def int8_mac_share(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> float | None:
    """Share (%) of MACs in integer nodes or in QDQ-wrapped Conv/Gemm/MatMul (both operands dequantized int8)."""
    try:
        int8, total = mac_counts(model, input_shapes)
    except Exception:  # a model shape inference rejects: no MAC count, not a failed row
        return None
    return None if total == 0 else round(100.0 * int8 / total, 1)


def _run_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int | None]]:
    """Shapes of ``names`` from one run on a random feed of the bound input shapes: ONNX inference stops at shape
    arithmetic of old opsets (ddddocr's Mul-7 of two Gathers before its LSTM) and at contrib ops."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    feed = model_random_feed(copy, np.random.default_rng(0))
    sess = session(copy.SerializeToString(), 1)
    wanted = [o.name for o in sess.get_outputs()]
    return {name: list(value.shape) for name, value in zip(wanted, sess.run(wanted, feed)) if name in names}


def mac_counts(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> tuple[int, int]:
    """(MACs in int8 nodes, all MACs) with the corpus shapes bound where the model leaves a dim open."""
    bound = _bound(model, input_shapes)
    shapes = _shape_map(bound)
    unknown = [n for n in bound.graph.node if n.op_type in MAC_OPS and node_macs(n, shapes) is None]
    if unknown:
        shapes |= _run_shapes(bound, sorted({t for n in unknown for t in [*n.input[:3], *n.output[:1]] if t}))
    producers = {out: node.op_type for node in bound.graph.node for out in node.output}
    total = int8 = 0
    for node in bound.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        macs = node_macs(node, shapes) or 0
        total += macs
        int8 += macs if int8_mac(node, producers) else 0
    return int8, total


def _latency_ratio(
    fp32: bytes, candidate: bytes, fp32_feed: dict, candidate_feed: dict, threads: int, seconds: float
) -> float:
    """Median candidate time / median fp32 time over interleaved single runs."""
    sessions = [session(fp32, threads, timed=True), session(candidate, threads, timed=True)]
    runs = [[], []]
    for sess, feed in zip(sessions, (fp32_feed, candidate_feed)):
        sess.run(None, feed)  # warm-up
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(runs[0]) < 5:
        for index, (sess, feed) in enumerate(zip(sessions, (fp32_feed, candidate_feed))):
            start = time.perf_counter()
            sess.run(None, feed)
            runs[index].append(time.perf_counter() - start)
        if len(runs[0]) >= 200:
            break
    return round(statistics.median(runs[1]) / statistics.median(runs[0]), 3)


def score_candidate(
    model: CorpusModel, fp32: bytes, candidate: bytes, evaluation: dict, reference: list, chars, bench_seconds: float
) -> dict:
    fp32_feeds = feeds(session(fp32), evaluation)
    outputs, feed = compiled_outputs(candidate, fp32_feeds)
    value = METRICS[model.metric](model, evaluation, reference, outputs, chars)
    banded, against_source = BANDED.get(model.metric), AGAINST_SOURCE.get(model.metric)
    return {
        "value": round(value, 3),
        **({"value_banded": round(banded(model, evaluation, reference, outputs, chars), 3)} if banded else {}),
        **(
            {"value_vs_source": round(against_source(model, evaluation, reference, outputs, chars), 3)}
            if against_source
            else {}
        ),
        "latency_ratio_1t": _latency_ratio(fp32, candidate, fp32_feeds[0], feed, 1, bench_seconds),
        "latency_ratio_all": _latency_ratio(fp32, candidate, fp32_feeds[0], feed, os.cpu_count() or 1, bench_seconds),
        "size_ratio": round(len(candidate) / len(fp32), 3),
        "int8_mac_pct": int8_mac_share(onnx.load_from_string(candidate), model.input_shapes),
    }


def bench_model(
    model: CorpusModel,
    targets: list[str],
    tools: list[str],
    work: Path,
    timeout: float,
    bench_seconds: float,
    lepton_args: list[str] | None = None,
) -> list[dict]:
    path = ensure_model(model)
    calib, evaluation_path = ensure_data(model)
    calib_inputs = without_labels(calib, work / f"{model.name}-calib.npz")
    evaluation = dict(np.load(evaluation_path, allow_pickle=False))
    fp32 = path.read_bytes()
    reference = run_all(session(fp32), evaluation)
    chars = charset(model, path) if model.metric == "char_accuracy" else None
    fp32_value = round(METRICS[model.metric](model, evaluation, reference, reference, chars), 3)
    base = {"model": model.name, "metric": model.metric, "fp32_value": fp32_value}
    rows = []
    jobs = [("lepton", t) for t in targets if "lepton" in tools] + [
        (t, "cpu int8 (QDQ)") for t in tools if t != "lepton"
    ]
    for tool, target in jobs:
        out = work / f"{model.name}-{tool}-{Path(target.split()[0]).stem}.onnx"
        if tool == "lepton":
            run = run_compile(model, target, out.with_suffix(""), timeout=timeout, save_model=out, extra=lepton_args)
            row = {
                "code": run.code,
                "compile_s": run.seconds,
                "peak_rss_mb": run.peak_rss_mb,
                "message": "" if run.code == 0 else run.message,
                **device_facts(out.with_suffix("")),
            }
        else:
            row = run_peer(tool, path, calib_inputs, out, timeout)
        row = {**base, "tool": tool, "target": target, **row}
        if row["code"] == 0 and out.is_file():
            try:
                row.update(score_candidate(model, fp32, out.read_bytes(), evaluation, reference, chars, bench_seconds))
            except (
                Exception
            ) as exc:  # a candidate that compiled but cannot run is a result, not a crash of the benchmark
                row["message"] = f"scoring failed: {exc.__class__.__name__}: {str(exc)[:200]}"
        print(_line(row), flush=True)
        rows.append(row)
    return rows


def device_facts(out_dir: Path) -> dict:
    """What the compile's report says leaves the accelerator: ops the quantized model runs in float or the target
    lacks (``host_ops``), and for a tpu ``.tflite`` how many of its ops the Edge TPU check maps (``edgetpu_ops``)."""
    reports = sorted(out_dir.glob("*.lepton/report.json"))
    if not reports:
        return {}
    report = json.loads(reports[0].read_text())
    quantize = next((s for s in report.get("pipeline", []) if s.get("name") == "quantize"), None)
    facts = {} if quantize is None else {"host_ops": len(quantize.get("summary", {}).get("float_ops", []))}
    tflite = report.get("device", {}).get("tflite", {})
    if tflite.get("edgetpu"):
        facts["edgetpu_ops"] = f"{tflite['edgetpu']['edgetpu_ops']}/{tflite['edgetpu']['ops']}"
    elif tflite:
        facts["edgetpu_ops"] = "no .tflite: " + str(tflite.get("reason", ""))[:80]
    return facts


def _fmt(value, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def _line(row: dict) -> str:
    return (
        f"{row['model']:<18} {row['tool']:<8} {row['target']:<15} exit {row['code']:<3} {row['metric']} "
        f"{row['fp32_value']:.2f} -> {_fmt(row.get('value'), '.2f')}  lat {_fmt(row.get('latency_ratio_1t'))}/{_fmt(row.get('latency_ratio_all'))} "
        + (f"vs source {row['value_vs_source']:.2f}  " if "value_vs_source" in row else "")
        + f"size {_fmt(row.get('size_ratio'))} int8 {_fmt(row.get('int8_mac_pct'))}%  {row['compile_s']}s {row['peak_rss_mb']} MB "
        + (f"host ops {row['host_ops']} " if "host_ops" in row else "")
        + (f"Edge TPU {row['edgetpu_ops']} " if "edgetpu_ops" in row else "")
        + row["message"][:120]
    )


def markdown(rows: list[dict], command: str) -> str:
    head = (
        "| model | tool | target | exit | metric | fp32 | result | Δ | vs source | latency ×fp32 (1 thread) "
        "| latency ×fp32 (all threads) | size ×fp32 | int8 MACs % | host ops | Edge TPU ops | compile s | peak RSS MB "
        "| message |"
    )
    lines = [f"Command: `{command}`", "", head, "|" + "---|" * 18]
    for r in rows:
        delta = None if r.get("value") is None else round(r["value"] - r["fp32_value"], 2)
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['target']} | {r['code']} | {r['metric']} | {r['fp32_value']:.2f} | "
            f"{_fmt(r.get('value'), '.2f')} | {_fmt(delta)} | {_fmt(r.get('value_vs_source'), '.2f')} | "
            f"{_fmt(r.get('latency_ratio_1t'))} | {_fmt(r.get('latency_ratio_all'))} | "
            f"{_fmt(r.get('size_ratio'))} | {_fmt(r.get('int8_mac_pct'))} | {_fmt(r.get('host_ops'))} | "
            f"{_fmt(r.get('edgetpu_ops'))} | {r['compile_s']} | {_fmt(r['peak_rss_mb'])} | "
            f"{r['message'].replace('|', '/')[:160]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="corpus model names (default: all but the op-level pt_* models)")
    parser.add_argument(
        "--targets", nargs="*", default=TARGETS, help="builtin target names or target TOML files (extends = ...)"
    )
    parser.add_argument("--tools", nargs="*", default=TOOLS, choices=TOOLS)
    parser.add_argument("--max-accuracy-drop", type=float, help="Lepton's budget in points (default: the target's)")
    parser.add_argument(
        "--eval-metric", help="Lepton's --eval-metric (e.g. detection@0.1, the application's threshold)"
    )
    parser.add_argument(
        "--eval-count",
        type=int,
        help="held-out samples per model (default: the manifest's); more resolve smaller differences between tools",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="per compile/quantization, seconds")
    parser.add_argument("--bench-seconds", type=float, default=2.0, help="interleaved timing per thread setting")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "corpus_yardstick")
    parser.add_argument(
        "--render",
        nargs="+",
        type=Path,
        help="combine earlier runs' JSON into OUT (a later row for a pair replaces one)",
    )
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.out)
        return 0
    models = [by_name(n) for n in args.models] if args.models else [m for m in MODELS if not m.name.startswith("pt_")]
    if args.eval_count:  # the builders are seeded: a larger set starts with the manifest's samples
        models = [dataclasses.replace(m, eval_count=args.eval_count) for m in models]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lepton-yardstick-") as tmp:
        for model in models:
            budget = [] if args.max_accuracy_drop is None else ["--max-accuracy-drop", str(args.max_accuracy_drop)]
            budget += [] if args.eval_metric is None else ["--eval-metric", args.eval_metric]
            rows += bench_model(model, args.targets, args.tools, Path(tmp), args.timeout, args.bench_seconds, budget)
            _write(args.out, rows, argv)
    return 0


def render(runs: list[Path], out: Path) -> None:
    """One table from several runs: each (model, tool, target) row from the last run that has it, with the commands."""
    rows: dict[tuple[str, str, str], dict] = {}
    commands = []
    for path in runs:
        run = json.loads(path.read_text())
        commands += run["commands"] if "commands" in run else [run["command"]]  # a rendered file lists its runs'
        rows |= {(r["model"], r["tool"], r["target"]): r for r in run["rows"]}
    out.with_suffix(".json").write_text(
        json.dumps({"commands": commands, "rows": list(rows.values())}, indent=1) + "\n"
    )
    text = pivot(list(rows.values())) + "\n" + markdown(list(rows.values()), "; ".join(commands))
    out.with_suffix(".md").write_text(text, encoding="utf-8")


def pivot(rows: list[dict]) -> str:
    """Held-out Δ (points) and 1-thread latency ×fp32 per model × tool/target; "exit N" where nothing was made."""
    columns = sorted({(r["tool"], r["target"]) for r in rows}, key=lambda c: (c[0] != "lepton", c))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cells = {(r["model"], r["tool"], r["target"]): r for r in rows}
    names = [f"{tool} {Path(target).stem if target.endswith('.toml') else target}" for tool, target in columns]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in models:
        line = []
        for tool, target in columns:
            r = cells.get((model, tool, target))
            if r is None:
                line.append("")
            elif r.get("value") is None:
                line.append(f"exit {r['code']}")
            else:
                line.append(f"{r['value'] - r['fp32_value']:+.2f} ({_fmt(r.get('latency_ratio_1t'), '.2f')}x)")
        lines.append(f"| {model} | " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, rows: list[dict], argv: list[str] | None) -> None:
    command = "python benchmarks/bench_corpus.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "host_cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n"
    )
    out.with_suffix(".md").write_text(markdown(rows, command), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
