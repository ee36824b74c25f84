"""Probe (issue 16): what per-tensor power-of-two weights cost PP-OCRv4 rec on fpga, and what weight blocks win back.

The corpus's PP-OCRv4 rec, fused as the fpga target fuses it and pre-processed as the quantize pass sees it, is
quantized with fpga's arithmetic (symmetric int8 activations and per-tensor weights, power-of-two scales) for three
sets of op types, with and without ``passes/_quantize/weight_blocks.py`` (dense convs only, as in session 17, or on
through the depthwise convs), calibrated on the 48 corpus calibration lines a ``--calib``-only compile keeps. Scored as
the compile's gate scores (100 - character agreement with the source's decode) on the 16 lines it holds out and on the
corpus's 64 held-out lines, and by character accuracy against those lines' labels (``benchmarks/corpus/metrics.py``).

    LEPTON_CORPUS_DIR=... python benchmarks/probe_weight_blocks.py [--out benchmarks/results/weight_blocks_probe]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.passes._quantize import schemes  # noqa: E402
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate  # noqa: E402
from lepton_cli.passes._quantize.weight_blocks import split_weight_blocks  # noqa: E402

from benchmarks.corpus.data import charset  # noqa: E402
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.metrics import METRICS, decode_text  # noqa: E402
from benchmarks.corpus.runner import run_all, session  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.ocr_textset import char_accuracy  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import HOLDOUT_FRACTION, PassContext  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import load_samples  # noqa: E402

MATMULS = ("Conv", "MatMul", "Gemm")
HOST_ELEMENTWISE = MATMULS + ("Relu", "AveragePool", "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Flatten")
OP_SETS = {"Conv/MatMul/Gemm": MATMULS, "no Add/Mul/HardSigmoid (fpga's 2nd tier)": HOST_ELEMENTWISE, "every op": ()}


def fpga_input(name: str, work: Path) -> onnx.ModelProto:
    target = load_target("fpga")
    corpus = by_name(name)
    model, _ = upgrade_opset(onnx.load(ensure_model(corpus)), target.runtime.opset_min, target.runtime.opset_max)
    fuse = next(step for step in target.passes if step.name == "fuse")
    fused = get_pass("fuse").fn(bind_input_shapes(model, corpus.input_shapes), PassContext(target=target), fuse.params)
    return schemes.preprocess(fused.model, work)


def gate_split(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of the calibration lines, as a compile with ``--calib`` only splits them (seed 0)."""
    order = np.random.default_rng(0).permutation(len(lines))
    cut = max(1, int(round(len(lines) * (1 - HOLDOUT_FRACTION))))
    return lines[np.sort(order[:cut])], lines[np.sort(order[cut:])]


def measure(name: str, methods: list[str], op_sets: list[str], variants: list[str]) -> list[dict]:
    corpus = by_name(name)
    work = Path(tempfile.mkdtemp(prefix="blocks-"))
    calib_path, eval_path = ensure_data(corpus)
    kept, gate_lines = gate_split(np.load(calib_path)["x"])
    np.savez(work / "calib.npz", x=kept)
    evaluation = dict(np.load(eval_path))
    sets = {"gate's lines": {"x": gate_lines}, "held out": evaluation}
    source, chars = session(ensure_model(corpus).read_bytes()), charset(corpus, ensure_model(corpus))
    references = {key: run_all(source, data) for key, data in sets.items()}
    texts = {key: {"labels": np.array(decode_text(corpus, chars, ref))} for key, ref in references.items()}

    def score(model: onnx.ModelProto) -> dict:
        candidate = session(model.SerializeToString())
        outputs = {key: run_all(candidate, data) for key, data in sets.items()}
        drops = {
            f"drop vs source, {key}": round(
                100 - char_accuracy(decode_text(corpus, chars, got), [str(t) for t in texts[key]["labels"]]), 2
            )
            for key, got in outputs.items()
        }
        labels = METRICS[corpus.metric](corpus, evaluation, references["held out"], outputs["held out"], chars)
        return {**drops, "held-out characters": round(labels, 2)}

    plain = fpga_input(name, work)
    models = {"per tensor": plain} if "per tensor" in variants else {}
    for variant in [variant for variant in variants if variant != "per tensor"]:
        blocked, split = split_weight_blocks(plain, schemes.pow2_weight_scale, 16, variant == "depthwise")
        blocks = f"{sum(split.values())} in {len(split)} convs, {len(blocked.graph.node)} nodes"
        models[f"blocks, {variant} ({blocks})"] = blocked
    rows = [{"model": name, "weights": "float", "op types": "-", "method": "-", **score(plain)}]
    for label, model in models.items():
        samples = load_samples(work / "calib.npz", model)
        for method in methods:
            settings = CalibrationSettings(method=method, chunk=16, max_samples=64, power_of_two=True)
            ranges = schemes.save_ranges(calibrate(model, samples, settings, None), work / f"{len(rows)}.json")
            for ops_label in op_sets:
                scheme = schemes.Int8Scheme(
                    activation_type="s8",
                    per_channel=False,
                    activation_symmetric=True,
                    power_of_two=True,
                    op_types=OP_SETS[ops_label],
                )
                int8 = schemes.quantize_int8(model, ranges, method, scheme, [], work)
                rows.append({"model": name, "weights": label, "op types": ops_label, "method": method, **score(int8)})
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["ppocrv4_rec"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "weight_blocks_probe")
    parser.add_argument("--methods", nargs="*", default=["minmax", "percentile"])
    parser.add_argument("--op-sets", nargs="*", default=list(OP_SETS), choices=list(OP_SETS))
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["per tensor", "dense", "depthwise"],
        help="per tensor; dense: blocks on dense convs only (session 17); depthwise: on through depthwise convs",
    )
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in measure(name, args.methods, args.op_sets, args.variants)]
    args.out.with_suffix(".json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    header = list(rows[0])
    table = "\n".join(markdown_table(header, [[row[key] for key in header] for row in rows]))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
