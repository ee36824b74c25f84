"""Render a report (``report.json`` of a compile, or ``lepton bench``'s document) as Markdown and HTML.

Markdown is GitHub-flavoured and short enough for ``$GITHUB_STEP_SUMMARY`` (tables, no HTML
besides ``<details>``). HTML is one self-contained file: inline CSS and inline SVG plots, no
scripts, fonts or network requests, so it renders the same in a CI artifact viewer offline.
Every section is optional: a renderer draws what the report holds and skips the rest.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Iterable

from lepton_cli.compile.report import latency_ratio, section
from lepton_cli.compile.report import steps as report_steps
from lepton_cli.compile.report import warnings as report_warnings
from lepton_cli.device_artifacts.summary import device_lines

PALETTE = ["#2f6fdf", "#e8772e", "#2ca02c", "#9467bd", "#d62728", "#8c564b"]
MB = 1024 * 1024


# -- small formatting helpers ------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "?"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


def _bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _title(report: dict[str, Any]) -> str:
    if report.get("format", "").startswith("lepton-bench"):
        labels = [s["label"] for s in report.get("subjects", [])]
        return (
            "Lepton bench: "
            + " vs ".join(reversed(labels))
            + (f" (target {report['target']})" if report.get("target") else "")
        )
    model = section(report, "model").get("name", "model")
    target = section(report, "target").get("name", "?")
    return f"Lepton report: {model} → {target}"


# -- the sections as rows (shared by Markdown and HTML) ------------------------------------------

Table = tuple[list[str], list[list[str]]]


def _summary_table(report: dict[str, Any]) -> Table | None:
    src, out = section(report, "source"), section(report, "compiled")
    if not src or not out:
        return None
    rows = [
        ["size", _bytes(src.get("size_bytes")), _bytes(out.get("size_bytes"))],
        ["nodes", _num(src.get("nodes")), _num(out.get("nodes"))],
        ["params", _num(src.get("params")), _num(out.get("params"))],
        ["MACs", _num(src.get("macs")), _num(out.get("macs"))],
        ["opset", _num(src.get("opset")), _num(out.get("opset"))],
    ]
    return ["", "source", "compiled"], rows


def _accuracy_table(report: dict[str, Any]) -> Table | None:
    acc = section(report, "accuracy")
    if not acc:
        return None
    if not acc.get("measured", True):
        return ["accuracy"], [[acc.get("reason", "not measured")]]
    rows = [
        [
            f"{acc.get('metric', '?')} ({acc.get('data', '?')}, {acc.get('samples', '?')} samples"
            + (f", resolution {_num(acc['resolution_pct'], 2)} points" if "resolution_pct" in acc else "")
            + (f", input noise floor {_num(acc['input_floor']['drop_pct'], 2)}" if acc.get("input_floor") else "")
            + ")",
            f"{_num(acc.get('source_value'), 2)}%",
            f"{_num(acc.get('value'), 2)}%",
            f"{_num(acc.get('drop_pct'), 2)} (budget {_num(acc.get('budget_pct'), 2)})",
        ]
    ]
    for out in acc.get("outputs") or []:  # every output, its metric and how it was recognised
        rows.append(
            [
                f"output {out.get('name')}: {out.get('metric')} — {out.get('why')}",
                f"{_num(out.get('source_value'), 2)}%",
                f"{_num(out.get('value'), 2)}%",
                f"{_num(out.get('drop_pct'), 2)}",
            ]
        )
    agreement = acc.get("agreement") or {}
    if agreement:
        rows.append(["output agreement", "", ", ".join(f"{k} {_num(v, 4)}" for k, v in agreement.items()), ""])
    return ["metric", "source", "compiled", "drop (points)"], rows


def _latency_models(lat: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Models with the base of the ratios first (report.json is written with sorted keys)."""
    models = lat.get("models") or {}
    base = lat.get("base")
    return sorted(models.items(), key=lambda kv: kv[0] != base)


