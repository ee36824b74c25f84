"""A/B of compiled map detectors: latency against the source (one thread, interleaved) and the held-out worst page.

Each model is a compiled ONNX file (``compile_child --save-model``, one per commit or setting); all are timed in
one process, rounds interleaved with the source (this host is shared and noisy), and each is scored on the corpus's
evaluation pages: the worst page's F1 of the map binarised at DBNet's 0.3 against the source's, as the yardstick.

    python benchmarks/ab_map_models.py --model ppocrv4_det main=/tmp/a.onnx head=/tmp/b.onnx --out OUT

``--latency-only`` times any corpus model's compiled files the same way (a recogniser's accuracy is the yardstick's).
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
from benchmarks.probe_det_float_sets import latency_ratios, one_thread  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocrv4_det", help="the corpus model the files were compiled from")
    parser.add_argument("models", nargs="+", help="label=path.onnx, in table order")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--latency-only", action="store_true", help="no map scores (a model that is no map detector)")
    parser.add_argument("--out", type=Path, required=True, help="OUT.md and OUT.json")
    args = parser.parse_args(argv)

    corpus = by_name(args.model)
    source = ensure_model(corpus).read_bytes()
    pages = np.load(ensure_data(corpus)[1])["x"]
    labelled = [item.split("=", 1) for item in args.models]
    compiled = [Path(path).read_bytes() for _, path in labelled]
    ratios = latency_ratios(source, compiled, {"x": pages[:1]}, args.rounds)
    reference = None if args.latency_only else one_thread(source)  # no scores: the source is only timed
    refs = [reference.run(None, {"x": page[None]})[0] for page in pages] if reference else []
    rows = []
    for (label, path), data, ratio in zip(labelled, compiled, ratios):
        if args.latency_only:
            rows.append({"model": label, "file": path, "latency_x_fp32": round(ratio, 3)})
            print(f"{label:<24} {ratio:6.3f}x")
            continue
        session = one_thread(data)
        f1 = [100 * pixel_f1(ref, session.run(None, {"x": page[None]})[0]) for ref, page in zip(refs, pages)]
        rows.append({"model": label, "file": path, "latency_x_fp32": round(ratio, 3), "worst_page": round(min(f1), 2)})
        rows[-1]["mean_page"] = round(float(np.mean(f1)), 2)
        print(f"{label:<24} {ratio:6.3f}x  worst page {min(f1):6.2f}  mean {np.mean(f1):6.2f}")
    flags = " --latency-only" if args.latency_only else ""
    command = f"python benchmarks/ab_map_models.py --model {args.model}{flags} " + " ".join(args.models)
    result = {"command": command, "pages": len(pages), "rounds": args.rounds, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    header = ["model", "latency ×fp32 (1 thread)", "worst page F1@0.3", "mean page F1@0.3"]
    keys = ["model", "latency_x_fp32", "worst_page", "mean_page"]
    if args.latency_only:
        header, keys = header[:2], keys[:2]
    lines = [f"`{command}` ({len(pages)} held-out pages, {args.rounds} interleaved rounds)", ""]
    lines += markdown_table(header, [[r[k] for k in keys] for r in rows])
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
