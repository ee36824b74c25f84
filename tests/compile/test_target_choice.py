"""--target auto: each rule of suggest_target on simulated hosts, and the reasons it gives."""

from __future__ import annotations

import pytest

from lepton_cli.compile.target_choice import suggest_target
from lepton_cli.host.detect import GpuInfo, HostInfo

H100 = GpuInfo(
    name="NVIDIA H100 80GB HBM3", vendor="NVIDIA", memory_total_mb=81559, memory_free_mb=80000, source="nvidia-smi"
)
CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"


def host(arch="x86_64", system="linux", isa=("avx2", "fma"), gpus=(), providers=(CPU_EP,)) -> HostInfo:
    return HostInfo(
        arch=arch,
        system=system,
        cpu_model="test CPU",
        cores_physical=4,
        cores_logical=8,
        isa=tuple(isa),
        memory_total_mb=16384,
        memory_available_mb=8192,
        gpus=tuple(gpus),
        providers=tuple(providers),
    )


@pytest.mark.parametrize(
    "h, expected, reason_part",
    [
        (host(gpus=[H100], providers=(CUDA_EP, CPU_EP)), "cuda", "H100"),
        (
            host(gpus=[H100], providers=("TensorrtExecutionProvider", CUDA_EP, CPU_EP)),
            "cuda",
            "TensorrtExecutionProvider",
        ),
        (host(arch="aarch64", isa=("neon", "dotprod")), "edge-arm", "without a phone EP"),
        (host(arch="aarch64", system="android", isa=("neon", "dotprod", "i8mm")), "mobile", "android"),
        (
            host(arch="aarch64", system="darwin", isa=("neon",), providers=("CoreMLExecutionProvider", CPU_EP)),
            "mobile",
            "CoreML",
        ),
        (host(isa=("avx2", "fma", "avx512f", "avx512_vnni")), "cpu-avx", "AVX2"),
        (host(isa=("sse4_2",)), "cpu-avx", "x86-64"),
    ],
)
def test_each_rule(h, expected, reason_part):
    suggestion = suggest_target(h)
    assert suggestion.name == expected
    assert any(reason_part in r for r in suggestion.reasons), suggestion.reasons


def test_gpu_without_cuda_ep_is_not_cuda_and_says_why():
    suggestion = suggest_target(host(gpus=[H100]))
    assert suggestion.name == "cpu-avx"
    assert any("onnxruntime-gpu" in w for w in suggestion.warnings)


def test_cuda_ep_without_gpu_is_not_cuda_and_says_why():
    suggestion = suggest_target(host(providers=(CUDA_EP, CPU_EP)))
    assert suggestion.name == "cpu-avx"
    assert any("no NVIDIA GPU" in w for w in suggestion.warnings)


def test_isa_gap_against_the_reference_part():
    """cpu-avx's reference part has AVX-512 VNNI; an AVX2-only host hears which flags it lacks."""
    plain = suggest_target(host(isa=("avx2", "fma")))
    assert any("avx512_vnni" in w for w in plain.warnings)
    full = suggest_target(host(isa=("avx2", "fma", "avx512f", "avx512_vnni")))
    assert not full.warnings
    no_avx2 = suggest_target(host(isa=("sse4_2",)))
    assert any("fp32 variant" in w for w in no_avx2.warnings)
    pi4 = suggest_target(host(arch="aarch64", isa=("neon",)))
    assert pi4.name == "edge-arm" and any("dotprod" in w for w in pi4.warnings)


def test_unknown_architecture_has_no_target():
    suggestion = suggest_target(host(arch="riscv64", isa=()))
    assert suggestion.name is None and "riscv64" in suggestion.summary()


def test_compile_target_auto_uses_the_detected_host(run_cli, tmp_path):
    import json

    from conftest import DIGITS

    from lepton_cli.host.detect import detect_host

    expected = suggest_target(detect_host())
    result = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", "auto", "-o", tmp_path, "--json")
    if expected.name is None:
        assert result.code == 2 and "--target auto" in result.stderr
        return
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["target"] == expected.name and doc["bundle"].endswith(f".{expected.name}.lepton")
    report = json.loads((tmp_path / f"digits_cnn.{expected.name}.lepton" / "report.json").read_text())
    assert report["target_choice"]["target"] == expected.name and report["target_choice"]["reasons"] == expected.reasons
    human = run_cli("compile", DIGITS / "digits_cnn.onnx", "--target", "auto", "-o", tmp_path / "h")
    assert f"--target auto chose {expected.name}" in human.stderr


def test_target_auto_on_unknown_arch_is_exit_2(monkeypatch):
    from lepton_cli.compile import compiler
    from lepton_cli.errors import BadInputError

    with pytest.raises(BadInputError) as err:
        compiler.resolve_target("auto", host(arch="riscv64", isa=()))
    assert "riscv64" in err.value.message
    assert compiler.resolve_target("edge-arm", host())[1] is None


def test_edge_arm_without_xnnpack_says_bundles_run_on_the_cpu_ep():
    """The PyPI onnxruntime for aarch64 has no XNNPACK EP: detect and --target auto say so."""
    pi = suggest_target(host(arch="aarch64", isa=("neon", "dotprod", "i8mm", "fp16")))
    assert pi.name == "edge-arm"
    assert any("XnnpackExecutionProvider" in w and "CPUExecutionProvider" in w for w in pi.warnings), pi.warnings
    with_xnnpack = suggest_target(
        host(arch="aarch64", isa=("neon", "dotprod", "i8mm", "fp16"), providers=("XnnpackExecutionProvider", CPU_EP))
    )
    assert not any("Xnnpack" in w for w in with_xnnpack.warnings)
