"""``lepton verify BUNDLE --trust PUBKEY.pem``: signature and integrity of every file; needs no secret."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lepton_cli.bundle import verify_bundle
from lepton_cli.commands._bundle_keys import trust_spec
from lepton_cli.commands._options import BundleArg, JsonFlag, StateOpt, TrustOpt
from lepton_cli.commands._provenance import show_provenance
from lepton_cli.console import emit_json, settings, stdout


def verify_command(
    bundle: BundleArg,
    trust: TrustOpt = None,
    state: StateOpt = None,
    json_out: JsonFlag = False,
    provenance: Annotated[
        bool,
        typer.Option(
            "--provenance",
            help="Also check and print the signed in-toto provenance statement (how the bundle was built).",
        ),
    ] = False,
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against",
            help="With --provenance: a rebuild of the same inputs; exit 4 unless its inputs and models match this bundle's.",
        ),
    ] = None,
) -> None:
    """Check the bundle's signature, every file's sha256, format version, expiry and rollback state (exit 4 on failure)."""
    settings.json_mode = json_out
    settings.quiet = json_out
    trusted = trust_spec(trust)
    manifest = verify_bundle(bundle, trust=trusted, state_path=state)
    if provenance or against is not None:
        show_provenance(bundle, trusted, against, json_out)
        return
    doc = {
        "bundle": str(bundle),
        "verified": True,
        "signer": manifest.get("signer"),
        "bundle_id": manifest["bundle_id"],
        "version": manifest["version"],
        "expires": manifest.get("expires"),
        "model": manifest["model"]["name"],
        "target": manifest["target"]["name"],
        "files": [{k: e[k] for k in ("path", "role", "size", "sha256")} for e in manifest["files"]],
        "recipients": [r["key_id"] for r in manifest["encryption"]["recipients"]],
    }
    if json_out:
        emit_json(doc)
        return
    stdout.print(
        f"[green]verified[/green] {bundle}: {doc['model']} for {doc['target']}, version {doc['version']}"
        f"{', expires ' + doc['expires'] if doc['expires'] else ''}, signed by {doc['signer']}, "
        f"{len(doc['files'])} files, encrypted to {len(doc['recipients'])} recipient(s)"
    )


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_command)
