"""``lepton bench MODEL|BUNDLE [--against MODEL|BUNDLE]``: host latency (interleaved), cost model, budgets, gates.

The measuring is in ``measure``, the estimate in ``costmodel``, the Markdown/HTML in ``report_render``;
this command only gathers the models and data, shows progress and applies the gates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import onnx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lepton_cli import __version__
from lepton_cli.compile.option_values import check_option_value
from lepton_cli.compile.report import apply_gates, section
from lepton_cli.compile.report_render import append_step_summary, render_html, render_markdown
from lepton_cli.console import emit_json, note, settings, stderr, stdout, warn
from lepton_cli.errors import BadInputError, QualityGateError
from lepton_cli.evaluate import costmodel
from lepton_cli.evaluate import latency as measure
from lepton_cli.host.detect import detect_host
from lepton_cli.model.load import load_model
from lepton_cli.model.shapes import check_input_memory, graph_inputs, parse_input_shapes, require_static
from lepton_cli.pipeline.targets import Target, load_target
from lepton_cli.samples.sample_set import SampleSet, load_samples

BENCH_FORMAT = "lepton-bench/1"


@dataclass
class Subject:
    label: str
    path: Path
    kind: str  # "model" or "bundle"
    model: onnx.ModelProto
    size_bytes: int
    target: str | None = None  # a bundle's target


def _is_bundle(path: Path) -> bool:
    return (
        (path.is_dir() and (path / "manifest.json").is_file()) or path.suffix in (".lepton", ".zip") and path.is_file()
    )


def _load_subject(path: Path, key: str | None, trust: str | None) -> Subject:
    if not path.exists():
        raise BadInputError(f"{path} does not exist", "pass an .onnx model or a .lepton bundle")
    if not _is_bundle(path):
        loaded = load_model(path)
        return Subject(path.name, path, "model", loaded.model, loaded.file_size)
    from lepton_cli.bundle import open_bundle
    from lepton_cli.bundle.manifest import PRIMARY_MODEL
    from lepton_cli.commands._bundle_keys import (  # option, then LEPTON_* variable, then the dev key set (said so)
        key_spec,
        trust_spec,
    )

    # record=False: measuring a bundle is not deploying it, so the device's rollback state stays as it was.
    opened = open_bundle(path, key=key_spec(key), trust=trust_spec(trust), record=False)
    blob = opened.models.get(PRIMARY_MODEL) or next(iter(opened.models.values()), None)
    if blob is None:
        raise BadInputError(f"bundle {path} holds no model", "compile it again")
    if getattr(blob, "external_files", None):
        raise BadInputError(
            f"bundle {path}: {PRIMARY_MODEL} keeps its weights in an external data file, which `lepton bench` does not measure",
            "measure it with `lepton run` on your data, or bench the source model",
        )
    return Subject(
        path.name,
        path,
        "bundle",
        onnx.load_from_string(blob),
        len(blob),
        (opened.manifest.get("target") or {}).get("name"),
    )


def _progress_bar(total_runs: int, seconds: float) -> tuple[Progress | None, Any]:
    if settings.quiet:
        return None, None
    progress = Progress(
        TextColumn("measuring"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} rounds"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    task = progress.add_task("bench", total=total_runs)

    def update(rounds: int, elapsed: float) -> None:
        # Whichever stop rule is nearer decides how full the bar is.
        progress.update(task, completed=max(rounds, total_runs * min(1.0, elapsed / seconds)))

    return progress, update


def _bind_shapes(view: onnx.ModelProto, input_shapes: list[str], samples: SampleSet | None) -> dict[str, list]:
    """The dims to measure at: ``--input-shape``, else the samples' shapes, else a batch of one for a free batch dim."""
    shapes = parse_input_shapes(input_shapes)
    if samples is not None and not shapes:
        dynamic = {sig.name for sig in graph_inputs(view) if not sig.is_static}
        shapes = {name: dims for name, dims in samples.shapes().items() if name in dynamic}
    for sig in graph_inputs(view):
        # A free batch dim alone is common (exporters mark it dynamic); measure a batch of one, said in the output.
        if sig.name not in shapes and not sig.is_static and all(isinstance(d, int) for d in sig.dims[1:]):
            shapes[sig.name] = [1, *sig.dims[1:]]
            note(f"input {sig.name}: dynamic batch dim measured at 1 (use --input-shape to choose)")
    check_input_memory(graph_inputs(view), shapes, detect_host().usable_memory_mb)
    return shapes


def _subject_doc(s: Subject) -> dict[str, Any]:
    return {
        "label": s.label,
        "path": str(s.path),
        "kind": s.kind,
        "size_bytes": s.size_bytes,
        **({"target": s.target} if s.target else {}),
    }


def _add_target_sections(doc: dict[str, Any], target: Target, bound: dict[str, onnx.ModelProto], last: Subject) -> None:
    doc["cost_model"] = costmodel.cost_model_section(target, bound)
    doc["budgets"] = costmodel.budgets_section(
        target, last.size_bytes, doc["cost_model"]["models"][last.label], last.label
    )


