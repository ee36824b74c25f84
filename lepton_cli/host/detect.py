"""What this machine is: CPU model, cores, ISA flags, memory (with cgroup limits), GPUs, ONNX Runtime EPs.

Used by ``lepton detect``, ``--target auto`` (``target_choice``), the passes (``PassContext.host``)
and, on the device, by ``runtime_select`` to pick a bundle variant and execution providers.

Checked before writing by hand: ONNX Runtime exposes ``get_available_providers()`` (EPs compiled
into the wheel, not whether a device is present) and, since 1.22, ``get_ep_devices()`` (hardware
devices each EP can use, with vendor and type); we use both. Neither reports CPU ISA features,
core counts or container memory limits, and the stdlib has no portable CPU-feature API
(``platform.processor()`` is empty on Linux), so CPU facts come from ``/proc/cpuinfo`` in its x86
(``flags``) and aarch64 (``Features``) forms, memory from ``/proc/meminfo`` and the cgroup v1/v2
files. Every source is injectable (``HostSources``) so tests simulate other hosts.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

# x86 /proc/cpuinfo flag → our ISA name (the names targets/*.toml use in hardware.isa).
_X86_FLAGS = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512dq": "avx512dq",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}
# aarch64 /proc/cpuinfo Features (Linux hwcaps) → our ISA name.
_ARM_FEATURES = {
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "asimdhp": "fp16",
    "fphp": "fp16",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
}
# Linux "CPU part" ids of Arm-designed cores (implementer 0x41), for a readable model name.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3",
    "0xd4f": "Neoverse-V2",
}
_NO_LIMIT = 1 << 60  # cgroup v1 writes ~2^63 for "unlimited"
GPU_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    vendor: str = ""
    memory_total_mb: float | None = None
    memory_free_mb: float | None = None
    driver: str = ""
    source: str = ""  # "nvidia-smi" or "onnxruntime"


@dataclass(frozen=True)
class HostInfo:
    arch: str  # normalised: "x86_64", "aarch64", or what platform.machine() said
    system: str  # "linux", "android", "darwin", "windows", ...
    cpu_model: str
    cores_physical: int
    cores_logical: int
    isa: tuple[str, ...]
    memory_total_mb: float | None
    memory_available_mb: float | None
    cgroup_memory_limit_mb: float | None = None
    cgroup_memory_used_mb: float | None = None
    cgroup_cpu_limit: float | None = None  # CPU quota in cores (cpu.max / cfs_quota)
    gpus: tuple[GpuInfo, ...] = ()
    providers: tuple[str, ...] = ()  # ONNX Runtime EPs compiled into the installed wheel
    ort_version: str = ""
    notes: tuple[str, ...] = ()  # what could not be read, for `lepton detect`

    @classmethod
    def unknown(cls) -> HostInfo:
        """A host of which nothing is known (a pass run on its own): no ISA flags, one core, memory unknown."""
        return cls(
            arch="",
            system="",
            cpu_model="",
            cores_physical=1,
            cores_logical=1,
            isa=(),
            memory_total_mb=None,
            memory_available_mb=None,
        )

    def has_isa(self, requirement: str) -> bool:
        """``requirement`` is one ISA name or alternatives joined by ``|`` (any of them will do)."""
        return any(part.strip() in self.isa for part in requirement.split("|"))

    @property
    def usable_memory_mb(self) -> float | None:
        """Memory a new process can still take: the smaller of free RAM and what the cgroup limit leaves."""
        candidates = [self.memory_available_mb]
        if self.cgroup_memory_limit_mb is not None:
            candidates.append(self.cgroup_memory_limit_mb - (self.cgroup_memory_used_mb or 0.0))
        known = [c for c in candidates if c is not None]
        return max(0.0, min(known)) if known else None

    @property
    def usable_cores(self) -> int:
        """Cores worth one intra-op thread each: physical cores (SMT siblings share the FMA units), capped by the cgroup quota."""
        cores = max(1, self.cores_physical)
        if self.cgroup_cpu_limit is not None:
            cores = min(cores, max(1, int(self.cgroup_cpu_limit)))
        return cores

    @property
    def gpu_providers(self) -> tuple[str, ...]:
        return tuple(p for p in self.providers if p in GPU_PROVIDERS)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["isa"] = list(self.isa)
        doc["providers"] = list(self.providers)
        doc["notes"] = list(self.notes)
        doc["usable_memory_mb"] = self.usable_memory_mb
        doc["usable_cores"] = self.usable_cores
        return doc

    def pass_context(self) -> dict[str, Any]:
        """The facts about the build host a report records (``--target auto``'s choice)."""
        return {
            "arch": self.arch,
            "system": self.system,
            "cpu_model": self.cpu_model,
            "isa": list(self.isa),
            "cores": self.usable_cores,
            "memory_mb": self.usable_memory_mb,
            "providers": list(self.providers),
            "gpus": [g.name for g in self.gpus],
        }


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _run_nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _sysctl(name: str) -> str | None:
    exe = shutil.which("sysctl")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


# macOS has no /proc: sysctl names for the same facts (Apple silicon hw.optional.arm.*; Intel Macs hw.optional.*).
_DARWIN_ISA = {
    "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512vnni": "avx512_vnni",
}


def parse_darwin(sysctl: Callable[[str], str | None]) -> tuple[CpuFacts, float | None]:
    """CPU facts and total RAM (MiB) from sysctl on macOS."""
    isa = sorted({ours for name, ours in _DARWIN_ISA.items() if sysctl(name) == "1"})

    def number(name: str) -> int | None:
        value = sysctl(name)
        return int(value) if value and value.isdigit() else None

    memsize = number("hw.memsize")
    facts = CpuFacts(
        sysctl("machdep.cpu.brand_string") or "unknown Apple CPU",
        number("hw.physicalcpu"),
        number("hw.logicalcpu"),
        tuple(isa),
    )
    return facts, (memsize / 2**20 if memsize else None)


def _system() -> str:
    # CPython's Android builds report platform.system() == "Linux" before 3.13; sys.getandroidapilevel exists there only.
    return "android" if hasattr(sys, "getandroidapilevel") else platform.system()


def _ort_facts() -> tuple[list[str], list[GpuInfo], str]:
    import onnxruntime as ort

    providers = list(ort.get_available_providers())
    gpus: list[GpuInfo] = []
    for ep_device in getattr(ort, "get_ep_devices", lambda: [])():  # ORT >= 1.22
        device = ep_device.device
        if str(device.type).endswith("GPU"):
            gpus.append(
                GpuInfo(
                    name=f"{device.vendor} device {device.device_id:#x}",
                    vendor=device.vendor,
                    source=f"onnxruntime ({ep_device.ep_name})",
                )
            )
    return providers, gpus, ort.__version__


@dataclass
class HostSources:
    """Where each fact comes from; tests replace fields to simulate another host."""

    machine: str = field(default_factory=platform.machine)
    system: str = field(default_factory=_system)
    cpuinfo: Callable[[], str | None] = lambda: _read("/proc/cpuinfo")
    meminfo: Callable[[], str | None] = lambda: _read("/proc/meminfo")
    logical_cpus: Callable[[], int | None] = os.cpu_count
    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_self_cgroup: Callable[[], str | None] = lambda: _read("/proc/self/cgroup")
    nvidia_smi: Callable[[], str | None] = _run_nvidia_smi
    ort: Callable[[], tuple[list[str], list[GpuInfo], str]] = _ort_facts
    sysctl: Callable[[str], str | None] = _sysctl


def normalise_arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l", "armv8b"):
        return "aarch64"
    return m or "unknown"


@dataclass(frozen=True)
class CpuFacts:
    model: str
    physical: int | None
    logical: int | None
    isa: tuple[str, ...]


def _blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per processor block (blank-line separated ``key : value`` lines)."""
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_cpuinfo(text: str, arch: str) -> CpuFacts:
    """CPU model, physical/logical cores and our ISA names from /proc/cpuinfo (x86 or aarch64 format)."""
    blocks = _blocks(text)
    procs = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    logical = len(procs) or None
    if arch == "x86_64":
        flags = set(next((b["flags"] for b in procs if "flags" in b), "").split())
        isa = sorted({ours for flag, ours in _X86_FLAGS.items() if flag in flags})
        model = next((b["model name"] for b in procs if "model name" in b), "unknown x86-64 CPU")
        # Physical cores: distinct (socket, core) pairs; SMT siblings share a core id.
        pairs = {(b.get("physical id", "0"), b["core id"]) for b in procs if "core id" in b}
        physical = len(pairs) or None
        return CpuFacts(model, physical, logical, tuple(isa))
    if arch == "aarch64":
        features = set()
        for b in procs or blocks:
            features |= set(b.get("features", "").split())
        isa = sorted({ours for feat, ours in _ARM_FEATURES.items() if feat in features})
        parts = []
        for b in procs:
            part = b.get("cpu part", "").lower()
            name = (
                _ARM_PARTS.get(part, f"part {part}")
                if b.get("cpu implementer", "").lower() == "0x41"
                else (f"implementer {b.get('cpu implementer', '?')} part {part}" if part else "")
            )
            if name and name not in parts:
                parts.append(name)
        board = next((b[k] for b in blocks for k in ("model", "hardware") if k in b and not b[k].isdigit()), "")
        model = " + ".join(parts) or "unknown aarch64 CPU"
        if board:
            model = f"{board} ({model})"
        # Arm cores have no SMT (except a few Neoverse parts, which Linux still lists as separate cores).
        return CpuFacts(model, logical, logical, tuple(isa))
    return CpuFacts(
        next((b["model name"] for b in procs if "model name" in b), f"unknown {arch} CPU"), logical, logical, ()
    )


def parse_meminfo(text: str) -> tuple[float | None, float | None]:
    """(MemTotal, MemAvailable) in MiB; MemAvailable falls back to MemFree on old kernels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) / 1024.0  # kB → MiB
    return values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))


