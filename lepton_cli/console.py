"""Where output goes: results on stdout (one JSON document with --json), diagnostics on stderr.

``NO_COLOR`` is honoured by rich itself; ``--quiet`` silences progress and notes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


class _Settings:
    quiet: bool = False
    json_mode: bool = False
    debug: bool = bool(os.environ.get("LEPTON_DEBUG"))


settings = _Settings()


def note(message: str) -> None:
    """A progress or informational line for people, on stderr; silent with --quiet."""
    if not settings.quiet:
        stderr.print(message, highlight=False)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet (it also goes into the report)."""
    stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)  # a message is text, never markup


def emit_json(document: Any) -> None:
    """The one JSON document of a --json command, alone on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def captured_stderr() -> Iterator[Any]:
    """TensorFlow's C++ side writes logs and MLIR diagnostics to fd 2: keep them out of the CLI's stderr."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
