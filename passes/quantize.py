"""quantize: per-target int8/fp16 schemes, streamed calibration, accuracy-aware tuning within the budget.

Schemes (``QuantizeParams.scheme``; each target's TOML says which and why):
* ``int8``: static QDQ int8 through ONNX Runtime's ``quantize_static`` after its pre-processing;
  activation/weight types, per-channel weights, symmetric ranges, ``reduce_range`` (``auto``: on for
  an x86 target without VNNI) and power-of-two scales (DPU) are parameters;
* ``fp16``: fp16 compute and weights, fp32 graph I/O, ops that overflow kept in fp32;
* ``int8_weight_only``: int8 weights with DequantizeLinear, float compute (size, not speed);
* ``int8_dynamic``: dynamic int8 MatMul/Gemm/LSTM (transformers, RNNs); ``int4_weight_only``:
  4-bit MatMulNBits blocks (MatMul with constant weights only).
Calibration (``lepton_cli.passes._quantize.calibration``) is streamed chunk by chunk over --calib and the
tuning (``lepton_cli.passes._quantize.tuning``) keeps the most harmful layers in float and tries the
calibration methods until the accuracy budget holds, keeping the most-int8 model that meets it;
nothing meets it: exit 3 with every candidate tried. Without --calib a static-int8 target falls
back to ``without_calib`` (weight-only or dynamic int8, warned) or fails with exit 2.

Libraries checked: ONNX Runtime's quantization tools (used for all the arithmetic); see the
modules in ``lepton_cli/quant/`` for what each adds and why.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any, Callable, Literal

import onnx
from lepton_cli.passes._quantize import fp16_safe, schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.consumer_ranges import narrow_to_readers
from lepton_cli.passes._quantize.heads import find_heads, head_overrides
from lepton_cli.passes._quantize.integer_io import make_integer_io
from lepton_cli.passes._quantize.prequantized import describe, has_subgraphs, quantized_ops
from lepton_cli.passes._quantize.recovery import RecoverySettings, recover
from lepton_cli.passes._quantize.short_names import shorten_added_names
from lepton_cli.passes._quantize.tuning import Trial, keep_float_nodes, quantized_nodes, search
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from lepton_cli import console
from lepton_cli.errors import BadInputError, QualityGateError
from lepton_cli.evaluate.accuracy import EXACT_INTEGER, VNNI_ISA, X86_ISA, scoring_opt_level
from lepton_cli.model.external_data import has_external, inline_copy
from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import LOSSY, PassEnv, PassResult, register_pass

Method = Literal["minmax", "percentile", "entropy", "mse"]
SENSITIVITY_SAMPLES = 8
# The target has VNNI but this host does not: this host's AVX2 kernels would saturate u8·s8 sums that
# VNNI does not, so candidates are scored unfused (exact integer arithmetic, accuracy.scoring_opt_level)
# and weights keep their full 8-bit range. (Scoring with the host's kernels instead, as an earlier
# version did, measured PP-OCRv4 rec agreement drop 4.9 full range vs 3.7 with 7-bit weights: the
# saturation of a kernel the target does not run, not the model's int8 error.)
HOST_WITHOUT_VNNI = (
    "this build host's int8 kernels saturate (x86 without VNNI), the target's do not: full-range "
    "weights, accuracy scored with exact integer arithmetic (QDQ unfused)"
)


@dataclass(frozen=True)
class QuantizeParams:
    scheme: Literal["int8", "fp16", "int8_weight_only", "int8_dynamic", "int4_weight_only"] = "int8"
    activation_type: Literal["u8", "s8"] = "u8"
    weight_type: Literal["s8", "u8"] = "s8"
    per_channel: bool = True
    reduce_range: Literal["auto", "on", "off"] = "auto"  # auto: on for x86 targets without VNNI
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    power_of_two_scales: bool = False  # symmetric per-tensor int8 with 2^k scales (DPU fix-point)
    op_types: list[str] = field(default_factory=list)  # empty: every op ORT quantizes
    # Tried before op_types when set (empty: every op ORT quantizes): kept when the search finds a candidate
    # within the budget (more int8, fewer Q/DQ transitions: faster), else the search runs again with op_types.
    fast_op_types: list[str] | None = None
    methods: list[Method] = field(default_factory=lambda: ["minmax", "percentile", "entropy"])  # tried in order
    percentile: float = 99.999
    histogram_bins: int = 2048
    entropy_bins: int = 512
    calib_chunk: int = 16  # samples whose activations are held in memory at once
    max_calib_samples: int = 256
    tune: bool = True  # False: quantize with methods[0], everything, no search
    max_float_layers: int = 32  # most layers the search may keep in float
    float_kept_weights: Literal["int8", "float"] = (
        "float"  # int8: float-kept layers compute in float on int8-stored weights
    )
    # A candidate meets the budget when the one-sided upper confidence bound of its drop does, at this
    # level (0.5: the measured drop). PP-OCRv4 rec, cpu-avx, 200 labelled tuning lines: a candidate at
    # 0.43 ± 0.21 of a 0.5 budget dropped 0.64 on 200 other lines.
    budget_confidence: float = 0.8
    max_eval_samples: int = (
        1000  # as many as compile's accuracy gate scores, so the search decides what the gate will see
    )
    budget_share: float = 1.0  # share of the accuracy budget this pass may spend (earlier lossy passes spend the rest)
    without_calib: Literal["weight_only", "dynamic", "fail"] = "weight_only"
    fp16_block_ops: list[str] = field(default_factory=lambda: list(schemes.FP16_BLOCK_DEFAULT))
    int4_block_size: int = 32
    preprocess: bool = True  # ORT's quant_pre_process (shape inference + basic optimisation) before int8
    warn_float_ops: bool = False  # integer-only hardware: warn about every op left in float
    integer_io: bool = (
        False  # int8: integer graph inputs/outputs, scale and zero point in metadata (quant/integer_io.py)
    )
    # Accuracy recovery before any layer is kept float (quant/recovery.py); off unless a target measured a gain.
    equalize: bool = False  # cross-layer equalisation of conv pairs joined by ReLU-family activations (exact in float)
    smoothquant_alpha: float | None = (
        None  # SmoothQuant for MatMul/Gemm inputs after a LayerNorm: share moved to weights
    )
    bias_correction: bool = False  # fold each weight layer's mean int8 output error into its bias
    adaround: bool = False  # optimise each layer's weight rounding against its float output on --calib
    adaround_iterations: int = 200
    adaround_seconds: float = 120.0  # whole-model budget; layers past it round to nearest
    recovery_samples: int = 32  # --calib samples the bias correction and rounding measure layer inputs on
    # Output heads one int8 scale cannot hold (quant/heads.py): a Concat of far-apart ranges, a decoding Softmax.
    # auto: float when the target may keep layers float (max_float_layers > 0), else int8 with a warning.
    head_precision: Literal["auto", "float", "int16", "int8"] = "auto"
    head_range_ratio: float = 4.0  # Concat inputs this many times apart in range (2 bits of int8) make a mixed head

    def __post_init__(self) -> None:
        if not self.methods:
            raise ParamValueError("methods", "give at least one calibration method")
        if not 90.0 < self.percentile <= 100.0:
            raise ParamValueError("percentile", f"must be in (90, 100], got {self.percentile}")
        if self.entropy_bins < 256 or self.histogram_bins < 256:
            raise ParamValueError(
                "entropy_bins", "histograms need >= 256 bins (with 128 every entropy threshold is the full range)"
            )
        for name in ("calib_chunk", "max_calib_samples", "max_eval_samples", "int4_block_size"):
            if getattr(self, name) < 1:
                raise ParamValueError(name, "must be >= 1")
        if self.max_float_layers < 0:
            raise ParamValueError("max_float_layers", "must be >= 0")
        if self.integer_io and self.scheme != "int8":
            raise ParamValueError(
                "integer_io", 'needs scheme = "int8" (static quantization gives inputs and outputs a scale)'
            )
        if not 0 < self.budget_share <= 1:
            raise ParamValueError("budget_share", "must be in (0, 1]")
        if not 0.5 <= self.budget_confidence < 1:
            raise ParamValueError("budget_confidence", f"must be in [0.5, 1), got {self.budget_confidence}")
        if self.smoothquant_alpha is not None and not 0 < self.smoothquant_alpha < 1:
            raise ParamValueError("smoothquant_alpha", f"must be in (0, 1), got {self.smoothquant_alpha}")
        if self.head_precision == "int16" and self.power_of_two_scales:
            raise ParamValueError(
                "head_precision", "int16 heads need 16-bit Q/DQ, which power-of-two (DPU) targets lack"
            )
        if self.head_range_ratio <= 1:
            raise ParamValueError("head_range_ratio", f"must be > 1, got {self.head_range_ratio}")
        if self.recovery_samples < 1 or self.adaround_iterations < 1 or self.adaround_seconds <= 0:
            raise ParamValueError(
                "recovery_samples", "recovery_samples, adaround_iterations and adaround_seconds must be > 0"
            )
        if self.int4_block_size & (self.int4_block_size - 1) or self.int4_block_size < 16:
            raise ParamValueError("int4_block_size", "must be a power of two >= 16")


def _reduce_range(params: QuantizeParams, target_isa: list[str], host_isa: list[str]) -> tuple[bool, str]:
    """(reduce_range, why). u8·s8 pairs summed in int16 by VPMADDUBSW saturate without VNNI; 7-bit weights avoid it."""
    if params.reduce_range != "auto":
        return params.reduce_range == "on", "set in the target"
    if params.activation_type != "u8":
        return False, "signed activations: no u8·s8 int16 saturation"
    if any(i in X86_ISA for i in target_isa) and not any(i in VNNI_ISA for i in target_isa):
        return True, "x86 target without VNNI"
    if scoring_opt_level(target_isa, host_isa) == EXACT_INTEGER:
        return False, HOST_WITHOUT_VNNI
    return False, "target has VNNI"


def _int8_scheme(params: QuantizeParams, reduce_range: bool) -> schemes.Int8Scheme:
    pow2 = params.power_of_two_scales
    return schemes.Int8Scheme(
        activation_type="s8" if pow2 else params.activation_type,
        weight_type="s8" if pow2 else params.weight_type,
        per_channel=params.per_channel and not pow2,
        reduce_range=reduce_range,
        activation_symmetric=params.activation_symmetric or pow2,
        weight_symmetric=params.weight_symmetric or pow2,
        power_of_two=pow2,
        op_types=tuple(params.op_types),
    )


def _float_ops(model: onnx.ModelProto, supported: list[str]) -> list[dict[str, str]]:
    """Compute nodes that do not run in integer arithmetic (or not on the target at all)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = set(quantized_nodes(model))
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if supported and node.op_type not in supported:
            out.append(
                {"node": node.name, "op": node.op_type, "why": "op not supported by the target (runs on the host)"}
            )
        elif node.name not in quantized and not all(i in dq_out or not i for i in node.input[:1]):
            out.append({"node": node.name, "op": node.op_type, "why": "float (not quantized)"})
    return out


