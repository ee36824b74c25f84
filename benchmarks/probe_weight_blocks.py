"""Probe (issue 16): what per-tensor power-of-two weights cost PP-OCRv4 rec on fpga, and what weight blocks win back.

The corpus's PP-OCRv4 rec, fused as the fpga target fuses it and pre-processed as the quantize pass sees it, is
quantized with fpga's arithmetic (symmetric int8 activations and per-tensor weights, power-of-two scales) for three
sets of op types, with and without ``passes/_quantize/weight_blocks.py``, and scored by character accuracy against the
held-out lines' labels (``benchmarks/corpus/metrics.py``); the calibration lines are the corpus's, disjoint.

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
from benchmarks.corpus.metrics import METRICS, _decode_text  # noqa: E402
from benchmarks.corpus.runner import run_all, session  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
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


def measure(name: str, methods: list[str], op_sets: list[str], blocks_only: bool, depthwise: bool) -> list[dict]:
    corpus = by_name(name)
    work = Path(tempfile.mkdtemp(prefix="blocks-"))
    calib_path, eval_path = ensure_data(corpus)
    evaluation = dict(np.load(eval_path))
    reference = run_all(session(ensure_model(corpus).read_bytes()), evaluation)
    chars = charset(corpus, ensure_model(corpus))
    np.savez(work / "calib.npz", x=np.load(calib_path)["x"])
    plain = fpga_input(name, work)
    blocked, split = split_weight_blocks(plain, schemes.pow2_weight_scale, 16, depthwise)

    source_text = {"labels": np.array(_decode_text(corpus, chars, reference))}

    def score(model: onnx.ModelProto, against: dict = evaluation) -> float:
        return METRICS[corpus.metric](
            corpus, against, reference, run_all(session(model.SerializeToString()), evaluation), chars
        )

    rows = [
        {
            "model": name,
            "weights": "float",
            "op types": "-",
            "method": "-",
            "char_accuracy": round(score(plain), 2),
            "agreement": round(score(plain, source_text), 2),
        },
        {
            "model": name,
            "weights": "float, blocks",
            "op types": "-",
            "method": "-",
            "char_accuracy": round(score(blocked), 2),
        },
    ]
    variants = [("per tensor", plain), (f"blocks ({sum(split.values())} in {len(split)} convs)", blocked)]
    for label, model in variants[1:] if blocks_only else variants:
        samples = load_samples(work / "calib.npz", model)
        for method in methods:
            settings = CalibrationSettings(method=method, chunk=16, max_samples=64, power_of_two=True)
            ranges = schemes.save_ranges(calibrate(model, samples, settings, None), work / f"{len(rows)}.json")
            for ops_label, ops in ((label, OP_SETS[label]) for label in op_sets):
                scheme = schemes.Int8Scheme(
                    activation_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True, op_types=ops
                )
                int8 = schemes.quantize_int8(model, ranges, method, scheme, [], work)
                rows.append(
                    {
                        "model": name,
                        "weights": label,
                        "op types": ops_label,
                        "method": method,
                        "char_accuracy": round(score(int8), 2),
                        "agreement": round(score(int8, source_text), 2),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["ppocrv4_rec"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "weight_blocks_probe")
    parser.add_argument("--methods", nargs="*", default=["minmax", "percentile"])
    parser.add_argument("--op-sets", nargs="*", default=list(OP_SETS), choices=list(OP_SETS))
    parser.add_argument("--blocks-only", action="store_true", help="skip the per-tensor rows")
    parser.add_argument("--no-depthwise", action="store_true", help="blocks on dense convs only (session 17)")
    args = parser.parse_args(argv)
    rows = [
        row
        for name in args.models
        for row in measure(name, args.methods, args.op_sets, args.blocks_only, not args.no_depthwise)
    ]
    args.out.with_suffix(".json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    header = list(rows[0])
    table = "\n".join(markdown_table(header, [[row[key] for key in header] for row in rows]))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
