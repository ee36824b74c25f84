"""``compile``'s side of bundles: which keys to use, and the manifest fields a compile records.

Keys, in order: ``--sign-key`` / ``--recipient`` options, then ``LEPTON_SIGNING_KEY`` /
``LEPTON_RECIPIENT`` (a path or PEM text: one recipient; more with the repeatable option), then
the development key set in the config folder, created on first use (and said so).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lepton_cli.bundle.archive import ARCHIVE_SUFFIX, write_archive
from lepton_cli.bundle.keys import ENV, EncryptionPublicKey, SigningPrivateKey, dev_keys, key_id, load_key, resolve
from lepton_cli.bundle.manifest import parse_expires
from lepton_cli.bundle.provenance import PROVENANCE
from lepton_cli.bundle.provenance import sign as sign_provenance
from lepton_cli.bundle.provenance import statement as provenance_statement
from lepton_cli.bundle.writer import check_bundle_options, write_bundle
from lepton_cli.compile.report import section, steps
from lepton_cli.compile.report_render import render_html, render_markdown
from lepton_cli.errors import BadInputError


@dataclass
class CompileKeys:
    """Explicit keys, checked before the compile; gaps are filled from the dev key set at write time,
    so a compile that fails on its inputs creates nothing."""

    signing: SigningPrivateKey | None
    recipients: list[EncryptionPublicKey]
    on_note: Callable[[str], None] | None = None

    def complete(self) -> tuple[SigningPrivateKey, list[EncryptionPublicKey]]:
        if self.signing is not None and self.recipients:
            return self.signing, self.recipients
        keys, created = dev_keys(create=True)
        assert keys is not None
        if self.on_note:
            if created:
                self.on_note(
                    f"created a development key set in {keys.folder} (signing {keys.signing_id}, encryption "
                    f"{keys.encryption_id}); use `lepton keys generate` and --sign-key/--recipient for real deployments"
                )
            else:
                self.on_note(f"using the development key set in {keys.folder}")
        signing = self.signing or load_key(
            str(keys.path("signing", "private")), "signing", "private", origin="development signing key"
        )
        recipients = self.recipients or [
            load_key(
                str(keys.path("encryption", "public")), "encryption", "public", origin="development encryption key"
            )
        ]
        return signing, recipients  # type: ignore[return-value]


def resolve_compile_keys(
    sign_key: str | None,
    recipients: list[str],
    version: int,
    expires: str | None,
    on_note: Callable[[str], None] | None = None,
) -> CompileKeys:
    """All key and bundle options checked before the compile starts (exit 2 on any problem)."""
    check_bundle_options(version, expires)
    now = datetime.now(timezone.utc)
    if expires is not None and parse_expires(expires) <= now:
        raise BadInputError(
            f"--expires {expires} has passed (now {now:%Y-%m-%dT%H:%MZ}): every device would refuse the bundle",
            "pass a date in the future, or leave --expires out for a bundle that does not expire",
        )
    signing = resolve(sign_key, ENV["sign"], "signing", "private", "--sign-key")
    publics = [
        load_key(
            spec, "encryption", "public", origin=f"--recipient {spec if '-----BEGIN' not in spec else '(PEM text)'}"
        )
        for spec in recipients
    ]
    if not publics and os.environ.get(ENV["recipient"]):
        publics = [resolve(None, ENV["recipient"], "encryption", "public", "recipient")]  # type: ignore[list-item]
    ids = [key_id(p) for p in publics]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise BadInputError(f"recipient {duplicates[0]} is given twice", "list each --recipient once")
    return CompileKeys(signing, publics, on_note)  # type: ignore[arg-type]


def _rendered_reports(report: dict[str, Any]) -> dict[str, bytes]:
    return {
        "report.json": (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode(),
        "report.md": render_markdown(report).encode(),
        "report.html": render_html(report).encode(),
    }


def compile_manifest_fields(report: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """What SPEC asks the manifest to record, taken from the compile's report."""
    model = section(report, "model")
    target = dict(section(report, "target"))
    source, compiled = section(report, "source"), section(report, "compiled")
    fields: dict[str, Any] = {
        "model": {"name": Path(model.get("name", "model")).stem, "file": model.get("name")},
        "source": {"sha256": model.get("sha256")},
        "target": target,
        "pipeline": steps(report),
        "io": {
            "source": {k: source.get(k) for k in ("inputs", "outputs")},
            "compiled": {k: compiled.get(k) for k in ("inputs", "outputs")},
        },
    }
    for key, value in (extra or {}).items():
        if key == "execution_providers":
            target["execution_providers"] = value
        fields[key] = value
    return fields


def write_compile_output(
    bundle_dir: Path,
    models: dict[str, bytes],
    report: dict[str, Any],
    keys: CompileKeys,
    *,
    version: int,
    expires: str | None,
    archive: bool,
    extra_fields: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    extra_plain_files: dict[str, bytes] | None = None,
) -> Path | None:
    """The signed, encrypted bundle folder (and its archive with ``archive``); returns the archive path.

    ``provenance`` (``compile_inputs``) adds the signed in-toto provenance statement beside the reports;
    ``extra_plain_files`` are signed but not encrypted (a device's operator config: no weights in it).
    """
    signing_key, recipients = keys.complete()
    plain_files = {**(extra_plain_files or {}), **_rendered_reports(report)}
    if provenance is not None:
        plain_files[PROVENANCE] = sign_provenance(
            provenance_statement(provenance, models, bundle_dir.name), signing_key
        )
    write_bundle(
        bundle_dir,
        models=models,
        plain_files=plain_files,
        manifest_fields=compile_manifest_fields(report, extra_fields),
        signing_key=signing_key,
        recipients=recipients,
        version=version,
        expires=expires,
    )
    if archive:
        return write_archive(bundle_dir, bundle_dir.with_name(bundle_dir.name + ARCHIVE_SUFFIX))
    return None
