"""``compile``'s core, without the terminal: load, normalise, run the pipeline, write the output.

The CLI command (``commands/compile.py``) only parses options and renders progress.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from lepton_cli.compile.accuracy_gate import AccuracyGate, check_accuracy_budget
from lepton_cli.compile.inputs import compile_inputs
from lepton_cli.compile.listeners import Listeners
from lepton_cli.compile.option_values import check_option_values
from lepton_cli.compile.output import CompileKeys, resolve_compile_keys, write_compile_output
from lepton_cli.compile.report import apply_gates, build_report, load_baseline
from lepton_cli.compile.report_render import append_step_summary
from lepton_cli.compile.source import PreparedSource, prepare_source
from lepton_cli.compile.target_choice import TargetSuggestion, suggest_target
from lepton_cli.compile.variants import (
    PRIMARY_PATH,
    BuiltVariant,
    compile_extra_variants,
    manifest_variants,
    serialize_all,
    variant_path,
)
from lepton_cli.device_artifacts import DeviceArtifacts, build_device_artifacts
from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.gate_warnings import accuracy_warnings, compression_warnings
from lepton_cli.evaluate.latency import compile_sections
from lepton_cli.host.detect import HostInfo, detect_host
from lepton_cli.model.external_data import ModelPayload, bundle_payload, use_weights_folder
from lepton_cli.model.load import LoadedModel, load_model
from lepton_cli.model.stats import ModelStats, collect_stats
from lepton_cli.pipeline.context import PassContext, ProgressReport
from lepton_cli.pipeline.instruments import StepProgress
from lepton_cli.pipeline.records import StepRecord
from lepton_cli.pipeline.run import check_requirements, run_pipeline
from lepton_cli.pipeline.targets import Target, load_target


@dataclass
class CompileOptions:
    model: Path
    target: str
    output_dir: Path | None = None
    calib: Path | None = None
    preprocess: str | None = None  # settings for an image-folder --calib/--eval (lepton_cli/samples/preprocess.py)
    eval: Path | None = None
    input_shapes: list[str] = field(default_factory=list)
    max_accuracy_drop: float | None = None
    eval_metric: str = "auto"  # auto | top1 | agreement | ctc | mask-f1@T (lepton_cli/evaluate/accuracy.py)
    seed: int = 0
    sign_key: str | None = None  # path or PEM text; else $LEPTON_SIGNING_KEY, else the dev key set
    recipients: list[str] = field(default_factory=list)  # encryption public keys; else $LEPTON_RECIPIENT / dev set
    bundle_version: int = 0  # monotonic: devices refuse a lower version than they have seen
    expires: str | None = None  # ISO 8601; devices refuse the bundle after it
    archive: bool = False  # also write <bundle>.zip, readable in place
    bench: bool = True  # short, time-capped host measurement of source vs compiled
    bench_seconds: float = 1.5
    max_latency_ratio: float | None = None  # gate: compiled p50 / source p50
    baseline: Path | None = None  # gate: a stored report.json this compile must not be worse than
    baseline_tolerance_pct: float = 5.0
    enforce_budgets: bool = False  # gate: the target's size and memory budgets

    def __post_init__(self) -> None:
        check_option_values(self)


@dataclass
class CompileResult:
    bundle_dir: Path
    model_path: Path
    report: dict[str, Any]
    steps: list[StepRecord]
    target: Target
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # variants and EPs, for the bundle manifest
    model_bytes: bytes = (
        b""  # the compiled model in plaintext (the bundle holds it encrypted); graph only when it has a .data file
    )
    archive: Path | None = None
    models: dict[str, bytes | ModelPayload] = field(
        default_factory=dict
    )  # every model the bundle holds (bundle path -> plaintext)
    inputs: dict[str, Any] = field(default_factory=dict)  # compile_inputs: the provenance materials and cache key
    plain_files: dict[str, bytes] = field(default_factory=dict)  # signed, not encrypted (a device's operator config)


def bundle_name(model_path: Path, target: Target) -> str:
    return f"{model_path.stem}.{target.name}.lepton"


def _check_output_dir(output_dir: Path) -> None:
    """Fail before any work when the output folder cannot be written (nothing half-written later).

    Probes by creating and removing a file: ``os.access`` says yes to root even on read-only mounts.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise BadInputError(f"output {output_dir} exists and is not a folder", "pass a folder with -o")
    probe_dir = output_dir if output_dir.exists() else next((p for p in output_dir.parents if p.exists()), Path("."))
    try:
        if not probe_dir.is_dir():
            raise OSError("not a folder")
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".lepton-probe-"):
            pass
    except OSError:
        raise BadInputError(f"output folder {output_dir} is not writable", "choose a writable folder with -o") from None


