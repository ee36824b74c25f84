"""Target profiles: load ``targets/<name>.toml`` (or a user's file), resolve ``extends``,
validate every key into typed dataclasses, and instantiate each pass's parameters.

Errors are exit-2 ``BadInputError``s naming the key path, e.g. ``passes[1] (quantize).scheme``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from lepton_cli.errors import BadInputError
from lepton_cli.pipeline.params import ParamValueError, from_table, json_ready, to_table
from lepton_cli.pipeline.registry import all_passes, get_pass

BUILTIN_TARGETS = ("cpu-avx", "cuda", "tpu", "fpga", "edge-arm", "mobile")
_MAX_EXTENDS_DEPTH = 8


@dataclass(frozen=True)
class Hardware:
    """Facts the cost model needs; each number carries a source comment in the TOML."""

    peak_int8_tops: float
    peak_fp16_tflops: float
    peak_fp32_tflops: float
    memory_bandwidth_gbps: float
    memory_mb: float  # RAM, or on-chip memory for accelerators that have only that for weights
    preferred_layout: Literal["NCHW", "NHWC"]
    channel_alignment: int
    on_chip_memory_kb: float = 0.0
    isa: list[str] = field(default_factory=list)  # e.g. avx512_vnni, neon, dotprod, i8mm
    cores: int = 1
    # The accelerator runs quantized element-wise ops (Add, Mul, activations, pooling) itself on int8 tensors; false:
    # ONNX Runtime's CPU EP, whose QLinearAdd/Mul dequantize, compute and requantize each element.
    int8_elementwise: bool = False

    def __post_init__(self) -> None:
        for name in ("peak_int8_tops", "peak_fp16_tflops", "peak_fp32_tflops", "memory_bandwidth_gbps", "memory_mb"):
            if getattr(self, name) <= 0:
                raise ParamValueError(name, f"must be > 0, got {getattr(self, name)}")
        if self.channel_alignment < 1:
            raise ParamValueError("channel_alignment", f"must be >= 1, got {self.channel_alignment}")
        if self.cores < 1:
            raise ParamValueError("cores", f"must be >= 1, got {self.cores}")


# The DPU check's reference part (DPUCZDX8G B4096, UG1414): a layer reads and writes at most 256 passes of its
# channel parallelism (16), 4096 channels.
DPU_CHANNEL_PARALLEL = 16
DPU_MAX_CHANNELS = 256 * DPU_CHANNEL_PARALLEL


@dataclass(frozen=True)
class Runtime:
    execution_providers: list[str]  # ONNX Runtime EPs in preference order
    opset_min: int
    opset_max: int
    supported_ops: list[str] = field(default_factory=list)  # empty: every ONNX op
    deployment_runtime: Literal["onnxruntime", "portable"] = "onnxruntime"
    # Files for the device's own runtime, made from each compiled model (lepton_cli/device_artifacts).
    device_formats: list[Literal["ort", "tflite"]] = field(default_factory=list)
    # The accelerator's documented constraints, checked on the compiled graph (lepton_cli/device_artifacts).
    device_checks: list[Literal["dpu", "edgetpu"]] = field(default_factory=list)

    def max_layer_channels(self) -> int | None:
        """The most output channels one layer of the target's checked accelerator computes; None when unchecked."""
        return DPU_MAX_CHANNELS if "dpu" in self.device_checks else None

    def require_onnxruntime(self, target: str, setting: str, why: str) -> None:
        """Refuse ``setting`` (``pass.param`` = true) unless the target deploys with ONNX Runtime: ``why`` says what
        ONNX Runtime-only thing it writes."""
        if self.deployment_runtime == "onnxruntime":
            return
        raise BadInputError(
            f"{setting} = true on target {target!r}, whose deployment runtime is {self.deployment_runtime!r}: {why}",
            f'set {setting.split(".")[-1]} = false, or use a target with deployment_runtime = "onnxruntime"',
        )

    def __post_init__(self) -> None:
        if not self.execution_providers:
            raise ParamValueError("execution_providers", "must name at least one execution provider")
        if not 7 <= self.opset_min <= self.opset_max:
            raise ParamValueError(
                "opset_min", f"need 7 <= opset_min <= opset_max, got {self.opset_min}..{self.opset_max}"
            )


