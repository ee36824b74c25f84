"""PP-OCRv4 rec, int8 on cpu-avx: Lepton's quantize pass vs naive ONNX Runtime quantize_static.

Three rendered text-line sets (benchmarks/ocr_textset.py): calibration (seed 1, its own fonts and
words), tuning (seed 2: the --eval data Lepton's search scores on) and test (seed 3: only this
script looks at it; same fonts as tuning, different lines). For each model: character accuracy on
the test set (CTC greedy decode with the model's ``character`` table), size, and host latency
(ORT, all optimisations, interleaved runs, same thread count) as a ratio to fp32.

Candidates: fp32; ORT quantize_static as its docs suggest (QDQ, per-channel, U8S8, min/max) on the
raw model; the same after ``quant_pre_process``; percentile calibration after pre-processing;
Lepton's ``quantize`` pass with each ``--targets`` target's parameters (cpu-avx: U8S8, edge-arm: S8S8)
and ``--budget`` (exit 3 is reported, with what it tried); optionally again with a ``--relaxed`` budget.
Lepton's budget is character accuracy against the tuning lines' text (text labels, the issue's
metric); with ``--unlabelled``, as a user without a labelled set would run it: agreement with the
fp32 model's CTC decode (the model declares CTC via its ``character`` metadata). Agreement counts
every borderline character the int8 model flips, and flips cost accuracy both ways: on 200 lines
it stayed near 0.8 points whatever was kept in float, while accuracy against the text moved 0.1.

    .venv/bin/python benchmarks/bench_quantize_ocr.py [--calib 64 --tune 100 --test 200 --budget 0.5 --relaxed 2.5]
"""

from __future__ import annotations

import argparse
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
from conftest import OCR_REC  # noqa: E402
from lepton_cli.passes._quantize.calibration import SampleSetReader, quiet_ort  # noqa: E402

from lepton_cli.errors import QualityGateError  # noqa: E402
from lepton_cli.evaluate.accuracy import scoring_opt_level  # noqa: E402
from lepton_cli.evaluate.latency import Candidate, StopRule, host_latency  # noqa: E402
from lepton_cli.host.detect import detect_host  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import load_samples  # noqa: E402


