"""``load_device_file``: a bundle's device file (``.ort`` or ``.tflite``) as a ready session.

The manifest's ``device_artifacts`` says which file holds a format. Which one to decrypt is read
from the manifest before authentication (display-grade), then ``open_bundle`` verifies the whole
bundle, decrypts only that file in memory, and the authenticated manifest must list the same
entry. The session takes the same feeds as ``BundleSession`` (source layout, float).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_cli.bundle.manifest import PRIMARY_MODEL, fail
from lepton_cli.bundle.reader import open_bundle, read_manifest_unverified
from lepton_cli.errors import BadInputError
from lepton_cli.model.sessions import REPLAY_OPTIMIZATIONS

FORMATS = ("onnx", "ort", "tflite")
RUNTIMES = {"ort": "ONNX Runtime (ORT format)", "tflite": "LiteRT (ai-edge-litert)"}


@dataclass
class DeviceSelection:
    """What ran and why (the ``selection`` of ``lepton run --json``)."""

    format: str
    path: str
    runtime: str
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.path, "runtime": self.runtime, "log": self.log}


def _entry(manifest: dict[str, Any], fmt: str, variant_path: str) -> dict[str, Any] | None:
    listed = [e for e in manifest.get("device_artifacts") or [] if isinstance(e, dict) and e.get("format") == fmt]
    return next((e for e in listed if e.get("from") == variant_path), listed[0] if listed else None)


def _variant_path(manifest: dict[str, Any], variant: str | None) -> str:
    if variant is None:
        return PRIMARY_MODEL
    for v in manifest.get("variants") or []:
        if variant in (v.get("name"), v.get("path")):
            return str(v.get("path"))
    return variant


def _check_runtime(fmt: str) -> None:
    if fmt == "tflite":
        from lepton_cli.runtime.litert_session import interpreter_class

        interpreter_class()  # exit 2 naming the extra before any decryption


def load_device_file(
    path: str | Path,
    fmt: str,
    *,
    key: Any,
    trust: Any,
    state_path: Path | None = None,
    variant: str | None = None,
    providers: list[str] | None = None,
    threads: int = 0,
) -> Any:
    """Verify the bundle, decrypt its ``fmt`` file in memory and open it in that format's runtime."""
    _check_runtime(fmt)
    listed = read_manifest_unverified(path)  # only to choose what to decrypt: open_bundle authenticates it
    wanted_from = _variant_path(listed, variant)
    unverified = _entry(listed, fmt, wanted_from)
    if unverified is None:
        raise BadInputError(
            f"{path} has no {fmt} file (its manifest lists no device_artifacts of that format)",
            "use --format onnx, or compile for a target that makes one (mobile: ort; tpu: tflite, with lepton-cli[tflite])",
        )
    opened = open_bundle(path, key=key, trust=trust, state_path=state_path, models=[str(unverified.get("path"))])
    entry = _entry(opened.manifest, fmt, wanted_from)
    if entry != unverified or entry is None or entry["path"] not in opened.models:
        raise fail(f"manifest.json's {fmt} entry changed between reads")
    data = opened.models.pop(entry["path"])
    selection = DeviceSelection(
        fmt,
        entry["path"],
        RUNTIMES[fmt],
        [f"format {fmt}: {entry['path']} (made from {entry['from']}), runtime {RUNTIMES[fmt]}"],
    )
    if fmt == "tflite":
        from lepton_cli.runtime.litert_session import LiteRTSession

        session: Any = LiteRTSession(data, entry["io_names"], entry.get("io_layout") or {}, threads or None)
        session.model_path, session.manifest = entry["path"], opened.manifest
    else:
        session = _ort_session(data, opened.manifest, entry["path"], providers, threads, selection)
    session.selection = selection
    return session


def _ort_session(
    data: bytes,
    manifest: dict[str, Any],
    path: str,
    providers: list[str] | None,
    threads: int,
    selection: DeviceSelection,
) -> Any:
    import onnxruntime as ort

    from lepton_cli.runtime.bundle_session import BundleSession

    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    options.add_session_config_entry(REPLAY_OPTIMIZATIONS, "1")  # signed bundle: its saved optimizations are trusted
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    chosen = [p for p in (providers or []) if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in providers or [] if p not in available]
    if missing:
        selection.log.append(f"not in this onnxruntime: {', '.join(missing)}; running on {', '.join(chosen)}")
    return BundleSession(ort.InferenceSession(data, options, providers=chosen), manifest, path)