@dataclass(frozen=True)
class Budgets:
    max_model_size_mb: float | None = None
    max_activation_memory_mb: float | None = None
    max_accuracy_drop_pct: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop_pct <= 100:
            raise ParamValueError("max_accuracy_drop_pct", f"must be within 0..100, got {self.max_accuracy_drop_pct}")
        for name in ("max_model_size_mb", "max_activation_memory_mb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ParamValueError(name, f"must be > 0, got {value}")


@dataclass(frozen=True)
class PassStep:
    name: str
    params: Any  # the pass's own params dataclass instance
    why: str = ""
    enabled: bool = True


@dataclass(frozen=True)
class Variant:
    """One model the bundle carries (e.g. int8 main model, fp32 fallback): the target's pipeline with
    some passes skipped or re-parameterised, and what the device needs to run it (runtime_select)."""

    name: str
    precision: str
    why: str
    skip: list[str]
    requires_isa: list[str]  # all needed on the device; "a|b" = either
    requires_providers: list[str]  # ORT EPs; "a|b" = either
    pass_params: dict[str, Any]  # per-pass overrides as written (validated into ``passes``)
    passes: list[PassStep]  # the pipeline this variant runs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "why": self.why,
            "skip": self.skip,
            "requires_isa": self.requires_isa,
            "requires_providers": self.requires_providers,
            "pass_params": json_ready(self.pass_params),
        }


@dataclass(frozen=True)
class _VariantFields:
    name: str
    precision: Literal["fp32", "fp16", "int8", "mixed"]
    why: str = ""
    skip: list[str] = field(default_factory=list)
    requires_isa: list[str] = field(default_factory=list)
    requires_providers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.name):
            raise ParamValueError(
                "name", f"{self.name!r} must be lower-case letters, digits, '-' or '_' (it names a file)"
            )


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    hardware: Hardware
    runtime: Runtime
    budgets: Budgets
    passes: list[PassStep]
    source: str  # builtin name or file path
    resolved: dict[str, Any]  # the merged TOML after extends, as validated
    variants: list[Variant] = field(default_factory=list)  # empty: one model, the whole pipeline

    def for_variant(self, variant: Variant) -> "Target":
        """This target with the variant's pipeline, for ``run_pipeline``."""
        return dataclasses.replace(self, passes=variant.passes)

    @property
    def sha256(self) -> str:
        """sha256 of the resolved target (canonical JSON), recorded in every bundle manifest."""
        blob = json.dumps(self.resolved, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "sha256": self.sha256,
            "hardware": to_table(self.hardware),
            "runtime": to_table(self.runtime),
            "budgets": to_table(self.budgets),
            "passes": [
                {"name": s.name, "enabled": s.enabled, "why": s.why, "params": to_table(s.params)} for s in self.passes
            ],
        } | ({"variants": [v.to_dict() for v in self.variants]} if self.variants else {})


TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOP_KEYS = {"name", "description", "extends", "hardware", "runtime", "budgets", "passes", "pass_params", "variants"}
_STEP_KEYS = {"name", "why", "enabled"}