def resolve_target(spec: str, host: HostInfo) -> tuple[Target, TargetSuggestion | None]:
    """``--target auto`` picks a builtin for ``host`` (target_choice); anything else loads as given."""
    if spec != "auto":
        return load_target(spec), None
    choice = suggest_target(host)
    if choice.name is None:
        raise BadInputError(f"--target auto: {choice.summary()}", "name a target with --target (see `lepton targets`)")
    return load_target(choice.name), choice


def compile_model(
    options: CompileOptions,
    *,
    progress: StepProgress | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    on_progress: ProgressReport | None = None,
) -> CompileResult:
    """Compile and write the signed, encrypted bundle (``compile_unsealed``, then ``seal``)."""
    host = detect_host()
    target, choice = resolve_target(options.target, host)
    if choice is not None and on_note:
        on_note(f"--target auto chose [bold]{choice.name}[/bold]: {'; '.join(choice.reasons)}")
        for caveat in choice.warnings:
            on_note(f"  note: {caveat}")
    _check_output_dir(options.output_dir or options.model.parent)
    keys = resolve_compile_keys(options.sign_key, options.recipients, options.bundle_version, options.expires, on_note)
    result = compile_unsealed(
        options, target, host, progress=progress, on_warning=on_warning, on_progress=on_progress, choice=choice
    )
    return seal(result, options, keys)


def seal(result: CompileResult, options: CompileOptions, keys: CompileKeys) -> CompileResult:
    """Write ``result``'s models, report and provenance as the bundle (atomically); the archive too with ``--archive``."""
    bundle_dir = (options.output_dir or options.model.parent) / bundle_name(options.model, result.target)
    result.archive = _write_output(
        bundle_dir,
        result.models,
        result.report,
        keys,
        options,
        result.manifest_fields,
        result.inputs,
        result.plain_files,
    )
    result.bundle_dir, result.model_path = bundle_dir, bundle_dir / "model.onnx.enc"
    return result


@dataclass
class _Compiled:
    """The main model and the target's other variants, after their pipelines and accuracy gates."""

    source_stats: ModelStats  # counted before any pass ran
    model: onnx.ModelProto
    steps: list[StepRecord]
    accuracy: dict[str, Any]
    others: list[BuiltVariant]


def compile_unsealed(
    options: CompileOptions,
    target: Target,
    host: HostInfo,
    *,
    progress: StepProgress | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_progress: ProgressReport | None = None,
    choice: TargetSuggestion | None = None,
) -> CompileResult:
    """The compile itself, every gate included, without keys or disk output: what ``lepton build``'s workers run."""
    listeners = Listeners(progress, on_warning, on_progress)
    loaded = load_model(options.model, keep_external=True)  # large weights stay on disk (external_data)
    release_weights = use_weights_folder(loaded.weights_folder)
    work_dirs: list[Path] = []
    try:
        source = prepare_source(
            loaded,
            target,
            calib=options.calib,
            evaluation=options.eval,
            preprocess=options.preprocess,
            input_shapes=options.input_shapes,
            memory_mb=host.usable_memory_mb,
        )
        ctx = _context(options, target, host, source, listeners)
        work_dirs.append(ctx.work_dir)
        for variant in target.variants[1:]:  # every model's preconditions, before any pass runs
            check_requirements(source.model, ctx, variant.passes)
        built = _compile_all(source, ctx, target, listeners)
        return _finish(options, target, host, loaded, source, ctx, built, choice)
    finally:
        release_weights()
        for folder in work_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _context(
    options: CompileOptions, target: Target, host: HostInfo, source: PreparedSource, listeners: Listeners
) -> PassContext:
    """The main model's pipeline context: the first [[variants]] entry (if any) is model.onnx."""
    primary = target.variants[0] if target.variants else None
    ctx = PassContext(
        target=target.for_variant(primary) if primary else target,
        calib=source.calib,
        eval=source.evaluation,
        seed=options.seed,
        max_accuracy_drop=options.max_accuracy_drop,
        input_shapes=source.shapes,
        eval_metric=options.eval_metric,
        on_warning=listeners.on_warning,
        on_progress=listeners.on_progress,
        host=host,
    )
    for text in source.normalisation:  # what the user must know about how the model was read
        if text.startswith(("dropped unused opset imports", "kept input shapes dynamic", "--calib: ", "--eval: ")):
            ctx.warn(text)
    return ctx


