"""``lepton keys generate [--dir DIR]``: a signing pair and an encryption pair for bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lepton_cli.bundle.keys import default_key_dir, generate_keys
from lepton_cli.commands._options import JsonFlag
from lepton_cli.console import emit_json, settings, stdout

keys_app = typer.Typer(
    help="Signing (ECDSA P-256) and encryption (X25519) key pairs for bundles.", no_args_is_help=True
)


@keys_app.command("generate")
def generate_command(
    folder: Annotated[
        Optional[Path],
        typer.Option("--dir", help="Folder for the four PEM files (default: the Lepton config folder's keys/)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite keys already in the folder.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Write signing-private/public.pem (ECDSA P-256) and encryption-private/public.pem (X25519); private files 0600."""
    settings.json_mode = json_out
    keys = generate_keys(folder or default_key_dir(), overwrite=force)
    doc = {
        "folder": str(keys.folder),
        "signing_key_id": keys.signing_id,
        "encryption_key_id": keys.encryption_id,
        "files": {f"{p}_{k}": str(keys.path(p, k)) for p in ("signing", "encryption") for k in ("private", "public")},
    }
    if json_out:
        emit_json(doc)
        return
    stdout.print(
        f"signing key    {keys.signing_id}\n  private {keys.path('signing', 'private')}  (keep secret: signs bundles)\n"
        f"  public  {keys.path('signing', 'public')}  (give to devices: lepton verify/run --trust)"
    )
    stdout.print(
        f"encryption key {keys.encryption_id}\n  private {keys.path('encryption', 'private')}  (stays on the device: lepton run --key)\n"
        f"  public  {keys.path('encryption', 'public')}  (give to publishers: lepton compile --recipient)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
