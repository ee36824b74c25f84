"""The benchmark report: ``report.json`` is the source; Markdown and HTML render from it."""
from __future__ import annotations

from typing import Any

from . import __version__
from .pipeline import StepRecord
from .stats import ModelStats

REPORT_FORMAT = "lepton-report/1"


def build_report(*, model_name: str, source_sha256: str, target: dict[str, Any], source: ModelStats,
                 compiled: ModelStats, steps: list[StepRecord], normalisation: list[str],
                 warnings: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report of one compile (sections added by later stages go in ``extra``)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    report = {
        "format": REPORT_FORMAT,
        "tool": {"name": "lepton", "version": __version__},
        "model": {"name": model_name, "sha256": source_sha256},
        "target": target,
        "normalisation": normalisation,
        "source": source.to_dict(),
        "compiled": compiled.to_dict(),
        "summary": {
            "size_ratio": ratio(compiled.size_bytes, source.size_bytes),
            "params_ratio": ratio(compiled.params, source.params),
            "macs_ratio": ratio(compiled.macs, source.macs),
            "nodes_before": source.nodes,
            "nodes_after": compiled.nodes,
        },
        "pipeline": [s.to_dict() for s in steps],
        "warnings": list(warnings),
    }
    report.update(extra or {})
    return report
