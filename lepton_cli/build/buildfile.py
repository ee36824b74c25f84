"""``BUILD.toml``: the models and targets of one ``lepton build``, validated on load.

Every error is an exit-2 ``BadInputError`` naming the file and the key path (``model[1].targets[0]``),
as target files do. ``[defaults]`` and each ``[[model]]`` take any ``lepton compile`` option by its long
name with dashes as underscores; a model's own value wins. Paths are relative to the build file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_cli.compile.compiler import CompileOptions
from lepton_cli.compile.option_values import OptionValueError
from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.accuracy import parse_metric
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.targets import Target, load_target


@dataclass(frozen=True)
class CompileFields:
    """The ``lepton compile`` options a build file may set (names as on the command line)."""

    calib: str | None = None
    preprocess: str | None = None
    eval: str | None = None
    input_shape: list[str] = field(default_factory=list)
    max_accuracy_drop: float | None = None
    eval_metric: str = "auto"
    seed: int = 0
    sign_key: str | None = None
    recipient: list[str] = field(default_factory=list)
    bundle_version: int = 0
    expires: str | None = None
    archive: bool = False
    no_bench: bool = False
    bench_seconds: float = 1.5
    max_latency_ratio: float | None = None
    baseline: str | None = None
    baseline_tolerance: float = 5.0
    enforce_budgets: bool = False


@dataclass(frozen=True)
class ModelFields(CompileFields):
    path: str = ""
    targets: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One model x target compile: its options (keys resolved by the driver) and where it sits in the build file."""

    index: int
    model_index: int
    key_path: str  # model[i].targets[j], for messages
    options: CompileOptions
    target: Target

    @property
    def label(self) -> tuple[str, str]:
        return self.options.model.name, self.target.name


@dataclass
class BuildPlan:
    path: Path
    jobs: list[Job]
    sign_key: str | None
    recipients: list[str]
    bundle_version: int
    expires: str | None


_PATH_FIELDS = ("calib", "eval", "baseline")
_KEY_FIELDS = ("sign_key", "recipient", "bundle_version", "expires")


def _fail(origin: Path, message: str, fix: str) -> BadInputError:
    return BadInputError(f"{origin}: {message}", fix)


def _fields(cls: type, table: Any, key_path: str, origin: Path) -> Any:
    try:
        return from_table(cls, table, key_path)
    except BadInputError as exc:
        raise _fail(origin, exc.message, (exc.fix or "").replace("target file", "build file")) from None


def _relative(base: Path, value: str | None) -> str | None:
    if value is None or "-----BEGIN" in value:  # PEM text stays as written
        return value
    return str(base / value) if not Path(value).is_absolute() else value


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"build file {path} does not exist", "check the path") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"cannot read build file {path}: {exc.__class__.__name__}", "pass a readable UTF-8 .toml file"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path}: not valid TOML: {exc}", "fix the TOML syntax at the position shown") from None


def _check_file(origin: Path, key_path: str, value: str | None, what: str) -> None:
    if value is not None and not Path(value).exists():
        raise _fail(origin, f"{key_path}: {what} {value} does not exist", "fix the path (relative to the build file)")


def _target(spec: str, base: Path, key_path: str, origin: Path, cache: dict[str, Target]) -> Target:
    looks_like_path = spec.endswith(".toml") or "/" in spec
    resolved = _relative(base, spec) if looks_like_path else spec
    if spec == "auto":
        raise _fail(origin, f"{key_path}: 'auto' is not allowed in a build", "name the target (see `lepton targets`)")
    if resolved not in cache:
        try:
            cache[resolved] = load_target(resolved)
        except BadInputError as exc:
            raise _fail(origin, f"{key_path}: {exc.message}", exc.fix or "fix the target") from None
    return cache[resolved]


def _options(values: dict[str, Any], model: Path) -> CompileOptions:
    return CompileOptions(
        model=model,
        target="",
        calib=Path(values["calib"]) if values["calib"] else None,
        preprocess=values["preprocess"],
        eval=Path(values["eval"]) if values["eval"] else None,
        input_shapes=list(values["input_shape"]),
        max_accuracy_drop=values["max_accuracy_drop"],
        eval_metric=values["eval_metric"],
        seed=values["seed"],
        archive=values["archive"],
        bench=not values["no_bench"],
        bench_seconds=values["bench_seconds"],
        max_latency_ratio=values["max_latency_ratio"],
        baseline=Path(values["baseline"]) if values["baseline"] else None,
        baseline_tolerance_pct=values["baseline_tolerance"],
        enforce_budgets=values["enforce_budgets"],
    )


