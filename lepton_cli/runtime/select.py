"""On the device: choose the bundle variant, the execution providers and the thread count, then open the session.

A bundle's manifest lists its variants in preference order (``manifest["variants"]``: name, path,
precision, requires_isa, requires_providers, est_latency_ms, peak_memory_mb); a bundle without
that list has one variant, ``model.onnx``. For each variant, in order:

1. hard requirements: every ``requires_isa`` entry (``a|b`` = either) must be in the host's ISA,
   and some provider of each ``requires_providers`` entry must be available in this onnxruntime;
2. memory: the variant's peak memory must fit in the host's usable memory (free RAM, cgroup
   limit) and, when it would run on a GPU EP, in the GPU's free memory. Memory is an estimate,
   so when every variant fails only on memory the smallest is still tried, with a warning;
3. providers: the bundle's preferred EPs that this onnxruntime has, GPU EPs only with a GPU
   seen, CPU last; the session is created, and when creation fails the most preferred
   accelerator EP is dropped and creation retried. ORT also falls back silently when an EP
   cannot initialise (``session.get_providers()`` lacks it): we detect that and log it, and
   a variant that *requires* the missing EP (fp16 needs a GPU) is passed over;
4. threads: one intra-op thread per usable physical core (cgroup quota respected) unless given.

Every decision is appended to ``Selection.log`` and logged on the ``lepton`` logger. The checks are
ours because ONNX Runtime has no variant concept and its own provider fallback is silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lepton_cli.bundle.manifest import PRIMARY_MODEL
from lepton_cli.errors import BadInputError
from lepton_cli.host.detect import GPU_PROVIDERS, HostInfo, detect_host

log = logging.getLogger("lepton")

CPU_EP = "CPUExecutionProvider"


@dataclass(frozen=True)
class VariantSpec:
    name: str
    path: str
    precision: str = "fp32"
    requires_isa: tuple[str, ...] = ()
    requires_providers: tuple[str, ...] = ()
    est_latency_ms: float | None = None
    peak_memory_mb: float | None = None

    @classmethod
    def from_manifest(cls, doc: Mapping[str, Any]) -> "VariantSpec":
        return cls(
            name=str(doc["name"]),
            path=str(doc["path"]),
            precision=str(doc.get("precision", "fp32")),
            requires_isa=tuple(doc.get("requires_isa") or ()),
            requires_providers=tuple(doc.get("requires_providers") or ()),
            est_latency_ms=doc.get("est_latency_ms"),
            peak_memory_mb=doc.get("peak_memory_mb"),
        )


def manifest_variants(manifest: Mapping[str, Any]) -> list[VariantSpec]:
    """The variants a manifest declares, in preference order; an old or single-model bundle has one."""
    listed = manifest.get("variants") or []
    if not listed:
        return [VariantSpec(name="default", path=PRIMARY_MODEL)]
    return [VariantSpec.from_manifest(v) for v in listed]


@dataclass
class Selection:
    session: Any  # onnxruntime.InferenceSession
    variant: VariantSpec
    providers: list[str]  # those the session really uses
    threads: int
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant.name,
            "path": self.variant.path,
            "precision": self.variant.precision,
            "providers": self.providers,
            "threads": self.threads,
            "log": self.log,
        }


def _any_available(requirement: str, available: Sequence[str]) -> bool:
    return any(p.strip() in available for p in requirement.split("|"))


def check_requirements(variant: VariantSpec, host: HostInfo) -> str | None:
    """Why ``variant`` cannot run on ``host`` (ISA or providers), or None."""
    missing_isa = [r for r in variant.requires_isa if not host.has_isa(r)]
    if missing_isa:
        return f"needs ISA {', '.join(missing_isa)}; host has {', '.join(host.isa) or 'none detected'}"
    missing_eps = [r for r in variant.requires_providers if not _any_available(r, usable_providers(host))]
    if missing_eps:
        return f"needs execution provider {', '.join(missing_eps)}; usable here: {', '.join(usable_providers(host))}"
    return None


def usable_providers(host: HostInfo) -> list[str]:
    """EPs this onnxruntime has, minus GPU EPs when no GPU is visible (they would only fail or fall back)."""
    return [p for p in host.providers if p not in GPU_PROVIDERS or host.gpus]


def provider_order(
    preferred: Sequence[str], host: HostInfo, variant: VariantSpec | None = None
) -> tuple[list[str], list[str]]:
    """(providers to try, in order, CPU last; reasons for each one left out)."""
    notes: list[str] = []
    usable = usable_providers(host)
    wanted = list(preferred) or [CPU_EP]
    for requirement in variant.requires_providers if variant else ():  # a variant's own EPs come first
        for p in reversed(requirement.split("|")):
            if p in usable and p not in wanted:
                wanted.insert(0, p)
    order = []
    for p in wanted:
        if p in order:
            continue
        if p in usable:
            order.append(p)
        elif p in host.providers:
            notes.append(f"{p} skipped: no GPU visible on this host")
        elif p != CPU_EP:
            notes.append(f"{p} skipped: not in this onnxruntime build ({host.ort_version or '?'})")
    if CPU_EP in order:
        order.remove(CPU_EP)
    order.append(CPU_EP)  # always the last resort; ORT itself appends it too
    return order, notes


def check_memory(variant: VariantSpec, host: HostInfo, providers: Sequence[str]) -> str | None:
    """Why ``variant``'s peak memory does not fit (RAM, or GPU memory when a GPU EP leads), or None."""
    if variant.peak_memory_mb is None:
        return None
    usable = host.usable_memory_mb
    if usable is not None and variant.peak_memory_mb > usable:
        return f"needs ~{variant.peak_memory_mb:.0f} MB, {usable:.0f} MB usable"
    if providers and providers[0] in GPU_PROVIDERS:
        free = [g.memory_free_mb for g in host.gpus if g.memory_free_mb is not None]
        if free and variant.peak_memory_mb > max(free):
            return f"needs ~{variant.peak_memory_mb:.0f} MB, {max(free):.0f} MB free on the GPU"
    return None


