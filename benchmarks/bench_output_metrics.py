"""Scoring every output by what it is, fp16 without overflow, power-of-two fpga scales: before vs after.

Prints markdown tables and writes JSON (``--out``). Real models and data only:
- ddddocr's ``common_det.onnx`` (YOLOX character detector, `pip install --no-deps ddddocr==1.6.1`) on
  rendered text pages: the first-output arg-max "agreement" the old gate used vs detection F1;
- digits with a MiniLM export's output order (input copy, embedding, logits): the old first-output
  drop vs every output's; a classifier with flattened confidence (logits x 0.15);
- PP-OCRv4 rec with a layout detector's 11-name ``character`` entry: CTC or not;
- onnx's light zoo: fp16 nodes kept fp32 and non-finite outputs, the old keep list vs the verified plan;
- PP-OCRv4 det (160x160, fpga fuse, rendered pages): scales that are not powers of two.

    .venv/bin/python benchmarks/bench_output_metrics.py --out benchmarks/results/output_metrics.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import ocr_textset as textset  # noqa: E402
from conftest import DIGITS, LIGHT_MODELS, OCR_DET, OCR_REC  # noqa: E402
from lepton_cli.passes._quantize import fp16_safe, schemes  # noqa: E402
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate  # noqa: E402
from lepton_cli.passes._quantize.pow2_grid import clip_free_scale  # noqa: E402

from lepton_cli.evaluate.accuracy import Evaluator  # noqa: E402
from lepton_cli.model.sessions import make_session, random_feed  # noqa: E402
from lepton_cli.model.shapes import graph_inputs  # noqa: E402
from lepton_cli.samples.sample_set import SampleSet, load_samples  # noqa: E402


def _pages(count: int, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            np.asarray(
                textset.render_page(
                    rng,
                    textset.CALIB_FONTS if seed == 1 else textset.EVAL_FONTS,
                    textset.CALIB_WORDS if seed == 1 else textset.EVAL_WORDS,
                    size,
                ),
                np.float32,
            ).transpose(2, 0, 1)
            for _ in range(count)
        ]
    )


def _int8(model: onnx.ModelProto, calib: SampleSet, work: Path, scheme: schemes.Int8Scheme) -> onnx.ModelProto:
    base = schemes.preprocess(model, work)
    data = calibrate(
        base,
        calib,
        CalibrationSettings(
            method="minmax", chunk=8, max_samples=64, percentile=99.999, histogram_bins=2048, entropy_bins=512
        ),
        None,
        None,
    )
    return schemes.quantize_int8(base, schemes.save_ranges(data, work / "ranges.json"), "minmax", scheme, [], work)


def _row(label: str, old, new) -> dict:
    return {"case": label, "old_gate": old, "per_output": new}


def detector(work: Path) -> list[dict]:
    spec = importlib.util.find_spec("ddddocr")
    path = Path(spec.origin).parent / "common_det.onnx" if spec and spec.origin else None
    if path is None or not path.exists():
        return [{"case": "ddddocr common_det", "skipped": "pip install --no-deps ddddocr==1.6.1"}]
    from lepton_cli.model.load import upgrade_opset

    model, _ = upgrade_opset(onnx.load(path), 13, 21)  # as compile does (opset 11: no per-channel DequantizeLinear)
    evaluation = SampleSet(Path("pages"), {"images": _pages(8, 2, 416)}, None, {"images": False})
    calib = SampleSet(Path("pages"), {"images": _pages(16, 1, 416)}, None, {"images": False})
    candidates = {
        "fp16": schemes.to_fp16(model, list(schemes.FP16_BLOCK_DEFAULT), []),
        "int8 u8s8 per-channel, every op": _int8(model, calib, work, schemes.Int8Scheme()),
    }
    old, new = Evaluator(model, evaluation, metric="agreement"), Evaluator(model, evaluation)
    rows = []
    for label, candidate in candidates.items():
        o, n = old.score(candidate), new.score(candidate)
        rows.append(
            _row(
                f"ddddocr common_det {label}",
                {"metric": "arg-max over the last axis", "drop_pct": o.drop_pct},
                {"metric": n.metric, "why": n.outputs[0]["why"], "drop_pct": n.drop_pct, **n.outputs[0]["detail"]},
            )
        )
    return rows


def minilm_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """digits with a MiniLM export's output order: a copy of the input first, then the embedding, then logits."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node.append(helper.make_node("Identity", ["image"], ["image_copy"], name="copy"))
    out.graph.node.append(helper.make_node("Identity", ["relu3"], ["sentence_embedding"], name="embedding_pool"))
    logits = out.graph.output[0]
    del out.graph.output[:]
    out.graph.output.extend(
        [
            helper.make_tensor_value_info("image_copy", onnx.TensorProto.FLOAT, ["N", 1, 8, 8]),
            helper.make_tensor_value_info("sentence_embedding", onnx.TensorProto.FLOAT, ["N", "D"]),
            logits,
        ]
    )
    return out


