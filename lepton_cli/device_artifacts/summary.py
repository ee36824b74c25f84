"""One line per device file and check, for the report's Markdown/HTML and the compile command."""
from __future__ import annotations

from typing import Any


def device_lines(report: dict[str, Any]) -> list[str]:
    device = report.get("device") or {}
    lines: list[str] = []
    ort_section = device.get("ort")
    if ort_section:
        if ort_section.get("produced"):
            lines.append(f"ORT format: {', '.join(ort_section['files'])} for {ort_section['runtime']}; reduced-build "
                         f"operator config {ort_section['ops_config']}")
            for ep, entry in (ort_section.get("usability") or {}).get("eps", {}).items():
                cpu = ", ".join(f"{op}×{n}" for op, n in entry["cpu_ops"].items()) or "none"
                lines.append(f"{ep} (ORT usability check): {entry['partitions']} partition(s) cover {entry['supported_nodes']}/"
                             f"{entry['nodes']} nodes ({entry['suitability']}); on the CPU: {cpu}")
        else:
            lines.append(f"ORT format: not produced ({ort_section.get('reason')})")
    tfl = device.get("tflite")
    if tfl:
        if tfl.get("produced"):
            acc = tfl.get("accuracy") or {}
            score = (f"; {acc['metric']} {acc['value']:.2f}% in LiteRT (drop {acc['drop_pct']:.2f})" if acc.get("measured") else "")
            lines.append(f"TFLite: {tfl['path']} ({tfl['size_bytes']:,} bytes, {'int8' if tfl['integer_io'] else 'float'} I/O){score}")
            tpu = tfl.get("edgetpu")
            if tpu:
                cpu = ", ".join(f"#{c['index']} {c['op']}" for c in tpu["cpu_ops"][:12]) or "none"
                lines.append(f"Edge TPU check: {tpu['edgetpu_ops']}/{tpu['ops']} ops map to the Edge TPU; on the CPU: {cpu}")
        else:
            lines.append(f"TFLite: not produced ({tfl.get('reason')})")
    dpu = device.get("dpu")
    if dpu:
        if dpu["ok"]:
            lines.append(f"DPU check ({dpu['reference']}): {dpu['nodes_checked']} nodes, no violation")
        else:
            lines.append(f"DPU check ({dpu['reference']}): {len(dpu['violations'])} violation(s)")
            lines += [f"DPU: {v['node']} ({v['op']}) {v['rule']}: {v['detail']}" for v in dpu["violations"][:20]]
    return lines
