"""One line per device file and check, for the report's Markdown/HTML and the compile command."""

from __future__ import annotations

from typing import Any


def _ort_lines(section: dict[str, Any]) -> list[str]:
    if not section.get("produced"):
        return [f"ORT format: not produced ({section.get('reason')})"]
    lines = [
        f"ORT format: {', '.join(section['files'])} for {section['runtime']}; reduced-build operator config {section['ops_config']}"
    ]
    for ep, entry in (section.get("usability") or {}).get("eps", {}).items():
        cpu = ", ".join(f"{op}×{n}" for op, n in entry["cpu_ops"].items()) or "none"
        lines.append(
            f"{ep} (ORT usability check): {entry['partitions']} partition(s) cover {entry['supported_nodes']}/"
            f"{entry['nodes']} nodes ({entry['suitability']}); on the CPU: {cpu}"
        )
    return lines


def _tflite_lines(section: dict[str, Any]) -> list[str]:
    if not section.get("produced"):
        return [f"TFLite: not produced ({section.get('reason')})"]
    acc = section.get("accuracy") or {}
    score = (
        f"; {acc['metric']} {acc['value']:.2f}% in LiteRT (drop {acc['drop_pct']:.2f})" if acc.get("measured") else ""
    )
    lines = [
        f"TFLite: {section['path']} ({section['size_bytes']:,} bytes, {'int8' if section['integer_io'] else 'float'} I/O){score}"
    ]
    tpu = section.get("edgetpu")
    if tpu:
        cpu = ", ".join(f"#{c['index']} {c['op']}" for c in tpu["cpu_ops"][:12]) or "none"
        more = f" (+{len(tpu['cpu_ops']) - 12} more)" if len(tpu["cpu_ops"]) > 12 else ""
        lines.append(
            f"Edge TPU check: {tpu['edgetpu_ops']}/{tpu['ops']} ops map to the Edge TPU; on the CPU: {cpu}{more}"
        )
    return lines


def _dpu_lines(section: dict[str, Any]) -> list[str]:
    if section["ok"]:
        return [f"DPU check ({section['reference']}): {section['nodes_checked']} nodes, no violation"]
    lines = [f"DPU check ({section['reference']}): {len(section['violations'])} violation(s)"]
    # One line per kind of violation, not per node: PP-OCRv4 rec's host tier is 208 of them, most "Div is not a DPU
    # operator"; its first 20 nodes named one op.
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for v in section["violations"]:
        groups.setdefault((v["op"], v["rule"]), []).append(v)
    for (op, rule), found in list(groups.items())[:20]:
        nodes = [v["node"] for v in found]
        named = ", ".join(nodes[:3]) + (f" +{len(nodes) - 3} more" if len(nodes) > 3 else "")
        detail = found[0]["detail"] if len({v["detail"] for v in found}) == 1 else f"e.g. {found[0]['detail']}"
        lines.append(f"DPU: {len(nodes)} x {op} {rule}: {detail} ({named})")
    return lines + ([f"DPU: +{len(groups) - 20} more kinds (report.json)"] if len(groups) > 20 else [])


def device_lines(report: dict[str, Any]) -> list[str]:
    device = report.get("device") or {}
    lines: list[str] = []
    for key, render in (("ort", _ort_lines), ("tflite", _tflite_lines), ("dpu", _dpu_lines)):
        if device.get(key):
            lines += render(device[key])
    return lines