def choose_threads(host: HostInfo, requested: int | None = None) -> tuple[int, str]:
    if requested is not None:
        if requested < 1:
            raise BadInputError(f"--threads must be >= 1, got {requested}", "pass a positive thread count")
        return requested, f"threads {requested} (requested)"
    threads = host.usable_cores
    why = f"{host.cores_physical} physical cores"
    if host.cgroup_cpu_limit is not None and threads < host.cores_physical:
        why += f", cgroup CPU quota {host.cgroup_cpu_limit:g}"
    return threads, f"threads {threads} ({why})"


SessionFactory = Callable[[bytes, list[str], int], Any]


def default_session_factory(model: bytes, providers: list[str], threads: int) -> Any:
    from lepton_cli.model.sessions import make_session

    # Deployment: all graph optimisations on (the build-time checks run with them off, for determinism).
    return make_session(model, opt_level="all", threads=threads, providers=providers)


def _open_variant(
    blob: bytes,
    variant: VariantSpec,
    providers: list[str],
    threads: int,
    factory: SessionFactory,
    record: Callable[[str], None],
    strict: bool = True,
) -> tuple[Any, list[str]] | None:
    """A session for one variant, dropping accelerator EPs one at a time while creation fails."""
    attempt = list(providers)
    while True:
        try:
            session = factory(blob, attempt, threads)
        except Exception as exc:  # ORT raises plain RuntimeError/Fail subclasses for EP and model errors
            message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
            accelerators = [p for p in attempt if p != CPU_EP]
            if not accelerators:
                record(f"variant {variant.name}: session failed on {CPU_EP}: {message}")
                return None
            record(f"variant {variant.name}: {accelerators[0]} failed to initialise ({message}); retrying without it")
            attempt = [p for p in attempt if p != accelerators[0]]
            continue
        used = list(session.get_providers()) if hasattr(session, "get_providers") else attempt
        for p in attempt:
            if p not in used:
                record(f"variant {variant.name}: {p} did not initialise (onnxruntime fell back silently)")
        unmet = [r for r in variant.requires_providers if not _any_available(r, used)]
        if unmet and not strict:
            record(
                f"warning: variant {variant.name} forced although it needs {', '.join(unmet)}; running on {', '.join(used)}"
            )
        elif unmet:
            record(
                f"variant {variant.name}: passed over, it needs {', '.join(unmet)} and the session runs on {', '.join(used)}"
            )
            return None
        return session, used


