"""Host latency: interleaved A/B runs in ONNX Runtime, robust summaries, a bootstrap CI of the p50 ratio.

How a measurement goes (each choice is there to make the ratio trustworthy on a noisy machine):
- every candidate gets its own session with fixed, recorded settings (threads, providers, full graph
  optimisation as deployed) and ``warmup`` unrecorded runs first (allocator growth, lazy kernel
  selection and cold caches would otherwise land in the samples);
- candidates run interleaved, one run each per round, the order reversed every other round
  (A B, B A, A B, ...): slow drifts (CPU frequency, a neighbour's load) hit both candidates
  alike and neither always runs first on a cache its rival warmed;
- it stops after ``runs`` rounds or once ``seconds`` have passed, but never before ``min_runs``
  rounds, so a short time cap still gives percentiles that mean something;
- p50/p90/p99, mean, throughput per candidate; the p50 ratio's 95% interval comes from a paired
  bootstrap over rounds (resampling whole rounds keeps the drift both candidates shared).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from lepton_cli.evaluate import costmodel
from lepton_cli.host.detect import HostInfo, detect_host
from lepton_cli.model.external_data import external_bytes
from lepton_cli.model.io_contract import adapt_feed, io_layout
from lepton_cli.model.sessions import OPT_LEVELS, model_random_feed, new_session, read_external_from_folder
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs
from lepton_cli.model.stats import collect_stats
from lepton_cli.runtime.select import choose_threads, provider_order
from lepton_cli.samples.sample_set import SampleSet

BOOTSTRAP_RESAMPLES = 2000
# compile's own measurement: short and time-capped (``lepton bench`` is the place for a long one)
COMPILE_SECONDS = 1.5
COMPILE_RUNS = 100
MAX_FEEDS = 16  # distinct inputs cycled through; more only costs memory


@dataclass(frozen=True)
class StopRule:
    """When to stop measuring: ``runs`` rounds, or ``seconds`` of measuring once ``min_runs`` rounds are in."""

    runs: int = 200
    seconds: float = 10.0
    min_runs: int = 5
    warmup: int = 3

    def __post_init__(self) -> None:
        if self.runs < 1 or self.min_runs < 1 or self.warmup < 0 or self.seconds <= 0:
            raise ValueError(f"bad stop rule {self}")

    def done(self, rounds: int, elapsed: float) -> bool:
        if rounds >= self.runs:
            return True
        return elapsed >= self.seconds and rounds >= min(self.min_runs, self.runs)


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Who runs when in one round: the given order on even rounds, reversed on odd ones (ABBA)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


Runner = Callable[[int], Any]  # runs the candidate once on input number ``i``
ProgressFn = Callable[[int, float], None]  # (rounds done, seconds elapsed)


def measure_interleaved(
    runners: dict[str, Runner],
    rule: StopRule,
    *,
    clock: Callable[[], float] = time.perf_counter,
    progress: ProgressFn | None = None,
) -> dict[str, list[float]]:
    """Run every candidate interleaved until ``rule`` says stop; return seconds per run, per candidate.

    Warm-up runs go first, in the same alternating order, and are not recorded.
    """
    names = list(runners)
    for w in range(rule.warmup):
        for name in round_order(names, w):
            runners[name](w)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = clock()
    rounds = 0
    while True:
        for name in round_order(names, rounds):
            t0 = clock()
            runners[name](rounds)
            samples[name].append(clock() - t0)
        rounds += 1
        elapsed = clock() - started
        if progress:
            progress(rounds, elapsed)
        if rule.done(rounds, elapsed):
            return samples


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not len(values):
        raise ValueError("no samples")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(seconds: Sequence[float], *, batch: int = 1) -> dict[str, Any]:
    """p50/p90/p99/mean/std/min in milliseconds, throughput in samples per second (batch / mean)."""
    arr = np.asarray(seconds, dtype=np.float64)
    mean = float(arr.mean())
    return {
        "runs": int(arr.size),
        "p50_ms": percentile(arr, 50) * 1e3,
        "p90_ms": percentile(arr, 90) * 1e3,
        "p99_ms": percentile(arr, 99) * 1e3,
        "mean_ms": mean * 1e3,
        "std_ms": float(arr.std(ddof=1)) * 1e3 if arr.size > 1 else 0.0,
        "min_ms": float(arr.min()) * 1e3,
        "throughput_per_s": batch / mean if mean > 0 else None,
    }


def bootstrap_p50_ratio(
    base: Sequence[float],
    candidate: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """p50(candidate) / p50(base) with a percentile-bootstrap interval.

    Equal-length samples from interleaved rounds are resampled in pairs (whole rounds); otherwise
    each side is resampled on its own.
    """
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if not a.size or not b.size:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    paired = a.size == b.size
    per_round = b / a if paired else None
    ratios, paired_medians = [], []
    # Resample in chunks: --runs 100000 must not allocate resamples x runs indices at once.
    chunk = max(1, 4_000_000 // max(a.size, b.size))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        idx_a = rng.integers(0, a.size, size=(rows, a.size))
        idx_b = idx_a if paired else rng.integers(0, b.size, size=(rows, b.size))
        ratios.append(np.median(b[idx_b], axis=1) / np.median(a[idx_a], axis=1))
        if per_round is not None:
            paired_medians.append(np.median(per_round[idx_a], axis=1))
    ratios = np.concatenate(ratios)
    tail = (1 - confidence) / 2 * 100
    doc = {
        "ratio": float(np.median(b) / np.median(a)),
        "ci_low": float(np.percentile(ratios, tail)),
        "ci_high": float(np.percentile(ratios, 100 - tail)),
        "confidence": confidence,
        "resamples": resamples,
        "paired": paired,
    }
    if per_round is not None:
        # The median of per-round ratios: each round's A and B ran back to back, so load that changes
        # between rounds cancels; a second view of the same question, reported beside the p50 ratio.
        boot = np.concatenate(paired_medians)
        doc["paired_median_ratio"] = float(np.median(per_round))
        doc["paired_ci"] = [float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))]
    return doc


# -- feeds and sessions ----------------------------------------------------------------------------


@dataclass
class Feeds:
    feeds: list[dict[str, np.ndarray]]
    source: str  # "--calib PATH", "--eval PATH" or "random"
    warning: str | None = None
    batch: int = 1


def make_feeds(
    model: onnx.ModelProto,
    samples: SampleSet | None,
    role: str = "--calib",
    *,
    seed: int = 0,
    dims: dict[str, list[int]] | None = None,
    limit: int = MAX_FEEDS,
) -> Feeds:
    """Real samples when given, else seeded random inputs of the right dtype and shape, with a warning."""
    if samples is not None and len(samples):
        feeds = list(samples.feeds(limit))
        source = f"{role} {samples.path}"
        warning = None
    else:
        rng = np.random.default_rng(seed)
        feeds = [model_random_feed(model, rng, dims) for _ in range(min(limit, 4))]
        source = "random"
        warning = (
            "latency measured on random inputs: it can depend on the data (e.g. detection models, early exits); "
            "pass --calib or --eval for representative samples"
        )
    first = next(iter(feeds[0].values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim else 1
    return Feeds(feeds, source, warning, batch)


@dataclass
class Candidate:
    """One model to time: its label, the serialized model, and the feeds adapted to its I/O layout."""

    label: str
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)


def fit_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A feed for ``model``: as is when it already has the model's static input shapes (e.g. random inputs
    made from this model's own signature), else converted from NCHW as ``io_contract.adapt_feed`` does."""
    sigs = {sig.name: sig for sig in graph_inputs(model)}
    if all(
        name in sigs
        and sigs[name].is_static
        and tuple(value.shape) == tuple(sigs[name].dims)
        and value.dtype == sigs[name].dtype
        for name, value in feed.items()
    ):
        return feed
    return adapt_feed(model, feed)