def _compile_all(source: PreparedSource, ctx: PassContext, target: Target, listeners: Listeners) -> _Compiled:
    """The main model's pipeline inside its accuracy gate, then every other variant's."""
    source_stats = collect_stats(source.model)
    gate = AccuracyGate(ctx)
    compiled, steps = run_pipeline(source.model, ctx, listeners.progress, final_check=gate)
    compiled.producer_name = "lepton"
    for text in [*compression_warnings(steps, compiled), *accuracy_warnings(gate.accuracy)]:
        ctx.warn(text)
    others = compile_extra_variants(source.model, ctx, target, listeners, AccuracyGate)
    return _Compiled(source_stats, compiled, steps, gate.accuracy, others)


def _finish(
    options: CompileOptions,
    target: Target,
    host: HostInfo,
    loaded: LoadedModel,
    source: PreparedSource,
    ctx: PassContext,
    built: _Compiled,
    choice: TargetSuggestion | None,
) -> CompileResult:
    """Device files, report and gates; the bundle's models last (their bytes may copy the weights)."""
    primary = target.variants[0] if target.variants else None
    manifest_fields = {
        "execution_providers": list(target.runtime.execution_providers),
        "variants": manifest_variants(
            target,
            [(primary, variant_path(0, primary), built.model, built.steps)]
            + [(b.variant, b.path, b.model, b.steps) for b in built.others],
        ),
    }
    # Device files (.ort) are made from the bundle's bytes: serialize once, early, only for targets that make them.
    payloads = _bundle_payloads(built.model, built.others) if target.runtime.device_formats else None
    device = _device_artifacts(target, built.model, payloads, source.model, ctx)
    if device.manifest:
        manifest_fields["device_artifacts"] = device.manifest
    report = _report(options, target, host, loaded, source, ctx, built, device, manifest_fields, choice)
    _apply_gates(report, options, ctx, built, device)
    if payloads is None:
        payloads = _bundle_payloads(built.model, built.others)  # late: it may hold a serialized copy of the weights
    models: dict[str, bytes | ModelPayload] = {
        path: payload if payload.data_name else payload.graph for path, payload in payloads.items()
    }  # bytes unless paired with a data file
    models.update(device.models)
    if options.archive:
        _check_archive_size(payloads)
    return CompileResult(
        Path(),
        Path(),
        report,
        built.steps,
        target,
        manifest_fields,
        payloads[PRIMARY_PATH].graph,
        None,
        models=models,
        inputs=compile_inputs(options, target),
        plain_files=device.plain_files,
    )


def _report(
    options: CompileOptions,
    target: Target,
    host: HostInfo,
    loaded: LoadedModel,
    source: PreparedSource,
    ctx: PassContext,
    built: _Compiled,
    device: DeviceArtifacts,
    manifest_fields: dict[str, Any],
    choice: TargetSuggestion | None,
) -> dict[str, Any]:
    """report.json: the pipeline, accuracy, device files, host latency and the target's cost model."""
    extra: dict[str, Any] = {"accuracy": built.accuracy, "variants": manifest_fields["variants"]}
    if device.report:
        extra["device"] = device.report
    if built.others:
        extra["variant_builds"] = [b.report() for b in built.others]
    if choice is not None:
        extra["target_choice"] = choice.to_dict() | {"host": host.pass_context()}
    data = source.evaluation or source.calib
    perf, perf_warnings = compile_sections(
        source.model,
        built.model,
        target,
        data,
        "--eval" if source.evaluation else "--calib",
        bench=options.bench,
        seconds=options.bench_seconds,
        seed=options.seed,
        host=host,
    )
    for text in perf_warnings:
        ctx.warn(text)
    if loaded.external_sha256:
        extra["source_external_data"] = loaded.external_sha256
    return build_report(
        model_name=options.model.name,
        source_sha256=loaded.sha256,
        target={"name": target.name, "sha256": target.sha256, "source": target.source},
        source=built.source_stats,
        compiled=collect_stats(built.model),
        steps=built.steps,
        normalisation=source.normalisation,
        warnings=ctx.warnings + [f"variant {b.variant.name}: {w}" for b in built.others for w in b.warnings],
        extra=extra,
        **perf,
    )


