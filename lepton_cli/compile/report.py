"""The benchmark report: ``report.json`` is the source; Markdown and HTML render from it.

Readers (the renderer, the manifest fields, ``lepton build``'s summary, the CI gates) read the
report's shared parts through the accessors below, not through chains of ``.get()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lepton_cli import __version__
from lepton_cli.errors import BadInputError, QualityGateError
from lepton_cli.model.stats import ModelStats
from lepton_cli.pipeline.records import StepRecord

REPORT_FORMAT = "lepton-report/1"
Report = dict[str, Any]  # a compile's report.json, or ``lepton bench``'s document (same sections)


# -- reading a report ------------------------------------------------------------------------------


def section(report: Report, name: str) -> dict[str, Any]:
    """A top-level section (``host_latency``, ``cost_model``, ``budgets``, ``accuracy``, ...), ``{}`` when absent."""
    return report.get(name) or {}


def latency_ratio(report: Report, label: str = "compiled") -> dict[str, Any] | None:
    """``label``'s p50 over the base's with its bootstrap CI (``ratio``, ``ci_low``, ``ci_high``), or None."""
    return (section(report, "host_latency").get("ratios") or {}).get(label)


def p50_ratio(report: Report, label: str = "compiled") -> float | None:
    ratio = latency_ratio(report, label)
    return ratio["ratio"] if ratio else None


def estimate(report: Report, label: str = "compiled") -> dict[str, Any]:
    """The cost model's estimate for ``label`` (``latency_ms``, ``peak_activation_bytes``, ...), ``{}`` when absent."""
    return (section(report, "cost_model").get("models") or {}).get(label) or {}


def estimated_ms(report: Report, label: str = "compiled") -> float | None:
    return estimate(report, label).get("latency_ms")


def steps(report: Report) -> list[dict[str, Any]]:
    """The pipeline's steps as recorded (``StepRecord.to_dict``), in order."""
    return report.get("pipeline") or []


def warnings(report: Report) -> list[str]:
    return report.get("warnings") or []


def build_report(
    *,
    model_name: str,
    source_sha256: str,
    target: dict[str, Any],
    source: ModelStats,
    compiled: ModelStats,
    steps: list[StepRecord],
    normalisation: list[str],
    warnings: list[str],
    extra: dict[str, Any] | None = None,
    host_latency: dict[str, Any] | None = None,
    cost_model: dict[str, Any] | None = None,
    budgets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report of one compile (sections added by later stages go in ``extra``).

    ``host_latency`` (source vs compiled, ``measure.latency_section``), ``cost_model`` and ``budgets``
    (``costmodel.cost_model_section`` / ``budgets_section``) are added when given.
    """

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
    for key, section in (("host_latency", host_latency), ("cost_model", cost_model), ("budgets", budgets)):
        if section is not None:
            report[key] = section
    report.update(extra or {})
    return report


# -- CI gates (exit 3) -----------------------------------------------------------------------------

BASELINE_TOLERANCE_PCT = 5.0


def load_baseline(path: Path) -> dict[str, Any]:
    """A stored ``report.json`` to compare a new compile with (exit 2 when unreadable)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"--baseline {path} is not a readable report.json ({exc.__class__.__name__})",
            "pass the report.json of an earlier compile",
        ) from None
    if not isinstance(doc, dict) or not str(doc.get("format", "")).startswith("lepton-"):
        raise BadInputError(f"--baseline {path} is not a Lepton report", "pass the report.json of an earlier compile")
    return doc