def naive(model: onnx.ModelProto, calib, work: Path, *, pre: bool, method: str) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = work / f"naive-{pre}-{method}-in.onnx"
    onnx.save_model(model, src)
    if pre:
        quant_pre_process(str(src), str(src), skip_symbolic_shape=True)
    out = work / f"naive-{pre}-{method}.onnx"
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with quiet_ort():
        quantize_static(
            str(src),
            str(out),
            SampleSetReader(model, calib, 0, len(calib)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
        )
    return onnx.load(str(out))


def lepton(model: onnx.ModelProto, calib, tune, budget: float, target_name: str) -> tuple[onnx.ModelProto | None, dict]:
    target = load_target(target_name)
    step = next(s for s in target.passes if s.name == "quantize")
    spec = get_pass("quantize")
    ctx = PassContext(target=target, calib=calib, eval=tune, max_accuracy_drop=budget, host=detect_host())
    # Only the quantize pass runs here: as in a compile where the target's earlier lossy pass (edge-arm's
    # channel pruning, budget_share 0.5) spent nothing, its share carries over (PassContext.spent).
    ctx.spent(budget * (1 - step.params.budget_share), 0.0)
    started = time.perf_counter()
    try:
        result = spec.fn(onnx.ModelProto.FromString(model.SerializeToString()), ctx, step.params)
    except QualityGateError as exc:
        return None, {"exit": 3, "message": exc.message, "seconds": round(time.perf_counter() - started, 1)}
    summary = {k: v for k, v in result.summary.items() if k != "float_ops"}
    return result.model, {
        "exit": 0,
        "summary": summary,
        "seconds": round(time.perf_counter() - started, 1),
        "warnings": ctx.warnings,
    }


def char_acc(
    model: onnx.ModelProto, images: np.ndarray, texts: list[str], chars: list[str], opt_level: str = "all"
) -> float:
    session = make_session(model, opt_level=opt_level)
    probs = np.concatenate([session.run(None, {"x": images[i : i + 1]})[0] for i in range(len(images))])
    return textset.char_accuracy(textset.ctc_greedy(probs, chars), texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--tune", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--relaxed", type=float, default=None, help="also run Lepton with this budget")
    ap.add_argument("--targets", default="cpu-avx,edge-arm", help="comma-separated Lepton targets to quantize for")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-percentile", action="store_true")
    ap.add_argument("--unlabelled", action="store_true", help="tune on agreement with the fp32 model, not the text")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    source = onnx.load(OCR_REC)
    chars = textset.charset(source)
    model, _ = upgrade_opset(source, 13, 21)  # the opset fix quantize_static needs (per-axis QDQ)
    model = bind_input_shapes(model, {"x": [1, 3, 48, 320]})
    sets = {}
    for role, count, seed, kind in (
        ("calib", args.calib, 1, "calib"),
        ("tune", args.tune, 2, "eval"),
        ("test", args.test, 3, "eval"),
    ):
        images, texts = textset.make_set(count, seed, kind)
        labelled = role == "tune" and not args.unlabelled
        np.savez(work / f"{role}.npz", x=images, **({"labels": np.array(texts)} if labelled else {}))
        sets[role] = (images, texts)
    calib = load_samples(work / "calib.npz", model)
    tune = load_samples(work / "tune.npz", model, role="--eval")

    models: dict[str, onnx.ModelProto] = {"fp32": model}
    info: dict[str, dict] = {}
    t = time.perf_counter()
    models["ort naive (no pre-process)"] = naive(model, calib, work, pre=False, method="minmax")
    models["ort + quant_pre_process"] = naive(model, calib, work, pre=True, method="minmax")
    if not args.skip_percentile:
        models["ort + pre-process, percentile"] = naive(model, calib, work, pre=True, method="percentile")
    info["naive_seconds"] = round(time.perf_counter() - t, 1)
    for target_name, budget in [
        (t, b)
        for t in args.targets.split(",")
        for b in [args.budget] + ([args.relaxed] if args.relaxed is not None else [])
    ]:
        label = f"lepton {target_name} (budget {budget:g})"
        built, detail = lepton(model, calib, tune, budget, target_name)
        info[label] = detail
        if built is not None:
            models[label] = built
        else:
            print(f"{label}: exit 3 after {detail['seconds']} s: {detail['message']}", file=sys.stderr)

    images, texts = sets["test"]
    rows = {}
    host_isa = list(detect_host().pass_context().get("isa") or [])
    for label, m in models.items():
        # Accuracy as the model's target computes it: on an x86 host without VNNI the int8 kernels
        # saturate where the target's do not, so int8 models are scored unfused (exact integer arithmetic).
        # ORT's naive models are U8S8 for a cpu-avx (VNNI) deployment.
        target_name = label.split()[1] if label.startswith("lepton ") else "cpu-avx"
        level = "all" if label == "fp32" else scoring_opt_level(list(load_target(target_name).hardware.isa), host_isa)
        rows[label] = {
            "char_acc": round(char_acc(m, images, texts, chars, level), 2),
            "size_bytes": m.ByteSize(),
            "scored_opt_level": level,
        }
    feeds = [{"x": images[i : i + 1]} for i in range(8)]
    timing = host_latency(
        [Candidate(label, m, feeds) for label, m in models.items()],
        StopRule(runs=40, seconds=20.0, min_runs=10, warmup=3),
        threads=args.threads,
        providers=["CPUExecutionProvider"],
        keep_samples=False,
    )
    base = rows["fp32"]
    print(f"\nPP-OCRv4 rec 48x320, test set {len(texts)} rendered lines, threads {args.threads}")
    print(f"{'model':<36} {'char acc':>8} {'drop':>6} {'size x':>7} {'p50 ms':>8} {'speed x':>8}")
    for label, row in rows.items():
        p50 = timing["models"][label]["p50_ms"]
        row |= {
            "drop": round(base["char_acc"] - row["char_acc"], 2),
            "size_ratio": round(row["size_bytes"] / base["size_bytes"], 3),
            "p50_ms": round(p50, 2),
            "speedup": round(timing["models"]["fp32"]["p50_ms"] / p50, 2),
        }
        print(
            f"{label:<36} {row['char_acc']:8.2f} {row['drop']:6.2f} {row['size_ratio']:7.3f} {p50:8.2f} {row['speedup']:8.2f}"
        )
    for label, detail in info.items():
        if isinstance(detail, dict) and detail.get("exit") == 3:
            print(f"{label:<36} exit 3 (nothing met the budget) — {detail['message'][:300]}")
    out = ROOT / "benchmarks" / "results" / "bench_quantize_ocr.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "rows": rows,
                "lepton": info,
                "latency_settings": timing["settings"],
                "host": detect_host().pass_context(),
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
