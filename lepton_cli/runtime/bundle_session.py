"""``load_bundle``: a verified, decrypted bundle as a ready ONNX Runtime session.

The choice of model variant and execution providers lives in ``_plan_session`` alone
(``runtime.select`` does the device-specific choosing).
The session is built from bytes in memory; nothing decrypted touches the disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from lepton_cli.bundle.reader import OpenedBundle, open_bundle, read_manifest_unverified
from lepton_cli.model.io_contract import IoContract
from lepton_cli.runtime.select import Selection, select_session


def _plan_session(
    opened: OpenedBundle, providers: Sequence[str] | None, variant: str | None = None, threads: int = 0
) -> Selection:
    """Variant, execution providers and threads for this device, and the opened session (``runtime.select``)."""
    return select_session(
        opened.models, opened.manifest, preferred_providers=providers, threads=threads or None, only=variant
    )


class BundleSession:
    """An ``InferenceSession`` that takes and returns the source model's layout (NCHW) and float
    values even when the compiled model's I/O is NHWC (``lepton.io_layout.*`` metadata) or integer
    (``lepton.io_quant.*``: float feeds are quantized, integer outputs dequantized; integer feeds pass
    as they are). ``.session`` is the raw ONNX Runtime session; everything else delegates."""

    selection: Selection | None = None  # set by load_bundle: the variant/EP/thread choice and its log

    def __init__(self, session: ort.InferenceSession, manifest: dict[str, Any], model_path: str):
        self.session = session
        self.manifest = manifest
        self.model_path = model_path
        self.contract = IoContract.from_metadata(session.get_modelmeta().custom_metadata_map)

    def adapt(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.contract.adapt(feed)

    def restore(self, name: str, value: np.ndarray) -> np.ndarray:
        return self.contract.restore(name, value)

    def run(
        self, output_names: list[str] | None, feed: dict[str, np.ndarray], run_options: Any = None
    ) -> list[np.ndarray]:
        names = output_names or [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, self.adapt(feed), run_options)
        return [self.restore(name, value) for name, value in zip(names, outputs)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _forced_paths(path: str | Path, variant: str | None) -> list[str] | None:
    """The model path of a forced variant, from the manifest (every check still runs in ``open_bundle``)."""
    if variant is None:
        return None
    try:
        listed = read_manifest_unverified(path).get("variants") or []
    except Exception:  # unreadable here: open_bundle reports it properly
        return None
    paths = [
        v["path"]
        for v in listed
        if isinstance(v, dict) and variant in (v.get("name"), v.get("path")) and isinstance(v.get("path"), str)
    ]
    return paths or None


def load_bundle(
    path: str | Path,
    key: Any = None,
    trust: Any = None,
    providers: Sequence[str] | None = None,
    variant: str | None = None,
    *,
    state_path: Path | None = None,
    threads: int = 0,
) -> BundleSession:
    """Verify and decrypt ``path`` in memory and return a ready session (raises ``VerificationError``)."""
    import os

    from lepton_cli.bundle.keys import ENV

    key = key if key is not None else os.environ.get(ENV["decrypt"])
    trust = trust if trust is not None else os.environ.get(ENV["trust"])
    # Every variant is decrypted (in memory): which one runs is decided on the device, by _plan_session;
    # a forced variant alone (the others are still hash-checked): a large one's weights are in memory once.
    opened = open_bundle(path, key=key, trust=trust, state_path=state_path, models=_forced_paths(path, variant))
    selection = _plan_session(opened, providers, variant, threads)
    opened.models.clear()  # the session holds its own copy; drop the plaintext of every variant
    bundle_session = BundleSession(selection.session, opened.manifest, selection.variant.path)
    bundle_session.selection = selection  # what was chosen and why (``lepton run`` prints selection.log)
    return bundle_session
