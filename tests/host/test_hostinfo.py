"""Host detection: /proc/cpuinfo in x86 and aarch64 forms, meminfo, cgroup v1/v2 limits, nvidia-smi, and this host."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort
import pytest

from lepton_cli.host.detect import (
    HostSources,
    detect_host,
    normalise_arch,
    parse_cgroup_cpu,
    parse_cgroup_memory,
    parse_cpuinfo,
    parse_meminfo,
    parse_nvidia_smi,
)


def _x86_block(n: int, core: int, flags: str, model: str, socket: int = 0) -> str:
    return (
        f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\nphysical id\t: {socket}\n"
        f"siblings\t: 4\ncore id\t\t: {core}\ncpu cores\t: 2\nflags\t\t: {flags}\n\n"
    )


SPR_FLAGS = (
    "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx_vnni "
    "avx512_bf16 avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8"
)
# Sapphire Rapids with hyper-threading: 4 logical CPUs on 2 cores.
SPR = "".join(_x86_block(n, n // 2, SPR_FLAGS, "Intel(R) Xeon(R) Platinum 8480+") for n in range(4))
# An old Westmere-class VM: no AVX at all.
OLD_X86 = _x86_block(0, 0, "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt", "Intel Xeon E5620")
# Raspberry Pi 5 (4x Cortex-A76): dotprod, no i8mm; the board model sits in a trailing block.
PI5 = (
    "".join(
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
        f"fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
        f"CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
        for n in range(4)
    )
    + "Revision\t: d04170\nSerial\t\t: 1234\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
)
# AWS Graviton3 (Neoverse-V1): SVE, i8mm, bf16.
GRAVITON3 = "".join(
    f"processor\t: {n}\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
    f"cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 asimddp sha512 sve asimdfhm svei8mm svebf16 i8mm bf16 "
    f"dgh rng\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd40\n\n"
    for n in range(8)
)
# Raspberry Pi 4 (Cortex-A72): NEON only.
PI4 = "".join(
    f"processor\t: {n}\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n"
    for n in range(4)
)


def test_x86_flags_cores_and_model():
    facts = parse_cpuinfo(SPR, "x86_64")
    assert facts.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert (facts.physical, facts.logical) == (2, 4)  # SMT siblings share a core id
    for isa in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_fp16"):
        assert isa in facts.isa
    assert "sse2" not in facts.isa  # only the flags targets care about are kept
    old = parse_cpuinfo(OLD_X86, "x86_64")
    assert "avx2" not in old.isa and "sse4_2" in old.isa


def test_two_sockets_count_distinct_cores():
    text = "".join(_x86_block(n, n % 2, "avx2 fma", "EPYC", socket=n // 2) for n in range(4))
    assert parse_cpuinfo(text, "x86_64").physical == 4


@pytest.mark.parametrize(
    "text, model_part, has, lacks",
    [
        (PI5, "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)", ["neon", "dotprod", "fp16"], ["i8mm", "sve"]),
        (GRAVITON3, "Neoverse-V1", ["neon", "dotprod", "i8mm", "bf16", "sve"], ["sve2"]),
        (PI4, "Cortex-A72", ["neon"], ["dotprod", "i8mm", "fp16"]),
    ],
)
def test_aarch64_features(text, model_part, has, lacks):
    facts = parse_cpuinfo(text, "aarch64")
    assert model_part in facts.model
    assert facts.physical == facts.logical == text.count("processor")
    assert all(i in facts.isa for i in has), facts.isa
    assert not any(i in facts.isa for i in lacks), facts.isa


def test_arch_names():
    assert normalise_arch("AMD64") == "x86_64" and normalise_arch("arm64") == "aarch64"
    assert normalise_arch("riscv64") == "riscv64"


def test_meminfo_and_old_kernel_fallback():
    assert parse_meminfo("MemTotal:  8000000 kB\nMemFree: 1000 kB\nMemAvailable:  4096000 kB\n") == (
        8000000 / 1024,
        4000.0,
    )
    assert parse_meminfo("MemTotal:  2048 kB\nMemFree:  1024 kB\n") == (2.0, 1.0)


def test_cgroup_v2_limits(tmp_path):
    group = tmp_path / "app.slice"
    group.mkdir()
    (group / "memory.max").write_text(f"{512 * 2**20}\n")
    (group / "memory.current").write_text(f"{128 * 2**20}\n")
    (group / "cpu.max").write_text("150000 100000\n")
    assert parse_cgroup_memory(tmp_path, "0::/app.slice\n") == (512.0, 128.0)
    assert parse_cgroup_cpu(tmp_path, "0::/app.slice\n") == 1.5
    (group / "memory.max").write_text("max\n")
    (group / "cpu.max").write_text("max 100000\n")
    assert parse_cgroup_memory(tmp_path, "0::/app.slice\n") == (None, None)
    assert parse_cgroup_cpu(tmp_path, "0::/app.slice\n") is None


def test_cgroup_v1_limits_and_container_root(tmp_path):
    mem, cpu = tmp_path / "memory", tmp_path / "cpu,cpuacct"
    mem.mkdir()
    cpu.mkdir()
    # Inside a container the namespaced path (/docker/abc) is not under the mount: the mount root holds the limits.
    (mem / "memory.limit_in_bytes").write_text(str(2 * 2**30))
    (mem / "memory.usage_in_bytes").write_text(str(2**29))
    (cpu / "cpu.cfs_quota_us").write_text("200000")
    (cpu / "cpu.cfs_period_us").write_text("100000")
    self_cgroup = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n"
    assert parse_cgroup_memory(tmp_path, self_cgroup) == (2048.0, 512.0)
    assert parse_cgroup_cpu(tmp_path, self_cgroup) == 2.0
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712")  # "unlimited"
    (cpu / "cpu.cfs_quota_us").write_text("-1")
    assert parse_cgroup_memory(tmp_path, self_cgroup) == (None, None)
    assert parse_cgroup_cpu(tmp_path, self_cgroup) is None


def test_nvidia_smi_rows():
    gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 80000, 550.54.15\nTesla T4, [N/A], [N/A], 535.1\n\n")
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    assert gpus[0].memory_total_mb == 81559 and gpus[0].memory_free_mb == 80000 and gpus[0].driver == "550.54.15"
    assert gpus[1].memory_total_mb is None


def simulated(
    tmp_path: Path,
    *,
    machine="x86_64",
    cpuinfo=SPR,
    mem_kb=(16 * 2**20, 8 * 2**20),
    cgroup=None,
    providers=("CPUExecutionProvider",),
    smi=None,
    system="Linux",
) -> HostSources:
    (tmp_path / "cg").mkdir(exist_ok=True)
    for name, text in (cgroup or {}).items():
        (tmp_path / "cg" / name).write_text(text)
    return HostSources(
        machine=machine,
        system=system,
        cpuinfo=lambda: cpuinfo,
        meminfo=lambda: None if mem_kb is None else f"MemTotal: {mem_kb[0]} kB\nMemAvailable: {mem_kb[1]} kB\n",
        logical_cpus=lambda: 3,
        cgroup_root=tmp_path / "cg",
        proc_self_cgroup=lambda: "0::/\n",
        nvidia_smi=lambda: smi,
        ort=lambda: (list(providers), [], "9.9"),
    )


def test_detect_simulated_container(tmp_path):
    host = detect_host(
        simulated(
            tmp_path,
            cgroup={"memory.max": str(1024 * 2**20), "memory.current": str(300 * 2**20), "cpu.max": "100000 100000"},
        )
    )
    assert host.arch == "x86_64" and host.system == "linux" and host.has_isa("avx512_vnni|avx_vnni")
    assert host.memory_total_mb == 16384 and host.memory_available_mb == 8192
    assert host.usable_memory_mb == 724  # the cgroup leaves less than free RAM
    assert host.usable_cores == 1  # cgroup quota of one core beats 2 physical cores
    assert host.pass_context()["isa"] == list(host.isa)


def test_detect_missing_sources_are_notes_not_errors(tmp_path):
    def broken():
        raise ImportError("no onnxruntime")

    sources = simulated(tmp_path, cpuinfo=None, mem_kb=None)
    sources.ort = broken
    host = detect_host(sources)
    assert host.isa == () and host.cores_logical == 3 and host.memory_total_mb is None and host.providers == ()
    assert len(host.notes) == 3 and host.usable_memory_mb is None


def test_detect_gpu_from_nvidia_smi(tmp_path):
    host = detect_host(
        simulated(
            tmp_path,
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            smi="NVIDIA H100 80GB HBM3, 81559, 80000, 550.54.15\n",
        )
    )
    assert host.gpus[0].name == "NVIDIA H100 80GB HBM3" and host.gpu_providers == ("CUDAExecutionProvider",)


def test_this_host_matches_independent_sources():
    """The real detection agrees with what os and onnxruntime say directly."""
    host = detect_host()
    assert host.cores_logical == os.cpu_count()
    assert 1 <= host.cores_physical <= host.cores_logical
    assert list(host.providers) == ort.get_available_providers() and host.ort_version == ort.__version__
    if Path("/proc/meminfo").exists():
        assert host.memory_total_mb and 0 < host.memory_available_mb <= host.memory_total_mb
    if host.arch == "x86_64" and Path("/proc/cpuinfo").exists():
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
        assert ("avx2" in host.isa) == ("avx2" in flags)
        assert ("avx512_vnni" in host.isa) == ("avx512_vnni" in flags)


def test_detect_command_json(run_cli):
    import json

    result = run_cli("detect", "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["host"]["cores_logical"] == os.cpu_count()
    assert doc["suggestion"]["reasons"]
    text = run_cli("detect")
    assert text.code == 0 and "suggested target" in text.stdout


def test_macos_apple_silicon_from_sysctl(tmp_path):
    values = {
        "machdep.cpu.brand_string": "Apple M2 Pro",
        "hw.physicalcpu": "10",
        "hw.logicalcpu": "10",
        "hw.memsize": str(16 * 2**30),
        "hw.optional.neon": "1",
        "hw.optional.arm.FEAT_DotProd": "1",
        "hw.optional.arm.FEAT_I8MM": "0",
        "hw.optional.arm.FEAT_FP16": "1",
        "hw.optional.arm.FEAT_BF16": "1",
    }
    sources = simulated(
        tmp_path,
        machine="arm64",
        system="Darwin",
        cpuinfo=None,
        mem_kb=None,
        providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
    )
    sources.sysctl = values.get
    host = detect_host(sources)
    assert (host.arch, host.system, host.cpu_model) == ("aarch64", "darwin", "Apple M2 Pro")
    assert host.isa == ("bf16", "dotprod", "fp16", "neon") and host.cores_physical == 10
    assert host.memory_total_mb == 16384 and not host.notes