def _isa_warning(ctx: Any) -> None:
    target_isa = set(ctx.target.hardware.isa)
    host_isa = set(ctx.host.isa)
    missing = sorted(target_isa - host_isa)
    if host_isa and missing:
        ctx.warn(
            f"the build host ({ctx.host.arch or platform.machine()}) lacks {', '.join(missing)} of target "
            f"{ctx.target.name!r}: latencies measured here are this host's int8 kernels, not the target's "
            "(the search does not use them; the report's benchmark does)"
        )


class _CalibProgress:
    """A progress bar on stderr while calibration data streams through the model (silent with --quiet)."""

    def __init__(self, label: str):
        self.progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            console=console.stderr,
            transient=True,
            disable=console.settings.quiet,
        )
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("calib", total=total)
        self.progress.update(self.task, completed=done)
        if done >= total:
            self.progress.stop()


def _fallback(model: onnx.ModelProto, ctx: Any, params: QuantizeParams) -> PassResult:
    if params.without_calib == "fail":
        raise BadInputError(
            f"target {ctx.target.name!r} needs static int8 quantization and no --calib data was given",
            "pass --calib samples.npz (or an image folder with --preprocess); this target forbids a weight-only fallback",
        )
    if params.without_calib == "dynamic":
        result = schemes.dynamic_int8(model, ctx.work_dir, params.per_channel)
        what = "dynamic int8 (MatMul/Gemm weights int8, activations quantized at run time)"
    else:
        result, _ = schemes.weight_only_int8(model)
        what = "int8 weight-only (weights int8, compute float)"
    ctx.warn(f"no --calib data: static int8 needs calibration, fell back to {what}; pass --calib for full int8")
    return PassResult(
        result,
        {
            "scheme": params.without_calib,
            "fallback": True,
            "fallback_reason": "no --calib data",
            "int8_weights": _int8_initializers(result),
        },
    )


