"""Lepton: compile one ONNX model for many targets into signed, encrypted bundles."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import lepton_cli` (and the CLI's start-up) stays light; load_bundle pulls in ONNX Runtime.
    if name == "load_bundle":
        from lepton_cli.runtime.bundle_session import load_bundle

        return load_bundle
    raise AttributeError(f"module 'lepton_cli' has no attribute {name!r}")