def baseline_checks(
    report: dict[str, Any], baseline: dict[str, Any], tolerance_pct: float = BASELINE_TOLERANCE_PCT
) -> list[dict[str, Any]]:
    """New compile vs a stored report: worse by more than ``tolerance_pct`` percent (accuracy: points) fails.

    Latency is compared as the compiled/source p50 ratio (absolute milliseconds differ between CI
    machines) and as the cost model's estimate (deterministic); size as bytes; accuracy in points.
    """
    tol = tolerance_pct / 100
    checks = []

    def add(name: str, new: float | None, old: float | None, worse: bool, limit: float) -> None:
        if new is not None and old is not None:
            checks.append(
                {
                    "gate": "baseline",
                    "name": name,
                    "value": round(new, 4),
                    "baseline": round(old, 4),
                    "limit": round(limit, 4),
                    "ok": not worse,
                }
            )

    new_size, old_size = section(report, "compiled").get("size_bytes"), section(baseline, "compiled").get("size_bytes")
    if new_size is not None and old_size is not None:
        add("compiled size bytes", new_size, old_size, new_size > old_size * (1 + tol), old_size * (1 + tol))
    new_acc, old_acc = section(report, "accuracy"), section(baseline, "accuracy")
    if new_acc.get("measured") and old_acc.get("measured") and new_acc.get("metric") == old_acc.get("metric"):
        add(
            f"accuracy {new_acc['metric']} %",
            new_acc["value"],
            old_acc["value"],
            new_acc["value"] < old_acc["value"] - tolerance_pct,
            old_acc["value"] - tolerance_pct,
        )
    new_r, old_r = p50_ratio(report), p50_ratio(baseline)
    if new_r is not None and old_r is not None:
        add("p50 latency ratio compiled/source", new_r, old_r, new_r > old_r * (1 + tol), old_r * (1 + tol))
    new_e, old_e = estimated_ms(report), estimated_ms(baseline)
    if new_e is not None and old_e is not None:
        add("estimated latency ms (cost model)", new_e, old_e, new_e > old_e * (1 + tol), old_e * (1 + tol))
    return checks


def _baseline_failures(
    report: dict[str, Any], baseline: dict[str, Any], tolerance_pct: float, gates: list[dict[str, Any]]
) -> list[str]:
    """The baseline gate's checks appended to ``gates``; what failed, in words. Exit 2 when nothing compares."""
    compared = baseline_checks(report, baseline, tolerance_pct)
    if not compared:  # a gate that compares nothing would pass every compile
        raise BadInputError(
            "--baseline shares no measurement with this compile (size, accuracy on the same metric, latency "
            "ratio, cost-model estimate): nothing to compare",
            "pass the report.json of an earlier compile of this model for this target",
        )
    gates.extend(compared)
    return [
        f"{check['name']} {check['value']:g} is worse than the baseline's {check['baseline']:g} "
        f"beyond {tolerance_pct:g}% (limit {check['limit']:g})"
        for check in compared
        if not check["ok"]
    ]


def apply_gates(
    report: dict[str, Any],
    *,
    max_latency_ratio: float | None = None,
    baseline: dict[str, Any] | None = None,
    baseline_tolerance_pct: float = BASELINE_TOLERANCE_PCT,
    enforce_budgets: bool = False,
) -> None:
    """Record every gate in ``report["gates"]``; raise ``QualityGateError`` (exit 3) naming each failure."""
    gates = report.setdefault("gates", [])
    failures = []
    latency = section(report, "host_latency")
    if max_latency_ratio is not None:
        if not latency.get("ratios"):
            raise BadInputError(
                "--max-latency-ratio needs a latency measurement of two models", "drop --no-bench, or pass --against"
            )
        for label, r in latency["ratios"].items():
            ok = r["ratio"] <= max_latency_ratio
            gates.append(
                {
                    "gate": "max_latency_ratio",
                    "model": label,
                    "value": round(r["ratio"], 4),
                    "limit": max_latency_ratio,
                    "ok": ok,
                }
            )
            if not ok:
                failures.append(
                    f"{label} p50 is {r['ratio']:.3f}x {latency.get('base')} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}), "
                    f"over --max-latency-ratio {max_latency_ratio:g}"
                )
    if baseline is not None:
        failures += _baseline_failures(report, baseline, baseline_tolerance_pct, gates)
    if enforce_budgets:
        budgets = report.get("budgets")
        if budgets is None:
            raise BadInputError(
                "--enforce-budgets needs a target: its budgets are what is enforced", "pass --target NAME"
            )
        for check in budgets["checks"]:
            gates.append({"gate": "budget", "model": budgets.get("model"), **check})
            if not check["ok"]:
                failures.append(
                    f"{check['name']} {check['value']:.1f} {check['unit']} over the budget of {check['limit']:g} {check['unit']}"
                )
    if failures:
        raise QualityGateError("; ".join(failures), "optimise further, or relax the gate if the cost is acceptable")
