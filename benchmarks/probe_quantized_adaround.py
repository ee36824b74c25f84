"""Probe (issue 16): an int8 model before and after its weights' rounding is refitted on the quantized model's own
inputs (``passes/_quantize/quantized_adaround.py``), scored by the corpus metric on the evaluation set (held out)
and on the calibration set (what the gate reads), against the same model with quantized bias correction.

    python -m benchmarks.corpus.compile_child --save-model INT8.onnx -- MODEL.onnx --target T --calib C \
        --input-shape ... -o OUT -q --no-bench --max-accuracy-drop 100
    python benchmarks/probe_quantized_adaround.py --model ppocrv5_rec --int8 INT8.onnx --float FLOAT.onnx \
        --out benchmarks/results/probe_quantized_adaround_ppocrv5_rec

T: a target that extends the one probed with ``tune = false`` (one method, every op it quantizes); FLOAT.onnx: the
same command with a target listing the passes before quantize only (the same node names).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.passes._quantize.quantized_adaround import refit_quantized_weights  # noqa: E402
from lepton_cli.passes._quantize.quantized_bias import correct_quantized_biases  # noqa: E402

from benchmarks.corpus.data import charset  # noqa: E402
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.metrics import METRICS  # noqa: E402
from benchmarks.corpus.runner import compiled_outputs, run_all, session  # noqa: E402
from benchmarks.corpus.runner import feeds as sample_feeds  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--int8", required=True)
    parser.add_argument("--float", required=True, dest="reference")
    parser.add_argument("--samples", type=int, nargs="*", default=[16])
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--float-share", type=float, nargs="*", default=[0.0])
    parser.add_argument("--out", default="benchmarks/results/probe_quantized_adaround")
    args = parser.parse_args(argv)
    corpus = by_name(args.model)
    source = ensure_model(corpus)
    chars = charset(corpus, source) if corpus.metric == "char_accuracy" else None
    sets = {name: dict(np.load(path, allow_pickle=False)) for name, path in zip(("calib", "eval"), ensure_data(corpus))}
    fp32 = session(source)
    data = {name: (arrays, sample_feeds(fp32, arrays), run_all(fp32, arrays)) for name, arrays in sets.items()}

    def score(model: onnx.ModelProto) -> dict[str, float]:
        result = {}
        for name, (arrays, feeds, reference) in data.items():
            fp32_value = METRICS[corpus.metric](corpus, arrays, reference, reference, chars)
            value = METRICS[corpus.metric](
                corpus, arrays, reference, compiled_outputs(model.SerializeToString(), feeds)[0], chars
            )
            result[name] = round(fp32_value - value, 2)
        return result

    int8, reference = onnx.load(args.int8), onnx.load(args.reference)
    rows = [("int8", int8, 0.0, 0)]
    for count in args.samples:
        for share in args.float_share:
            refit = onnx.ModelProto.FromString(int8.SerializeToString())
            start = time.perf_counter()
            changed = refit_quantized_weights(
                refit, reference, data["calib"][1][:count], chunk=args.chunk, float_share=share
            )
            label = f"weights refitted on the int8 model ({count} samples, float share {share:g})"
            rows.append((label, refit, time.perf_counter() - start, len(changed)))
    corrected = onnx.ModelProto.FromString(int8.SerializeToString())
    start = time.perf_counter()
    layers = len(correct_quantized_biases(corrected, reference, data["calib"][1][:8]))
    rows.append(("bias correction on the int8 model (8 samples)", corrected, time.perf_counter() - start, layers))
    table = []
    for label, model, seconds, layers in rows:
        drops = score(model)
        table.append({"model": args.model, "what": label, "layers": layers, "seconds": round(seconds, 1), **drops})
        print(
            f"{label:<72} layers {layers:4d} {seconds:7.1f} s  calib {drops['calib']:6.2f}  eval {drops['eval']:6.2f}",
            flush=True,
        )
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    header = ["model", "int8 model", "layers changed", "seconds", "drop on --calib", "drop held out"]
    lines = markdown_table(
        header, [[r["model"], r["what"], r["layers"], r["seconds"], r["calib"], r["eval"]] for r in table]
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