def _apply_gates(
    report: dict[str, Any], options: CompileOptions, ctx: PassContext, built: _Compiled, device: DeviceArtifacts
) -> None:
    """Every gate, in order (exit 3): the main model's accuracy, latency/budgets/baseline, then every other model."""
    append_step_summary(report)  # $GITHUB_STEP_SUMMARY, when set, before any gate can stop the compile
    check_accuracy_budget(built.accuracy, ctx.accuracy_budget)
    apply_gates(
        report,
        max_latency_ratio=options.max_latency_ratio,
        enforce_budgets=options.enforce_budgets,
        baseline=load_baseline(options.baseline) if options.baseline else None,
        baseline_tolerance_pct=options.baseline_tolerance_pct,
    )
    for other in built.others:  # every model the bundle ships must meet the budget, not only the main one
        check_accuracy_budget(other.accuracy, ctx.accuracy_budget)
    for measured in device.accuracy:  # and every device file (the .tflite in LiteRT)
        check_accuracy_budget(measured, ctx.accuracy_budget)


ARCHIVE_FILE_LIMIT = (
    2**31 - 2**24
)  # the bundle archive is a zip without zip64 (bundle/archive.py), encryption adds ~0.03 %


def _check_archive_size(payloads: dict[str, ModelPayload]) -> None:
    """--archive: refuse before writing anything when a file of the bundle would need zip64."""
    sizes = [len(p.graph) for p in payloads.values()] + [p.data_size for p in payloads.values()]
    if max(sizes) > ARCHIVE_FILE_LIMIT or sum(sizes) > 2 * ARCHIVE_FILE_LIMIT:
        raise BadInputError(
            f"--archive: the bundle would hold {sum(sizes) / 2**30:.2f} GiB, beyond what the bundle archive format holds "
            "(2 GiB a file, 4 GiB in all)",
            "drop --archive and ship the bundle folder",
        )


def _write_output(
    bundle_dir: Path,
    models: dict[str, bytes | ModelPayload],
    report: dict[str, Any],
    keys: CompileKeys,
    options: CompileOptions,
    manifest_fields: dict[str, Any],
    inputs: dict[str, Any] | None,
    plain_files: dict[str, bytes],
) -> Path | None:
    """The signed, encrypted bundle (lepton_cli/bundle), written atomically; returns the archive path if any."""
    return write_compile_output(
        bundle_dir,
        models,
        report,
        keys,
        version=options.bundle_version,
        expires=options.expires,
        archive=options.archive,
        extra_fields=manifest_fields,
        provenance=inputs,
        extra_plain_files=plain_files,
    )


def _bundle_payloads(compiled: onnx.ModelProto, others: list[Any]) -> dict[str, ModelPayload]:
    """Every model the bundle ships, in its bundle form (``external_data.bundle_payload``)."""
    return {PRIMARY_PATH: bundle_payload(compiled, PRIMARY_PATH), **serialize_all(others)}


def _device_artifacts(
    target: Target,
    compiled: onnx.ModelProto,
    payloads: dict[str, ModelPayload] | None,
    source: onnx.ModelProto,
    ctx: PassContext,
) -> DeviceArtifacts:
    """The target's own device files (.ort, .tflite) and constraint checks (lepton_cli/device_artifacts)."""
    if not (target.runtime.device_formats or target.runtime.device_checks):
        return DeviceArtifacts()
    models = {path: payload.graph for path, payload in (payloads or {}).items()}
    ctx.current_pass = "device"
    try:
        return build_device_artifacts(target, models, compiled, ctx.warn, source=source, ctx=ctx)
    finally:
        ctx.current_pass = ""
