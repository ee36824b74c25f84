"""report.md / report.html from a real compile report; step summary; baseline gate; a headless Chromium screenshot."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import DIGITS

from lepton_cli.compile import report_render
from lepton_cli.compile.report import apply_gates, baseline_checks
from lepton_cli.errors import QualityGateError

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One real compile of the digits demo (with calibration data), shared by the tests below."""
    from lepton_cli.compile.compiler import CompileOptions, compile_model

    tmp = tmp_path_factory.mktemp("render")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEPTON_HOME", str(tmp / "home"))
        mp.setenv("GITHUB_STEP_SUMMARY", str(tmp / "summary.md"))
        result = compile_model(
            CompileOptions(
                model=DIGITS / "digits_cnn.onnx",
                target="cpu-avx",
                output_dir=tmp,
                calib=DIGITS / "calib.npz",
                eval=DIGITS / "eval.npz",
                bench_seconds=0.3,
            )
        )
    return result, tmp


def test_compile_report_has_the_issue_7_sections(compiled):
    result, _ = compiled
    report = result.report
    lat = report["host_latency"]
    assert set(lat["models"]) == {"source", "compiled"} and "compiled" in lat["ratios"]
    assert lat["input"]["source"].startswith("--eval")
    assert set(report["cost_model"]["models"]) == {"source", "compiled"}
    assert report["budgets"]["model"] == "compiled" and report["budgets"]["checks"]
    for key in ("source", "compiled", "summary", "pipeline", "warnings", "accuracy"):  # the existing keys stay
        assert key in report


def test_markdown_has_every_section_and_fits_a_step_summary(compiled):
    result, tmp = compiled
    md = report_render.render_markdown(result.report)
    for heading in ("### Model", "### Accuracy", "### Host latency", "### Cost model", "### Budgets", "### Pipeline"):
        assert heading in md
    assert "<" not in md.replace("<details>", "")  # plain Markdown: no HTML a step summary would strip
    assert "| compiled |" in md and "p50 ratio [95% CI]" in md
    assert (tmp / "summary.md").read_text(encoding="utf-8").strip() == md.strip()  # compile appended it
    assert len(md) < 64 * 1024  # GitHub's step summary limit is 1 MiB per step; stay tiny


def test_the_quantize_choice_is_stated_in_both_renderings(compiled):
    """digits on cpu-avx: the search's choice (method, op types, source, float-kept nodes, why) in Markdown and HTML,
    read from the quantize step's own summary."""
    result, _ = compiled
    quantize = next(s for s in result.report["pipeline"] if s["name"] == "quantize")["summary"]
    md = report_render.render_markdown(result.report)
    assert "### Quantization choice" in md
    assert f"| calibration method | {quantize['method']} |" in md
    assert "| source quantized | the model as given |" in md  # a CNN has nothing for the SmoothQuant tier
    assert f"| nodes kept float | {len(quantize['float_kept'])}" in md
    assert f"| why this one | {quantize['choice']} |" in md
    assert "<h2>Quantization choice</h2>" in report_render.render_html(result.report)