def _model_jobs(
    raw: Any, index: int, defaults: dict[str, Any], base: Path, origin: Path, targets: dict[str, Target], first_job: int
) -> list[Job]:
    key_path = f"model[{index}]"
    own = _fields(ModelFields, raw, key_path, origin)
    explicit = {k for k in raw} if isinstance(raw, dict) else set()
    for name in _KEY_FIELDS:
        if name in explicit:
            raise _fail(
                origin,
                f"{key_path}.{name}: keys and bundle versions are set once, in [defaults]",
                f"move {name} to [defaults]",
            )
    if not own.path:
        raise _fail(origin, f"missing key {key_path}.path", 'add path = "models/your_model.onnx"')
    if not own.targets:
        raise _fail(
            origin, f"{key_path}.targets must list at least one target", 'e.g. targets = ["cpu-avx", "edge-arm"]'
        )
    values = {
        f.name: getattr(own, f.name) if f.name in explicit else defaults[f.name]
        for f in dataclasses.fields(CompileFields)
    }
    for name in _PATH_FIELDS:
        values[name] = _relative(base, values[name])
        _check_file(origin, f"{key_path}.{name}", values[name], name if name != "eval" else "evaluation data")
    model = Path(_relative(base, own.path) or "")
    _check_file(origin, f"{key_path}.path", str(model), "model file")
    try:
        parse_metric(values["eval_metric"])
    except BadInputError as exc:
        raise _fail(origin, f"{key_path}.eval_metric: {exc.message}", exc.fix or "") from None
    try:
        _options(values, model)  # each job gets its own copy below
    except OptionValueError as exc:  # a value out of range (a negative max_accuracy_drop)
        key = "baseline_tolerance" if exc.field == "baseline_tolerance_pct" else exc.field  # the build file's name
        where = key_path if key in explicit else "defaults"
        raise _fail(origin, f"{where}.{key}: {exc.message}", exc.fix or "") from None
    jobs = []
    for t_index, spec in enumerate(own.targets):
        target = _target(spec, base, f"{key_path}.targets[{t_index}]", origin, targets)
        jobs.append(
            Job(first_job + len(jobs), index, f"{key_path}.targets[{t_index}]", _options(values, model), target)
        )
    return jobs


def load_build_file(path: Path) -> BuildPlan:
    """Parse and validate ``path``; every model x target becomes one ``Job`` (exit 2 on anything wrong)."""
    raw = _read(path)
    unknown = sorted(set(raw) - {"defaults", "model"})
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}", "a build file has a defaults table and model tables only")
    defaults_raw = raw.get("defaults", {})
    defaults_obj = _fields(CompileFields, defaults_raw, "defaults", path)
    defaults = dataclasses.asdict(defaults_obj)
    base = path.parent
    for name in _PATH_FIELDS:
        _check_file(path, f"defaults.{name}", _relative(base, defaults[name]), name)
    models = raw.get("model")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise _fail(
            path,
            "no models: a build file needs at least one model table",
            'add a "model" table header in double brackets, with path = "..." and targets = ["cpu-avx"]',
        )
    targets: dict[str, Target] = {}
    jobs: list[Job] = []
    seen: dict[tuple[str, str], str] = {}
    for index, entry in enumerate(models):
        for job in _model_jobs(entry, index, defaults, base, path, targets, len(jobs)):
            bundle = (job.options.model.stem, job.target.name)
            if bundle in seen:
                raise _fail(
                    path,
                    f"{job.key_path}: bundle {bundle[0]}.{bundle[1]}.lepton is also built by {seen[bundle]}",
                    "list each target once per model, and give models distinct file names",
                )
            seen[bundle] = job.key_path
            jobs.append(job)
    return BuildPlan(
        path,
        jobs,
        sign_key=_relative(base, defaults["sign_key"]),
        recipients=[_relative(base, r) or r for r in defaults["recipient"]],
        bundle_version=defaults["bundle_version"],
        expires=defaults["expires"],
    )
