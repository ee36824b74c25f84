"""``lepton targets [list | show NAME]``: what each target does, pass by pass."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from lepton_cli.commands._options import JsonFlag
from lepton_cli.console import emit_json, stdout
from lepton_cli.pipeline.params import to_table
from lepton_cli.pipeline.targets import builtin_names, load_target

targets_app = typer.Typer(help="List targets, or show one target's pipeline pass by pass.", no_args_is_help=False)


@targets_app.callback(invoke_without_command=True)
def _default(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    if ctx.invoked_subcommand is None:
        list_targets(json_out)


@targets_app.command("list")
def list_targets(json_out: JsonFlag = False) -> None:
    """List the builtin targets with their description and pipeline."""
    rows = [load_target(name) for name in builtin_names()]
    if json_out:
        emit_json(
            {
                "targets": [
                    {
                        "name": t.name,
                        "description": t.description,
                        "passes": [s.name for s in t.passes if s.enabled],
                        "execution_providers": t.runtime.execution_providers,
                    }
                    for t in rows
                ]
            }
        )
        return
    table = Table(title="Lepton targets")
    for col in ("target", "description", "passes", "execution providers"):
        table.add_column(col)
    for t in rows:
        table.add_row(
            t.name,
            t.description,
            " → ".join(s.name for s in t.passes if s.enabled),
            ", ".join(t.runtime.execution_providers),
        )
    stdout.print(table)


@targets_app.command("show")
def show_target(
    name: Annotated[str, typer.Argument(help="Builtin target name or path to a .toml file.")],
    json_out: JsonFlag = False,
) -> None:
    """Show a target: hardware facts, runtime, budgets, and each pass with its parameters and why."""
    target = load_target(name)
    if json_out:
        emit_json(target.to_dict())
        return
    stdout.print(f"[bold]{target.name}[/bold] — {target.description}")
    stdout.print(f"source: {target.source}   sha256: {target.sha256[:16]}…")
    facts = Table(title="hardware / runtime / budgets", show_header=False)
    for section, obj in (("hardware", target.hardware), ("runtime", target.runtime), ("budgets", target.budgets)):
        for key, value in to_table(obj).items():
            facts.add_row(f"{section}.{key}", str(value))
    stdout.print(facts)
    steps = Table(title="pipeline")
    for col in ("#", "pass", "parameters", "why"):
        steps.add_column(col)
    for i, step in enumerate(target.passes):
        params = "\n".join(f"{k} = {v}" for k, v in to_table(step.params).items())
        label = step.name if step.enabled else f"{step.name} (disabled)"
        steps.add_row(str(i), label, params, step.why)
    stdout.print(steps)


def register(app: typer.Typer) -> None:
    app.add_typer(targets_app, name="targets")
