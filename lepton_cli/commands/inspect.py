"""``lepton inspect MODEL.onnx``: ops, params, MACs, I/O, opset, size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lepton_cli.commands._options import JsonFlag
from lepton_cli.console import emit_json, stdout
from lepton_cli.model.external_data import weights_folder
from lepton_cli.model.load import load_model
from lepton_cli.model.stats import collect_stats


def inspect_command(
    path: Annotated[
        Path, typer.Argument(help="An .onnx model, or a bundle (.lepton folder or .zip): its manifest, unverified.")
    ],
    json_out: JsonFlag = False,
) -> None:
    """Show a model's op histogram, parameters, MACs, inputs and outputs with shapes, opset and size."""
    if _is_bundle(path):
        _inspect_bundle(path, json_out)
        return
    loaded = load_model(path, keep_external=True)  # counts need dims only: external data stays on disk
    with weights_folder(loaded.weights_folder):
        stats = collect_stats(loaded.model)
    doc = {"path": str(path), "sha256": loaded.sha256, "file_size": loaded.file_size, **stats.to_dict()}
    if loaded.external_sha256:
        doc["external_data_sha256"] = loaded.external_sha256
    if json_out:
        emit_json(doc)
        return
    stdout.print(f"[bold]{path}[/bold]  opset {stats.opset}  {loaded.file_size:,} bytes  sha256 {loaded.sha256[:16]}…")
    stdout.print(
        f"nodes {stats.nodes:,}   params {stats.params:,}   MACs {stats.macs:,}"
        if stats.macs is not None
        else f"nodes {stats.nodes:,}   params {stats.params:,}   MACs ? (bind dynamic dims to count)"
    )
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


def _is_bundle(path: Path) -> bool:
    return path.is_dir() or path.name.endswith(".lepton.zip")


def _inspect_bundle(path: Path, json_out: bool) -> None:
    """A bundle's manifest, without keys: NOT verified (say so); the model itself stays encrypted."""
    from lepton_cli.bundle import read_manifest_unverified

    manifest = read_manifest_unverified(path)
    if json_out:
        emit_json({"path": str(path), "verified": False, "manifest": manifest})
        return
    stdout.print(f"[bold]{path}[/bold]  (manifest shown unverified: run `lepton verify` before trusting it)")
    for label, value in _header_rows(manifest):
        stdout.print(f"{label:<11}{value}")
    stdout.print(_files_table(manifest))
    stdout.print(_io_table(manifest))
    stdout.print(_pipeline_table(manifest))


# An unverified manifest may hold anything: every read below tolerates missing or mistyped fields.


def _header_rows(manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    recipients = (manifest.get("encryption") or {}).get("recipients", [])
    return [
        ("format", f"{manifest.get('format')} v{manifest.get('format_version')}"),
        ("model", (manifest.get("model") or {}).get("name")),
        ("target", (manifest.get("target") or {}).get("name")),
        ("version", manifest.get("version")),
        ("expires", manifest.get("expires") or "never"),
        ("created", manifest.get("created")),
        ("signer", manifest.get("signer")),
        ("recipients", ", ".join(str(r.get("key_id")) for r in recipients if isinstance(r, dict))),
    ]


def _files_table(manifest: dict[str, Any]) -> Table:
    files = Table(title="files")
    for col in ("path", "role", "size", "encrypted", "sha256"):
        files.add_column(col)
    for entry in manifest.get("files") or []:
        if isinstance(entry, dict):
            files.add_row(
                str(entry.get("path")),
                str(entry.get("role")),
                f"{entry.get('size', 0):,}",
                str(entry.get("encrypted")),
                str(entry.get("sha256", ""))[:16] + "…",
            )
    return files


def _io_table(manifest: dict[str, Any]) -> Table:
    io = Table(title="inputs and outputs (source layout / compiled)")
    for col in ("kind", "name", "dtype", "source shape", "compiled shape"):
        io.add_column(col)
    sigs = manifest.get("io") or {}
    for kind in ("inputs", "outputs"):
        compiled = {s.get("name"): s for s in ((sigs.get("compiled") or {}).get(kind) or [])}
        for sig in (sigs.get("source") or {}).get(kind) or []:
            io.add_row(
                kind[:-1],
                str(sig.get("name")),
                str(sig.get("dtype")),
                str(sig.get("shape")),
                str((compiled.get(sig.get("name")) or {}).get("shape")),
            )
    return io


def _pipeline_table(manifest: dict[str, Any]) -> Table:
    steps = Table(title="pipeline")
    for col in ("pass", "seconds"):
        steps.add_column(col)
    for step in manifest.get("pipeline") or []:
        if isinstance(step, dict):
            seconds = step.get("seconds")
            steps.add_row(str(step.get("name")), f"{seconds:.2f}" if isinstance(seconds, (int, float)) else "?")
    return steps


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
