"""``lepton compile MODEL.onnx --target NAME|PATH.toml``: the main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from lepton_cli.compile.compiler import CompileOptions, CompileResult, compile_model
from lepton_cli.console import emit_json, note, settings, stderr, stdout, warn
from lepton_cli.device_artifacts.summary import device_lines
from lepton_cli.evaluate.accuracy import parse_metric_spec
from lepton_cli.pipeline.records import StepRecord

EVAL_METRIC_HELP = (
    "auto (each output by what it is: top-1 with labels, class scores by top-1, embeddings by cosine, YOLO heads "
    "by box F1, CTC by characters, maps by mask F1, the rest by relative error), or one of top1, agreement, ctc, "
    "mask-f1@THRESHOLD, cosine, detection[@CONFIDENCE], exact, relative-error for the first output; NAME=metric entries "
    "(comma-separated) for any output."
)

ModelArg = Annotated[Path, typer.Argument(help="The ONNX model to compile.")]
TargetOpt = Annotated[
    str, typer.Option("--target", "-t", help="Builtin target name, 'auto', or a path to a target .toml.")
]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default: beside the model).")]
CalibOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--calib", help="Calibration samples: .npz keyed by input name, or a folder of images (see --preprocess)."
    ),
]
PreprocessOpt = Annotated[
    Optional[str],
    typer.Option(
        "--preprocess",
        help="For an image folder: size=HxW,scale=1/255,mean=a:b:c,std=a:b:c,order=RGB|BGR,layout=NCHW|NHWC.",
    ),
]
EvalOpt = Annotated[Optional[Path], typer.Option("--eval", help="Evaluation samples (.npz, optional 'labels').")]
InputShapeOpt = Annotated[
    Optional[list[str]], typer.Option("--input-shape", help="Bind dynamic dims: NAME=1,3,224,224 (repeatable).")
]
MaxDropOpt = Annotated[
    Optional[float], typer.Option("--max-accuracy-drop", help="Quality gate and tuning budget, in percentage points.")
]
EvalMetricOpt = Annotated[str, typer.Option("--eval-metric", help=EVAL_METRIC_HELP)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random check inputs and sampling.")]
SignKeyOpt = Annotated[
    Optional[str],
    typer.Option("--sign-key", help="Signing private key (PEM path); else $LEPTON_SIGNING_KEY, else the dev key set."),
]
RecipientOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--recipient",
        help="Encryption public key of a device (PEM path, repeatable); else $LEPTON_RECIPIENT, else the dev key set.",
    ),
]
BundleVersionOpt = Annotated[
    int,
    typer.Option(
        "--bundle-version", help="Monotonic bundle version: devices refuse lower versions than they have seen."
    ),
]
ExpiresOpt = Annotated[
    Optional[str],
    typer.Option("--expires", help="Devices refuse the bundle after this ISO 8601 date/time (e.g. 2027-01-31)."),
]
ArchiveOpt = Annotated[
    bool, typer.Option("--archive", help="Also write the bundle as one uncompressed .zip file, read in place.")
]
NoBenchOpt = Annotated[
    bool, typer.Option("--no-bench", help="Skip the short host latency measurement (source vs compiled).")
]
BenchSecondsOpt = Annotated[
    float, typer.Option("--bench-seconds", help="Time cap of that measurement (`lepton bench` measures longer).")
]
MaxLatencyRatioOpt = Annotated[
    Optional[float],
    typer.Option("--max-latency-ratio", help="Gate: exit 3 when compiled p50 / source p50 exceeds this."),
]
BaselineOpt = Annotated[
    Optional[Path],
    typer.Option("--baseline", help="Gate: exit 3 when worse than this earlier report.json (size, accuracy, latency)."),
]
BaselineToleranceOpt = Annotated[
    float, typer.Option("--baseline-tolerance", help="Tolerance for --baseline, percent (accuracy: points).")
]
EnforceBudgetsOpt = Annotated[
    bool, typer.Option("--enforce-budgets", help="Gate: exit 3 when the target's size or memory budget is missed.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON result document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class CompileProgress:
    """The compile's progress on stderr: a line per pass, and a pass's own progress as a bar (done of total) or a
    note; silent with --quiet and --json (``settings.quiet``)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.label = ""

    def step(self, name: str, phase: str, record: StepRecord | None) -> None:
        self.close()
        if phase == "start":
            note(f"[cyan]→[/cyan] {name} …")
            return
        assert record is not None and record.before is not None and record.after is not None
        verdict = {True: "[green]outputs match[/green]", False: "[red]mismatch[/red]", None: "check skipped"}
        shown = verdict[record.check.ok] if record.check.kind in ("exact", "tolerance") else record.check.kind
        note(
            f"[green]✓[/green] {name:<16} {record.seconds:6.2f}s  nodes {record.before.nodes}→{record.after.nodes}  "
            f"size {_fmt_bytes(record.before.size_bytes)}→{_fmt_bytes(record.after.size_bytes)}  {shown}"
        )

    def pass_progress(self, pass_name: str, message: str, done: int | None, total: int | None) -> None:
        if settings.quiet:
            return
        if done is None or total is None:
            self.close()
            note(f"  {escape(pass_name)}: {escape(message)}")
            return
        if self.bar is None or message != self.label:
            self.close()
            self.bar = Progress(
                TextColumn(escape(message)), BarColumn(), MofNCompleteColumn(), console=stderr, transient=True
            )
            self.bar.start()
            self.task, self.label = self.bar.add_task(message, total=total), message
        assert self.task is not None
        self.bar.update(self.task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.task, self.label = None, None, ""


def _performance_summary(report: dict) -> dict:
    """The compile's latency, estimate and budget verdict in a few keys for CI scripts (full detail: report.json)."""
    lat = report.get("host_latency") or {}
    ratio = (lat.get("ratios") or {}).get("compiled") or {}
    models = lat.get("models") or {}
    est = ((report.get("cost_model") or {}).get("models") or {}).get("compiled") or {}
    return {
        "host_p50_ms": {k: round(v["p50_ms"], 4) for k, v in models.items()} or None,
        "host_p50_ratio": ratio.get("ratio"),
        "host_p50_ratio_ci95": [ratio["ci_low"], ratio["ci_high"]] if ratio else None,
        "estimated_latency_ms": est.get("latency_ms"),
        "peak_activation_bytes": (est.get("peak_activation_bytes") or {}).get("greedy_arena"),
        "budgets_ok": (report.get("budgets") or {}).get("ok"),
    }


def _json_document(result: CompileResult) -> dict[str, Any]:
    return {
        "bundle": str(result.bundle_dir),
        "model": str(result.model_path),
        "target": result.target.name,
        "archive": str(result.archive) if result.archive else None,
        "summary": result.report["summary"],
        "accuracy": result.report.get("accuracy"),
        "warnings": result.report["warnings"],
        "device": device_lines(result.report),
        "performance": _performance_summary(result.report),
    }


def _summary_table(model: Path, result: CompileResult) -> Table:
    """Source vs compiled: size counts, accuracy, host latency and the target's latency estimate."""
    table = Table(title=f"{model.name} → {result.target.name}", show_header=True)
    for col in ("", "source", "compiled"):
        table.add_column(col)
    src, out = result.report["source"], result.report["compiled"]
    table.add_row("nodes", str(src["nodes"]), str(out["nodes"]))
    table.add_row("params", f"{src['params']:,}", f"{out['params']:,}")
    table.add_row(
        "MACs",
        f"{src['macs']:,}" if src["macs"] is not None else "?",
        f"{out['macs']:,}" if out["macs"] is not None else "?",
    )
    table.add_row("size", _fmt_bytes(src["size_bytes"]), _fmt_bytes(out["size_bytes"]))
    _accuracy_rows(table, result.report.get("accuracy") or {})
    _latency_rows(table, result)
    return table


def _accuracy_rows(table: Table, accuracy: dict[str, Any]) -> None:
    if not accuracy.get("measured"):
        return
    outputs = accuracy.get("outputs") or []
    where = f"{accuracy['output']}: " if len(outputs) > 1 else ""
    table.add_row(
        f"{where}{accuracy['metric']} ({accuracy['data']})",
        f"{accuracy['source_value']:.2f}%",
        f"{accuracy['value']:.2f}% (drop {accuracy['drop_pct']:.2f}, budget {accuracy['budget_pct']:g})",
    )
    for out in outputs if len(outputs) > 1 else []:
        if out["name"] != accuracy["output"]:
            table.add_row(
                f"  {out['name']}: {out['metric']}",
                f"{out['source_value']:.2f}%",
                f"{out['value']:.2f}% (drop {out['drop_pct']:.2f})",
            )


def _latency_rows(table: Table, result: CompileResult) -> None:
    latency = result.report.get("host_latency") or {}
    if latency.get("models"):  # the short host measurement
        lat, ratio = latency["models"], latency["ratios"].get("compiled") or {}
        table.add_row(
            f"host p50 ({latency['settings']['providers'][0]})",
            f"{lat['source']['p50_ms']:.3f} ms",
            f"{lat['compiled']['p50_ms']:.3f} ms (x{ratio.get('ratio', 0):.3f}, "
            f"95% CI {ratio.get('ci_low', 0):.3f}-{ratio.get('ci_high', 0):.3f})",
        )
    estimates = (result.report.get("cost_model") or {}).get("models") or {}
    if "latency_ms" in estimates.get("compiled", {}) and "latency_ms" in estimates.get("source", {}):
        table.add_row(
            f"est. latency on {result.target.name}",
            f"{estimates['source']['latency_ms']:.3f} ms",
            f"{estimates['compiled']['latency_ms']:.3f} ms",
        )


def _show(model: Path, result: CompileResult, quiet: bool) -> None:
    if not quiet:
        stdout.print(_summary_table(model, result))
        for line in device_lines(result.report):
            note(f"device: {escape(line)}")
    stdout.print(f"bundle: {result.bundle_dir}" + (f"  (archive {result.archive})" if result.archive else ""))


def compile_command(
    model: ModelArg,
    target: TargetOpt,
    output: OutputOpt = None,
    calib: CalibOpt = None,
    preprocess: PreprocessOpt = None,
    eval_data: EvalOpt = None,
    input_shape: InputShapeOpt = None,
    max_accuracy_drop: MaxDropOpt = None,
    eval_metric: EvalMetricOpt = "auto",
    seed: SeedOpt = 0,
    sign_key: SignKeyOpt = None,
    recipient: RecipientOpt = None,
    bundle_version: BundleVersionOpt = 0,
    expires: ExpiresOpt = None,
    archive: ArchiveOpt = False,
    no_bench: NoBenchOpt = False,
    bench_seconds: BenchSecondsOpt = 1.5,
    max_latency_ratio: MaxLatencyRatioOpt = None,
    baseline: BaselineOpt = None,
    baseline_tolerance: BaselineToleranceOpt = 5.0,
    enforce_budgets: EnforceBudgetsOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compile MODEL for a target: run its pass pipeline and write the bundle and its report."""
    settings.quiet = quiet or json_out
    settings.json_mode = json_out
    parse_metric_spec(eval_metric)  # exit 2 on a bad name or threshold, before any work
    options = CompileOptions(
        model=model,
        target=target,
        output_dir=output,
        calib=calib,
        preprocess=preprocess,
        eval=eval_data,
        input_shapes=input_shape or [],
        max_accuracy_drop=max_accuracy_drop,
        eval_metric=eval_metric,
        seed=seed,
        sign_key=sign_key,
        recipients=recipient or [],
        bundle_version=bundle_version,
        expires=expires,
        archive=archive,
        bench=not no_bench,
        bench_seconds=bench_seconds,
        max_latency_ratio=max_latency_ratio,
        baseline=baseline,
        baseline_tolerance_pct=baseline_tolerance,
        enforce_budgets=enforce_budgets,
    )
    _compile_and_show(options, json_out, quiet)


def _compile_and_show(options: CompileOptions, json_out: bool, quiet: bool) -> None:
    note(f"compiling [bold]{options.model}[/bold] for target [bold]{options.target}[/bold]")
    display = CompileProgress()
    try:
        result = compile_model(
            options, progress=display.step, on_warning=warn, on_note=note, on_progress=display.pass_progress
        )
    finally:
        display.close()
    if json_out:
        emit_json(_json_document(result))
    else:
        _show(Path(options.model), result, quiet)


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_command)
