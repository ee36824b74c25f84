"""``lepton detect [--json]``: host CPU, ISA, memory, GPUs, execution providers, and the suggested target."""

from __future__ import annotations

import typer
from rich.table import Table

from lepton_cli.commands._options import JsonFlag
from lepton_cli.compile.target_choice import suggest_target
from lepton_cli.console import emit_json, stdout
from lepton_cli.host.detect import detect_host
from lepton_cli.runtime.select import usable_providers


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f} MB"


def detect_command(
    json_out: JsonFlag = False,
) -> None:
    """Describe this host (CPU, ISA flags, memory, GPUs, ONNX Runtime EPs) and the target `--target auto` would use."""
    host = detect_host()
    suggestion = suggest_target(host)
    if json_out:
        emit_json(
            {"host": host.to_dict(), "usable_providers": usable_providers(host), "suggestion": suggestion.to_dict()}
        )
        return
    table = Table(title="this host", show_header=False)
    table.add_row("CPU", f"{host.cpu_model} ({host.arch}, {host.system})")
    table.add_row(
        "cores",
        f"{host.cores_physical} physical, {host.cores_logical} logical"
        + (f", cgroup quota {host.cgroup_cpu_limit:g}" if host.cgroup_cpu_limit is not None else ""),
    )
    table.add_row("ISA", ", ".join(host.isa) or "none detected")
    memory = f"{_mb(host.memory_total_mb)} total, {_mb(host.memory_available_mb)} available"
    if host.cgroup_memory_limit_mb is not None:
        memory += f", cgroup limit {_mb(host.cgroup_memory_limit_mb)} ({_mb(host.cgroup_memory_used_mb)} used)"
    table.add_row("memory", memory)
    table.add_row("GPUs", "\n".join(f"{g.name} ({_mb(g.memory_total_mb)}, {g.source})" for g in host.gpus) or "none")
    table.add_row("onnxruntime", f"{host.ort_version or 'not usable'}: {', '.join(host.providers) or 'no providers'}")
    for note in host.notes:
        table.add_row("note", note)
    stdout.print(table)
    if suggestion.name:
        stdout.print(f"suggested target: [bold]{suggestion.name}[/bold] — {'; '.join(suggestion.reasons)}")
    else:
        stdout.print(f"no builtin target fits: {'; '.join(suggestion.reasons)}")
    for warning in suggestion.warnings:
        stdout.print(f"  note: {warning}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("detect")(detect_command)
