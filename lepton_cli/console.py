"""Where output goes: results on stdout (one JSON document with --json), diagnostics on stderr.

``NO_COLOR`` is honoured by rich itself; ``--quiet`` silences progress and notes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

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