def source_layout_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A weightless model with ``model``'s inputs in the source's NCHW layout: what sample data
    (always in the source's layout, as for ``compile --calib``) is validated against."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        dims = copy.type.tensor_type.shape.dim
        if io_layout(model, value.name) == "NHWC" and len(dims) == 4:
            order = [dims[i] for i in (0, 3, 1, 2)]
            saved = [onnx.TensorShapeProto.Dimension() for _ in order]
            for target, dim in zip(saved, order):
                target.CopyFrom(dim)
            del dims[:]
            dims.extend(saved)
        inputs.append(copy)
    return onnx.helper.make_model(onnx.helper.make_graph([], "inputs", inputs, []))


def bind_like(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Bind ``model``'s free input dims from ``shapes`` given in the source's (NCHW) terms.

    A compiled model may take NHWC (layout metadata) or padded channels: its own static dims win,
    the given sizes fill only what it leaves free.
    """
    wanted = {}
    for sig in graph_inputs(model):
        if sig.is_static or sig.name not in shapes:
            continue
        dims = list(shapes[sig.name])
        if io_layout(model, sig.name) == "NHWC" and len(dims) == 4:
            dims = [dims[0], dims[2], dims[3], dims[1]]
        wanted[sig.name] = [d if isinstance(d, int) else given for d, given in zip(sig.dims, dims)]
    return bind_input_shapes(model, wanted) if wanted else model


def _session(model: onnx.ModelProto, threads: int, providers: list[str]) -> ort.InferenceSession:
    """``ort.make_session``'s settings (full optimisation, as deployed) with intra-op spinning off.

    Why: after a run, ONNX Runtime's pool threads spin-wait for more work. Interleaved, the idle
    session's spinning threads steal cores from the one being timed; on a 2-core host an A/A test
    of one model against itself read 0.84x with spinning on.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS["all"]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    read_external_from_folder(options, model)
    return new_session(model.SerializeToString(), options, list(providers))


def host_latency(
    candidates: list[Candidate],
    rule: StopRule,
    *,
    threads: int,
    providers: Iterable[str],
    batch: int = 1,
    progress: ProgressFn | None = None,
    seed: int = 0,
    keep_samples: bool = True,
) -> dict[str, Any]:
    """Measure every candidate interleaved; the first is the base of the ratios.

    Returns ``{"settings": ..., "models": {label: summary (+ samples_ms)}, "ratios": {label: p50 ratio vs base}}``.
    """
    providers = list(providers)
    sessions = {}
    for cand in candidates:
        session = _session(cand.model, threads, providers)
        feeds = [fit_feed(cand.model, f) for f in cand.feeds]
        sessions[cand.label] = (session, feeds)

    def runner(session: Any, feeds: list[dict[str, np.ndarray]]) -> Runner:
        return lambda i: session.run(None, feeds[i % len(feeds)])

    used = sessions[candidates[0].label][0].get_providers()
    samples = measure_interleaved({label: runner(*sf) for label, sf in sessions.items()}, rule, progress=progress)
    models = {}
    for label, secs in samples.items():
        models[label] = summarize(secs, batch=batch)
        if keep_samples:
            models[label]["samples_ms"] = [round(s * 1e3, 4) for s in secs]
    base = candidates[0].label
    ratios = {
        label: bootstrap_p50_ratio(samples[base], samples[label], seed=seed) for label in samples if label != base
    }
    return {
        "settings": {
            "threads": threads,
            "providers": used,
            "requested_providers": providers,
            "warmup": rule.warmup,
            "intra_op_spinning": False,
            "max_runs": rule.runs,
            "max_seconds": rule.seconds,
            "min_runs": rule.min_runs,
            "order": "interleaved, reversed every other round",
            "opt_level": "all",
            "batch": batch,
        },
        "base": base,
        "models": models,
        "ratios": ratios,
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def latency_section(
    models: dict[str, onnx.ModelProto],
    feeds: Feeds,
    rule: StopRule,
    *,
    preferred_providers: Sequence[str] = ("CPUExecutionProvider",),
    target_name: str | None = None,
    threads: int | None = None,
    host: HostInfo | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """``report["host_latency"]`` for ``models`` (the first is the base of the ratios), and warnings to show.

    Execution providers: the target's, in its order, where this host has them; else CPU, said plainly.
    Threads: ``threads``, else the physical cores (``runtime_select.choose_threads``); recorded either way.
    """
    host = host or detect_host()
    threads_n, threads_why = choose_threads(host, threads)
    preferred = list(preferred_providers) or ["CPUExecutionProvider"]
    providers, skipped = provider_order(preferred, host)
    warnings = []
    if providers[0] != preferred[0]:
        warnings.append(
            f"{'target ' + target_name + ' prefers' if target_name else 'preferred'} {preferred[0]}, not usable here: "
            f"latency measured on {providers[0]} instead ({'; '.join(skipped) or 'not in this onnxruntime build'})"
        )
    if feeds.warning:
        warnings.append(feeds.warning)
    candidates = [Candidate(label, model, feeds.feeds) for label, model in models.items()]
    load_before = _load_average()
    section = host_latency(
        candidates, rule, threads=threads_n, providers=providers, batch=feeds.batch, progress=progress, seed=seed
    )
    load = max(x for x in (load_before, _load_average(), 0.0) if x is not None)
    section["settings"]["threads_why"] = threads_why
    section["settings"]["load_average"] = round(load, 2)
    if load > host.cores_logical:
        # Load above the core count makes multi-threaded ratios unstable (docs/decisions.md).
        warnings.append(
            f"the host was busy while measuring (load average {load:.1f} on {host.cores_logical} cores): "
            "ratios can move between runs; measure on a quiet machine, or with --threads 1 to be less exposed"
        )
    section["input"] = {"source": feeds.source, "distinct_feeds": len(feeds.feeds), "batch": feeds.batch}
    section["host"] = {
        "cpu": host.cpu_model,
        "cores_physical": host.cores_physical,
        "isa": list(host.isa),
        "onnxruntime": host.ort_version,
    }
    return section, warnings


BENCH_WEIGHTS_LIMIT = 2 << 30  # interleaving keeps both sessions open: a large model's weights twice in memory


def _free_batch_dims(source: onnx.ModelProto) -> tuple[dict[str, list[int]], list[str]]:
    """(a batch of one for each input whose only free dim is the batch, the inputs with other free dims)."""
    batch_one = {
        sig.name: [1, *sig.dims[1:]]
        for sig in graph_inputs(source)
        if not sig.is_static and all(isinstance(d, int) for d in sig.dims[1:])
    }
    unbound = [sig.name for sig in graph_inputs(source) if not sig.is_static and sig.name not in batch_one]
    return batch_one, unbound


def _compile_latency(
    models: dict[str, onnx.ModelProto],
    target: Any,
    samples: SampleSet | None,
    role: str,
    *,
    bench: bool,
    seconds: float,
    seed: int,
    host: HostInfo | None,
) -> tuple[dict[str, Any], list[str]]:
    """Source vs compiled host latency, unless ``--no-bench`` or the weights are too large to hold twice."""
    weights = sum(collect_stats(m, with_macs=False).param_bytes for m in models.values())
    if not bench:
        return {"measured": False, "reason": "--no-bench"}, []
    if weights > BENCH_WEIGHTS_LIMIT:
        reason = (
            f"source and compiled hold {weights / 2**30:.2f} GiB of weights together, over the "
            f"{BENCH_WEIGHTS_LIMIT / 2**30:g} GiB the interleaved benchmark may keep open at once"
        )
        return {"measured": False, "reason": reason}, [f"host latency not measured: {reason}"]
    feeds = make_feeds(models["source"], samples, role, seed=seed)
    rule = StopRule(runs=COMPILE_RUNS, seconds=seconds, min_runs=5, warmup=2)
    return latency_section(
        models,
        feeds,
        rule,
        preferred_providers=target.runtime.execution_providers,
        target_name=target.name,
        host=host,
        seed=seed,
    )


def slower_than_source(
    section: dict[str, Any], target: Any, host: HostInfo | None, compiled: onnx.ModelProto | None = None
) -> list[str]:
    """A warning when the compiled model measured slower than its source on a host with the target's ISA, naming the
    likelier cause: layers kept float (PP-OCRv4 rec at a 0.5-point budget: 48 of them, 1.22x the fp32 latency), or,
    with none, int8 kernels slower than float ones on small layers (PP-OCR's direction classifier, 8-200 channels:
    1.4x); other hosts cannot stand in for it."""
    ratio = (section.get("ratios") or {}).get("compiled")
    if not ratio:
        return []
    low, high = ratio.get("paired_ci") or (ratio["ci_low"], ratio["ci_high"])  # paired rounds: the tighter interval
    if low <= 1.0 or not set(target.hardware.isa) <= set((host or detect_host()).isa):  # detected only when slower
        return []
    measured = (
        f"the compiled model ran {ratio['ratio']:.2f}x the source's p50 latency on this host, which has the "
        f"target's ISA (95% CI {low:.2f}-{high:.2f}): it is slower than the model given; "
    )
    float_layers, int8_layers = compute_layers(compiled) if compiled is not None else (1, 0)
    if float_layers or not int8_layers:
        return [
            measured + "layers kept float to meet the accuracy budget can cost more in Q/DQ transitions than int8 "
            "saves (the report's quantize step lists them): raise --max-accuracy-drop, or ship the source"
        ]
    exact = next((v.name for v in target.variants[1:] if v.precision == "fp32"), None)
    fix = f"run the bundle's exact {exact} variant there (lepton run --variant {exact})" if exact else "ship the source"
    return [
        measured + f"all {int8_layers} conv/matmul layers run int8, so ONNX Runtime's int8 kernels cost more than "
        f"its float ones on this model's layers (small ones carry their fixed cost): {fix}"
    ]


def compute_layers(model: onnx.ModelProto) -> tuple[int, int]:
    """(float, int8) Conv/ConvTranspose/MatMul/Gemm layers of a QDQ model (``costmodel.int8_mac``)."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    int8 = [costmodel.int8_mac(node, producers) for node in model.graph.node if node.op_type in costmodel.MAC_OPS]
    return int8.count(False), int8.count(True)


def compile_sections(
    source: onnx.ModelProto,
    compiled: onnx.ModelProto,
    target: Any,
    samples: SampleSet | None,
    role: str,
    *,
    bench: bool = True,
    seconds: float = COMPILE_SECONDS,
    seed: int = 0,
    host: HostInfo | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The compile report's ``host_latency`` (source vs compiled, short and time-capped), ``cost_model`` and
    ``budgets`` sections, and warnings. A free batch dim is measured at 1; other unbound dims skip the
    measurement (said in the section) rather than guess sizes the model may not accept."""
    batch_one, unbound = _free_batch_dims(source)
    sections: dict[str, Any] = {}
    warnings: list[str] = []
    if unbound and samples is None:
        sections["host_latency"] = {
            "measured": False,
            "reason": f"inputs {', '.join(unbound)} have unbound dims: pass --input-shape or --calib",
        }
        models = {"source": source, "compiled": compiled}
    else:
        models = {"source": bind_like(source, batch_one), "compiled": bind_like(compiled, batch_one)}
        sections["host_latency"], warnings = _compile_latency(
            models, target, samples, role, bench=bench, seconds=seconds, seed=seed, host=host
        )
        warnings += slower_than_source(sections["host_latency"], target, host, compiled)
    sections["cost_model"] = costmodel.cost_model_section(target, models)
    sections["budgets"] = costmodel.budgets_section(
        target, compiled.ByteSize() + external_bytes(compiled), sections["cost_model"]["models"]["compiled"], "compiled"
    )
    return sections, warnings