def classifiers(work: Path) -> list[dict]:
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    evaluation = load_samples(DIGITS / "eval.npz", model, role="--eval")
    calib = load_samples(DIGITS / "calib.npz", model)
    source = minilm_like(model)
    damaged = onnx.ModelProto()
    damaged.CopyFrom(source)
    rng = np.random.default_rng(0)
    for init in damaged.graph.initializer:
        if init.name == "fc1_W":
            w = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array((w + rng.normal(0, 0.5 * w.std(), w.shape)).astype(np.float32), init.name)
            )
    evaluator = Evaluator(source, evaluation)
    rows = []
    for label, candidate in (
        (
            "int8 s8s8 per-tensor",
            _int8(source, calib, work, schemes.Int8Scheme(activation_type="s8", per_channel=False)),
        ),
        ("embedding layer perturbed", damaged),
    ):
        score = evaluator.score(candidate)
        first = score.outputs[0]
        rows.append(
            _row(
                f"digits MiniLM-like (copy, embedding, logits) {label}",
                {"metric": first["metric"], "drop_pct": first["drop_pct"]},
                {
                    "worst_output": score.output,
                    "drop_pct": score.drop_pct,
                    "outputs": {o["name"]: [o["metric"], o["drop_pct"]] for o in score.outputs},
                },
            )
        )
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    flat.graph.node[-1].output[0] = "logits_raw"
    flat.graph.node.append(helper.make_node("Mul", ["logits_raw", "t"], ["logits"]))
    flat.graph.initializer.append(numpy_helper.from_array(np.array(0.15, np.float32), "t"))
    score = Evaluator(model, evaluation, evaluation.labels).score(flat)
    rows.append(
        _row(
            "digits logits x 0.15 (confidence collapse)",
            {"metric": "top1", "drop_pct": score.drop_pct},
            {
                "top_probability": score.outputs[0]["detail"]["top_probability"],
                "probability_cosine": score.outputs[0]["detail"]["probability_cosine"],
            },
        )
    )
    return rows


# A PP-DocLayout-style detector's class names, kept under the metadata key a CTC recogniser uses for its table.
LAYOUT_CLASSES = [
    "text",
    "title",
    "list",
    "table",
    "figure",
    "header",
    "footer",
    "reference",
    "equation",
    "caption",
    "seal",
]


def layout_character() -> list[dict]:
    from lepton_cli.evaluate.accuracy import is_ctc_model
    from lepton_cli.model.shapes import bind_input_shapes

    rec = bind_input_shapes(onnx.load(OCR_REC), {"x": [1, 3, 48, 160]})
    for prop in rec.metadata_props:
        if prop.key == "character":
            prop.value = "\n".join(LAYOUT_CLASSES)
    images, _ = textset.make_set(4, 5, "eval", width=160)
    role = Evaluator(rec, SampleSet(Path("l"), {"x": images}, None, {"x": False})).roles[0]
    return [
        _row(
            "PP-OCRv4 rec graph with an 11-name 'character' entry",
            {"metric": "ctc_agreement" if is_ctc_model(rec) else "?"},
            {"metric": role.metric, "why": role.why},
        )
    ]


