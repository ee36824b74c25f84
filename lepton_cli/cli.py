"""The ``lepton`` command line: one Typer app; each command lives in ``lepton_cli/commands/``.

Errors are handled in one place, here: a ``LeptonError`` becomes one line on stderr and its exit
code; anything else is a bug (exit 1) with a short message and the log path, traceback only
with ``--debug``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from lepton_cli import __version__, commands
from lepton_cli.console import settings, stderr
from lepton_cli.errors import ExitCode, LeptonError

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 internal error (a bug; see the log path printed); "
    "2 bad input or usage (file, model, TOML, data, key); 3 a quality gate failed "
    "(accuracy, size or memory budget); 4 verification failed (signature, integrity, "
    "decryption, rollback, expiry)."
)

app = typer.Typer(
    name="lepton",
    help="Compile one ONNX model for many targets into signed, encrypted bundles.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"lepton {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for internal errors.")] = False,
) -> None:
    if debug:
        settings.debug = True


def _register_commands() -> None:
    # Each module in lepton_cli/commands/ defines register(app); adding a command is adding a file.
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(app)


_register_commands()


def _write_crash_log() -> Path:
    log = Path(tempfile.gettempdir()) / "lepton-crash.log"
    try:
        log.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:
        pass
    return log


def _usage_errors() -> tuple[type, ...]:
    # Typer >= 0.20 vendors click; older versions use the click package itself.
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - depends on typer version
        from click.exceptions import ClickException
    return (ClickException,)


_USAGE_ERRORS = _usage_errors()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map exceptions to documented exit codes."""
    try:
        code = app(args=argv, standalone_mode=False)
        if (
            isinstance(code, int) and code
        ):  # not standalone, typer returns Exit codes (Ctrl-C's 130 too) instead of exiting
            if code == 130:
                stderr.print("[red]error:[/red] interrupted")
            sys.exit(code)
    except LeptonError as exc:
        if settings.debug:
            traceback.print_exc()
        stderr.print(f"[red]error:[/red] {escape(exc.one_line())}", highlight=False, markup=True)
        sys.exit(int(exc.exit_code))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        stderr.print("[red]error:[/red] aborted")
        sys.exit(int(ExitCode.BAD_INPUT))
    except KeyboardInterrupt:
        stderr.print("[red]error:[/red] interrupted")
        sys.exit(130)
    except Exception as exc:  # the top-level net: a bug, reported without a bare traceback
        if isinstance(exc, _USAGE_ERRORS):  # typer's own usage errors: bad or missing options
            exc.show()
            sys.exit(int(ExitCode.BAD_INPUT))
        log = _write_crash_log()
        if settings.debug:
            traceback.print_exc()
        stderr.print(
            f"[red]internal error:[/red] {exc.__class__.__name__}: {exc} "
            f"(this is a bug in Lepton; details in {log}; rerun with --debug for the traceback)",
            highlight=False,
        )
        sys.exit(int(ExitCode.INTERNAL))
