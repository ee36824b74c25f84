"""Bundle speed and memory: write, verify, verify + decrypt of a 100 MB model; bundle share of a compile.

Targets (issue 6): verify + decrypt >= 500 MB/s, peak memory <= 2x the model, the bundle step
<= 10% of a compile. Each open runs in a fresh subprocess so its peak RSS is its own; runs are
interleaved (verify, open, plain read), and a plain read of the same bytes is the baseline.

    .venv/bin/python benchmarks/bench_bundle.py [--mb 100] [--repeats 3] [--skip-compile] [--big-compile]

Writes benchmarks/results/bench_bundle.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from lepton_cli.bundle import open_bundle, verify_bundle
mode, bundle, keys, state = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
def status(field):  # bytes; ru_maxrss would carry the parent's peak across fork+exec
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (Linux >= 4.0)
except OSError:
    pass
base = status("VmRSS")
start, cpu = time.perf_counter(), time.process_time()
if mode == "open":
    opened = open_bundle(bundle, key=str(keys / "encryption-private.pem"), trust=str(keys / "signing-public.pem"), state_path=state)
    size = len(opened.models["model.onnx"])
elif mode == "verify":
    verify_bundle(bundle, trust=str(keys / "signing-public.pem"), state_path=state)
    size = 0
else:  # plain read of the ciphertext file: the I/O floor
    data = (bundle / "model.onnx.enc").read_bytes()
    size = len(data)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
peak = status("VmHWM")
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "peak_delta": peak - base, "size": size}}))
"""


def _model(mb: int) -> bytes:
    import onnx
    from onnx import helper, numpy_helper

    n = int((mb * 1e6 / 4) ** 0.5)
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _child(mode: str, bundle: Path, keys: Path, state: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO)), mode, str(bundle), str(keys), str(state)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_open(mb: int, repeats: int, work: Path) -> dict:
    from lepton_cli.bundle import write_bundle
    from lepton_cli.bundle.keys import generate_keys, load_key

    keys = work / "keys"
    generate_keys(keys)
    model = _model(mb)
    size = len(model)
    writes = []
    for i in range(repeats):
        start = time.perf_counter()
        bundle = write_bundle(
            work / "big.bench.lepton",
            models={"model.onnx": model},
            plain_files={"report.json": b"{}"},
            manifest_fields={"model": {"name": "big"}, "target": {"name": "bench"}},
            signing_key=load_key(str(keys / "signing-private.pem"), "signing", "private", origin="b"),
            recipients=[load_key(str(keys / "encryption-public.pem"), "encryption", "public", origin="b")],
            version=1,
            expires=None,
        )
        writes.append(time.perf_counter() - start)
    del model
    runs: dict[str, list[dict]] = {"read": [], "verify": [], "open": []}
    for _ in range(repeats):  # interleaved
        for mode in ("read", "verify", "open"):
            runs[mode].append(_child(mode, bundle, keys, work / "state.json"))
    mbs = size / 1e6

    def summary(mode: str) -> dict:
        secs = [r["seconds"] for r in runs[mode]]
        cpu = [r["cpu_seconds"] for r in runs[mode]]
        return {
            "median_s": statistics.median(secs),
            "mb_per_s": mbs / statistics.median(secs),
            "median_cpu_s": statistics.median(cpu),
            "mb_per_cpu_s": mbs / statistics.median(cpu),
            "best_mb_per_s": mbs / min(secs),
            "peak_delta_x_model": max(r["peak_delta"] for r in runs[mode]) / size,
        }

    result = {
        "load_average": " ".join(open("/proc/loadavg").read().split()[:3]),
        "model_mb": round(mbs, 1),
        "write_median_s": statistics.median(writes),
        "write_mb_per_s": mbs / statistics.median(writes),
        **{mode: summary(mode) for mode in runs},
    }
    result["open_vs_read_ratio"] = result["open"]["median_s"] / result["read"]["median_s"]
    return result


def compile_share(repeats: int, work: Path, big_compile: bool = False) -> list[dict]:
    import os

    import onnx

    from lepton_cli.compile import compiler
    from lepton_cli.compile.compiler import CompileOptions, compile_model
    from lepton_cli.errors import LeptonError

    os.environ["LEPTON_HOME"] = str(work / "home")
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    cases = [
        ("digits_cnn", REPO / "examples" / "digits" / "digits_cnn.onnx", "cpu-avx", []),
        ("light_squeezenet", light / "light_squeezenet.onnx", "cpu-avx", []),
        ("light_vgg19", light / "light_vgg19.onnx", "cpu-avx", []),
    ]
    if not big_compile:  # vgg19 compiles for ~1 minute per run on this box: opt-in
        cases = cases[:2]
    real = compiler._write_output
    rows = []
    for name, path, target, shapes in cases:
        if not path.exists():
            continue
        shares, totals, steps = [], [], []
        for i in range(repeats):
            spent = {}

            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return real(*args, **kwargs)
                finally:
                    spent["s"] = time.perf_counter() - start

            compiler._write_output = timed
            try:
                start = time.perf_counter()
                result = compile_model(
                    CompileOptions(model=path, target=target, output_dir=work / "out", input_shapes=shapes)
                )
                total = time.perf_counter() - start
            except LeptonError as exc:  # another stage failing is not this benchmark's subject
                print(f"skipped {name} → {target}: {exc.one_line()}")
                break
            finally:
                compiler._write_output = real
            shares.append(spent["s"] / total)
            totals.append(total)
            steps.append(spent["s"])
        if not totals:
            continue
        rows.append(
            {
                "model": name,
                "target": target,
                "compiled_mb": round(len(result.model_bytes) / 1e6, 2),
                "compile_s": statistics.median(totals),
                "bundle_step_s": statistics.median(steps),
                "bundle_share_pct": 100 * statistics.median(shares),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--big-compile", action="store_true", help="also light_vgg19 (~100 MB source, minutes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lepton-bench-bundle-") as tmp:
        work = Path(tmp)
        big = bench_open(args.mb, args.repeats, work)
        shares = [] if args.skip_compile else compile_share(args.repeats, work, args.big_compile)
    print(f"model {big['model_mb']} MB, median of {args.repeats} interleaved runs, each open in a fresh process")
    print(f"load average at start: {big['load_average']}")
    print(f"{'step':<24} {'MB/s':>8} {'best MB/s':>10} {'MB/CPU-s':>9} {'peak RSS / model':>17}")
    print(f"{'write (encrypt+sign)':<24} {big['write_mb_per_s']:>8.0f}")
    for mode, label in (("read", "plain read (floor)"), ("verify", "verify (no key)"), ("open", "verify + decrypt")):
        row = big[mode]
        print(
            f"{label:<24} {row['mb_per_s']:>8.0f} {row['best_mb_per_s']:>10.0f} {row['mb_per_cpu_s']:>9.0f} {row['peak_delta_x_model']:>16.2f}x"
        )
    print(f"verify+decrypt / plain read time: {big['open_vs_read_ratio']:.2f}x")
    if shares:
        print(f"\n{'compile':<28} {'model MB':>9} {'compile s':>10} {'bundle s':>9} {'share':>7}")
        for row in shares:
            print(
                f"{row['model'] + ' → ' + row['target']:<28} {row['compiled_mb']:>9.2f} {row['compile_s']:>10.2f} "
                f"{row['bundle_step_s']:>9.3f} {row['bundle_share_pct']:>6.1f}%"
            )
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bundle.json").write_text(json.dumps({"big_model": big, "compile_share": shares}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