def _builtin_text(name: str) -> str | None:
    try:
        return resources.files("lepton_cli.builtin_targets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return None


def builtin_names() -> list[str]:
    files = resources.files("lepton_cli.builtin_targets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{origin}: not valid TOML: {exc}", "fix the TOML syntax at the position shown") from None


def _read_raw(spec: str) -> tuple[dict[str, Any], str]:
    """Return (raw table, origin) for a builtin name or a path to a .toml file."""
    looks_like_path = spec.endswith(".toml") or "/" in spec or "\\" in spec
    if not looks_like_path:
        text = _builtin_text(spec)
        if text is None:
            raise BadInputError(
                f"unknown target {spec!r}",
                f"use one of {', '.join(builtin_names())}, 'auto', or a path to your own .toml",
            )
        return _parse(text, f"target {spec}"), spec
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(
            f"target file {spec} does not exist", "check the path, or use a builtin target name"
        ) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"cannot read target file {spec}: {exc.__class__.__name__}", "pass a readable UTF-8 .toml file"
        ) from None
    return _parse(text, str(path)), str(path)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge tables; arrays (``passes``) are replaced whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve(spec: str, depth: int = 0) -> tuple[dict[str, Any], str]:
    if depth > _MAX_EXTENDS_DEPTH:
        raise BadInputError(
            f"target {spec}: 'extends' chain is deeper than {_MAX_EXTENDS_DEPTH}", "remove the cycle in 'extends'"
        )
    raw, origin = _read_raw(spec)
    if not isinstance(raw, dict):
        raise BadInputError(f"{origin}: top level must be a table", "see README 'Target files'")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise BadInputError(
            f"{origin}: unknown key {unknown[0]!r}", f"valid top-level keys: {', '.join(sorted(_TOP_KEYS))}"
        )
    parent_name = raw.get("extends")
    if parent_name is None:
        return raw, origin
    if not isinstance(parent_name, str):
        raise BadInputError(f"{origin}: extends must be a string", 'e.g. extends = "edge-arm"')
    if parent_name.endswith(".toml") and not Path(parent_name).is_absolute() and origin.endswith(".toml"):
        parent_name = str(Path(origin).parent / parent_name)
    parent, _ = _resolve(parent_name, depth + 1)
    child = {k: v for k, v in raw.items() if k != "extends"}
    # Inherited variants describe the parent's pipeline: a child that replaces the passes drops them
    # unless it declares its own (otherwise a variant could skip a pass that no longer exists).
    dropped = {"name", "variants"} if "passes" in child else {"name"}
    merged = _merge({k: v for k, v in parent.items() if k not in dropped}, child)
    merged.setdefault("name", Path(origin).stem if origin.endswith(".toml") else origin)
    return merged, origin


def _step(raw: Any, index: int, overrides: dict[str, Any]) -> PassStep:
    path = f"passes[{index}]"
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} must be a table", 'write each pass as [[passes]] with name = "..."')
    name = raw.get("name")
    if not isinstance(name, str):
        raise BadInputError(f"{path}.name is missing or not a string", 'add name = "fuse" (see `lepton targets show`)')
    spec = get_pass(name, f"{path}.name")
    path = f"passes[{index}] ({name})"
    why = raw.get("why", "")
    enabled = raw.get("enabled", True)
    if not isinstance(why, str):
        raise BadInputError(f"{path}.why must be a string", "quote the text")
    if not isinstance(enabled, bool):
        raise BadInputError(f"{path}.enabled must be a boolean", "write true or false")
    table = {k: v for k, v in raw.items() if k not in _STEP_KEYS}
    table.update(overrides.get(name, {}))
    return PassStep(name=name, params=from_table(spec.params_cls, table, path), why=why, enabled=enabled)