def test_bundle_carries_rendered_reports(compiled):
    result, _ = compiled
    assert (result.bundle_dir / "report.md").read_text(encoding="utf-8") == report_render.render_markdown(result.report)
    assert (result.bundle_dir / "report.html").read_text(encoding="utf-8") == report_render.render_html(result.report)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def test_html_is_self_contained_with_plots(compiled):
    result, _ = compiled
    page = report_render.render_html(result.report)
    parsed = _Collector()
    parsed.feed(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags and not parsed.urls  # nothing fetched
    assert parsed.tags.count("svg") >= 3  # latency distribution, waterfalls, op-time bars
    assert page.count("<rect") > 10


def test_the_choice_table_names_the_recovery_tier_source(compiled):
    """A choice from the recovery tier (transform "recovery") says which steps made the source it quantized."""
    result, _ = compiled
    report = json.loads(json.dumps(result.report))
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    quantize |= {"transform": "recovery", "recovery_tier": {"steps": ["adaround", "bias_correction"], "changed": {}}}
    md = report_render.render_markdown(report)
    assert "| source quantized | after adaround + bias_correction (recovery tier: " in md


def test_the_choice_table_counts_the_element_wise_lowering(compiled):
    result, _ = compiled
    report = json.loads(json.dumps(result.report))
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    md = report_render.render_markdown(report)
    assert "element-wise in integer kernels" not in md  # digits has no gate or scalar Add to lower
    quantize["integer_elementwise"] = {"scalar_adds_folded": 7, "hardsigmoids_as_add": 14, "gates_quantized": 15}
    md = report_render.render_markdown(report)
    assert "| element-wise in integer kernels | 7 scalar Adds folded into a quantize's zero point; 14 HardSigmoid" in md


def test_layer_errors_rendered_when_a_pass_reports_them():
    report = {
        "format": "lepton-report/1",
        "model": {"name": "m.onnx"},
        "target": {"name": "t"},
        "pipeline": [
            {
                "name": "quantize",
                "seconds": 1.0,
                "before": {"size_bytes": 100},
                "after": {"size_bytes": 30},
                "summary": {"per_layer_error": [{"name": "conv1", "snr_db": 31.5}, {"name": "fc <b>", "snr_db": 12.0}]},
                "check": {"kind": "lossy"},
            }
        ],
    }
    assert report_render.layer_errors(report) == ("snr_db", [("conv1", 31.5), ("fc <b>", 12.0)])
    page = report_render.render_html(report)
    assert "Per-layer quantization error" in page and "fc &lt;b&gt;" in page and "fc <b>" not in page
    assert "| fc <b> | 12.0000 |" in report_render.render_markdown(report)
    assert report_render.layer_errors({"pipeline": [{"summary": {"x": 1}}]}) is None
    # the quantize pass's own shape (passes/quantize.py: worst_layers of node / local_nsr)
    quantize = {"pipeline": [{"summary": {"worst_layers": [{"node": "Conv_3", "local_nsr": 0.012}]}}]}
    assert report_render.layer_errors(quantize) == ("local_nsr", [("Conv_3", 0.012)])


def test_step_summary_only_when_set(tmp_path):
    report = {"format": "lepton-report/1", "warnings": ["a | b"]}
    assert report_render.append_step_summary(report, environ={}) is None
    target = tmp_path / "s.md"
    report_render.append_step_summary(report, environ={"GITHUB_STEP_SUMMARY": str(target)})
    report_render.append_step_summary(report, environ={"GITHUB_STEP_SUMMARY": str(target)})
    text = target.read_text(encoding="utf-8")
    assert text.count("## Lepton report") == 2 and "a \\| b" in text


def test_baseline_gate(compiled):
    result, _ = compiled
    report = copy.deepcopy(result.report)
    same = baseline_checks(report, result.report)
    assert same and all(c["ok"] for c in same)
    better_baseline = copy.deepcopy(result.report)
    better_baseline["compiled"]["size_bytes"] = report["compiled"]["size_bytes"] // 2
    better_baseline["cost_model"]["models"]["compiled"]["latency_ms"] /= 2
    with pytest.raises(QualityGateError) as err:
        apply_gates(report, baseline=better_baseline)
    assert "compiled size" in err.value.message and "estimated latency" in err.value.message
    assert any(g["gate"] == "baseline" and not g["ok"] for g in report["gates"])


def test_compile_baseline_cli_exit_codes(run_cli, compiled, tmp_path):
    result, _ = compiled
    baseline = tmp_path / "baseline.json"
    doc = copy.deepcopy(result.report)
    doc["compiled"]["size_bytes"] = 10  # a stored report the new compile cannot match
    baseline.write_text(json.dumps(doc), encoding="utf-8")
    res = run_cli(
        "compile",
        DIGITS / "digits_cnn.onnx",
        "--target",
        "cpu-avx",
        "-o",
        tmp_path,
        "--no-bench",
        "--baseline",
        baseline,
    )
    assert res.code == 3 and "baseline" in res.stderr
    assert not list(tmp_path.glob("*.lepton"))  # nothing written when a gate fails
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    res = run_cli(
        "compile", DIGITS / "digits_cnn.onnx", "--target", "cpu-avx", "-o", tmp_path, "--no-bench", "--baseline", bad
    )
    assert res.code == 2
    # a report in name only: no measurement to compare (it passed every compile)
    unrelated = tmp_path / "unrelated.json"
    unrelated.write_text(json.dumps({"format": result.report["format"]}), encoding="utf-8")
    res = run_cli(
        "compile", DIGITS / "digits_cnn.onnx", "-t", "cpu-avx", "-o", tmp_path, "--no-bench", "--baseline", unrelated
    )
    assert res.code == 2 and "shares no measurement with this compile" in res.stderr
    assert not list(tmp_path.glob("*.lepton"))


# CI must run it (`make test` installs chromium); elsewhere a missing browser only skips it.
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="/usr/bin/chromium not installed (make browser)"
)
def test_html_screenshot_in_headless_chromium(compiled, tmp_path):
    from PIL import Image

    result, _ = compiled
    page = tmp_path / "report.html"
    page.write_text(report_render.render_html(result.report), encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert shot.exists(), proc.stderr[-2000:]
    import numpy as np

    image = Image.open(shot).convert("RGB")
    assert image.size == (1100, 2400)
    pixels = np.asarray(image).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # text, tables and plots, not a blank page
    # the plots were drawn: solid blue of the waterfall's result bars (the histogram's bars are translucent)
    blue = [int(report_render.PALETTE[0][i : i + 2], 16) for i in (1, 3, 5)]
    assert int((pixels == blue).all(axis=1).sum()) > 200
    shutil.copy(shot, Path("/tmp/lepton-report-screenshot.png")) if Path("/tmp").is_dir() else None


def test_compile_latency_and_budget_gates_exit_3(run_cli, tmp_path):
    # Any measured ratio is far above 1e-6, so this gate fails whatever the machine's speed.
    res = run_cli(
        "compile",
        DIGITS / "digits_cnn.onnx",
        "--target",
        "cpu-avx",
        "-o",
        tmp_path,
        "--calib",
        DIGITS / "calib.npz",
        "--bench-seconds",
        "0.1",
        "--max-latency-ratio",
        "0.000001",
    )
    assert res.code == 3 and "max-latency-ratio" in res.stderr
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('extends = "cpu-avx"\nname = "tiny"\n[budgets]\nmax_model_size_mb = 0.01\n', encoding="utf-8")
    res = run_cli(
        "compile", DIGITS / "digits_cnn.onnx", "--target", tiny, "-o", tmp_path, "--no-bench", "--enforce-budgets"
    )
    assert res.code == 3 and "model size" in res.stderr
    assert not list(tmp_path.glob("*.lepton"))
    res = run_cli(
        "compile", DIGITS / "digits_cnn.onnx", "--target", tiny, "-o", tmp_path, "--no-bench"
    )  # not enforced: written
    assert res.code == 0, res.stderr
    report = json.loads(next(tmp_path.glob("*.lepton")).joinpath("report.json").read_text(encoding="utf-8"))
    assert report["budgets"]["ok"] is False and report["host_latency"] == {"measured": False, "reason": "--no-bench"}
