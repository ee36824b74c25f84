"""A build's results: the live table on stderr, the ``--json`` document, and one ``$GITHUB_STEP_SUMMARY`` table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from lepton_cli.compile.report import p50_ratio, section

BUILD_FORMAT = "lepton-build/1"
_SEVERITY = {0: 0, 3: 1, 4: 2, 2: 3, 1: 4}  # 2 (bad input) outranks 3 (gate) outranks 0; 1 (a bug) outranks all


@dataclass
class JobResult:
    model: str
    target: str
    state: str = "queued"  # queued | running | cached | done | failed | skipped
    exit_code: int | None = None
    bundle: str | None = None
    cached: bool = False
    seconds: float | None = None
    message: str | None = None
    worker: dict[str, Any] = field(
        default_factory=dict
    )  # pid, cores, affinity, peak_rss_mb of the process that compiled
    summary_doc: dict[str, Any] | None = None  # a few keys of the report: the driver keeps no whole reports

    def take_report(self, report: dict[str, Any]) -> None:
        self.summary_doc = {
            **section(report, "summary"),
            "accuracy_drop_pct": section(report, "accuracy").get("drop_pct"),
            "host_p50_ratio": p50_ratio(report),
        }

    def summary(self) -> dict[str, Any] | None:
        return self.summary_doc

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "exit_code": self.exit_code,
            "bundle": self.bundle,
            "cached": self.cached,
            "seconds": round(self.seconds, 3) if self.seconds is not None else None,
            "summary": self.summary(),
            "error": self.message,
            "state": self.state,
            "worker": self.worker or None,
        }


def worst_exit(codes: list[int | None]) -> int:
    """The build's exit code: the most severe of its compiles (2 over 3 over 0)."""
    known = [c for c in codes if c is not None]
    return max(known, key=lambda c: _SEVERITY.get(c, 4), default=0)


def _fmt(value: float | None, pattern: str) -> str:
    return pattern.format(value) if value is not None else "-"


def _row(result: JobResult) -> list[str]:
    summary = result.summary() or {}
    state = {
        "failed": f"[red]exit {result.exit_code}[/red]",
        "done": "[green]built[/green]",
        "cached": "[cyan]cached[/cyan]",
        "running": "[yellow]running[/yellow]",
        "skipped": "[dim]skipped[/dim]",
    }.get(result.state, result.state)
    return [
        Path(result.model).stem,
        result.target,
        state,
        _fmt(result.seconds, "{:.1f}s"),
        _fmt(summary.get("size_ratio"), "{:.3f}"),
        _fmt(summary.get("accuracy_drop_pct"), "{:.2f}"),
        _fmt(summary.get("host_p50_ratio"), "{:.3f}"),
    ]


COLUMNS = ("model", "target", "state", "time", "size ratio", "drop (pts)", "latency ratio")


def live_table(results: list[JobResult], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(
            column, justify="right" if column in ("time", "size ratio", "drop (pts)", "latency ratio") else "left"
        )
    for result in results:
        table.add_row(*_row(result))
    return table


def json_document(results: list[JobResult]) -> dict[str, Any]:
    return {
        "format": BUILD_FORMAT,
        "exit_code": worst_exit([r.exit_code for r in results]),
        "results": [r.to_dict() for r in results],
    }


def markdown_table(results: list[JobResult], exit_code: int) -> str:
    lines = [
        f"### lepton build: {len(results)} compile(s), exit {exit_code}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for result in results:
        cells = _row(result)
        cells[2] = {"done": "built", "cached": "cached", "failed": f"exit {result.exit_code}"}.get(
            result.state, result.state
        )
        if result.message:
            cells[2] += f": {result.message[:120]}"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def append_build_summary(
    results: list[JobResult], exit_code: int, environ: dict[str, str] | None = None
) -> Path | None:
    """One Markdown table for the whole build in ``$GITHUB_STEP_SUMMARY`` (GitHub Actions), when set."""
    path = (environ if environ is not None else os.environ).get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(markdown_table(results, exit_code) + "\n")
    except OSError:
        return None  # a summary we cannot write must not fail the build
    return Path(path)