def run_bench(
    subjects: list[Subject],
    *,
    target: Target | None,
    rule: measure.StopRule,
    threads: int | None,
    calib: Path | None,
    eval_data: Path | None,
    input_shapes: list[str],
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """The bench document: host latency of every subject (first = base of the ratios), cost model, budgets."""
    data_path, role = (eval_data, "--eval") if eval_data else (calib, "--calib")
    view = measure.source_layout_view(
        subjects[0].model
    )  # shapes below are in the source's (NCHW) terms, as the data is
    samples = load_samples(data_path, view, role=role) if data_path else None
    shapes = _bind_shapes(view, input_shapes, samples)
    bound = {s.label: measure.bind_like(s.model, shapes) for s in subjects}
    for s in subjects:
        require_static(bound[s.label], f"measuring {s.label}")  # exit 2 naming each free dim and an --input-shape
    feeds = measure.make_feeds(bound[subjects[0].label], samples, role, seed=seed, dims=shapes or None)
    latency, warnings = measure.latency_section(
        bound,
        feeds,
        rule,
        preferred_providers=target.runtime.execution_providers if target else ("CPUExecutionProvider",),
        target_name=target.name if target else None,
        threads=threads,
        seed=seed,
        progress=progress,
    )
    doc: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "tool": {"name": "lepton", "version": __version__},
        "subjects": [_subject_doc(s) for s in subjects],
        "target": target.name if target else None,
        "host_latency": latency,
    }
    if target is not None:
        _add_target_sections(doc, target, bound, subjects[-1])
    doc["warnings"] = warnings
    return doc


def _print_table(doc: dict[str, Any]) -> None:
    lat = doc["host_latency"]
    settings_ = lat["settings"]
    table = Table(
        title=f"host latency ({', '.join(settings_['providers'])}, {settings_['threads']} threads, input: {lat['input']['source']})"
    )
    for col in ("model", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput/s", "p50 ratio (95% CI)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, m in lat["models"].items():
        r = lat["ratios"].get(label)
        ratio = f"{r['ratio']:.3f} ({r['ci_low']:.3f}–{r['ci_high']:.3f})" if r else "base"
        table.add_row(
            label,
            str(m["runs"]),
            f"{m['p50_ms']:.3f}",
            f"{m['p90_ms']:.3f}",
            f"{m['p99_ms']:.3f}",
            f"{m['mean_ms']:.3f}",
            f"{m['throughput_per_s']:.1f}",
            ratio,
        )
    stdout.print(table)
    cost = section(doc, "cost_model")
    if cost:
        est = Table(title=f"cost model: {cost['target']}")
        for col in ("model", "est. latency ms", "memory-bound share", "peak act. (lower bound)", "arena (greedy)"):
            est.add_column(col, justify="left" if col == "model" else "right")
        for label, e in cost["models"].items():
            peak = e["peak_activation_bytes"]
            est.add_row(
                label,
                f"{e['latency_ms']:.3f}",
                f"{e['memory_bound_share']:.0%}",
                f"{peak['liveness_lower_bound'] / 2**20:.2f} MB",
                f"{peak['greedy_arena'] / 2**20:.2f} MB",
            )
        stdout.print(est)
    for check in section(doc, "budgets").get("checks", []):
        mark = "[green]ok[/green]" if check["ok"] else "[red]over[/red]"
        stdout.print(f"budget {check['name']}: {check['value']:.2f} / {check['limit']:g} {check['unit']} {mark}")


ModelArg = Annotated[Path, typer.Argument(help="The model (.onnx) or bundle (.lepton folder or archive) to measure.")]
AgainstOpt = Annotated[
    Optional[Path], typer.Option("--against", help="Baseline model or bundle: ratios are MODEL / AGAINST.")
]
TargetOpt = Annotated[
    Optional[str],
    typer.Option("--target", "-t", help="Target name or .toml: its execution providers, cost model and budgets."),
]
RunsOpt = Annotated[
    int, typer.Option("--runs", help="Stop after this many interleaved rounds (one run per model each).")
]
SecondsOpt = Annotated[
    float, typer.Option("--seconds", help="...or after this many seconds of measuring (at least 5 rounds).")
]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="Unrecorded runs per model before measuring.")]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", help="ONNX Runtime intra-op threads (default: physical cores).")
]
CalibOpt = Annotated[Optional[Path], typer.Option("--calib", help="Real input samples (.npz keyed by input name).")]
EvalOpt = Annotated[Optional[Path], typer.Option("--eval", help="Real input samples (.npz), preferred over --calib.")]
InputShapeOpt = Annotated[
    Optional[list[str]], typer.Option("--input-shape", help="Bind dynamic dims: NAME=1,3,224,224 (repeatable).")
]
KeyOpt = Annotated[
    Optional[str], typer.Option("--key", help="Decryption private key for bundles (or LEPTON_DECRYPTION_KEY).")
]
TrustOpt = Annotated[
    Optional[str], typer.Option("--trust", help="Publisher's signing public key for bundles (or LEPTON_TRUST).")
]
MaxRatioOpt = Annotated[
    Optional[float],
    typer.Option("--max-latency-ratio", help="Gate: exit 3 when MODEL's p50 / AGAINST's p50 exceeds this."),
]
EnforceBudgetsOpt = Annotated[
    bool,
    typer.Option("--enforce-budgets", help="Gate: exit 3 when MODEL misses the target's size or memory budgets."),
]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Also write report.json, report.md and report.html to this folder."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random inputs and the bootstrap.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (with raw samples) on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")]


