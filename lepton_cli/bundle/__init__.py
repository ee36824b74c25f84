"""Signed, encrypted bundles (SPEC "Bundle"): ``write_bundle``, ``verify_bundle``, ``open_bundle``, (``load_bundle`` lives in ``lepton_cli.runtime``).

One module per job: ``manifest`` (format, strict validation), ``crypto`` (Cobblestone + HPKE),
``signing`` (OpenSSF model-signing v1.0), ``archive`` (folder or zip), ``state`` (rollback),
``writer``, ``reader``, ``keys``; the ONNX Runtime session that runs a bundle is ``lepton_cli.runtime``.
"""

from __future__ import annotations

from lepton_cli.bundle.reader import OpenedBundle, open_bundle, read_manifest_unverified, verify_bundle
from lepton_cli.bundle.writer import write_bundle

__all__ = [
    "OpenedBundle",
    "open_bundle",
    "read_manifest_unverified",
    "verify_bundle",
    "write_bundle",
]
