"""Does the compile's accuracy gate see what held-out labelled data sees? digits on each lossy target.

    python benchmarks/bench_gate_resolution.py [--targets cpu-avx edge-arm] [--label after]
                                               [--out benchmarks/results/gate_resolution]

Each target: ``lepton compile examples/digits/digits_cnn.onnx --calib examples/digits/calib.npz`` (the default
path: no --eval) in a child process, then the compiled model scored against the source on eval.npz (397
labelled images, never seen by the compile): top-1 drop against the labels and top-1 agreement. Beside them, what
the calibration data itself can tell: agreement on the 50 held-out samples (the old gate), on all 200, and the
probability mass moved (mean total-variation distance of the softmaxes, points). The report's gate numbers
(drop, basis, resolution) come from the bundle's report.json. Writes OUT.json and updates OUT.md's section LABEL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.evaluate.accuracy import Evaluator  # noqa: E402
from lepton_cli.model.io_contract import adapt_feed, restore_output  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.samples.sample_set import load_samples  # noqa: E402

DIGITS = REPO / "examples" / "digits"
TARGETS = ["cpu-avx", "edge-arm", "fpga", "mobile", "tpu"]
BUDGET_PCT = 1.0  # every builtin target's max_accuracy_drop_pct


def compile_digits(target: str, work: Path) -> tuple[int, dict, bytes | None, str]:
    out, saved = work / target, work / f"{target}.onnx"
    argv = [sys.executable, "-m", "benchmarks.corpus.compile_child", "--save-model", str(saved), "--"]
    argv += [str(DIGITS / "digits_cnn.onnx"), "--target", target, "-o", str(out), "--calib"]
    argv += [str(DIGITS / "calib.npz"), "--quiet", "--no-bench"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    reports = sorted(out.rglob("report.json")) if out.exists() else []
    report = json.loads(reports[0].read_text()) if reports else {}
    model = saved.read_bytes() if saved.exists() else None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, report, model, lines[-1] if lines else ""


def _probs(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def first_outputs(model: onnx.ModelProto, samples) -> np.ndarray:
    sess = make_session(model)
    name = sess.get_outputs()[0].name
    return np.concatenate(
        [restore_output(model, name, sess.run(None, adapt_feed(model, f))[0]) for f in samples.feeds()]
    )


def calib_bases(source: onnx.ModelProto, candidate: onnx.ModelProto, calib) -> dict:
    """What --calib alone shows: agreement drop on the held-out quarter and on all, and the mass moved."""
    from lepton_cli.pipeline.context import HOLDOUT_FRACTION

    ref, got = first_outputs(source, calib), first_outputs(candidate, calib)
    flips = np.argmax(ref, 1) != np.argmax(got, 1)
    _, held = calib.split(HOLDOUT_FRACTION, 0)
    order = np.random.default_rng(0).permutation(len(calib))
    held_idx = np.sort(order[len(calib) - len(held) :])
    moved = 0.5 * np.abs(_probs(ref) - _probs(got)).sum(axis=1)
    return {
        "held_out_disagree_pct": round(100.0 * float(flips[held_idx].mean()), 2),
        "all_calib_disagree_pct": round(100.0 * float(flips.mean()), 2),
        "mass_moved_pct": round(100.0 * float(moved.mean()), 2),
    }


def measure(target: str, work: Path) -> dict:
    source = onnx.load(DIGITS / "digits_cnn.onnx")
    code, report, model_bytes, last = compile_digits(target, work)
    accuracy = report.get("accuracy", {}) or {}
    row = {
        "target": target,
        "exit": code,
        "gate_drop": accuracy.get("drop_pct"),
        "gate_data": accuracy.get("data"),
        "resolves_budget": accuracy.get("resolves_budget"),
        "resolution_pct": accuracy.get("resolution_pct"),
        "scored_samples": accuracy.get("samples"),
        "message": last[:160] if code else "",
    }
    if model_bytes is None:
        return row
    candidate = onnx.load_from_string(model_bytes)
    evaluation = load_samples(DIGITS / "eval.npz", source, role="--eval")
    labelled = Evaluator(source, evaluation, evaluation.labels).score(candidate)
    agreement = Evaluator(source, evaluation, None).score(candidate)
    calib = load_samples(DIGITS / "calib.npz", source)
    return row | {
        "eval_top1_source": labelled.source_value,
        "eval_top1": labelled.value,
        "eval_drop": round(labelled.drop_pct, 2),
        "eval_disagree_pct": round(agreement.drop_pct, 2),
        **calib_bases(source, candidate, calib),
    }


COLUMNS = [
    ("target", "target"),
    ("exit", "exit"),
    ("gate_drop", "gate drop"),
    ("resolves_budget", "resolves budget"),
    ("resolution_pct", "resolution"),
    ("scored_samples", "scored"),
    ("eval_drop", "eval top-1 drop"),
    ("eval_disagree_pct", "eval disagree %"),
    ("held_out_disagree_pct", "held-out 50 disagree %"),
    ("all_calib_disagree_pct", "all 200 disagree %"),
    ("mass_moved_pct", "mass moved %"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(key, "")) for key, _ in COLUMNS) + " |\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--label", default="current", help="section name in OUT.md/OUT.json (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gate_resolution")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lepton-gate-") as tmp:
        rows = []
        for target in args.targets:
            rows.append(measure(target, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    path = args.out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = rows
    path.write_text(json.dumps(results, indent=2) + "\n")
    md = ["# Gate resolution: digits, `--calib` only, budget 1 point\n", f"Command: `python {' '.join(sys.argv)}`\n"]
    for label, section_rows in results.items():
        md += [f"\n## {label}\n\n", table(section_rows)]
    args.out.with_suffix(".md").write_text("".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
