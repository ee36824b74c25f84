"""digits (a trained CNN and its own calibration images) through `lepton compile` with one quantize parameter set
on top of cpu-avx: the quantize step's summary, for tests of a recovery step's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from conftest import DIGITS


def quantize_summary(run_cli: Callable[..., Any], tmp_path: Path, params: str) -> dict[str, Any]:
    """The quantize step's summary of digits compiled for cpu-avx with ``params`` (TOML lines) set."""
    target = tmp_path / "steps.toml"
    target.write_text(f'extends = "cpu-avx"\nname = "cpu-avx-steps"\n[pass_params.quantize]\n{params}\n')
    out = tmp_path / "out"
    res = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", target, "--calib", DIGITS / "calib.npz", "-o", out)
    assert res.code == 0, res.stderr
    report = json.loads(next(out.glob("*.lepton/report.json")).read_text())
    return next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
