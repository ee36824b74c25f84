"""``lepton inspect MODEL.onnx``: ops, params, MACs, I/O, opset, size."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..console import emit_json, stdout
from ..model_io import load_model
from ..stats import collect_stats


def inspect_command(
    path: Annotated[Path, typer.Argument(help="An .onnx model (bundles: see `lepton verify`).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Show a model's op histogram, parameters, MACs, inputs and outputs with shapes, opset and size."""
    loaded = load_model(path)
    stats = collect_stats(loaded.model)
    doc = {"path": str(path), "sha256": loaded.sha256, "file_size": loaded.file_size, **stats.to_dict()}
    if json_out:
        emit_json(doc)
        return
    stdout.print(f"[bold]{path}[/bold]  opset {stats.opset}  {loaded.file_size:,} bytes  sha256 {loaded.sha256[:16]}…")
    stdout.print(f"nodes {stats.nodes:,}   params {stats.params:,}   MACs {stats.macs:,}" if stats.macs is not None
                 else f"nodes {stats.nodes:,}   params {stats.params:,}   MACs ? (bind dynamic dims to count)")
    io = Table(title="inputs and outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind, sigs in (("input", stats.inputs), ("output", stats.outputs)):
        for sig in sigs:
            io.add_row(kind, sig["name"], sig["dtype"], str(sig["shape"]))
    stdout.print(io)
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in stats.ops.items():
        ops.add_row(op, str(count))
    stdout.print(ops)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