def _weights_only(ctx: Any, params: QuantizeParams) -> bool:
    """Whether this run only rewrites weights (no ORT quantizer or calibrator sees the whole model)."""
    fallback = params.scheme == "int8" and ctx.calib is None and params.without_calib == "weight_only"
    return params.scheme in ("int8_weight_only", "int4_weight_only") or fallback


def _int8_initializers(model: onnx.ModelProto) -> int:
    return sum(
        1
        for i in model.graph.initializer
        if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) >= 2
    )  # weights; zero points are scalars or vectors


def _evaluation(model: onnx.ModelProto, ctx: Any, params: QuantizeParams):
    """(calibration samples, evaluator or None, what the evaluator scores): the compile's shared scorer
    (against the source, on the data the final gate scores) and the calibration part of the split."""
    calib, _, _ = ctx.scoring_data()
    scorer, scored_on = ctx.scorer(model)
    return calib, (scorer.subset(params.max_eval_samples) if scorer is not None else None), scored_on


def _tried_line(trials: list[Trial]) -> str:
    tiers = len({tuple(t.op_types or ()) for t in trials})

    def label(t: Trial) -> str:  # which op types only when several were tried
        return t.method if tiers < 2 or t.op_types is None else f"{t.method}[{','.join(t.op_types) or 'all ops'}]"

    return "; ".join(f"{label(t)}+{len(t.float_nodes)}{t.rule_tag} float: drop {t.drop_pct:.2f}" for t in trials)