def _latency_table(report: dict[str, Any]) -> Table | None:
    lat = section(report, "host_latency")
    if not lat or not lat.get("models"):
        return None
    rows = []
    for label, m in _latency_models(lat):
        r = latency_ratio(report, label)
        ratio = f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r else "base"
        rows.append(
            [
                label,
                _num(m.get("runs")),
                _num(m.get("p50_ms")),
                _num(m.get("p90_ms")),
                _num(m.get("p99_ms")),
                _num(m.get("mean_ms")),
                _num(m.get("throughput_per_s"), 1),
                ratio,
            ]
        )
    return ["model", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput /s", "p50 ratio [95% CI]"], rows


def _latency_settings(report: dict[str, Any]) -> str:
    lat = section(report, "host_latency")
    s = lat.get("settings") or {}
    host = lat.get("host") or {}
    parts = [
        f"execution provider {', '.join(s.get('providers', [])) or '?'}",
        f"{s.get('threads', '?')} threads",
        f"warm-up {s.get('warmup', '?')} runs excluded",
        "A/B interleaved",
    ]
    if lat.get("input"):
        parts.append(f"input: {lat['input'].get('source')}")
    if host.get("cpu"):
        parts.append(f"host: {host['cpu']}")
    return "; ".join(parts)


def _cost_table(report: dict[str, Any]) -> Table | None:
    cost = section(report, "cost_model")
    if not cost or not cost.get("models"):
        return None
    rows = []
    for label, e in cost["models"].items():
        if "error" in e:
            rows.append([label, e["error"], "", "", ""])
            continue
        peak = e.get("peak_activation_bytes") or {}
        rows.append(
            [
                label,
                _num(e.get("latency_ms")),
                f"{e.get('memory_bound_share', 0):.0%}",
                _bytes(peak.get("liveness_lower_bound")),
                _bytes(peak.get("greedy_arena")),
            ]
        )
    return [
        "model",
        "est. latency ms",
        "memory-bound share",
        "peak activations (lower bound)",
        "arena (greedy by size)",
    ], rows


def _budget_table(report: dict[str, Any], marks: tuple[str, str] = ("✅ ok", "❌ over")) -> Table | None:
    budgets = section(report, "budgets")
    if not budgets or not budgets.get("checks"):
        return None
    rows = [
        [
            c["name"],
            f"{_num(c['value'], 2)} {c['unit']}",
            f"{_num(c['limit'], 2)} {c['unit']}",
            marks[0] if c["ok"] else marks[1],
        ]
        for c in budgets["checks"]
    ]
    return ["budget", "value", "limit", ""], rows


def _pipeline_table(report: dict[str, Any]) -> Table | None:
    steps = report_steps(report)
    if not steps:
        return None
    rows = []
    for s in steps:
        b, a = s.get("before", {}), s.get("after", {})
        check = s.get("check") or {}
        verdict = {True: "outputs match", False: "mismatch", None: "skipped"}.get(
            check.get("ok"), check.get("kind", "")
        )
        rows.append(
            [
                s["name"],
                f"{s.get('seconds', 0):.2f}",
                f"{_num(b.get('nodes'))} → {_num(a.get('nodes'))}",
                f"{_bytes(b.get('size_bytes'))} → {_bytes(a.get('size_bytes'))}",
                f"{_num(b.get('macs'))} → {_num(a.get('macs'))}",
                verdict,
            ]
        )
    return ["pass", "seconds", "nodes", "size", "MACs", "check"], rows


def _lowered_text(lowered: dict[str, int]) -> str:
    """The quantize summary's ``integer_elementwise`` counts, as a sentence."""
    parts = [
        f"{lowered.get('scalar_adds_folded', 0)} scalar Adds folded into a quantize's zero point",
        f"{lowered.get('hardsigmoids_as_add', 0)} HardSigmoid as quantized Add",
        f"{lowered.get('gates_quantized', 0)} gates (HardSigmoid, Sigmoid) quantized for QLinearMul",
        f"{lowered.get('relus_folded', 0)} Relus folded into the quantize after them",
        f"{lowered.get('quantizes_hoisted', 0)} Concat/Resize inputs quantized before the copy",
        f"{lowered.get('gated_sums', 0)} gated sums (FPN top-down) as QLinearMul + QLinearAdd",
    ]
    return "; ".join(parts)


def _quantize_summary(report: dict[str, Any]) -> dict[str, Any] | None:
    """The main pipeline's searched quantize step's summary (None: no search ran)."""
    for step in report_steps(report):
        summary = step.get("summary") or {}
        if step.get("name") == "quantize" and summary.get("tuned"):
            return summary
    return None


def choice_table(report: dict[str, Any]) -> Table | None:
    """What the quantize search chose and why: method, op types, source, float-kept nodes, candidates tried."""
    summary = _quantize_summary(report)
    if summary is None:
        return None
    ops = summary.get("op_types")
    tried = summary.get("tried") or []
    kept = summary.get("float_kept") or []
    source = "the model as given"
    if summary.get("transform") == "smoothquant":
        tier = summary.get("smoothquant_tier") or {}
        source = f"SmoothQuant'ed (alpha {tier.get('alpha')}, {tier.get('inserted', 0)} float scales inserted)"
    elif summary.get("transform") in ("recovery", "fast_recovery"):
        steps = (summary.get(f"{summary['transform']}_tier") or {}).get("steps") or []
        source = f"after {' + '.join(steps)} (recovery tier: rounding and biases tuned for int8)"
    rows = [["calibration method", str(summary.get("method", ""))]]
    if ops is not None:
        rows.append(["op types quantized", ", ".join(ops) or "every op ONNX Runtime quantizes"])
    rows.append(["source quantized", source])
    names = ", ".join(kept[:6]) + (f", … ({len(kept) - 6} more)" if len(kept) > 6 else "")
    rows.append(["nodes kept float", f"{len(kept)}" + (f": {names}" if kept else "")])
    lowered = summary.get("integer_elementwise")
    if lowered and any(lowered.values()):
        rows.append(["element-wise in integer kernels", _lowered_text(lowered)])
    if summary.get("dynamic_lstm"):
        lstms = summary["dynamic_lstm"]
        rows.append(["LSTM layers int8 (DynamicQuantizeLSTM)", f"{len(lstms)}: {', '.join(lstms[:6])}"])
    rows.append(["drop (points)", _num(summary.get("drop_pct"), 2)])
    if summary.get("cost_ms") is not None:
        rows.append(["est. latency on the target", f"{_num(summary['cost_ms'], 3)} ms"])
    rows.append(["why this one", str(summary.get("choice", ""))])
    scored = sum(1 for t in tried if t.get("scored"))
    rows.append(["candidates", f"{len(tried)} built, {scored} scored (the rest priced above one within budget)"])
    if summary.get("search_stopped_s") is not None:
        stopped = f"after {_num(summary['search_stopped_s'], 0)} s, at quantize.max_search_seconds: the choice above"
        rows.append(["search stopped", stopped + " is the best of the candidates scored before it"])
    return ["", "chosen"], rows


def recovery_table(report: dict[str, Any]) -> Table | None:
    """What each quantize recovery step gained: the fully quantized model scored with the steps added in order."""
    for step in report_steps(report):
        gains = ((step.get("summary") or {}).get("recovery") or {}).get("gains")
        if not gains:
            continue
        rows = []
        previous = None
        for row in gains["rows"]:
            drop = row.get("drop_pct")
            change = "" if previous is None or drop is None else f"{previous - drop:+.2f}"
            label = " + ".join(row["steps"]) or f"none ({gains['method']}, nothing float)"
            rows.append([label, row.get("changed", ""), _num(drop, 2), change, _num(row.get("snr_db"), 2)])
            previous = drop
        return ["steps", "the last step changed", "drop (points)", "gained", "output SNR dB"], rows
    return None


_ERROR_KEYS = (
    "local_nsr",
    "nsr",
    "snr_db",
    "sqnr_db",
    "error",
    "rel_error",
    "mse",
    "max_abs",
    "cosine",
)  # quantize: local_nsr
_NAME_KEYS = ("name", "layer", "tensor", "node")


def layer_errors(report: dict[str, Any]) -> tuple[str, list[tuple[str, float]]] | None:
    """Per-layer quantization error from any pass summary that lists it: (metric, [(layer, value)])."""
    for step in report_steps(report):
        summary = step.get("summary") or {}
        for key in ("per_layer_error", "layer_errors", "worst_layers", "per_layer"):
            items = summary.get(key)
            if isinstance(items, dict):
                items = [{"name": k, **(v if isinstance(v, dict) else {"error": v})} for k, v in items.items()]
            if not isinstance(items, list) or not items or not isinstance(items[0], dict):
                continue
            metric = next((k for k in _ERROR_KEYS if k in items[0]), None)
            name_key = next((k for k in _NAME_KEYS if k in items[0]), None)
            if metric and name_key:
                values = [
                    (str(i[name_key]), float(i[metric])) for i in items if isinstance(i.get(metric), (int, float))
                ]
                return metric, values
    return None


def _gates(report: dict[str, Any], marks: tuple[str, str] = ("✅ pass", "❌ fail")) -> Table | None:
    gates = report.get("gates")
    if not gates:
        return None
    return ["gate", "model", "value", "limit", ""], [
        [
            g.get("gate", ""),
            g.get("model") or g.get("name", ""),
            _num(g.get("value")),
            _num(g.get("limit")),
            marks[0] if g.get("ok") else marks[1],
        ]
        for g in gates
    ]


# -- Markdown ----------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    head, rows = table
    lines = ["| " + " | ".join(_md_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown (fits ``$GITHUB_STEP_SUMMARY``)."""
    out = [f"## {_title(report)}", ""]
    sections = [
        ("Model", _summary_table(report)),
        ("Accuracy", _accuracy_table(report)),
        ("Host latency", _latency_table(report)),
        ("Cost model", _cost_table(report)),
        ("Budgets", _budget_table(report)),
        ("Gates", _gates(report)),
        ("Quantization choice", choice_table(report)),
        ("Quantization recovery", recovery_table(report)),
        ("Pipeline", _pipeline_table(report)),
    ]
    for name, table in sections:
        if table is None:
            continue
        out += [f"### {name}", "", _md_table(table), ""]
        if name == "Host latency":
            out += [f"_{_md_escape(_latency_settings(report))}_", ""]
        if name == "Budgets" and section(report, "budgets").get("skipped"):
            out += [f"_not checked: {_md_escape('; '.join(section(report, 'budgets')['skipped']))}_", ""]
        if name == "Cost model":
            cost = section(report, "cost_model")
            out += [f"_target {cost.get('target')}: {_md_escape(cost.get('method', ''))}_", ""]
    device = device_lines(report)
    if device:
        out += ["### Device", ""] + [f"- {_md_escape(line)}" for line in device] + [""]
    errors = layer_errors(report)
    if errors:
        metric, values = errors
        out += [
            "### Per-layer quantization error",
            "",
            _md_table((["layer", metric], [[n, _num(v, 4)] for n, v in values[:10]])),
            "",
        ]
    warnings = report_warnings(report)
    if warnings:
        out += ["### Warnings", ""] + [f"- {_md_escape(w)}" for w in warnings] + [""]
    return "\n".join(out)


def append_step_summary(report: dict[str, Any], environ: dict[str, str] | None = None) -> Path | None:
    """Append the Markdown report to ``$GITHUB_STEP_SUMMARY`` when it is set (GitHub Actions)."""
    path = (environ if environ is not None else os.environ).get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(render_markdown(report) + "\n")
    except OSError:
        return None  # a summary we cannot write must not fail the compile
    return Path(path)


# -- SVG plots ---------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _histogram_range(values: list[float]) -> tuple[float, float, int]:
    """(axis low, axis high, runs above the axis): the axis spans up to the 95th percentile, since a few
    stray 10x runs would squash every other bar into one."""
    ordered = sorted(values)
    lo, hi = ordered[0], ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    clipped = sum(v > hi for v in values)
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    return lo, hi, clipped


def _bin_shares(values: list[float], lo: float, step: float, bins: int) -> list[float]:
    """Share of runs per bin (so unequal run counts compare); values past either end go in the end bins."""
    counts = [0] * bins
    for v in values:
        counts[max(0, min(bins - 1, int((v - lo) / step)))] += 1
    return [x / max(1, len(values)) for x in counts]


def svg_histogram(
    series: dict[str, list[float]], *, unit: str = "ms", width: int = 640, height: int = 220, bins: int = 30
) -> str:
    """Overlaid histograms (shared bins) with a p50 line per series."""
    values = [v for vs in series.values() for v in vs]
    if not values:
        return ""
    lo, hi, clipped = _histogram_range(values)
    left, bottom, right = 50, 30, 10
    top = 10 + 14 * (len(series) + (1 if clipped else 0))  # the legend sits above the bars, never on them
    height += top
    plot_w, plot_h = width - left - right, height - top - bottom
    counts = {label: _bin_shares(vs, lo, (hi - lo) / bins, bins) for label, vs in series.items()}
    peak = max(max(c) for c in counts.values()) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img" '
        f'aria-label="latency distribution">'
    ]
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>')
    bw = plot_w / bins
    for i, (label, c) in enumerate(counts.items()):
        color = PALETTE[i % len(PALETTE)]
        for b, share in enumerate(c):
            if share:
                h = share / peak * plot_h
                parts.append(
                    f'<rect x="{left + b * bw:.1f}" y="{top + plot_h - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" '
                    f'fill="{color}" fill-opacity="0.55"/>'
                )
        p50 = sorted(series[label])[len(series[label]) // 2]
        x = left + (p50 - lo) / (hi - lo) * plot_w
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{color}" stroke-width="2" stroke-dasharray="4 2"/>'
        )
        parts.append(
            f'<text x="{left + plot_w - 4}" y="{14 + 14 * i}" text-anchor="end" fill="{color}" font-size="12">'
            f"{_e(label)} (p50 {p50:.3f} {unit})</text>"
        )
    if clipped:
        parts.append(
            f'<text x="{left + plot_w - 4}" y="{14 + 14 * len(series)}" text-anchor="end" font-size="10">'
            f"{clipped} runs above {hi:.3f} {unit} counted in the last bin</text>"
        )
    for frac in (0, 0.5, 1):
        x = left + frac * plot_w
        parts.append(
            f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle" font-size="11">{lo + frac * (hi - lo):.3f} {unit}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_hbars(items: list[tuple[str, float]], *, unit: str = "", width: int = 640, bar: int = 18) -> str:
    """Horizontal bars, one per item, labelled with its value."""
    if not items:
        return ""
    label_w, right = 200, 80
    height = bar * len(items) + 10
    top = max((abs(v) for _, v in items), default=1) or 1
    plot_w = width - label_w - right
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img" aria-label="bars">'
    ]
    for i, (label, value) in enumerate(items):
        y = 5 + i * bar
        w = abs(value) / top * plot_w
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar * 0.7:.1f}" text-anchor="end" font-size="11">{_e(label[:32])}</text>'
        )
        parts.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{max(w, 1):.1f}" height="{bar - 4}" fill="{PALETTE[4]}"/>'
        )
        parts.append(
            f'<text x="{label_w + w + 4:.1f}" y="{y + bar * 0.7:.1f}" font-size="11">{value:.4g} {_e(unit)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_waterfall(
    start_label: str,
    start: float,
    steps: list[tuple[str, float]],
    *,
    fmt: Any = _bytes,
    width: int = 640,
    height: int = 220,
) -> str:
    """A waterfall: the start value, each step's change (green down, red up), the end value."""
    levels = [start]
    for _, after in steps:
        levels.append(after)
    top_value = max(levels) or 1
    n = len(steps) + 2
    left, bottom, top = 10, 40, 20
    plot_h = height - top - bottom
    slot = (width - left * 2) / n
    y = lambda v: top + plot_h - v / top_value * plot_h  # noqa: E731 - a scale, not a function worth a name
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img" aria-label="waterfall">'
    ]

    def col(i: int, lo: float, hi: float, color: str, label: str, text: str) -> None:
        x = left + i * slot + slot * 0.15
        y1, y2 = y(max(lo, hi)), y(min(lo, hi))
        parts.append(
            f'<rect x="{x:.1f}" y="{y1:.1f}" width="{slot * 0.7:.1f}" height="{max(y2 - y1, 1):.1f}" fill="{color}"/>'
        )
        parts.append(
            f'<text x="{x + slot * 0.35:.1f}" y="{height - 24}" text-anchor="middle" font-size="11">{_e(label[:14])}</text>'
        )
        parts.append(
            f'<text x="{x + slot * 0.35:.1f}" y="{max(y1 - 4, 10):.1f}" text-anchor="middle" font-size="10">{_e(text)}</text>'
        )

    col(0, 0, start, "#777", start_label, fmt(start))
    prev = start
    for i, (name, after) in enumerate(steps, start=1):
        col(
            i,
            prev,
            after,
            "#2ca02c" if after <= prev else "#d62728",
            name,
            ("−" if after <= prev else "+") + fmt(abs(after - prev)),
        )
        prev = after
    col(n - 1, 0, prev, "#2f6fdf", "result", fmt(prev))
    parts.append("</svg>")
    return "".join(parts)


# -- HTML --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f4f8}td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:13px}
.warn{color:#8a4b00}svg.plot{display:block;margin:8px 0;background:#fafbfd;border:1px solid #e4e6eb}
"""


def _html_table(table: Table) -> str:
    head, rows = table
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table>")
    return "".join(out)


def _pipeline_plots(report: dict[str, Any]) -> list[str]:
    steps = report_steps(report)
    if not steps:
        return []
    first = steps[0].get("before", {})
    plots = []
    if first.get("size_bytes") is not None:
        plots.append("<p class='note'>Model size through the pipeline</p>")
        plots.append(
            svg_waterfall(
                "source", float(first["size_bytes"]), [(s["name"], float(s["after"]["size_bytes"])) for s in steps]
            )
        )
    if first.get("macs") and all(s.get("after", {}).get("macs") is not None for s in steps):
        plots.append("<p class='note'>MACs through the pipeline (compute the target must do)</p>")
        plots.append(
            svg_waterfall(
                "source",
                float(first["macs"]),
                [(s["name"], float(s["after"]["macs"])) for s in steps],
                fmt=lambda v: f"{v / 1e6:.1f}M",
            )
        )
    latency = _latency_endpoints(report)
    if latency:
        plots.append(
            "<p class='note'>Latency: measured p50 on this host, source → compiled (the pipeline's net effect)</p>"
        )
        plots.append(
            svg_waterfall("source p50", latency[0], [("compiled p50", latency[1])], fmt=lambda v: f"{v:.3f} ms")
        )
    plots.append("<p class='note'>Time each pass took (compile time)</p>")
    plots.append(svg_hbars([(s["name"], float(s.get("seconds", 0))) for s in steps], unit="s"))
    return plots


def _latency_endpoints(report: dict[str, Any]) -> tuple[float, float] | None:
    models = section(report, "host_latency").get("models") or {}
    if "source" in models and "compiled" in models:
        return models["source"]["p50_ms"], models["compiled"]["p50_ms"]
    return None


def _cost_notes(cost: dict[str, Any]) -> list[str]:
    """The cost model's target and method, and the last model's estimated time by op type."""
    if not cost:
        return []
    notes = [f"<p class='note'>target {_e(cost.get('target'))}: {_e(cost.get('method', ''))}</p>"]
    for e in list((cost.get("models") or {}).values())[-1:]:
        by_op = list((e.get("by_op_ms") or {}).items())[:10]
        if by_op:
            notes.append("<p class='note'>Estimated time by op type (last model)</p>")
            notes.append(svg_hbars([(op, float(ms)) for op, ms in by_op], unit="ms"))
    return notes


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page with inline SVG plots."""
    title = _title(report)
    body = [f"<h1>{_e(title)}</h1>"]
    tool = section(report, "tool")
    if tool:
        body.append(f"<p class='note'>{_e(tool.get('name', 'lepton'))} {_e(tool.get('version', ''))}</p>")

    def add(name: str, table: Table | None, extra: Iterable[str] = ()) -> None:
        if table is None:
            return
        body.append(f"<h2>{_e(name)}</h2>")
        body.append(_html_table(table))
        body.extend(extra)

    add("Model", _summary_table(report))
    add("Accuracy", _accuracy_table(report))
    lat = section(report, "host_latency")
    samples = {label: m["samples_ms"] for label, m in _latency_models(lat) if m.get("samples_ms")}
    add(
        "Host latency",
        _latency_table(report),
        [f"<p class='note'>{_e(_latency_settings(report))}</p>"] + ([svg_histogram(samples)] if samples else []),
    )
    add("Cost model", _cost_table(report), _cost_notes(section(report, "cost_model")))
    skipped = section(report, "budgets").get("skipped") or []
    add(
        "Budgets", _budget_table(report, ("ok", "OVER")), [f"<p class='note'>not checked: {_e(x)}</p>" for x in skipped]
    )
    add("Gates", _gates(report, ("pass", "FAIL")))
    device = device_lines(report)
    if device:
        body.append("<h2>Device</h2><ul>" + "".join(f"<li>{_e(line)}</li>" for line in device) + "</ul>")
    errors = layer_errors(report)
    if errors:
        metric, values = errors
        body.append("<h2>Per-layer quantization error</h2>")
        body.append(svg_hbars(values[:15], unit=metric))
    add("Quantization choice", choice_table(report))
    add("Quantization recovery", recovery_table(report))
    add("Pipeline", _pipeline_table(report), _pipeline_plots(report))
    warnings = report_warnings(report)
    if warnings:
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in warnings) + "</ul>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
