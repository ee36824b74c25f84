"""Where a DBNet's int8 loss lies: each page's map F1 for every calibration method and op-type tier, nothing float.

    LEPTON_CORPUS_DIR=/tmp/lcorpus python benchmarks/bench_map_pages.py [--model ppocrv4_det] [--target cpu-avx]
        [--methods minmax percentile mse entropy] [--out benchmarks/results/dbnet_pages]

The corpus model is bound to its corpus shape and fused as the target fuses it; then, per (tier, method), the
quantize pass's own builds (calibrated on the three quarters of --calib the compile calibrates on) are run on
the 8 calibration pages and the 8 held-out evaluation pages (other fonts, other words). Each page's F1 is the
worse of the map binarised at 0.3 and 0.5 against the fused fp32 model's map, in points. The candidates keep
nothing in float, so the table shows what the search starts from. Then each weight layer alone on the pass's int8
weight grid with float activations: how much one layer's weight rounding moves the worst page. Writes OUT.json/.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lepton_cli.passes._quantize import schemes, weight_layers  # noqa: E402
from lepton_cli.passes._quantize.int8_plan import Int8Plan  # noqa: E402
from lepton_cli.passes._quantize.tuning import SearchSpace  # noqa: E402

from benchmarks import ocr_textset as textset  # noqa: E402
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from lepton_cli.evaluate.output_roles import MAP_THRESHOLDS  # noqa: E402
from lepton_cli.model.load import load_model, upgrade_opset  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.model.shapes import bind_input_shapes  # noqa: E402
from lepton_cli.pipeline.context import HOLDOUT_FRACTION, PassContext  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import SampleSet, load_samples  # noqa: E402


def page_f1(ref: np.ndarray, got: np.ndarray) -> float:
    """The worse F1 over the map thresholds, in points."""
    return round(100.0 * min(textset.pixel_f1(ref, got, t) for t in MAP_THRESHOLDS), 2)


def weight_layer_losses(fused, scheme, feeds: list, refs: list) -> list[dict]:
    """Per weight layer: the worst page when only its weights are put on the pass's int8 grid, all else float."""
    rows = []
    for layer in weight_layers.weight_layers(fused):
        model = onnx.ModelProto()
        model.CopyFrom(fused)
        weight = weight_layers.load(model, layer.weight)
        per_row = weight_layers.to_rows(layer, weight)
        grid = weight_layers.weight_grid(per_row, scheme)
        weight_layers.store(model, layer.weight, weight_layers.from_rows(layer, grid.quantize(per_row), weight.shape))
        session = make_session(model)
        f1s = [page_f1(r, session.run(None, f)[0]) for r, f in zip(refs, feeds)]
        rows.append({"node": layer.name, "shape": list(weight.shape), "worst": min(f1s), "page": int(np.argmin(f1s))})
    return sorted(rows, key=lambda r: r["worst"])


@dataclasses.dataclass
class QuantizeSetup:
    """A corpus model as the target's quantize pass sees it, and that pass's search space."""

    corpus: Any
    fused: onnx.ModelProto  # bound to the corpus shape, fused as the target fuses it, nodes named
    calib: SampleSet
    evaluation: SampleSet
    held: SampleSet  # the part of --calib the compile's gate scores on
    plan: Int8Plan
    space: SearchSpace  # calibrated on the rest of --calib, as the compile calibrates


def quantize_setup(model_name: str, target_name: str, **quantize_params: Any) -> QuantizeSetup:
    """``model_name`` from the corpus on ``target_name``, its quantize parameters overridden by ``quantize_params``."""
    corpus = by_name(model_name)
    target = load_target(target_name)
    loaded = load_model(ensure_model(corpus)).model
    model, _ = upgrade_opset(loaded, target.runtime.opset_min, target.runtime.opset_max)
    model = bind_input_shapes(model, corpus.input_shapes)
    calib_path, eval_path = ensure_data(corpus)
    calib = load_samples(calib_path, model)
    evaluation = load_samples(eval_path, model)
    ctx = PassContext(target=target, calib=calib)
    steps = {s.name: s for s in target.passes}
    fused = get_pass("fuse").fn(model, ctx, steps["fuse"].params).model
    schemes.name_nodes(fused)
    params = dataclasses.replace(steps["quantize"].params, **quantize_params)
    plan = Int8Plan(params, list(target.hardware.isa), list(target.hardware.isa))
    kept, held = calib.split(HOLDOUT_FRACTION, ctx.seed)
    return QuantizeSetup(corpus, fused, calib, evaluation, held, plan, plan.space(fused, ctx, kept, {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocrv4_det")
    parser.add_argument("--target", default="cpu-avx")
    parser.add_argument("--methods", nargs="*", default=["minmax", "percentile", "mse", "entropy"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dbnet_pages")
    args = parser.parse_args(argv)

    setup = quantize_setup(args.model, args.target, methods=args.methods)
    fused, plan, space = setup.fused, setup.plan, setup.space
    pages = {"calib": list(setup.calib.feeds()), "eval": list(setup.evaluation.feeds())}
    source = make_session(fused)
    refs = {k: [source.run(None, feed)[0] for feed in feeds] for k, feeds in pages.items()}
    rows = []
    for tier, build in enumerate(space.builds):
        for method in space.methods:
            start = time.perf_counter()
            session = make_session(build(method, []))
            ops = ", ".join(space.tiers[tier] if space.tiers else []) or "every op"
            row = {"tier": f"{space.transform(tier)}:{ops}" if space.transform(tier) else ops, "method": method}
            for split, feeds in pages.items():
                row[split] = [page_f1(r, session.run(None, f)[0]) for r, f in zip(refs[split], feeds)]
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(
                f"{row['tier']:<20} {method:<10} calib min {min(row['calib']):6.2f}  eval min {min(row['eval']):6.2f}"
            )
    layers = weight_layer_losses(fused, plan.scheme, pages["calib"] + pages["eval"], refs["calib"] + refs["eval"])
    for r in layers[:5]:
        print(f"int8 weights of {r['node']} {r['shape']} alone: worst page {r['worst']:.2f} (page {r['page']})")
    positives = {k: [int(np.sum(r > MAP_THRESHOLDS[0])) for r in v] for k, v in refs.items()}
    result = {"model": args.model, "target": args.target, "positive_pixels": positives, "rows": rows}
    result["weight_layers"] = layers
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"`python benchmarks/bench_map_pages.py --model {args.model} --target {args.target} "
        f"--methods {' '.join(args.methods)}`",
        "",
        "| op types | method | calib pages F1 | worst | held-out pages F1 | worst |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tier']} | {r['method']} | {' '.join(f'{v:.1f}' for v in r['calib'])} | {min(r['calib']):.1f} | "
            f"{' '.join(f'{v:.1f}' for v in r['eval'])} | {min(r['eval']):.1f} |"
        )
    lines += [
        "",
        "Each weight layer's weights alone on the pass's int8 grid (everything else fp32; Conv, Gemm, MatMul), the 8 worst, over all 16 pages "
        "(0-7 calibration, 8-15 held-out):",
        "",
        "| layer | weight shape | worst page F1 | page |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['node']} | {r['shape']} | {r['worst']:.2f} | {r['page']} |" for r in layers[:8]]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
