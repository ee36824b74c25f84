"""Where all-MiniLM-L6-v2's int8 error comes from: which Q/DQ placement costs how much, nothing kept float.

The corpus model (``minilm_l6``, $LEPTON_CORPUS_DIR) is fused as cpu-avx fuses it and pre-processed as
the quantize pass does; calibrated on the corpus's 32 calibration sentences (min/max), quantized by ONNX
Runtime with each row's settings (Conv/MatMul/Gemm, per-channel s8 weights), and scored on the 48
evaluation sentences: token cosine drop over every position (the compile gate's metric), the mean-pooled
sentence-embedding cosine drop (the yardstick's), and the worst sentence's pooled drop. Rows "only X":
everything else reads float inputs (float_keep bypass), so the row is X's own share.

    LEPTON_CORPUS_DIR=/tmp/lcorpus .venv/bin/python benchmarks/bench_minilm_placement.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lepton_cli.passes._quantize import schemes  # noqa: E402
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate  # noqa: E402
from lepton_cli.passes._quantize.float_keep import keep_float_nodes  # noqa: E402
from lepton_cli.passes._quantize.int8_plan import matmul_output_options  # noqa: E402
from lepton_cli.passes._quantize.sensitivity import quantized_nodes  # noqa: E402

from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from lepton_cli.host.detect import detect_host  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import SampleSet  # noqa: E402

OPS = ("Conv", "MatMul", "Gemm")
GEMM_ROLES = ("Q", "K", "V", "O", "FFN1", "FFN2")  # Gemm order inside one encoder layer after fusion


def _samples(path: Path) -> SampleSet:
    data = np.load(path)
    names = ("input_ids", "attention_mask", "token_type_ids")
    return SampleSet(path, {k: data[k] for k in names}, None, dict.fromkeys(names, False))


def _prepared(work: Path) -> onnx.ModelProto:
    model = by_name("minilm_l6")
    source = bind_input_shapes(onnx.load(ensure_model(model)), {k: list(v) for k, v in model.input_shapes.items()})
    step = next(s for s in load_target("cpu-avx").passes if s.name == "fuse")
    ctx = PassContext(target=load_target("cpu-avx"), host=detect_host(), work_dir=work)
    fused = get_pass("fuse").fn(source, ctx, step.params).model
    return schemes.preprocess(fused, work)


def _scores(model: onnx.ModelProto, samples: SampleSet, reference: list[np.ndarray]) -> dict[str, float]:
    session = make_session(model, opt_level="all")
    tokens, pooled = [], []
    for feed, ref in zip(samples.feeds(), reference):
        r, g = ref[0][0].astype(np.float64), session.run(None, feed)[0][0].astype(np.float64)
        tokens.append(np.mean((r * g).sum(-1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(g, axis=-1)))
        mask = feed["attention_mask"][0].astype(bool)
        a, b = r[mask].mean(0), g[mask].mean(0)
        pooled.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return {
        "token_drop": round(100 * (1 - float(np.mean(tokens))), 3),
        "pooled_drop": round(100 * (1 - float(np.mean(pooled))), 3),
        "worst_pooled_drop": round(100 * (1 - float(np.min(pooled))), 3),
    }


def _classes(model: onnx.ModelProto) -> dict[str, list[str]]:
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    out = {role: gemms[i :: len(GEMM_ROLES)] for i, role in enumerate(GEMM_ROLES)}
    return out | {"QK": matmuls[0::2], "PV": matmuls[1::2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="minilm-placement-"))
    model = _prepared(work)
    calib_path, eval_path = ensure_data(by_name("minilm_l6"))
    calib, evaluation = _samples(calib_path), _samples(eval_path)
    float_session = make_session(model, opt_level="all")
    reference = [float_session.run(None, f) for f in evaluation.feeds()]
    ranges = {}
    for method in ("minmax", "percentile"):
        data = calibrate(model, calib, CalibrationSettings(method=method), None, list(OPS))
        ranges[method] = schemes.save_ranges(data, work / f"{method}.json")

    def quantized(float_outputs: bool, method: str = "minmax", **scheme) -> onnx.ModelProto:
        settings = schemes.Int8Scheme(op_types=OPS, extra=matmul_output_options(float_outputs), **scheme)
        return schemes.quantize_int8(model, ranges[method], method, settings, [], work)

    rows: list[dict] = []

    def row(label: str, candidate: onnx.ModelProto) -> None:
        rows.append({"row": label} | _scores(candidate, evaluation, reference))
        print(f"{label:<58} " + "  ".join(f"{k} {v:6.3f}" for k, v in rows[-1].items() if k != "row"), flush=True)

    with_outputs = quantized(False)
    all_nodes = quantized_nodes(with_outputs)
    row("ORT default (MatMul/Gemm outputs Q/DQ too)", with_outputs)
    classes = _classes(model) | {
        "MatMul/Gemm outputs": [n for n in all_nodes if n not in sum(_classes(model).values(), [])]
    }
    for name, nodes in classes.items():
        row(f"  only {name}", keep_float_nodes(with_outputs, model, [n for n in all_nodes if n not in nodes]))
    row("float_matmul_outputs (this change)", quantized(True))
    row("float_matmul_outputs, percentile", quantized(True, "percentile"))
    row(
        "float_matmul_outputs, s8 symmetric activations",
        quantized(True, activation_type="s8", activation_symmetric=True),
    )
    row("float_matmul_outputs, per-tensor weights", quantized(True, activation_type="s8", per_channel=False))
    row(
        "fpga: per-tensor power-of-two, symmetric",
        quantized(True, activation_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True),
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
