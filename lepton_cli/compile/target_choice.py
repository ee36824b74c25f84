"""``--target auto`` and ``lepton detect``: which builtin target fits a host, and why.

The rules, in order (first match wins), each recorded as a reason the user sees:
1. an NVIDIA GPU is visible and ONNX Runtime has the CUDA or TensorRT EP → ``cuda``;
2. aarch64 on Android/iOS, or with the NNAPI / Core ML EP → ``mobile``; other aarch64 → ``edge-arm``;
3. x86-64 → ``cpu-avx`` (with AVX2; without it the int8 kernels fall back to SSE and we say so).
The chosen target's preferred execution providers that this onnxruntime lacks are named too, with
the one its bundles fall back to (the PyPI aarch64 wheel has no XNNPACK: edge-arm runs on the CPU EP).
Then the chosen target's ``hardware.isa`` is compared with the host's, so the user learns what
the reference part has that this host lacks (e.g. AVX-512 VNNI on a plain AVX2 machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lepton_cli.host.detect import HostInfo

# ISA names in targets/*.toml that describe a CPU (others, e.g. sm_75, describe an accelerator).
CPU_ISA = {
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "dotprod",
    "i8mm",
    "fp16",
    "bf16",
    "sve",
    "sve2",
    "sme",
}


@dataclass(frozen=True)
class TargetSuggestion:
    name: str | None  # None: no builtin target fits this host
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.name, "reasons": self.reasons, "warnings": self.warnings}

    def summary(self) -> str:
        return (
            f"{self.name}: " + "; ".join(self.reasons)
            if self.name
            else "no builtin target fits: " + "; ".join(self.reasons)
        )


def _gpu_rule(host: HostInfo, reasons: list[str], warnings: list[str]) -> bool:
    nvidia = [g for g in host.gpus if g.vendor.upper().startswith("NVIDIA") or g.source == "nvidia-smi"]
    eps = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in host.providers]
    if nvidia and eps:
        reasons.append(f"NVIDIA GPU {nvidia[0].name} found and onnxruntime has {', '.join(eps)}")
        return True
    if nvidia:
        warnings.append(
            f"NVIDIA GPU {nvidia[0].name} found but this onnxruntime has no CUDA EP "
            "(install onnxruntime-gpu to use it): not choosing cuda"
        )
    elif eps:
        warnings.append(
            f"onnxruntime has {', '.join(eps)} but no NVIDIA GPU is visible (nvidia-smi): not choosing cuda"
        )
    return False


def suggest_target(host: HostInfo) -> TargetSuggestion:
    """The builtin target for ``host``, with the reasons for and the caveats against it."""
    reasons: list[str] = []
    warnings: list[str] = []
    if _gpu_rule(host, reasons, warnings):
        name: str | None = "cuda"
    elif host.arch == "aarch64":
        mobile_eps = [p for p in ("NnapiExecutionProvider", "CoreMLExecutionProvider") if p in host.providers]
        if host.system in ("android", "ios"):
            name = "mobile"
            reasons.append(f"aarch64 {host.system} device")
        elif mobile_eps:
            name = "mobile"
            reasons.append(f"aarch64 with {', '.join(mobile_eps)}")
        else:
            name = "edge-arm"
            reasons.append(f"aarch64 {host.system} host ({host.cpu_model}) without a phone EP")
    elif host.arch == "x86_64":
        name = "cpu-avx"
        if host.has_isa("avx2"):
            reasons.append(f"x86-64 with AVX2 ({host.cpu_model})")
        else:
            reasons.append(f"x86-64 ({host.cpu_model})")
            warnings.append(
                "no AVX2: ONNX Runtime's int8 kernels run on SSE here and may be slower than fp32; "
                "a bundle's fp32 variant will be chosen at run time"
            )
    else:
        name = None
        reasons.append(f"architecture {host.arch!r} matches none of the builtin targets")
    if name is not None:
        warnings.extend(_isa_gaps(name, host))
        warnings.extend(_provider_gaps(name, host))
    return TargetSuggestion(name, reasons, warnings)


def _provider_gaps(name: str, host: HostInfo) -> list[str]:
    """The target's accelerator EPs this onnxruntime lacks: its bundles fall back to the next one, or the CPU EP."""
    from lepton_cli.pipeline.targets import load_target  # late: targets imports the pass registry

    wanted = [p for p in load_target(name).runtime.execution_providers if p != "CPUExecutionProvider"]
    missing = [p for p in wanted if p not in host.providers]
    if not missing:
        return []
    fallback = next((p for p in wanted if p in host.providers), "CPUExecutionProvider")
    text = f"this onnxruntime has no {', '.join(missing)} (target {name} prefers it): bundles run on {fallback}"
    if fallback == "CPUExecutionProvider" and host.arch == "aarch64":
        text += " (ONNX Runtime's own Arm kernels)"
    if "XnnpackExecutionProvider" in missing and host.arch == "aarch64":
        text += "; the PyPI onnxruntime wheel for aarch64 is built without XNNPACK (build with --use_xnnpack to get it)"
    return [text]


def _isa_gaps(name: str, host: HostInfo) -> list[str]:
    """What the target's reference CPU has that this host lacks (the compile still works; speed differs)."""
    from lepton_cli.pipeline.targets import load_target  # late: targets imports the pass registry

    target_isa = [i for i in load_target(name).hardware.isa if i in CPU_ISA]
    if not target_isa or (name == "cuda"):
        return []
    missing = [i for i in target_isa if not host.has_isa(i)]
    if not missing:
        return []
    return [
        f"target {name} models a CPU with {', '.join(target_isa)}; this host lacks {', '.join(missing)} "
        "(latency estimates are for the reference part; run-time variant choice adapts to the device)"
    ]
