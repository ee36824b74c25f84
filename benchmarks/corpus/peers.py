"""The peer tools' own venvs in the corpus cache (ONNX Runtime's and NNCF's quantizers never enter Lepton's environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .fetch import cache_dir

PEER_VENVS = {
    "ort": ["onnxruntime==1.32.0", "onnx==1.23.2", "numpy"],
    "nncf": ["nncf==3.4.0", "onnxruntime==1.32.0", "onnx==1.23.2"],
}
PEER_SCRIPT = Path(__file__).with_name("peer_quantize.py")


def peer_python(tool: str) -> Path:
    """The tool's venv interpreter, created on first use ("nncf-ac" shares NNCF's, "ort-dynamic" ORT's)."""
    key = "nncf" if tool.startswith("nncf") else "ort"
    venv = cache_dir() / f"venv-{key}"
    stamp = venv / ".installed"
    if not stamp.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *PEER_VENVS[key]], check=True)
        stamp.write_text(" ".join(PEER_VENVS[key]))
    return venv / "bin" / "python"


def peer_command(tool: str, *args: str | Path) -> list[str]:
    return [str(peer_python(tool)), str(PEER_SCRIPT), tool, *(str(a) for a in args)]


def dynamic_quantized(source: Path, dest: Path) -> Path:
    """``source`` as ONNX Runtime's ``quantize_dynamic`` leaves it (DynamicQuantizeLinear + MatMulInteger): how many
    published transformer models ship."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.onnx")
    subprocess.run(peer_command("ort-dynamic", source, "-", tmp), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.replace(tmp, dest)
    return dest