def _variants(raw: Any, passes_raw: list[Any], overrides: dict[str, Any], steps: list[PassStep]) -> list[Variant]:
    """Validate ``[[variants]]``: names unique, ``skip`` and ``pass_params`` naming passes of this pipeline."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
        raise BadInputError("variants must be an array of tables", 'write each as [[variants]] with name = "int8"')
    pipeline = [s.name for s in steps]
    variants: list[Variant] = []
    for index, entry in enumerate(raw):
        path = f"variants[{index}]"
        fields = from_table(_VariantFields, {k: v for k, v in entry.items() if k != "pass_params"}, path)
        path = f"variants[{index}] ({fields.name})"
        if fields.name in {v.name for v in variants}:
            raise BadInputError(f"{path}.name: {fields.name!r} is declared twice", "give each variant its own name")
        for i, name in enumerate(fields.skip):
            if name not in pipeline:
                raise BadInputError(
                    f"{path}.skip[{i}]: no pass {name!r} in this target's pipeline",
                    f"the pipeline has: {', '.join(pipeline)}",
                )
        own = entry.get("pass_params", {})
        if not isinstance(own, dict) or not all(isinstance(v, dict) for v in own.values()):
            raise BadInputError(
                f"{path}.pass_params must be a table of tables",
                f"write [variants.pass_params.{pipeline[-1]}] then keys",
            )
        for name in own:
            if name not in pipeline or name in fields.skip:
                raise BadInputError(
                    f"{path}.pass_params.{name}: no pass of that name runs in this variant",
                    f"it runs: {', '.join(p for p in pipeline if p not in fields.skip)}",
                )
        merged = {name: {**overrides.get(name, {}), **own.get(name, {})} for name in set(overrides) | set(own)}
        passes = []
        for i, step_raw in enumerate(passes_raw):
            if steps[i].name in fields.skip:
                continue
            try:
                passes.append(_step(step_raw, i, merged) if steps[i].name in own else steps[i])
            except BadInputError as exc:
                raise BadInputError(f"{path}.pass_params: {exc.message}", exc.fix) from None
        variants.append(
            Variant(
                name=fields.name,
                precision=fields.precision,
                why=fields.why,
                skip=list(fields.skip),
                requires_isa=list(fields.requires_isa),
                requires_providers=list(fields.requires_providers),
                pass_params=copy.deepcopy(own),
                passes=passes,
            )
        )
    return variants


def _check_order(steps: list[PassStep]) -> None:
    """Passes that declare an order (``register_pass(order=)``) are listed in it (quantize calibrates the final graph)."""
    latest: tuple[int, str] | None = None
    for index, step in enumerate(steps):
        order = get_pass(step.name).order
        if order is None:
            continue
        if latest is not None and order < latest[0]:
            declared = sorted((s for s in all_passes().values() if s.order is not None), key=lambda s: s.order or 0)
            raise BadInputError(
                f"passes[{index}] ({step.name}) is listed after {latest[1]}, but must run before it",
                f"list the passes in this order: {' → '.join(s.name for s in declared)}",
            )
        latest = (order, step.name)


def load_target(spec: str) -> Target:
    """Load, resolve and validate a target by builtin name or path; exit-2 errors name the key path."""
    raw, origin = _resolve(spec)
    for key in ("description", "hardware", "runtime", "passes"):
        if key not in raw:
            raise BadInputError(
                f"{origin}: missing key {key!r}", "see README 'Target files' or `lepton targets show cpu-avx`"
            )
    description = raw["description"]
    if not isinstance(description, str):
        raise BadInputError(f"{origin}: description must be a string", "quote the text")
    hardware = from_table(Hardware, raw["hardware"], "hardware")
    runtime = from_table(Runtime, raw["runtime"], "runtime")
    budgets = from_table(Budgets, raw.get("budgets", {}), "budgets")
    overrides = raw.get("pass_params", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise BadInputError("pass_params must be a table of tables", "write [pass_params.quantize] then keys")
    passes_raw = raw["passes"]
    if not isinstance(passes_raw, list) or not passes_raw:
        raise BadInputError(f"{origin}: passes must be a non-empty array of tables", "write each pass as [[passes]]")
    steps = [_step(r, i, overrides) for i, r in enumerate(passes_raw)]
    _check_order(steps)
    for name in overrides:
        if name not in {s.name for s in steps}:
            raise BadInputError(
                f"pass_params.{name}: no pass of that name in this target's pipeline",
                f"the pipeline has: {', '.join(s.name for s in steps)}",
            )
    variants = _variants(raw.get("variants"), passes_raw, overrides, steps)
    name = str(raw.get("name", origin))
    if not TARGET_NAME.fullmatch(name):  # it names the bundle file and the report's target
        raise BadInputError(
            f"{origin}: target name {name!r} is not letters, digits, '.', '-' or '_' (starting with a letter or digit)",
            'set name = "my-target" in the target file',
        )
    target = Target(
        name=name,
        description=description,
        hardware=hardware,
        runtime=runtime,
        budgets=budgets,
        passes=steps,
        source=origin,
        resolved={},
        variants=variants,
    )
    # The resolved form is the validated dataclasses, so defaults are part of the hash.
    object.__setattr__(target, "resolved", json_ready(target.to_dict() | {"source": None, "sha256": None}))
    return target
