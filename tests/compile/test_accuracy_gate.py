"""compile measures accuracy against the source and enforces the budget (exit 3, nothing written)."""

from __future__ import annotations

import json

import numpy as np
from conftest import DIGITS
from onnx import numpy_helper

TARGET_WITH_NOISE = """
name = "noisy"
extends = "cpu-avx"
passes = [{{ name = "test_add_noise", why = "simulates a lossy pass", scale = {scale} }}]
"""


def _register_noise_pass():
    """A lossy test pass that perturbs weights, to drive the gate deterministically."""
    from dataclasses import dataclass

    from lepton_cli.pipeline.registry import _REGISTRY, LOSSY, PassResult, register_pass

    if "test_add_noise" in _REGISTRY:
        return

    @dataclass(frozen=True)
    class NoiseParams:
        scale: float = 0.0

    @register_pass("test_add_noise", params=NoiseParams, description="test only", exactness=LOSSY)
    def add_noise(model, ctx, params):
        rng = np.random.default_rng(ctx.seed)
        for init in model.graph.initializer:
            weights = numpy_helper.to_array(init)
            if weights.dtype == np.float32 and weights.size > 100:
                noise = rng.normal(0, params.scale * weights.std(), weights.shape)
                init.CopyFrom(numpy_helper.from_array((weights + noise).astype(np.float32), init.name))
        return PassResult(model, {"scale": params.scale})


def _compile(run_cli, tmp_path, scale: float, *extra: str):
    _register_noise_pass()
    target = tmp_path / "noisy.toml"
    target.write_text(TARGET_WITH_NOISE.format(scale=scale))
    out = tmp_path / "out"
    result = run_cli(
        "compile",
        DIGITS / "digits_cnn.onnx",
        "--target",
        target,
        "-o",
        out,
        "--eval",
        DIGITS / "eval.npz",
        "--json",
        *extra,
    )
    return result, out


def test_report_holds_the_measured_top1(run_cli, tmp_path):
    result, out = _compile(run_cli, tmp_path, 0.0)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)["report"] if "report" in json.loads(result.stdout) else None
    bundle = next(out.glob("*.lepton"))
    report = report or json.loads((bundle / "report.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy["measured"] and accuracy["metric"] == "top1" and accuracy["data"] == "--eval"
    assert accuracy["drop_pct"] == 0 and abs(accuracy["source_value"] - 98.4887) < 1e-3


def test_a_drop_over_the_budget_exits_3_and_writes_nothing(run_cli, tmp_path):
    result, out = _compile(run_cli, tmp_path, 0.5, "--max-accuracy-drop", "0.5")
    assert result.code == 3, result.stderr
    assert "accuracy dropped" in result.stderr and "budget of 0.5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.lepton")) if out.exists() else True