def _int_file(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _cgroup_dirs(root: Path, proc_self_cgroup: str | None, controller: str) -> list[Path]:
    """Candidate folders for this process's cgroup (v2 unified, then v1 per-controller), most specific first."""
    dirs: list[Path] = []
    for line in (proc_self_cgroup or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2
            dirs.append(root / rel if rel else root)
        elif controller in controllers.split(","):  # v1
            base = root / controllers
            dirs.append(base / rel if rel else base)
            dirs.append(base)  # inside a container the namespaced path is often the mount root
    dirs += [root, root / controller]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def parse_cgroup_memory(root: Path, proc_self_cgroup: str | None) -> tuple[float | None, float | None]:
    """(limit, usage) in MiB from cgroup v2 memory.max/current or v1 memory.limit_in_bytes/usage_in_bytes; None = no limit."""
    for d in _cgroup_dirs(root, proc_self_cgroup, "memory"):
        raw = _read(d / "memory.max")
        if raw is not None:
            used = _int_file(d / "memory.current")
            if raw.strip() == "max":
                return None, None
            if raw.strip().isdigit():
                return int(raw) / 2**20, (used / 2**20 if used is not None else None)
        limit = _int_file(d / "memory.limit_in_bytes")
        if limit is not None:
            used = _int_file(d / "memory.usage_in_bytes")
            if limit >= _NO_LIMIT:
                return None, None
            return limit / 2**20, (used / 2**20 if used is not None else None)
    return None, None


def parse_cgroup_cpu(root: Path, proc_self_cgroup: str | None) -> float | None:
    """CPU quota in cores from cgroup v2 cpu.max (``quota period``) or v1 cfs_quota_us/cfs_period_us; None = no quota."""
    for d in _cgroup_dirs(root, proc_self_cgroup, "cpu"):
        raw = _read(d / "cpu.max")
        if raw is not None:
            quota, _, period = raw.strip().partition(" ")
            if quota == "max":
                return None
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                return int(quota) / int(period)
        quota = _int_file(d / "cpu.cfs_quota_us")
        if quota is not None:
            period = _int_file(d / "cpu.cfs_period_us") or 100_000
            return None if quota <= 0 else quota / period
    return None


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Rows of ``--query-gpu=name,memory.total,memory.free,driver_version --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 4 or not cols[0]:
            continue

        def num(value: str) -> float | None:
            try:
                return float(value)
            except ValueError:  # "[N/A]" on some boards
                return None

        gpus.append(
            GpuInfo(
                name=cols[0],
                vendor="NVIDIA",
                memory_total_mb=num(cols[1]),
                memory_free_mb=num(cols[2]),
                driver=cols[3],
                source="nvidia-smi",
            )
        )
    return gpus


def detect_host(sources: HostSources | None = None) -> HostInfo:
    """Read every fact about this host (or the simulated one in ``sources``); never raises for a missing source."""
    src = sources or HostSources()
    arch = normalise_arch(src.machine)
    notes: list[str] = []
    cpuinfo = src.cpuinfo()
    darwin_total = None
    if cpuinfo:
        cpu = parse_cpuinfo(cpuinfo, arch)
    elif src.system.lower() == "darwin":
        cpu, darwin_total = parse_darwin(src.sysctl)
    else:
        cpu = CpuFacts(platform.processor() or f"unknown {arch} CPU", None, None, ())
        notes.append("/proc/cpuinfo not readable: ISA flags unknown")
    logical = cpu.logical or src.logical_cpus() or 1
    physical = cpu.physical or logical
    meminfo = src.meminfo()
    total, available = parse_meminfo(meminfo) if meminfo else (darwin_total, None)
    if meminfo is None and darwin_total is None:
        notes.append("/proc/meminfo not readable: memory unknown")
    self_cgroup = src.proc_self_cgroup()
    limit, used = parse_cgroup_memory(src.cgroup_root, self_cgroup)
    cpu_limit = parse_cgroup_cpu(src.cgroup_root, self_cgroup)
    try:
        providers, ort_gpus, ort_version = src.ort()
    except Exception as exc:  # a broken onnxruntime install still lets `detect` describe the CPU
        providers, ort_gpus, ort_version = [], [], ""
        notes.append(f"onnxruntime not usable: {exc.__class__.__name__}: {exc}")
    smi = src.nvidia_smi()
    gpus = parse_nvidia_smi(smi) if smi else []
    if not gpus:
        gpus = ort_gpus  # nvidia-smi is richer (memory, driver); ORT's device list covers other vendors
    return HostInfo(
        arch=arch,
        system=src.system.lower(),
        cpu_model=cpu.model,
        cores_physical=physical,
        cores_logical=logical,
        isa=cpu.isa,
        memory_total_mb=total,
        memory_available_mb=available,
        cgroup_memory_limit_mb=limit,
        cgroup_memory_used_mb=used,
        cgroup_cpu_limit=cpu_limit,
        gpus=tuple(gpus),
        providers=tuple(providers),
        ort_version=ort_version,
        notes=tuple(notes),
    )
