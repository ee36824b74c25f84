"""PP-OCRv4 compiled by `lepton compile` for cpu-avx, edge-arm and cuda, measured where it would run.

Two steps, so the measuring can happen on another machine (a VNNI CPU, a GPU) that has only
onnxruntime, onnx, numpy and Pillow:

    .venv/bin/python benchmarks/bench_deployed.py prepare DIR [--targets cpu-avx,edge-arm,cuda]
    python3 benchmarks/bench_deployed.py measure DIR --provider CPUExecutionProvider [--threads 1]

``prepare`` renders the data (benchmarks/ocr_textset.py: calibration seed 1, tuning seed 2, test
seed 3 with its own lines), runs the real compile (CLI options: ``--calib``, ``--eval``,
``--input-shape``, ``--max-accuracy-drop``, ``--eval-metric``; rec's tuning lines carry their text as
labels, so its budget of 0.5 points is character accuracy against the text, the issue's metric; det's
5 points are ``mask-f1@0.3``, i.e. pixel F1 >= 0.95 of the thresholded map on the tuning pages), opens each bundle with the development keys and writes the
plaintext models of every variant beside the source and the test set.

``measure`` loads each (source, compiled) pair in ONNX Runtime with all optimisations and the
given provider and thread count, checks accuracy on the test set (rec: character accuracy against
the rendered text; det: pixel F1 of the 0.3-thresholded map against the source's) and times them
in interleaved rounds (A/B alternating, so drift hits both). Prints a table and writes
``DIR/measure-<provider>.json`` (and ``$OUT`` when that is set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ocr_textset as textset  # noqa: E402

CASES = {  # name: (model file, input shape, test-set kind, calib count, tune count, budget points, --eval-metric)
    # det: the bar is pixel F1 >= 0.95 of the 0.3-thresholded map, so the budget is 5 points of mask-f1@0.3
    "det": ("ch_PP-OCRv4_det_infer.onnx", [1, 3, 640, 640], "pages", 32, 8, 5.0, "mask-f1@0.3"),
    # rec: 200 tuning lines (~2,700 characters, 0.04 points each): with 64 the same model's drop moved by 0.4
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", [1, 3, 48, 320], "lines", 64, 200, 0.5, "auto"),
}


def _ocr_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if not spec or not spec.origin:
        sys.exit("rapidocr_onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4)")
    return Path(spec.origin).parent / "models"


def _data(kind: str, count: int, seed: int, role: str) -> tuple[np.ndarray, list[str]]:
    if kind == "pages":
        return textset.make_pages(count, seed, role), []
    return textset.make_set(count, seed, role)


def prepare(out: Path, targets: list[str], cases: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("LEPTON_HOME", tempfile.mkdtemp(prefix="lepton-home-"))
    from lepton_cli.bundle import open_bundle
    from lepton_cli.bundle.keys import dev_keys
    from lepton_cli.compile.compiler import CompileOptions, compile_model
    from lepton_cli.errors import LeptonError

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-deployed-"))
    earlier = out / "prepare.json"  # runs for other cases/targets add to it
    summary: dict = json.loads(earlier.read_text()) if earlier.exists() else {"host": platform.node(), "cases": {}}
    for case in cases:
        filename, shape, kind, n_calib, n_tune, budget, metric = CASES[case]
        source = _ocr_dir() / filename
        folder = out / case
        folder.mkdir(exist_ok=True)
        onnx.save_model(onnx.load(source), folder / "source.onnx")
        for role, count, seed, textset_role in (("calib", n_calib, 1, "calib"), ("tune", n_tune, 2, "eval")):
            images, texts = _data(kind, count, seed, textset_role)
            labels = (
                {"labels": np.array(texts)} if texts and role == "tune" else {}
            )  # rec: character accuracy vs the text
            np.savez(work / f"{case}-{role}.npz", x=images, **labels)
        if not (folder / "test.npz").exists():
            test, texts = _data(
                kind, 16 if kind == "pages" else 200, 3, "eval"
            )  # 8 pages flattered int8 det by ~1.5 F1 points
            np.savez_compressed(
                folder / "test.npz", x=test, texts=np.array(texts, dtype=object) if texts else np.array([])
            )
        for target in targets:
            options = CompileOptions(
                model=source,
                target=target,
                output_dir=work / target,
                calib=work / f"{case}-calib.npz",
                eval=work / f"{case}-tune.npz",
                input_shapes=[f"x={','.join(map(str, shape))}"],
                max_accuracy_drop=budget,
                eval_metric=metric,
                bench=False,
            )
            started = time.perf_counter()
            try:
                result = compile_model(options, on_note=lambda _m: None, on_warning=lambda m: print(f"  warning: {m}"))
            except LeptonError as exc:
                print(f"{case} → {target}: exit {exc.exit_code}: {exc.one_line()}")
                summary["cases"][f"{case}/{target}"] = {"exit": exc.exit_code, "message": exc.one_line()}
                continue
            seconds = time.perf_counter() - started
            keys, _ = dev_keys(create=False)
            opened = open_bundle(
                result.bundle_dir,
                key=str(keys.path("encryption", "private")),
                trust=str(keys.path("signing", "public")),
                state_path=work / "state.json",
                record=False,
            )
            files = {}
            for path, blob in opened.models.items():
                name = f"{target}-{Path(path).stem}.onnx" if path != "model.onnx" else f"{target}.onnx"
                (folder / name).write_bytes(blob)
                files[path] = name
            report = result.report
            summary["cases"][f"{case}/{target}"] = {
                "exit": 0,
                "compile_seconds": round(seconds, 1),
                "files": files,
                "accuracy": report.get("accuracy"),
                "variants": [
                    {k: v.get(k) for k in ("name", "path", "precision", "requires_isa", "requires_providers")}
                    for v in opened.manifest.get("variants", [])
                ],
                "quantize": next(
                    (s.get("summary") for s in report.get("pipeline", []) if s.get("name") == "quantize"), None
                ),
            }
            acc = report.get("accuracy") or {}
            print(
                f"{case} → {target}: exit 0 in {seconds:.0f} s, {acc.get('metric')} drop {acc.get('drop_pct')} "
                f"({acc.get('arithmetic', '')}); files {sorted(files.values())}"
            )
    (out / "prepare.json").write_text(json.dumps(summary, indent=2, default=str))


def _session(path: Path, provider: str, threads: int, opt_level: str = "all"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[opt_level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    )


def _channel_last(path: Path) -> set[str]:
    """The model's inputs/outputs that are channel-last (layout_transform's ``lepton.io_layout.<name>``)."""
    props = onnx.load(str(path), load_external_data=False).metadata_props
    return {
        p.key.removeprefix("lepton.io_layout.")
        for p in props
        if p.key.startswith("lepton.io_layout.") and p.value == "NHWC"
    }


def _outputs(session, images: np.ndarray, nhwc: bool = False, nhwc_out: bool = False) -> np.ndarray:
    frames = np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if nhwc else images
    out = np.concatenate([session.run(None, {"x": frames[i : i + 1]})[0] for i in range(len(frames))])
    return out.transpose(0, 3, 1, 2) if nhwc_out else out  # back to the source's NCHW map


def _interleaved(
    sessions: dict[str, object], feeds: dict[str, dict], rounds: int, per_round: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[name])  # warm-up: allocator growth, cuDNN algorithm search
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(None, feeds[name])
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def measure(folder: Path, provider: str, threads: int, rounds: int, exact: bool = False) -> dict:
    import onnxruntime as ort

    if provider != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages when they are not on the loader path

    rows = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        data = np.load(case_dir / "test.npz", allow_pickle=True)
        images, texts = data["x"], [str(t) for t in data["texts"]]
        source = case_dir / "source.onnx"
        compiled = sorted(p for p in case_dir.glob("*.onnx") if p.name != "source.onnx")
        # a variant that names another provider (cuda's fp16 on a CPU run) is still measured, and says so
        paths = {"source": source, **{p.stem: p for p in compiled}}
        # accuracy: "exact" scores int8 unfused (the exact integer result) where this host's kernels saturate
        scoring = {
            name: _session(path, provider, threads, "basic" if exact and name != "source" else "all")
            for name, path in paths.items()
        }
        nhwc = {name: _channel_last(path) for name, path in paths.items()}
        outputs = {
            name: _outputs(s, images, "x" in nhwc[name], s.get_outputs()[0].name in nhwc[name])
            for name, s in scoring.items()
        }
        sessions = {name: _session(path, provider, threads) for name, path in paths.items()}
        if texts:
            chars = textset.charset(onnx.load(source, load_external_data=False))
            quality = {n: textset.char_accuracy(textset.ctc_greedy(o, chars), texts) for n, o in outputs.items()}
            metric = "char_acc"
        else:
            per_page = {
                n: [textset.pixel_f1(outputs["source"][i], o[i]) for i in range(len(o))] for n, o in outputs.items()
            }
            quality = {n: float(np.mean(f)) for n, f in per_page.items()}
            worst = {n: round(float(np.min(f)), 4) for n, f in per_page.items()}  # one bad page hides in a mean
            metric = "pixel_f1_vs_source"
        feeds = {
            name: {"x": np.ascontiguousarray(images[:1].transpose(0, 2, 3, 1)) if "x" in nhwc[name] else images[:1]}
            for name in sessions
        }
        times = _interleaved(sessions, feeds, rounds, 5)
        base = float(np.median(times["source"]))
        for name, s in sessions.items():
            p50 = float(np.median(times[name]))
            extra = {} if texts else {"pixel_f1_worst_page": worst[name]}
            rows.append(
                {
                    "case": case_dir.name,
                    "model": name,
                    "provider_used": s.get_providers()[0],
                    metric: round(quality[name], 4),
                    "p50_ms": round(p50, 3),
                    "latency_ratio": round(p50 / base, 3),
                    "runs": len(times[name]),
                    "size_mb": round((case_dir / f"{name}.onnx").stat().st_size / 1e6, 3),
                    "size_ratio": round((case_dir / f"{name}.onnx").stat().st_size / source.stat().st_size, 4),
                    **extra,
                }
            )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    result = {
        "provider": provider,
        "threads": threads,
        "ort": ort.__version__,
        "cpu": cpu,
        "exact_scoring": exact,
        "vnni": [f for f in flags if "vnni" in f],
        "rows": rows,
    }
    print(f"\n{provider}, ORT {ort.__version__}, {threads} thread(s), CPU {cpu}, VNNI flags {result['vnni'] or 'none'}")
    print(
        f"{'case':<5}{'model':<18}{'EP used':<24}{'quality':>9}{'worst':>8}{'p50 ms':>10}{'ratio':>8}{'MB':>8}{'size x':>8}"
    )
    for r in rows:
        q = r.get("char_acc", r.get("pixel_f1_vs_source"))
        worst_page = f"{r['pixel_f1_worst_page']:.4f}" if "pixel_f1_worst_page" in r else "-"
        print(
            f"{r['case']:<5}{r['model']:<18}{r['provider_used']:<24}{q:>9.4f}{worst_page:>8}{r['p50_ms']:>10.3f}"
            f"{r['latency_ratio']:>8.3f}{r['size_mb']:>8.2f}{r['size_ratio']:>8.3f}"
        )
    name = f"measure-{provider}-t{threads}.json"
    (folder / name).write_text(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    if len(sys.argv) == 1:  # `make bench` runs every script bare: this one needs a step and a folder
        print(
            "skipped: bench_deployed.py needs `prepare DIR` here, then `measure DIR` on the machine to measure (see its docstring)"
        )
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--targets", default="cpu-avx,edge-arm,cuda")
    p.add_argument("--cases", default="det,rec")
    m = sub.add_parser("measure")
    m.add_argument("dir", type=Path)
    m.add_argument("--provider", default="CPUExecutionProvider")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--rounds", type=int, default=10)
    m.add_argument(
        "--exact",
        action="store_true",
        help="score int8 accuracy unfused (a build host without VNNI); latency is still ORT's all-optimisation run",
    )
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.dir, args.targets.split(","), args.cases.split(","))
    else:
        measure(args.dir, args.provider, args.threads, args.rounds, args.exact)


if __name__ == "__main__":
    main()
