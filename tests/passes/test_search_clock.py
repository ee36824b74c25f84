"""The quantize search's wall-time limit (``max_search_seconds``) on the digits CNN and its own images: the choice
among what was scored before it, or exit 3 naming the limit, never a half-written bundle."""

from __future__ import annotations

import json

from conftest import DIGITS
from lepton_cli.passes._quantize import search_clock

TARGET = """
name = "cpu-avx-limited"
extends = "cpu-avx"

[pass_params.quantize]
max_search_seconds = {limit}
"""


def _compile(run_cli, tmp_path, limit: float):
    target = tmp_path / "limited.toml"
    target.write_text(TARGET.format(limit=limit))
    out = tmp_path / "out"
    result = run_cli(
        "compile", DIGITS / "digits_cnn.onnx", "--target", target, "--calib", DIGITS / "calib.npz", "-o", out,
        "--no-bench",
    )  # fmt: skip
    return result, out


def test_a_search_past_its_limit_exits_3_naming_it_and_writes_nothing(run_cli, tmp_path):
    result, out = _compile(run_cli, tmp_path, 1e-9)
    assert result.code == 3, result.stderr
    assert "before the search's 1e-09 s limit (quantize.max_search_seconds)" in result.stderr
    assert "raise or remove quantize.max_search_seconds" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not list(out.iterdir())


def test_the_candidates_scored_before_the_limit_still_choose(run_cli, tmp_path, monkeypatch):
    """The limit passing after the first candidate: it is scored (within budget), the next is never built."""
    checks = []

    def check(clock: search_clock.SearchClock) -> None:
        checks.append(clock.elapsed())
        if len(checks) > 1:
            raise search_clock.SearchTimeUp("test")

    monkeypatch.setattr(search_clock.SearchClock, "check", check)
    result, out = _compile(run_cli, tmp_path, 1500)
    assert result.code == 0, result.stderr
    report = json.loads((next(out.glob("*.lepton")) / "report.json").read_text())
    summary = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    assert summary["search_stopped_s"] >= 0 and len(checks) == 2
    assert "the search stopped at its 1500 s limit (max_search_seconds)" in result.stderr  # not reproducible: said
    assert [t["method"] for t in summary["tried"]] == ["minmax"]  # the one candidate scored, and chosen
    assert summary["method"] == "minmax" and summary["float_kept"] == []
    page = (next(out.glob("*.lepton")) / "report.md").read_text()
    assert "search stopped" in page and "max_search_seconds" in page


def test_a_limit_must_be_positive(run_cli, tmp_path):
    result, _ = _compile(run_cli, tmp_path, 0)
    assert result.code == 2 and "max_search_seconds" in result.stderr and "Traceback" not in result.stderr
