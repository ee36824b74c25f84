"""How far a map detector's own output moves when its input moves by less than one pixel level.

The corpus's pages are 8-bit renderings normalised per channel, so each channel's values lie on a grid (one pixel
level = one step, found and dithered as the compile's scorer does it: ``lepton_cli/evaluate/input_floor.py``). Adding
uniform noise of at most ±``fraction`` of that step, then rounding back to 8 bits, gives the same page; the source model, fed the unrounded page, is scored against itself on the yardstick's metric (the
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
from lepton_cli.evaluate.input_floor import dithered, value_grids  # noqa: E402

THRESHOLDS = (0.3, 0.5)  # the yardstick's map_f1: the worse of the two per page


def page_scores(references: list[np.ndarray], outputs: list[np.ndarray]) -> list[float]:
    return [100 * min(pixel_f1(r, o, t) for t in THRESHOLDS) for r, o in zip(references, outputs)]


def measure(name: str, fractions: list[float], compiled: dict[str, str]) -> list[dict]:
    corpus = by_name(name)
    source = one_thread(ensure_model(corpus).read_bytes())
    feeds = [{"x": page[None]} for page in np.load(ensure_data(corpus)[1])["x"]]
    grids = value_grids(feeds)  # the scorer's own reading of the 8-bit grid (lepton_cli/evaluate/input_floor.py)
    if not grids:
        raise SystemExit(f"{name}: its pages are on no 8-bit grid")
    references = [source.run(None, feed)[0] for feed in feeds]
    rows = []
    for fraction in fractions:
        noisy = [dithered(feed, grids, index, fraction) for index, feed in enumerate(feeds)]
        outputs = [source.run(None, feed)[0] for feed in noisy]
        rows.append(_row(name, f"source, input ±{fraction:g} level", page_scores(references, outputs)))
    for label, path in compiled.items():
        session = one_thread(Path(path).read_bytes())
        rows.append(_row(name, label, page_scores(references, [session.run(None, feed)[0] for feed in feeds])))
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
