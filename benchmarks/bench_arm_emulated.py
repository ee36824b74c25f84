"""edge-arm bundles run on Arm (user-mode emulation) against the compile report's accuracy claim.

Builds, once, an arm64 Debian trixie root (``debootstrap --foreign``: download and unpack only, no
arm code runs) and takes QEMU 10 from trixie's ``qemu-user`` package (static; bookworm's 7.2 shows
the guest the host's x86 ``/proc/cpuinfo`` and onnxruntime crashes on import), installs Lepton's
dependencies as aarch64 wheels from PyPI (``pip install --target --platform ...aarch64``), then
compiles the digits example and PP-OCRv4 rec (48x160, rendered text lines) for edge-arm on this
host and runs ``lepton run`` on each bundle under ``QEMU_CPU=cortex-a76``. Reported per model:
the compile report's claim (scored on x86), ``lepton run`` on x86, ``lepton run`` on emulated Arm,
and how many samples decode differently between the two runs. ONNX Runtime on Arm fuses more
Q/DQ Convs into QLinearConv than on x86 (no VNNI there), so the report's x86 score estimates a
different graph from the one the Arm device runs; the table says which graph each number scored.

    .venv/bin/python benchmarks/bench_arm_emulated.py [--root /tmp/lepton-arm64] [--no-rec]

Needs root (debootstrap) and network access to deb.debian.org and PyPI; minutes of emulation.
Writes benchmarks/results/bench_arm_emulated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
DEPENDENCIES = [
    "typer>=0.12",
    "rich>=13",
    "onnx>=1.16",
    "onnxruntime>=1.18",
    "onnxsim>=0.4.36",
    "numpy>=1.24",
    "cryptography>=46",
]
PLATFORMS = ["manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_34_aarch64"]


def _sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kwargs)


def _unpack_included(root: Path) -> None:
    """debootstrap --foreign downloads --include packages but unpacks only the required set: unpack them too."""
    for deb in sorted((root / "var/cache/apt/archives").glob("*.deb")):
        _sh("dpkg-deb", "-x", str(deb), str(root))


def build_environment(base: Path) -> tuple[Path, Path, Path]:
    """(qemu-aarch64 binary, arm64 root, aarch64 site-packages), built once under ``base``."""
    qemu, root, site = base / "qemu/usr/bin/qemu-aarch64", base / "root", base / "site"
    if not qemu.exists():
        helper = base / "qemu-download"
        _sh(
            "debootstrap",
            "--foreign",
            "--arch=amd64",
            "--variant=minbase",
            "--include=qemu-user",
            "trixie",
            str(helper),
            MIRROR,
        )
        deb = next((helper / "var/cache/apt/archives").glob("qemu-user_*.deb"))
        _sh("dpkg-deb", "-x", str(deb), str(base / "qemu"))
        shutil.rmtree(helper, ignore_errors=True)
    if not (root / "usr/bin/python3").exists():
        _sh(
            "debootstrap",
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3",
            "trixie",
            str(root),
            MIRROR,
        )
        _unpack_included(root)
    if not (site / "onnxruntime").exists():
        version = _sh(
            str(qemu),
            "-L",
            str(root),
            str(root / "usr/bin/python3"),
            "-c",
            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        ).stdout.strip()
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        _sh(
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(site),
            *platforms,
            "--python-version",
            version,
            "--implementation",
            "cp",
            "--only-binary=:all:",
            *DEPENDENCIES,
        )
    # Lepton itself, pure Python, as an installed package (its builtin targets live in package data).
    _sh(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--upgrade",
        "--target",
        str(base / "lepton"),
        str(REPO),
    )
    return qemu, root, site


def _arm_run(env_parts: tuple[Path, Path, Path], args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    qemu, root, site = env_parts
    arm_env = {**env, "QEMU_CPU": "cortex-a76", "PYTHONPATH": f"{site.parent / 'lepton'}:{site}"}
    start = time.perf_counter()
    done = subprocess.run(
        [str(qemu), "-L", str(root), str(root / "usr/bin/python3"), "-m", "lepton_cli", *args],
        capture_output=True,
        text=True,
        env=arm_env,
        cwd=site.parent,
    )  # not REPO: its source tree would shadow
    if done.returncode != 0:
        raise RuntimeError(f"lepton on emulated Arm failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout), time.perf_counter() - start


def _x86_run(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "lepton_cli", *args], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    return json.loads(done.stdout)


def _rec_inputs(folder: Path) -> tuple[Path, Path, Path, list[str], object]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "tests"))
    import ocr_textset as textset
    import onnx
    from conftest import OCR_REC

    from lepton_cli.model.load import upgrade_opset
    from lepton_cli.model.shapes import bind_input_shapes

    model, _ = upgrade_opset(onnx.load(OCR_REC), 13, 21)
    onnx.save(bind_input_shapes(model, {"x": [1, 3, 48, 160]}), folder / "rec160.onnx")
    calib, _ = textset.make_set(64, 1, "calib", width=160)
    evaluation, texts = textset.make_set(200, 3, "eval", width=160)
    np.savez(folder / "calib.npz", x=calib)
    np.savez(folder / "eval.npz", x=evaluation, labels=np.array(texts))
    return folder / "rec160.onnx", folder / "calib.npz", folder / "eval.npz", texts, textset


def _score(outputs: Path, texts: list[str] | None, textset: object, model: Path) -> tuple[float, np.ndarray]:
    data = np.load(outputs)
    first = data[data.files[0]]
    if texts is None:
        labels = np.load(REPO / "examples/digits/eval.npz")["labels"]
        return float((first.argmax(1) == labels).mean() * 100), first.argmax(1)
    import onnx

    decoded = textset.ctc_greedy(first, textset.charset(onnx.load(model)))
    return textset.char_accuracy(decoded, texts), np.array(decoded, dtype=object)


def measure(
    name: str,
    model: Path,
    calib: Path,
    evaluation: Path,
    texts: list[str] | None,
    textset: object,
    folder: Path,
    env: dict[str, str],
    arm: tuple[Path, Path, Path],
) -> dict:
    compiled = _x86_run(
        [
            "compile",
            str(model),
            "--target",
            "edge-arm",
            "--calib",
            str(calib),
            "--eval",
            str(evaluation),
            "-o",
            str(folder),
            "--no-bench",
            "--json",
        ],
        env,
    )
    bundle = compiled["bundle"]
    report = json.loads((Path(bundle) / "report.json").read_text())
    x86_out, arm_out = folder / f"{model.stem}.x86.npz", folder / f"{model.stem}.arm.npz"
    _x86_run(["run", bundle, "--inputs", str(evaluation), "-o", str(x86_out), "--json"], env)
    arm_doc, seconds = _arm_run(arm, ["run", bundle, "--inputs", str(evaluation), "-o", str(arm_out), "--json"], env)
    x86_value, x86_pred = _score(x86_out, texts, textset, model)
    arm_value, arm_pred = _score(arm_out, texts, textset, model)
    return {
        "model": name,
        "metric": report["accuracy"]["metric"],
        "report_claim": report["accuracy"]["value"],
        "report_arithmetic": report["accuracy"].get("arithmetic"),
        "x86_run": round(x86_value, 4),
        "arm_run": round(arm_value, 4),
        "samples": len(x86_pred),
        "samples_differing": int(sum(a != b for a, b in zip(x86_pred, arm_pred))),
        "arm_providers": arm_doc["providers"],
        "arm_selection_log": arm_doc["selection"]["log"],
        "arm_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lepton-arm64",
        help="where the arm64 environment is built (kept)",
    )
    parser.add_argument("--no-rec", action="store_true", help="digits only")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    arm = build_environment(args.root)
    rows = []
    detect: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "LEPTON_HOME": str(folder / "home")}
        detect, _ = _arm_run(arm, ["detect", "--json"], env)
        print(
            f"lepton detect on emulated Arm: {detect['suggestion']['target']}; notes: {detect['suggestion']['warnings']}"
        )
        digits = REPO / "examples" / "digits"
        rows.append(
            measure(
                "digits",
                digits / "digits_cnn.onnx",
                digits / "calib.npz",
                digits / "eval.npz",
                None,
                None,
                folder,
                env,
                arm,
            )
        )
        if not args.no_rec:
            model, calib, evaluation, texts, textset = _rec_inputs(folder)
            rows.append(measure("PP-OCRv4 rec 48x160", model, calib, evaluation, texts, textset, folder, env, arm))
    print(
        f"{'model':22} {'metric':13} {'report (x86 scoring)':>21} {'run x86':>8} {'run Arm':>8} {'differ':>9}  Arm EP"
    )
    for r in rows:
        print(
            f"{r['model']:22} {r['metric']:13} {r['report_claim']:21.2f} {r['x86_run']:8.2f} {r['arm_run']:8.2f} "
            f"{r['samples_differing']:4}/{r['samples']:<4}  {', '.join(r['arm_providers'])}"
        )
    out = REPO / "benchmarks" / "results" / "bench_arm_emulated.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"qemu_cpu": "cortex-a76", "detect": detect["suggestion"], "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