def _int8_builder(
    base: onnx.ModelProto,
    calib: Any,
    params: QuantizeParams,
    scheme: schemes.Int8Scheme,
    work_dir: Any,
    tag: str,
    narrowed: dict[str, list[str]],
    source: onnx.ModelProto | None = None,
    exclude: list[str] | None = None,
) -> Callable[[str, list[str]], onnx.ModelProto]:
    """(method, float-kept nodes) -> candidate, for one set of op types; calibration and the fully
    quantized model are computed once per method. ``narrowed`` gets, per method, the tensors whose
    calibrated range was cut to what their readers can tell apart (quant/consumer_ranges.py)."""
    ranges: dict[str, Any] = {}
    full: dict[str, onnx.ModelProto] = {}
    # Only the tensors around the ops being quantized need ranges (histograms of every tensor are slow).
    calib_ops = list(scheme.op_types) or None
    source = base if source is None else source  # recovery's adjusted weights; float-kept layers read ``base``

    def build(method: str, keep: list[str]) -> onnx.ModelProto:
        if method not in ranges:
            settings = CalibrationSettings(
                method=method,
                chunk=params.calib_chunk,
                max_samples=params.max_calib_samples,
                percentile=params.percentile,
                histogram_bins=params.histogram_bins,
                entropy_bins=params.entropy_bins,
            )
            data = calibrate(source, calib, settings, _CalibProgress(f"calibrating ({method})"), calib_ops)
            narrowed[method] = narrow_to_readers(source, data)
            ranges[method] = schemes.save_ranges(data, work_dir / f"ranges-{tag}-{method}.json")
        if method not in full:
            full[method] = schemes.quantize_int8(source, ranges[method], method, scheme, list(exclude or []), work_dir)
        # Float-kept nodes are bypassed in the fully quantized model, exactly as the sensitivity search
        # measured them. Re-quantizing with ORT's nodes_to_exclude instead changed neighbouring Q/DQ and
        # was not monotonic (PP-OCRv4 rec, S8S8, CTC drop for k = 1..16 kept: 0.92, 0.92, 1.03, 1.15,
        # 1.61; bypassed: 0.80, 0.92, 0.92, 0.80, 0.69).
        return keep_float_nodes(full[method], base, keep, params.float_kept_weights == "float")

    return build