@dataclass
class _Log:
    """The selection's log: every decision, also sent to the ``lepton`` logger."""

    entries: list[str] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        self.entries.append(message)
        log.info(message)


def _preferred_providers(manifest: Mapping[str, Any], preferred: Sequence[str] | None) -> list[str]:
    return list(
        preferred
        or manifest.get("execution_providers")
        or (manifest.get("target") or {}).get("execution_providers")
        or [CPU_EP]
    )


def _forced_variants(variants: list[VariantSpec], only: str | None) -> list[VariantSpec]:
    if only is None:
        return variants
    forced = [v for v in variants if only in (v.name, v.path)]
    if not forced:
        raise BadInputError(
            f"the bundle has no variant {only!r}",
            f"choose one of: {', '.join(f'{v.name} ({v.path})' for v in variants)}",
        )
    return forced


Candidate = tuple[VariantSpec, list[str]]  # a variant and the providers to try it on


def _candidates(
    variants: list[VariantSpec],
    models: Mapping[str, bytes],
    host: HostInfo,
    preferred: list[str],
    forced: bool,
    record: _Log,
) -> list[Candidate]:
    """The variants that pass the hard and memory checks (forced: every one, with warnings), in order."""
    candidates: list[Candidate] = []
    memory_only: list[Candidate] = []
    reported_skips: set[str] = set()
    for variant in variants:
        if variant.path not in models:
            record(f"variant {variant.name}: {variant.path} is not in the bundle; skipped")
            continue
        reason = check_requirements(variant, host)
        if reason and not forced:
            record(f"variant {variant.name} ({variant.precision}): skipped, {reason}")
            continue
        if reason:
            record(f"warning: variant {variant.name} forced although it {reason}")
        providers, skipped = provider_order(preferred, host, variant)
        for note in skipped:
            if note not in reported_skips:
                reported_skips.add(note)
                record(note)
        reason = check_memory(variant, host, providers)
        if reason and forced:
            record(f"warning: variant {variant.name} forced although it {reason}")
        elif reason:
            record(f"variant {variant.name} ({variant.precision}): skipped, {reason}")
            memory_only.append((variant, providers))
            continue
        candidates.append((variant, providers))
    if not candidates and memory_only:
        # Peak memory is an estimate: trying the smallest variant beats refusing to run at all.
        memory_only.sort(key=lambda vp: vp[0].peak_memory_mb or 0.0)
        record(f"no variant fits the memory estimate; trying the smallest, {memory_only[0][0].name}, anyway")
        return memory_only[:1]
    return candidates


def select_session(
    models: Mapping[str, bytes],
    manifest: Mapping[str, Any],
    *,
    host: HostInfo | None = None,
    preferred_providers: Sequence[str] | None = None,
    threads: int | None = None,
    only: str | None = None,
    session_factory: SessionFactory = default_session_factory,
) -> Selection:
    """Choose and open the best variant of a bundle for this device (see the module docstring).

    ``models`` maps bundle paths to decrypted model bytes; ``preferred_providers`` defaults to the
    manifest's ``execution_providers`` (the target's runtime order), else CPU only. ``only`` (a
    variant name or path, e.g. ``lepton run --variant``) forces one variant: its unmet
    requirements are logged as warnings instead of skipping it.
    """
    host = host or detect_host()
    record = _Log()
    preferred = _preferred_providers(manifest, preferred_providers)
    n_threads, why = choose_threads(host, threads)
    record(why)
    variants = _forced_variants(manifest_variants(manifest), only)
    for variant, providers in _candidates(variants, models, host, preferred, only is not None, record):
        opened = _open_variant(
            models[variant.path], variant, providers, n_threads, session_factory, record, strict=only is None
        )
        if opened is not None:
            session, used = opened
            record(f"chose variant {variant.name} ({variant.precision}) on {', '.join(used)}")
            return Selection(session, variant, used, n_threads, record.entries)
    raise BadInputError(
        "no variant of this bundle runs on this device: " + " | ".join(record.entries[1:] or ["no variants"]),
        "compile for this device's target (`lepton detect` suggests one) or add a fp32 variant",
    )
