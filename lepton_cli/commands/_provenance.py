"""``lepton verify --provenance [--against REBUILD]``: print a bundle's signed provenance, and compare a rebuild with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lepton_cli.bundle.archive import open_source
from lepton_cli.bundle.keys import load_key
from lepton_cli.bundle.provenance import MAX_PROVENANCE_BYTES, PROVENANCE, compare, verify
from lepton_cli.bundle.reader import verify_bundle
from lepton_cli.console import emit_json, stdout
from lepton_cli.errors import VerificationError


def read_provenance(bundle: Path, trust: str) -> dict[str, Any]:
    """The bundle's provenance statement; call after ``verify_bundle`` passed (the file is then signed content)."""
    trusted = load_key(trust, "signing", "public", origin="trusted key")
    source = open_source(bundle)
    try:
        if PROVENANCE not in source.sizes():
            raise VerificationError(f"{bundle.name} carries no {PROVENANCE}", "recompile it with this Lepton version")
        data = source.read(PROVENANCE, MAX_PROVENANCE_BYTES)
    finally:
        source.close()
    return verify(data, trusted)  # type: ignore[arg-type]


def _lines(stmt: dict[str, Any]) -> list[str]:
    build = stmt["predicate"]["buildDefinition"]
    versions = stmt["predicate"]["runDetails"]["builder"]["version"]
    lines = [f"provenance: {stmt['predicateType']} ({build['buildType']})", "outputs:"]
    lines += [f"  {s['name']}  sha256 {s['digest']['sha256']}" for s in stmt["subject"]]
    lines.append("inputs:")
    lines += [f"  {d['name']}  sha256 {d['digest']['sha256']}" for d in build["resolvedDependencies"]]
    options = build["externalParameters"]["options"]
    lines.append(
        "parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if v is not None and v != [])
    )
    passes = build["internalParameters"]["pipeline"]["passes"]
    lines.append("pipeline: " + " → ".join(p["name"] + ("" if p.get("enabled", True) else " (off)") for p in passes))
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return lines


def show_provenance(bundle: Path, trust: str, against: Path | None, json_out: bool) -> None:
    stmt = read_provenance(bundle, trust)
    differences = None
    if against is not None:
        verify_bundle(against, trust=trust)
        differences = compare(stmt, read_provenance(against, trust))
    if json_out:
        emit_json(
            {"bundle": str(bundle), "verified": True, "provenance": stmt}
            | ({"against": str(against), "reproduced": not differences, "differences": differences} if against else {})
        )
    else:
        stdout.print(f"[green]verified[/green] {bundle} and its provenance statement", highlight=False)
        for line in _lines(stmt):
            stdout.print(line, highlight=False, markup=False)
        if against is not None and not differences:
            stdout.print(
                f"[green]reproduced[/green]: {against} was built from the same inputs and its models are byte-identical"
            )
    if differences:
        raise VerificationError(
            f"{against} does not reproduce {bundle.name}: {'; '.join(differences[:4])}",
            "rebuild from exactly the inputs and tool versions the provenance lists",
        )
