"""Lepton: compile one ONNX model for many targets into signed, encrypted bundles."""
from __future__ import annotations

__version__ = "0.1.0"