def _stop_rule(runs: int, seconds: float, warmup: int) -> measure.StopRule:
    if runs < 1 or not seconds > 0 or warmup < 0:  # "not >": NaN too
        raise BadInputError("--runs must be >= 1, --seconds > 0 and --warmup >= 0", "pass positive limits")
    return measure.StopRule(runs=runs, seconds=seconds, warmup=warmup)


def _check_gates(max_latency_ratio: float | None, against: Path | None) -> None:
    if max_latency_ratio is not None and against is None:
        raise BadInputError(
            "--max-latency-ratio needs --against: it bounds MODEL's p50 over AGAINST's", "add --against BASELINE"
        )
    check_option_value("max_latency_ratio", max_latency_ratio)


def _load_subjects(model: Path, against: Path | None, key: str | None, trust: str | None) -> list[Subject]:
    subjects = [_load_subject(p, key, trust) for p in ([against] if against else []) + [model]]
    if len(subjects) == 2 and subjects[0].label == subjects[1].label:
        subjects[0].label += " (against)"
    return subjects


def _bench_target(name: str | None, subjects: list[Subject], enforce_budgets: bool) -> Target | None:
    """``--target``, else the target a bundle was compiled for, else none (CPU provider, no cost model)."""
    target_name = name or next((s.target for s in subjects if s.target), None)
    target = load_target(target_name) if target_name else None
    if enforce_budgets and target is None:
        raise BadInputError("--enforce-budgets needs a target: its budgets are what is enforced", "pass --target NAME")
    if target is None:
        note("no --target: measuring on the CPU execution provider, no cost model or budgets")
    return target


def _measure_with_progress(
    subjects: list[Subject], target: Target | None, rule: measure.StopRule, **options: Any
) -> dict[str, Any]:
    bar, update = _progress_bar(rule.runs, rule.seconds)
    if bar:
        bar.start()
    try:
        return run_bench(subjects, target=target, rule=rule, progress=update, **options)
    finally:
        if bar:
            bar.stop()


def _gate(doc: dict[str, Any], max_latency_ratio: float | None, enforce_budgets: bool) -> QualityGateError | None:
    """The gates' verdict, held so the outputs are written before exit 3."""
    try:
        apply_gates(doc, max_latency_ratio=max_latency_ratio, enforce_budgets=enforce_budgets)
    except QualityGateError as exc:
        return exc
    return None


def _write_reports(output: Path, doc: dict[str, Any]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str), encoding="utf-8")
    (output / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (output / "report.html").write_text(render_html(doc), encoding="utf-8")


def bench_command(
    model: ModelArg,
    against: AgainstOpt = None,
    target: TargetOpt = None,
    runs: RunsOpt = 200,
    seconds: SecondsOpt = 10.0,
    warmup: WarmupOpt = 3,
    threads: ThreadsOpt = None,
    calib: CalibOpt = None,
    eval_data: EvalOpt = None,
    input_shape: InputShapeOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = None,
    max_latency_ratio: MaxRatioOpt = None,
    enforce_budgets: EnforceBudgetsOpt = False,
    output: OutputOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure MODEL's latency on this host (interleaved with --against), estimate it on the target, check budgets."""
    settings.quiet = quiet or json_out
    settings.json_mode = json_out
    check_option_value("seed", seed)
    rule = _stop_rule(runs, seconds, warmup)
    _check_gates(max_latency_ratio, against)
    subjects = _load_subjects(model, against, key, trust)
    tgt = _bench_target(target, subjects, enforce_budgets)
    doc = _measure_with_progress(
        subjects,
        tgt,
        rule,
        threads=threads,
        calib=calib,
        eval_data=eval_data,
        input_shapes=input_shape or [],
        seed=seed,
    )
    settings_ = doc["host_latency"]["settings"]
    note(f"measured on {settings_['providers'][0]} with {settings_['threads_why']}")
    for w in doc["warnings"]:
        warn(w)
    gate_error = _gate(doc, max_latency_ratio, enforce_budgets)
    if output is not None:
        _write_reports(output, doc)
    append_step_summary(doc)
    if json_out:
        emit_json(doc)
    else:
        _print_table(doc)
    if gate_error is not None:
        raise gate_error


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
