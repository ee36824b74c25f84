"""How far a map detector's own output moves when its input moves by less than one pixel level.

The corpus's pages are 8-bit renderings normalised per channel, so each channel's values lie on a grid (one pixel
level = one step). Adding uniform noise of at most ±``fraction`` of that step, then rounding back to 8 bits, gives
the same page; the source model, fed the unrounded page, is scored against itself on the yardstick's metric (the
worst page's map F1 at 0.3 and 0.5). That score is the metric's floor on this model: no quantized model can be told
apart from the source by less. Compiled models given with ``label=path.onnx`` are scored beside it.

    python benchmarks/map_noise_floor.py --models ppocrv4_det ppocrv5_det --fractions 0.1 0.25 0.49 \
        [--compiled ppocrv4_det:int8=path.onnx ...] --out benchmarks/results/map_noise_floor
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.corpus.manifest import by_name  # noqa: E402
from benchmarks.corpus.store import ensure_data, ensure_model  # noqa: E402
from benchmarks.md_table import markdown_table  # noqa: E402
from benchmarks.ocr_textset import pixel_f1  # noqa: E402
from benchmarks.probe_det_float_sets import one_thread  # noqa: E402

THRESHOLDS = (0.3, 0.5)  # the yardstick's map_f1: the worse of the two per page


def pixel_steps(pages: np.ndarray) -> np.ndarray:
    """Per channel, the smallest gap between distinct values: one pixel level of a normalised 8-bit page."""
    steps = []
    for channel in np.moveaxis(pages, 1, 0):
        values = np.unique(channel)
        if len(values) < 2 or len(values) > 256:
            raise SystemExit(f"channel with {len(values)} distinct values: not an 8-bit rendering")
        steps.append(float(np.min(np.diff(values))))
    return np.asarray(steps, dtype=np.float32)


def page_scores(references: list[np.ndarray], outputs: list[np.ndarray]) -> list[float]:
    return [100 * min(pixel_f1(r, o, t) for t in THRESHOLDS) for r, o in zip(references, outputs)]


def dithered(pages: np.ndarray, steps: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-fraction, fraction, pages.shape).astype(np.float32)
    return pages + noise * steps[None, :, None, None]


def measure(name: str, fractions: list[float], compiled: dict[str, str]) -> list[dict]:
    corpus = by_name(name)
    source = one_thread(ensure_model(corpus).read_bytes())
    pages = np.load(ensure_data(corpus)[1])["x"]
    steps = pixel_steps(pages)
    references = [source.run(None, {"x": p[None]})[0] for p in pages]
    rows = []
    for fraction in fractions:
        outputs = [source.run(None, {"x": p[None]})[0] for p in dithered(pages, steps, fraction)]
        rows.append(_row(name, f"source, input ±{fraction:g} level", page_scores(references, outputs)))
    for label, path in compiled.items():
        session = one_thread(Path(path).read_bytes())
        rows.append(_row(name, label, page_scores(references, [session.run(None, {"x": p[None]})[0] for p in pages])))
    return rows


def _row(model: str, what: str, scores: list[float]) -> dict:
    ordered = sorted(scores)
    return {
        "model": model,
        "scored": what,
        "pages": len(scores),
        "worst_page": round(ordered[0], 2),
        "second_worst": round(ordered[1], 2),
        "mean_page": round(float(np.mean(scores)), 2),
        "pages_below_99": sum(s < 99 for s in scores),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocrv4_det", "ppocrv5_det"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.49])
    parser.add_argument("--compiled", nargs="*", default=[], help="MODEL:label=path.onnx")
    parser.add_argument("--out", type=Path, required=True, help="OUT.md and OUT.json")
    args = parser.parse_args(argv)
    compiled: dict[str, dict[str, str]] = {}
    for item in args.compiled:
        model, rest = item.split(":", 1)
        label, path = rest.split("=", 1)
        compiled.setdefault(model, {})[label] = path
    rows = [row for name in args.models for row in measure(name, args.fractions, compiled.get(name, {}))]
    keys = ["model", "scored", "pages", "worst_page", "second_worst", "mean_page", "pages_below_99"]
    table = markdown_table(keys, [[r[k] for k in keys] for r in rows])
    print("\n".join(table))
    command = "python benchmarks/map_noise_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    title = "# Map detectors: how far input noise under one pixel level moves the source itself (worst page F1)"
    args.out.with_suffix(".md").write_text("\n".join([title, "", f"`{command}`", "", *table]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
