"""What a target's device runs, beside the ONNX model: its own file formats and its constraint checks.

A target's ``[runtime] device_formats`` names the files made from every compiled model the bundle
carries (``ort``: ONNX Runtime Mobile's ``.ort`` plus the reduced-build operator config;
``tflite``: a full-integer ``.tflite`` for LiteRT and the Edge TPU compiler), and
``device_checks`` the accelerator constraints checked on the compiled graph (``dpu``,
``edgetpu``). The ONNX models stay in the bundle as the reference; each device file is encrypted
and signed like them, listed in the manifest's ``device_artifacts`` (path, format, the ONNX model
it was made from, the runtime that runs it), and its checks go to the report's ``device`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from lepton_cli.bundle.manifest import PRIMARY_MODEL
from lepton_cli.pipeline.targets import Target


@dataclass
class DeviceArtifacts:
    models: dict[str, bytes] = field(default_factory=dict)  # encrypted in the bundle, like model.onnx
    plain_files: dict[str, bytes] = field(default_factory=dict)  # signed plaintext (the operator config)
    manifest: list[dict[str, Any]] = field(default_factory=list)  # manifest["device_artifacts"]
    report: dict[str, Any] = field(default_factory=dict)  # report["device"]
    accuracy: list[dict[str, Any]] = field(default_factory=list)  # measured device files, for the accuracy gate


def _mobile(models: dict[str, bytes], out: DeviceArtifacts, warn: Callable[[str], None]) -> None:
    from lepton_cli.device_artifacts import ort_format

    section: dict[str, Any] = {"runtime": ort_format.RUNTIME}
    try:
        with ort_format.written(models) as sources:
            # The usability check first, while the conversion's files are not yet held: it copies the model once more.
            usability = ort_format.mobile_usability(sources[PRIMARY_MODEL])
            conversion = ort_format.convert(sources)
    except Exception as exc:  # a failure of ORT's tools leaves the ONNX bundle usable: say so, do not stop
        section["produced"] = False
        section["reason"] = (
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
        )
        warn(f"device: no .ort written: ONNX Runtime's mobile tools failed ({section['reason']})")
        out.report["ort"] = section
        return
    out.models.update(conversion.files)
    out.plain_files[ort_format.OPS_CONFIG] = conversion.ops_config
    for onnx_path in models:
        out.manifest.append(
            {
                "format": "ort",
                "path": ort_format.ort_path(onnx_path),
                "from": onnx_path,
                "runtime": ort_format.RUNTIME,
                "ops_config": ort_format.OPS_CONFIG,
            }
        )
    section.update(
        {
            "produced": True,
            "files": {p: len(b) for p, b in conversion.files.items()},
            "ops_config": ort_format.OPS_CONFIG,
            "optimization_style": "runtime",
            "target_platform": "arm",
        }
    )
    section["usability"] = usability
    out.report["ort"] = section


def build_device_artifacts(
    target: Target,
    models: dict[str, bytes],
    compiled: onnx.ModelProto,
    warn: Callable[[str], None],
    *,
    source: onnx.ModelProto | None = None,
    ctx: Any = None,
) -> DeviceArtifacts:
    """The device files and checks ``target`` asks for, made from ``models`` (bundle path -> ONNX bytes);
    ``compiled`` is the main model, ``source`` the normalised source and ``ctx`` the pipeline's context
    (data and budget, for scoring a device file)."""
    out = DeviceArtifacts()
    formats, checks = target.runtime.device_formats, target.runtime.device_checks
    if "ort" in formats:
        _mobile(models, out, warn)
    if "dpu" in checks:
        from lepton_cli.device_artifacts import dpu

        out.report["dpu"] = dpu.check_report(compiled, target, warn)
    if "tflite" in formats or "edgetpu" in checks:
        from lepton_cli.device_artifacts import tflite_artifact

        tflite_artifact.build(compiled, source, ctx, target, out, warn)
    return out