def _recover(
    base: onnx.ModelProto, calib: Any, params: QuantizeParams, scheme: schemes.Int8Scheme, summary: dict[str, Any]
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(float reference, model to quantize) after the enabled recovery steps (quant/recovery.py)."""
    settings = RecoverySettings(
        equalize=params.equalize,
        smoothquant_alpha=params.smoothquant_alpha,
        bias_correction=params.bias_correction,
        adaround=params.adaround,
        adaround_iterations=params.adaround_iterations,
        adaround_seconds=params.adaround_seconds,
        samples=params.recovery_samples,
    )
    if not (settings.equalize or settings.per_layer or settings.smoothquant_alpha is not None):
        return base, base
    feeds = list(calib.feeds(params.recovery_samples))
    recovered = recover(base, feeds, scheme, settings, console.note)
    summary["recovery"] = recovered.summary
    return recovered.reference, recovered.quantize_source


def _heads(
    model: onnx.ModelProto,
    calib: Any,
    params: QuantizeParams,
    scheme: schemes.Int8Scheme,
    ctx: Any,
    summary: dict[str, Any],
) -> tuple[list[str], schemes.Int8Scheme]:
    """(nodes ORT leaves float, scheme with 16-bit overrides) for the heads one int8 scale cannot hold."""
    found = find_heads(model, list(calib.feeds(8)), params.head_range_ratio)
    if not found:
        return [], scheme
    precision = params.head_precision
    if precision == "auto":
        precision = "float" if params.max_float_layers > 0 else "int8"
    summary["heads"] = [{"output": h.output, "nodes": h.nodes, "why": h.why, "precision": precision} for h in found]
    nodes = [n for h in found for n in h.nodes]
    if precision == "int8":
        mixed = [h for h in found if h.ranges]  # a Concat of far-apart ranges; an 8-bit Softmax only loses resolution
        if mixed:
            ctx.warn(
                f"{len(mixed)} output head(s) mix ranges one int8 scale cannot hold ({mixed[0].why}); this target "
                'keeps them int8: set head_precision = "float" or "int16" where the runtime allows'
            )
        return [], scheme
    if precision == "float":
        return nodes, scheme
    return [], replace(scheme, extra=scheme.extra | head_overrides(model, nodes, scheme.activation_type))


FP16_PROBE_SAMPLES = (
    64  # data samples whose fp32 ranges decide what stays fp32 (and that the fp16 model must pass finite)
)


def _fp16_probe_count(ctx: Any, params: QuantizeParams) -> int:
    data = ctx.calib if ctx.calib is not None else ctx.eval
    return min(len(data), FP16_PROBE_SAMPLES, params.max_calib_samples) if data is not None else 4


def _fp16_model(model: onnx.ModelProto, params: QuantizeParams, keep: list[str]) -> onnx.ModelProto:
    converted = schemes.to_fp16(model, params.fp16_block_ops, keep)
    fp16_safe.collapse_round_trip_casts(converted)
    return converted


def _fp16_plan(model: onnx.ModelProto, ctx: Any, params: QuantizeParams) -> fp16_safe.Fp16Plan:
    """Which nodes stay fp32 so the fp16 model is finite on the calibration data (else the check feeds)."""
    feeds = ctx.sample_feeds(model, _fp16_probe_count(ctx, params))
    if ctx.calib is not None or ctx.eval is not None:  # data is in the source layout (NCHW)
        feeds = [adapt_feed(model, feed) for feed in feeds]
    plan, _ = fp16_safe.plan_fp16(model, feeds, lambda keep: _fp16_model(model, params, keep))
    return plan


def requires(ctx: PassEnv, params: QuantizeParams) -> None:
    """A target that forbids the fallback needs --calib for static int8, known before any pass runs."""
    if params.scheme == "int8" and params.without_calib == "fail" and ctx.calib is None:
        raise BadInputError(
            f"target {ctx.target.name!r} needs static int8 quantization and no --calib data was given",
            "pass --calib samples.npz (or an image folder with --preprocess); this target forbids a weight-only fallback",
        )


@register_pass(
    "quantize",
    params=QuantizeParams,
    exactness=LOSSY,
    order=40,
    requires=requires,
    description="int8/fp16 per target scheme; streamed calibration; keeps sensitive layers in float to meet the accuracy budget",
)
def quantize(model: onnx.ModelProto, ctx: Any, params: QuantizeParams) -> PassResult:
    existing = quantized_ops(model)
    if existing:  # keep the model's own quantization (quant/prequantized.py)
        ctx.warn(
            f"the model is already quantized ({describe(existing)}): kept as it is, not quantized again; "
            f"compile the float model for {params.scheme} tuned to the accuracy budget"
        )
        return PassResult(model, {"scheme": params.scheme, "applied": "none", "already_quantized": dict(existing)})
    schemes.name_nodes(model)
    if has_external(model) and not _weights_only(ctx, params):
        # ORT's quantizers and calibrators take one whole protobuf; weight-only schemes read a tensor at a time.
        model = inline_copy(model, f"quantize scheme {params.scheme!r}")
    if params.scheme == "int8_weight_only":
        result, names = schemes.weight_only_int8(model)
        return PassResult(result, {"scheme": params.scheme, "int8_weights": len(names)})
    if params.scheme == "int8_dynamic":
        result = schemes.dynamic_int8(model, ctx.work_dir, params.per_channel)
        return PassResult(result, {"scheme": params.scheme, "int8_weights": _int8_initializers(result)})
    if params.scheme == "int4_weight_only":
        result, count = schemes.int4_weight_only(model, params.int4_block_size)
        return PassResult(result, {"scheme": params.scheme, "matmul_nbits": count})
    if params.scheme == "int8" and ctx.calib is None:
        return _fallback(model, ctx, params)

    budget = ctx.lossy_budget(params.budget_share)
    calib, evaluator, scored_on = _evaluation(model, ctx, params)
    summary: dict[str, Any] = {"scheme": params.scheme, "budget_pct": round(budget, 4), "scored_on": scored_on}

    if params.scheme == "fp16":
        # Activations beyond fp16's range (measured on the data, else random inputs) stay fp32; verified finite.
        plan = _fp16_plan(model, ctx, params)
        overflow = plan.kept
        summary["fp16_range"] = {
            "probe_samples": _fp16_probe_count(ctx, params),
            "beyond_range": len(plan.overflow),
            "nonfinite_in_fp16": plan.nonfinite,
            "rounds": plan.rounds,
            "finite": plan.finite,
        }
        if overflow:
            ctx.warn(f"{len(overflow)} node(s) produce values beyond fp16's range and stay fp32")
            summary["fp16_overflow_kept"] = overflow
        if not plan.finite:
            ctx.warn("the fp16 model still returns inf/NaN on the data after keeping overflowing nodes fp32")
        candidates = [
            n.name for n in model.graph.node if n.op_type not in params.fp16_block_ops and n.name not in overflow
        ]

        def build(method: str, keep: list[str]) -> onnx.ModelProto:
            return _fp16_model(model, params, sorted(set(keep) | set(overflow)))

        builds, tiers = [build], [[]]
        methods = ["fp16"]
        base = model
    else:
        _isa_warning(ctx)
        reduce_range, rr_why = _reduce_range(params, list(ctx.target.hardware.isa), list(ctx.host.isa))
        if rr_why == HOST_WITHOUT_VNNI:
            ctx.warn(rr_why)
        scheme = _int8_scheme(params, reduce_range)
        base = schemes.preprocess(model, ctx.work_dir, optimize=params.preprocess)
        summary |= {
            "activation_type": scheme.activation_type,
            "weight_type": scheme.weight_type,
            "per_channel": scheme.per_channel,
            "reduce_range": reduce_range,
            "reduce_range_why": rr_why,
            "activation_symmetric": scheme.activation_symmetric,
            "power_of_two_scales": scheme.power_of_two,
            "calibration_samples": min(len(calib), params.max_calib_samples),
        }
        fast = params.fast_op_types
        tiers = ([list(fast)] if fast is not None and sorted(fast) != sorted(params.op_types) else []) + [
            list(params.op_types)
        ]
        narrowed: dict[str, list[str]] = {}
        base, source = _recover(base, calib, params, scheme, summary)
        head_nodes, scheme = _heads(source, calib, params, scheme, ctx, summary)
        builds = [
            _int8_builder(
                base,
                calib,
                params,
                replace(scheme, op_types=tuple(ops)),
                ctx.work_dir,
                f"t{i}",
                narrowed,
                source,
                head_nodes,
            )
            for i, ops in enumerate(tiers)
        ]
        methods = list(dict.fromkeys(params.methods))
        candidates = None

    if evaluator is None or not params.tune:
        result = builds[-1](methods[0], [])
        summary |= {"method": methods[0], "tuned": False}
        if params.scheme == "int8":
            summary["op_types"] = tiers[-1]
    else:
        feeds = evaluator.first_feeds(SENSITIVITY_SAMPLES)
        if candidates is not None:  # fp16: every unblocked node may be kept in float

            def pick(m: onnx.ModelProto) -> list[str]:
                return candidates
        else:
            pick = quantized_nodes
        trials: list[Trial] = []
        for tier, build in enumerate(builds):
            if len(builds) > 1:
                console.note(
                    f"  op types: {', '.join(tiers[tier]) or 'every op ONNX Runtime quantizes'}"
                    + (" (fast_op_types, tried first)" if tier < len(builds) - 1 else "")
                )
            found = search(
                build,
                methods,
                evaluator,
                budget,
                base,
                feeds[:SENSITIVITY_SAMPLES],
                max_float=params.max_float_layers,
                candidates=pick,
                note=console.note,
                float_weights=params.float_kept_weights == "float",
                z=NormalDist().inv_cdf(params.budget_confidence),
            )
            for trial in found.trials:
                trial.op_types = tiers[tier] if params.scheme == "int8" else None
            trials += found.trials
            if found.best is not None:
                break
        summary |= {
            "tried": [t.to_dict() for t in trials],
            "worst_layers": [{"node": n, "output_nsr_gain_if_float": round(v, 6)} for n, v in found.sensitivity[:10]],
        }
        if found.best is None:
            raise QualityGateError(
                f"quantize: no candidate met the accuracy budget of {budget:g} points ({scored_on}); tried: {_tried_line(trials)}",
                'raise --max-accuracy-drop or max_float_layers, give more representative --calib data, or use scheme = "fp16"',
            )
        result = found.best
        assert found.best_trial is not None
        summary |= {
            "method": found.best_trial.method,
            "tuned": True,
            "float_kept": found.best_trial.float_nodes,
            "drop_pct": found.best_trial.drop_pct,
            "value": found.best_trial.value,
        }
        if params.scheme == "int8":
            summary["op_types"] = found.best_trial.op_types
    if params.scheme == "int8" and not quantized_ops(result) and has_subgraphs(model):
        ctx.warn(
            "nothing was quantized: the model computes inside If/Loop branches, which ONNX Runtime's quantizer "
            "leaves float; the compiled model stays float"
        )
        return PassResult(model, summary | {"applied": "none", "int8_weights": 0})
    float_ops = _float_ops(result, list(ctx.target.runtime.supported_ops)) if params.scheme == "int8" else []
    if float_ops:
        summary["float_ops"] = float_ops
        if params.warn_float_ops:
            ctx.warn(
                f"{len(float_ops)} ops left in float would run on the host: "
                + ", ".join(sorted({f["op"] for f in float_ops}))
            )
    if params.integer_io:
        result, converted, kept = make_integer_io(result)
        summary["integer_io"] = converted
        for reason in kept:
            ctx.warn(f"integer_io: {reason}; it stays float")
    if params.scheme == "int8":
        summary["ranges_narrowed_to_readers"] = len(narrowed.get(summary["method"], []))
        source_names = (
            {t.name for t in base.graph.initializer}
            | {n.name for n in base.graph.node}
            | {x for n in base.graph.node for x in list(n.input) + list(n.output)}
        )
        summary["name_bytes_saved"] = shorten_added_names(result, source_names)
        if len(result.graph.value_info):
            # ORT's quant_pre_process annotated every intermediate tensor's shape; runtimes infer them again
            # at load. PP-OCRv4 det int8: 19.5 KB of 1.43 MB (the difference between 0.301x and 0.297x fp32).
            summary["shape_annotations_dropped"] = len(result.graph.value_info)
            del result.graph.value_info[:]
    summary["int8_weights"] = _int8_initializers(result)
    return PassResult(result, summary)
