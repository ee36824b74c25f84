"""``load_bundle``: a verified, decrypted bundle as a ready ONNX Runtime session.

The choice of model variant and execution providers lives in ``_plan_session`` alone, so
device-specific selection (issue 8, ``runtime_select``) replaces one small function.
The session is built from bytes in memory; nothing decrypted touches the disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import BadInputError
from ..pipeline import LAYOUT_KEY
from .reader import OpenedBundle, open_bundle

DEFAULT_MODEL = "model.onnx"


def _plan_session(opened: OpenedBundle, providers: Sequence[str] | None, variant: str | None = None) -> tuple[str, list[str]]:
    """Which model path to load and with which execution providers (preference order)."""
    path = variant or DEFAULT_MODEL
    if path not in opened.models:
        raise BadInputError(f"the bundle has no model {path!r}", f"choose one of: {', '.join(sorted(opened.models))}")
    available = set(ort.get_available_providers())
    wanted = list(providers) if providers else list(opened.manifest.get("target", {}).get("execution_providers") or [])
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return path, chosen


class BundleSession:
    """An ``InferenceSession`` that takes and returns the source model's layout (NCHW) even when
    the compiled model's I/O is NHWC (``lepton.io_layout.*`` metadata); everything else delegates."""

    def __init__(self, session: ort.InferenceSession, manifest: dict[str, Any], model_path: str):
        self.session = session
        self.manifest = manifest
        self.model_path = model_path
        meta = session.get_modelmeta().custom_metadata_map
        self.layouts = {key[len(LAYOUT_KEY):]: value for key, value in meta.items() if key.startswith(LAYOUT_KEY)}

    def adapt(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(value.transpose(0, 2, 3, 1)) if self.layouts.get(name) == "NHWC" and value.ndim == 4 else value
                for name, value in feed.items()}

    def restore(self, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value.transpose(0, 3, 1, 2)) if self.layouts.get(name) == "NHWC" and value.ndim == 4 else value

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray], run_options: Any = None) -> list[np.ndarray]:
        names = output_names or [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, self.adapt(feed), run_options)
        return [self.restore(name, value) for name, value in zip(names, outputs)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def load_bundle(path: str | Path, key: Any = None, trust: Any = None, providers: Sequence[str] | None = None,
                variant: str | None = None, *, state_path: Path | None = None, threads: int = 0) -> BundleSession:
    """Verify and decrypt ``path`` in memory and return a ready session (raises ``VerificationError``)."""
    from ..keys import ENV

    import os

    key = key if key is not None else os.environ.get(ENV["decrypt"])
    trust = trust if trust is not None else os.environ.get(ENV["trust"])
    opened = open_bundle(path, key=key, trust=trust, state_path=state_path,
                         models=[variant or DEFAULT_MODEL])
    model_path, chosen = _plan_session(opened, providers, variant)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(opened.models.pop(model_path), sess_options=options, providers=chosen)
    except Exception as exc:  # ORT raises its own types; a signed model that will not load is the publisher's problem
        raise BadInputError(f"ONNX Runtime cannot load {model_path} from the bundle: {str(exc).splitlines()[0][:200]}",
                            "check that this ONNX Runtime supports the bundle's target (ops, opset)") from None
    return BundleSession(session, opened.manifest, model_path)
