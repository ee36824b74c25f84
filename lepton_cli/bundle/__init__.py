"""Signed, encrypted bundles (SPEC "Bundle"): ``write_bundle``, ``verify_bundle``, ``open_bundle``, ``load_bundle``.

One module per job: ``manifest`` (format, strict validation), ``crypto`` (Cobblestone + HPKE),
``signing`` (OpenSSF model-signing v1.0), ``archive`` (folder or zip), ``state`` (rollback),
``writer``, ``reader``, ``session`` (ONNX Runtime).
"""

from __future__ import annotations

from .reader import OpenedBundle, open_bundle, read_manifest_unverified, verify_bundle
from .session import BundleSession, load_bundle
from .writer import write_bundle

__all__ = [
    "BundleSession",
    "OpenedBundle",
    "load_bundle",
    "open_bundle",
    "read_manifest_unverified",
    "verify_bundle",
    "write_bundle",
]