def fp16_zoo() -> list[dict]:
    rows = []
    for path in LIGHT_MODELS:
        model = onnx.load(path)
        schemes.name_nodes(model)
        rng = np.random.default_rng(1)
        probe = [random_feed(graph_inputs(model), rng) for _ in range(4)]
        unseen = [random_feed(graph_inputs(model), np.random.default_rng(0))]
        old_keep = fp16_safe.overflow_nodes(model, probe)  # what the pass kept before: measured, not verified
        old = schemes.to_fp16(model, list(schemes.FP16_BLOCK_DEFAULT), old_keep)

        def convert(keep, m=model):
            converted = schemes.to_fp16(m, list(schemes.FP16_BLOCK_DEFAULT), keep)
            fp16_safe.collapse_round_trip_casts(converted)
            return converted

        plan, new = fp16_safe.plan_fp16(model, probe, convert)

        def nonfinite(m) -> int:
            session = make_session(m)
            return sum(int(not np.isfinite(o).all()) for f in probe + unseen for o in session.run(None, f))

        rows.append(
            {
                "model": path.stem,
                "nodes": len(model.graph.node),
                "old_kept_fp32": len(old_keep),
                "old_nonfinite_outputs": nonfinite(old),
                "new_kept_fp32": len(plan.kept),
                "new_rounds": plan.rounds,
                "new_nonfinite_outputs": nonfinite(new),
                "of_runs": len(probe) + len(unseen),
                "fp16_weights": sum(t.data_type == onnx.TensorProto.FLOAT16 for t in new.graph.initializer),
            }
        )
    return rows


def _old_pow2_overrides(model, ranges):
    """Before: activations and Conv/Gemm/MatMul weights only."""
    overrides = {}
    for name, data in ranges.items():
        low, high = data.range_value
        absmax = float(max(abs(float(np.asarray(low).min())), abs(float(np.asarray(high).max()))))
        overrides[name] = [
            {
                "quant_type": schemes.QuantType.QInt8,
                "scale": np.array(clip_free_scale(absmax), np.float32),
                "zero_point": np.array(0, np.int8),
            }
        ]
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in schemes.WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            overrides[node.input[1]] = [
                {
                    "quant_type": schemes.QuantType.QInt8,
                    "scale": np.array(clip_free_scale(float(np.abs(w).max())), np.float32),
                    "zero_point": np.array(0, np.int8),
                }
            ]
    return overrides


def pow2_det(work: Path) -> list[dict]:
    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.pipeline.context import PassContext
    from lepton_cli.pipeline.registry import get_pass
    from lepton_cli.pipeline.targets import load_target

    model, _ = upgrade_opset(onnx.load(OCR_DET), 13, 21)
    model = bind_input_shapes(model, {"x": [1, 3, 160, 160]})
    step = next(s for s in load_target("fpga").passes if s.name == "fuse")
    model = get_pass("fuse").fn(model, PassContext(target=load_target("fpga")), step.params).model
    calib = SampleSet(Path("p"), {"x": textset.make_pages(4, 1, "calib", size=160)}, None, {"x": False})
    scheme = schemes.Int8Scheme(activation_type="s8", per_channel=False, activation_symmetric=True, power_of_two=True)
    rows = []
    for label, overrides in (
        ("before (activations and weights)", _old_pow2_overrides),
        ("after (every constant)", schemes.pow2_overrides),
    ):
        original = schemes.pow2_overrides
        schemes.pow2_overrides = overrides
        try:
            q = _int8(model, calib, work / label.split()[0], scheme)
        finally:
            schemes.pow2_overrides = original
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        scales = [
            inits[n.input[1]].reshape(-1) for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        ]
        off = sum(any(math.frexp(float(s))[0] != 0.5 for s in v) for v in scales)
        rows.append({"case": f"PP-OCRv4 det 160x160 fpga {label}", "qdq_nodes": len(scales), "not_power_of_two": off})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "output_metrics.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for sub in ("before", "after"):
            (work / sub).mkdir()
        result = {
            "detector": detector(work),
            "classifiers": classifiers(work),
            "layout_character": layout_character(),
            "fp16_light_zoo": fp16_zoo(),
            "fpga_pow2": pow2_det(work),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    for section, rows in result.items():
        print(f"\n### {section}\n")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print(
                "| "
                + " | ".join(
                    json.dumps(r.get(k), default=float) if isinstance(r.get(k), (dict, list)) else str(r.get(k, ""))
                    for k in keys
                )
                + " |"
            )


if __name__ == "__main__":
    main()
