"""Command-line options that several commands declare with the same name and help."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
BundleArg = Annotated[Path, typer.Argument(help="A <model>.<target>.lepton folder or its .zip archive.")]
TrustOpt = Annotated[
    Optional[str],
    typer.Option(
        "--trust", help="The publisher's signing public key (PEM); else $LEPTON_TRUST, else the local dev key."
    ),
]
StateOpt = Annotated[
    Optional[Path],
    typer.Option("--state", help="Rollback state file (default: bundle-state.json in the Lepton config folder)."),
]
