"""Benchmark the prune pass on real-weight models: what it removes, what it costs, that ORT runs it.

Models: the digits demo (labels: top-1), PP-OCRv4 det (synthetic document images: agreement with
the unpruned model), and onnx's pytorch-converted Conv/Linear models with their own
test_data_set inputs. Each model is first simplified by onnxsim (the core of the fuse pass, which
runs before prune in every target), then pruned per mode with a fixed accuracy budget. For each
run: params and MACs before/after (``collect_stats`` of the models, compared with what the pass
reports), the accuracy drop on the data the search used and on held-out data, ORT (all
optimisations) running the result, and the per-layer before/after table.

    .venv/bin/python benchmarks/bench_prune.py            # ~3-5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_prune.py --quick    # digits + pytorch-converted only
Writes benchmarks/results/prune.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lepton_cli.evaluate.accuracy import Evaluator  # noqa: E402
from lepton_cli.model.load import upgrade_opset  # noqa: E402
from lepton_cli.model.sessions import make_session  # noqa: E402
from lepton_cli.model.stats import collect_stats  # noqa: E402
from lepton_cli.pipeline.context import PassContext  # noqa: E402
from lepton_cli.pipeline.params import from_table, to_table  # noqa: E402
from lepton_cli.pipeline.registry import get_pass  # noqa: E402
from lepton_cli.pipeline.targets import load_target  # noqa: E402
from lepton_cli.samples.sample_set import SampleSet, load_samples  # noqa: E402

ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
PYTORCH_CASES = [
    "test_Linear",
    "test_Conv2d",
    "test_Conv2d_padding",
    "test_Conv2d_strided",
    "test_Conv3d",
    "test_Conv1d",
]
PRUNE = get_pass("prune")


def simplify(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model, check_n=0, overwrite_input_shapes=shapes)
    return simplified if ok else model


def text_images(n: int, seed: int, size: int = 320) -> np.ndarray:
    """Synthetic document crops (dark words on light paper), normalised as PP-OCR's det preprocessing does."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = ["Lepton", "invoice 2024", "TOTAL 38.50", "hello world", "ONNX", "Receipt #0042", "QTY 3 x 4.99"]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(170, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 7))):
            font = ImageFont.load_default(size=int(rng.integers(14, 34)))
            draw.text(
                (int(rng.integers(0, size // 2)), int(rng.integers(0, size - 30))),
                str(rng.choice(words)),
                fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                font=font,
            )
        out.append(((np.asarray(img, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def text_lines(n: int, seed: int) -> np.ndarray:
    """Synthetic 48x192 text-line crops, half of them upside down, normalised as PP-OCR's cls expects."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = ["Lepton 2024", "TOTAL 38.50", "hello world", "Receipt #42", "QTY 3 x 4.99", "ONNX model"]
    out = []
    for i in range(n):
        img = Image.new("RGB", (192, 48), tuple(int(v) for v in rng.integers(170, 256, 3)))
        ImageDraw.Draw(img).text(
            (int(rng.integers(0, 20)), int(rng.integers(2, 12))),
            str(rng.choice(words)),
            fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
            font=ImageFont.load_default(size=int(rng.integers(20, 30))),
        )
        if i % 2:
            img = img.rotate(180)
        out.append(((np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def run_case(
    label: str,
    model: onnx.ModelProto,
    target: str,
    table: dict,
    search: SampleSet | None,
    held_out: SampleSet | None,
    budget: float,
) -> dict:
    profile = load_target(target)
    ctx = PassContext(target=profile, calib=search, max_accuracy_drop=budget)
    # the target's own prune parameters, with this case's overrides (mode, sample count, layer size floor)
    step = next(s for s in profile.passes if s.name == "prune")
    params = from_table(PRUNE.params_cls, to_table(step.params) | table, "prune")
    started = time.perf_counter()
    result = PRUNE.fn(model, ctx, params)
    seconds = time.perf_counter() - started
    before, after = collect_stats(model), collect_stats(result.model)
    session = make_session(result.model, opt_level="all")  # ORT loads and optimises the result
    feed = (search or held_out).feed(0)
    outputs = session.run(None, feed)
    summary = result.summary
    held = None
    if held_out is not None:
        held = Evaluator(model, held_out, held_out.labels).score(result.model)
    weights = summary.get("weights", {})
    row = {
        "case": label,
        "target": target,
        "mode": summary.get("mode"),
        "seconds": round(seconds, 2),
        "params": [before.params, after.params],
        "macs": [before.macs, after.macs],
        "reported_params": summary.get("totals", {}).get("params"),
        "reported_macs": summary.get("totals", {}).get("macs"),
        "allowed_drop": summary.get("budget_pct"),
        "search_drop": (summary.get("accuracy") or {}).get("drop_pct"),
        "held_out": held.to_dict() if held else None,
        "ort_ok": all(np.isfinite(o).all() for o in outputs),
        "pruned_layers_2_4_or_sparse": weights.get("pruned_layers"),
        "sparse_bytes": [weights.get("pruned_dense_bytes"), weights.get("pruned_sparse_bytes")] if weights else None,
        "dead_channels": sum((summary.get("channels") or {}).get("dead_channels", {}).values()),
        "layers": summary.get("layers", []),
        "weight_layers": weights.get("layers", []),
        "decisions": (summary.get("channels") or {}).get("decisions", []),
        "warnings": ctx.warnings,
    }
    if row["mode"] == "2:4":
        row["pattern_ok"] = check_2_4(model, result.model, weights.get("layers", []))
    return row


def check_2_4(before: onnx.ModelProto, after: onnx.ModelProto, layers: list[dict]) -> bool:
    from lepton_cli.model.channels.channel_groups import weights_as_initializers

    src = onnx.ModelProto()
    src.CopyFrom(before)
    weights_as_initializers(src)
    b = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    a = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    nodes = {(n.name or n.output[0]): n for n in src.graph.node}
    for row in layers:
        if row["sparsity"][1] <= row["sparsity"][0]:
            continue
        node = nodes[row["layer"]]
        axis = 1 if node.op_type == "Conv" or any(x.name == "transB" and x.i for x in node.attribute) else 0
        got = np.moveaxis(a[row["weight"]], axis, -1).reshape(-1, 4)
        orig = np.moveaxis(b[row["weight"]], axis, -1).reshape(-1, 4)
        if (np.count_nonzero(got, 1) > 2).any() or not np.array_equal(
            np.sort(np.abs(got), 1)[:, 2:], np.sort(np.abs(orig), 1)[:, 2:]
        ):
            return False
    return True


def digits_cases(budget: float) -> list[dict]:
    folder = REPO / "examples" / "digits"
    model = simplify(onnx.load(folder / "digits_cnn.onnx"), {"image": [1, 1, 8, 8]})  # batch 1: MACs known
    calib, evaluation = (
        load_samples(folder / "calib.npz", model),
        load_samples(folder / "eval.npz", model, role="--eval"),
    )
    common = {"max_samples": 200, "min_params": 128}
    return [
        run_case(
            "digits",
            model,
            "edge-arm",
            {"mode": "channel", "ratios": [0.125, 0.25, 0.5], **common},
            calib,
            evaluation,
            budget,
        ),
        run_case("digits", model, "cuda", {"mode": "2:4", **common}, calib, evaluation, budget),
        run_case(
            "digits",
            model,
            "edge-arm",
            {"mode": "magnitude", "ratios": [0.25, 0.5, 0.75, 0.9], **common},
            calib,
            evaluation,
            budget,
        ),
    ]


def pytorch_cases(budget: float) -> list[dict]:
    rows = []
    for name in PYTORCH_CASES:
        folder = ONNX_DATA / "pytorch-converted" / name
        model, _ = upgrade_opset(onnx.load(folder / "model.onnx"), 13, 21)
        model = simplify(model)
        tensor = onnx.TensorProto()
        tensor.ParseFromString((folder / "test_data_set_0" / "input_0.pb").read_bytes())
        input_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
        data = SampleSet(folder, {input_name: numpy_helper.to_array(tensor)[None]}, None, {input_name: True})
        for mode, target in (("magnitude", "edge-arm"), ("channel", "edge-arm"), ("2:4", "cuda")):
            rows.append(
                run_case(
                    name, model, target, {"mode": mode, "min_params": 0, "ratios": [0.1, 0.25, 0.5]}, data, data, budget
                )
            )
    return rows


def det_cases(budget: float, samples: int) -> list[dict]:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # not imported: its __init__ needs cv2
    path = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx" if spec and spec.origin else None
    if path is None or not path.exists():
        print("PP-OCRv4 det not installed (rapidocr-onnxruntime): skipped", file=sys.stderr)
        return []
    model = simplify(onnx.load(path), {"x": [1, 3, 320, 320]})
    search = SampleSet(path, {"x": text_images(samples, seed=1)}, None, {"x": False})
    held = SampleSet(path, {"x": text_images(samples, seed=2)}, None, {"x": False})
    cls_path = path.parent / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    cls = simplify(onnx.load(cls_path), {"x": [1, 3, 48, 192]})
    cls_search = SampleSet(cls_path, {"x": text_lines(64, seed=1)}, None, {"x": False})
    cls_held = SampleSet(cls_path, {"x": text_lines(64, seed=2)}, None, {"x": False})
    return [
        run_case(
            "ppocr_cls_mobile_v2", cls, "mobile", {"mode": "channel", "min_params": 512}, cls_search, cls_held, budget
        ),
        run_case(
            "ppocrv4_det",
            model,
            "edge-arm",
            {"mode": "channel", "ratios": [0.125, 0.25, 0.5], "max_samples": samples},
            search,
            held,
            budget,
        ),
        run_case(
            "ppocrv4_det",
            model,
            "fpga",
            {"mode": "channel", "ratios": [0.125, 0.25, 0.5], "min_channels": 16, "max_samples": samples},
            search,
            held,
            budget,
        ),
        run_case("ppocrv4_det", model, "cuda", {"mode": "2:4", "max_samples": samples}, search, held, budget),
    ]


def _fmt(pair) -> str:
    if not pair or pair[0] is None:
        return "-"
    a, b = pair
    return f"{a:,} → {b:,} ({100 * (1 - b / a):.1f}% less)" if a else "-"


def print_table(rows: list[dict]) -> None:
    print(
        f"{'case':<22} {'target':<9} {'mode':<9} {'params':<32} {'MACs':<40} {'drop search/held':<18} {'ORT':<4} {'s':>6}"
    )
    for r in rows:
        held = r["held_out"]["drop_pct"] if r["held_out"] else None
        drops = f"{r['search_drop'] if r['search_drop'] is not None else '-'}/{held if held is not None else '-'}"
        print(
            f"{r['case']:<22} {r['target']:<9} {str(r['mode']):<9} {_fmt(r['params']):<32} {_fmt(r['macs']):<40} {drops:<18} "
            f"{'ok' if r['ort_ok'] else 'FAIL':<4} {r['seconds']:>6}"
        )
        if r["reported_params"] and r["reported_params"][0] != r["reported_params"][1]:
            same = (
                r["params"][0] - r["params"][1] == r["reported_params"][0] - r["reported_params"][1]
                and r["macs"] == r["reported_macs"]
            )
            print(f"    the pass's report matches the model (params removed, MACs before/after): {same}")
        if r.get("pattern_ok") is not None:
            print(f"    2:4 pattern verified on {r['pruned_layers_2_4_or_sparse']} tensors: {r['pattern_ok']}")
        if r["sparse_bytes"] and r["sparse_bytes"][0]:
            print(
                f"    sparse encoding of the pruned weights: {r['sparse_bytes'][0]:,} → {r['sparse_bytes'][1]:,} bytes"
            )
    print()
    for r in rows:
        if r["layers"] and r["mode"] == "channel":
            print(f"per-layer before → after: {r['case']} on {r['target']}")
            print(f"  {'layer':<24} {'op':<6} {'out ch':<12} {'in ch':<12} {'params':<18} {'MACs':<24}")
            for layer in r["layers"]:
                macs = layer["macs"]
                print(
                    f"  {layer['layer'][:24]:<24} {layer['op']:<6} {'%d→%d' % tuple(layer['out_channels']):<12} "
                    f"{'%d→%d' % tuple(layer['in_channels']):<12} {'%d→%d' % tuple(layer['params']):<18} "
                    f"{('%s→%s' % tuple(macs)) if macs[0] is not None else '-':<24}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits and pytorch-converted only")
    parser.add_argument(
        "--budget", type=float, default=2.0, help="accuracy budget in points (the pass spends budget_share of it)"
    )
    parser.add_argument("--det-samples", type=int, default=16)
    args = parser.parse_args()
    rows = digits_cases(args.budget) + pytorch_cases(args.budget)
    if not args.quick:
        rows += det_cases(args.budget, args.det_samples)
    print_table(rows)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps({"budget": args.budget, "rows": rows}, indent=2, default=str))
    print(f"\nwrote {out / 'prune.json'}")


if __name__ == "__main__":
    main()
