"""Static QDQ int8 through ONNX Runtime's ``quantize_static``, after its pre-processing.

The plan fixes the arithmetic once from the parameters and the target (``schemes.Int8Scheme``:
activation/weight types, per-channel weights, symmetric ranges, ``reduce_range``, power-of-two
scales for a DPU), then offers the tuner one build per op-type tier: calibration per method,
cached, with the enabled recovery steps and the output heads one int8 scale cannot hold. The
chosen candidate is finished for the target: float ops reported, integer I/O for a full-integer
accelerator, names shortened, shape annotations dropped.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from lepton_cli.passes._quantize import attention_balance, residual_scaling, schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.chip_norms import norms_as_l2
from lepton_cli.passes._quantize.consumer_ranges import narrow_to_readers
from lepton_cli.passes._quantize.depthwise_scales import (
    channel_ranges,
    channel_scaled_inputs,
    depthwise_inputs,
    per_channel_depthwise_inputs,
    scaled_reference,
)
from lepton_cli.passes._quantize.float_hard_swish import restore_hard_swish
from lepton_cli.passes._quantize.float_keep import keep_float_nodes
from lepton_cli.passes._quantize.heads import find_heads, head_overrides
from lepton_cli.passes._quantize.int8_fits import Int8Fits
from lepton_cli.passes._quantize.integer_elementwise import lowered, rewritten
from lepton_cli.passes._quantize.integer_io import make_integer_io
from lepton_cli.passes._quantize.plan import SearchPlan, int8_weights
from lepton_cli.passes._quantize.prequantized import has_subgraphs, quantized_ops
from lepton_cli.passes._quantize.recovery import GRAPH_STEPS, Recovered, RecoverySettings, changed_by, recover
from lepton_cli.passes._quantize.recurrent import DYNAMIC_LSTM, float_recurrent_warning
from lepton_cli.passes._quantize.short_names import shorten_added_names
from lepton_cli.passes._quantize.source_tiers import (
    RECOVERY,
    SourceTier,
    source_tiers,
    tier_changed,
    tier_summary,
)
from lepton_cli.passes._quantize.tuning import Build, SearchSpace, TierUnavailable, ranking_build
from lepton_cli.passes._quantize.weight_blocks import max_scale, split_weight_blocks
from lepton_cli.passes._quantize.weight_layers import weight_layers

from lepton_cli.evaluate.accuracy import EXACT_INTEGER, VNNI_ISA, X86_ISA, scoring_opt_level
from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.pipeline.registry import BudgetUse, PassResult
from lepton_cli.samples.sample_set import SampleSet

# The target has VNNI, this host does not: its AVX2 kernels would saturate u8·s8 sums the target's do not,
# so candidates are scored with exact integer arithmetic (QDQ unfused) and weights keep their full 8 bits.
HOST_WITHOUT_VNNI = (
    "this build host's int8 kernels saturate (x86 without VNNI), the target's do not: full-range "
    "weights, accuracy scored with exact integer arithmetic (QDQ unfused)"
)


def reduce_range(params: Any, target_isa: list[str], host_isa: list[str]) -> tuple[bool, str]:
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


def int8_scheme(params: Any, reduced: bool) -> schemes.Int8Scheme:
    """The arithmetic: power-of-two scales force symmetric per-tensor s8 (DPU fix-point)."""
    pow2 = params.power_of_two_scales
    return schemes.Int8Scheme(
        activation_type="s8" if pow2 else params.activation_type,
        weight_type="s8" if pow2 else params.weight_type,
        per_channel=params.per_channel and not pow2,
        reduce_range=reduced,
        activation_symmetric=params.activation_symmetric or pow2,
        weight_symmetric=params.weight_symmetric or pow2,
        power_of_two=pow2,
        op_types=tuple(params.op_types),
        dynamic_lstm=params.dynamic_lstm,
        extra=matmul_output_options(params.float_matmul_outputs),
    )


# Layers ORT runs on integer kernels whatever their result's type (MatMulIntegerToFloat, a float-output QGemm)
INTEGER_RESULT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "DynamicQuantizeLSTM", "QLinearConv", "QGemm")
SENTINEL = 1e30  # |x| beyond this is a mask's -inf/finfo.min stand-in, not a value a scale should cover


def sentinel_nodes(model: onnx.ModelProto, ranges: Any) -> list[str]:
    """Nodes reading or writing a tensor whose calibrated range reaches ``SENTINEL`` (an additive attention mask:
    Where(mask, 0, -3.4e38) -> Add): one int8 scale over -3.4e38..x rounds every attention score to 0."""
    huge = {n for n, data in ranges.items() if max(float(np.max(np.abs(v))) for v in data.range_value) >= SENTINEL}
    return [n.name for n in model.graph.node if huge & set(list(n.input) + list(n.output))]


def matmul_output_options(float_outputs: bool) -> dict[str, Any]:
    """ORT options leaving MatMul/Gemm results float (docs/decisions.md, "MatMul outputs").

    ORT's QDQ MatMul and Gemm quantize their output by default; in a transformer that tensor is read
    by float ops (bias/residual Add, Gelu, the attention scale Mul): the Q/DQ rounds it for nothing
    (all-MiniLM-L6-v2: 9.5 of its 11.3 points of cosine drop). Where a reader is quantized, ORT puts
    the same Q at that reader's input, so only float readers change."""
    return {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]} if float_outputs else {}


def _frame_layout_moves(model: onnx.ModelProto) -> set[str]:
    """Transposes taking a graph input to the graph's layout, read only by QuantizeLinear: the channel-last frame's
    move ahead of its quantize (layout_transform's I/O adapter), which an NHWC runtime never runs (the .tflite has
    none), not float arithmetic on the host."""
    inputs, g = {i.name for i in model.graph.input}, GraphIndex(model.graph)
    return {
        node.name
        for node in model.graph.node
        if node.op_type == "Transpose"
        and node.input[0] in inputs
        and {r.op_type for r in g.readers(node.output[0])} == {"QuantizeLinear"}
    }


def float_ops(model: onnx.ModelProto, supported: list[str]) -> list[dict[str, str]]:
    """Compute nodes that do not run in integer arithmetic (or not on the target at all)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    constants = {i.name for i in model.graph.initializer}
    moves = _frame_layout_moves(model)
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in moves:
            continue
        if supported and node.op_type not in supported:
            out.append(
                {"node": node.name, "op": node.op_type, "why": "op not supported by the target (runs on the host)"}
            )
        elif _float_arithmetic(node, dq_out, constants, quantized):
            out.append({"node": node.name, "op": node.op_type, "why": "float (not quantized)"})
    return out


def _float_arithmetic(node: onnx.NodeProto, dq_out: set[str], constants: set[str], quantized: set[str]) -> bool:
    """A float input (neither dequantized nor constant), or dequantized inputs into a result no QuantizeLinear reads
    (a Concat joining residual_blocks' projections). Weight layers with a float result are not: ORT runs them on
    integer kernels."""
    if any(i and i not in dq_out and i not in constants for i in node.input):
        return True
    if node.op_type in INTEGER_RESULT_OPS or not any(i in dq_out for i in node.input):
        return False
    return not any(o in quantized for o in node.output)


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


def _source_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    tensors = {x for n in graph.node for x in list(n.input) + list(n.output)}
    return {t.name for t in graph.initializer} | {n.name for n in graph.node} | tensors


def _fully_quantized_trial(
    summary: dict[str, Any], method: str, ops: list[str], transform: str
) -> dict[str, Any] | None:
    """The search's scored trial of ``method`` with nothing float on op types ``ops`` of source ``transform``, if any."""
    return next(
        (
            t
            for t in summary.get("tried", [])
            if t["method"] == method
            and not t["float_kept"]
            and t["op_types"] == ops
            and t["transform"] == transform
            and t["scored"]
        ),
        None,
    )


def _gain_row(steps: list[str], drop: float, drop_se: float, agreement: dict[str, float]) -> dict[str, Any]:
    snr = agreement.get("snr_db")
    return {
        "steps": steps,
        "drop_pct": round(drop, 4),
        "drop_se": round(drop_se, 4),
        "snr_db": None if snr is None else round(float(snr), 2),
    }


@dataclass(frozen=True)
class _DeferredBuild:
    """A source tier's build, made on first call (its rewritten source costs minutes); ``before_lowering`` is the
    made build's unlowered one, for the sensitivity ranking (``tuning.ranking_build``)."""

    made: Callable[[], tuple[Build, onnx.ModelProto]]

    def __call__(self, method: str, keep: list[str]) -> onnx.ModelProto:
        return self.made()[0](method, keep)

    @property
    def before_lowering(self) -> Build:
        return ranking_build(self.made()[0])


@dataclass
class _RecoveryInputs:
    settings: RecoverySettings
    base: onnx.ModelProto  # the pre-processed model the steps ran on
    feeds: list[dict[str, np.ndarray]]
    calib: SampleSet
    heads: list[str] = field(default_factory=list)  # output-head nodes left float
    scheme: schemes.Int8Scheme | None = None  # with the heads' 16-bit overrides


LOWERED = "integer_elementwise"  # the fallback tier with the lowering (``integer_elementwise_tier``)


class Int8Plan(SearchPlan):
    def __init__(self, params: Any, target_isa: list[str], host_isa: list[str]):
        """``params``: the pass's QuantizeParams; the ISAs decide ``reduce_range`` (see ``reduce_range``)."""
        self.params = params
        reduced, self.reduce_range_why = reduce_range(params, target_isa, host_isa)
        self.scheme = int8_scheme(params, reduced)
        fast = params.fast_op_types
        first = [list(fast)] if fast is not None and sorted(fast) != sorted(params.op_types) else []
        self.tiers = first + [list(params.op_types)]  # fast_op_types first: more int8, fewer Q/DQ transitions
        # Per (tier tag, method), as each build calibrates: tensors whose range was cut to what readers tell apart,
        # and nodes left float around a -inf/finfo.min mask; ``finish`` reports the chosen tier's.
        self.narrowed: dict[tuple[str, str], list[str]] = {}
        # What the int8-model steps fitted, by (tier tag, method): put back when the same model is built again.
        samples = {
            "quantized_adaround": params.recovery_samples,
            "quantized_bias_correction": params.quantized_bias_samples,
        }
        share = params.quantized_adaround_float_share or 0.0
        self.int8_fits = Int8Fits(samples, params.adaround_iterations, share)
        self.sentinel_nodes: dict[tuple[str, str], list[str]] = {}
        self.channel_ranges: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # per tier, depthwise inputs
        # per (tier tag, method): the float reference float-kept convs read, their weights scaled as the int8 ones
        self.channel_scaled: dict[tuple[str, str], onnx.ModelProto] = {}
        self.base = onnx.ModelProto()
        self.unblocked: onnx.ModelProto | None = None  # the source before weight blocks split its convs (fpga)
        self.alignment = 1  # the target's channel alignment (weight blocks are whole multiples of it)
        self.widest: int | None = None  # the most output channels one layer of the target's accelerator computes
        self.recovery: _RecoveryInputs | None = None  # what the steps ran on, for the report's per-step gains
        self.builds: list[Build] = []  # the search space's builds: plain tiers, then the source tiers offered
        self.source_tiers: list[SourceTier] = []
        self.recovered: dict[RecoverySettings, Recovered] = {}  # per source steps, their result (tiers share it)
        # The one fully quantized model held, keyed by (tier tag, method): the tuner tries one tier and method at a
        # time, and a MiniLM-sized model held per tier and method pushed the compile over its memory bar.
        self.quantized: dict[tuple[str, str], onnx.ModelProto] = {}

    def space(self, model: onnx.ModelProto, ctx: Any, calib: SampleSet, summary: dict[str, Any]) -> SearchSpace:
        params, scheme = self.params, self.scheme
        _isa_warning(ctx)
        if self.reduce_range_why == HOST_WITHOUT_VNNI:
            ctx.warn(self.reduce_range_why)
        unblocked = self._chip_norms(
            schemes.preprocess(model, ctx.work_dir, optimize=params.preprocess), calib, summary
        )
        self.alignment = ctx.target.hardware.channel_alignment
        self.widest = ctx.target.runtime.max_layer_channels()
        base = self._weight_blocks(unblocked, self.alignment, summary)
        self.unblocked = unblocked if base is not unblocked else None
        summary |= {
            "activation_type": scheme.activation_type,
            "weight_type": scheme.weight_type,
            "per_channel": scheme.per_channel,
            "reduce_range": scheme.reduce_range,
            "reduce_range_why": self.reduce_range_why,
            "activation_symmetric": scheme.activation_symmetric,
            "power_of_two_scales": scheme.power_of_two,
            "calibration_samples": min(len(calib), params.max_calib_samples),
        }
        self.base, source, recovery_float = self._recover(base, calib, summary, ctx.progress)
        head_nodes, scheme = self._heads(source, calib, ctx, summary)
        if self.recovery is not None:
            self.recovery.heads, self.recovery.scheme = head_nodes, scheme
        exclude = head_nodes + recovery_float
        plain = self._recovery_settings(base)
        on = plain.int8_steps
        builds = [
            self._builder(source, calib, replace(scheme, op_types=tuple(ops)), ctx, f"t{i}", exclude, int8_steps=on)
            for i, ops in enumerate(self.tiers)
        ]
        space = SearchSpace(builds, list(dict.fromkeys(params.methods)), self.base, tiers=list(self.tiers))
        space.transforms, space.references = [""] * len(self.tiers), [lambda: self.base] * len(self.tiers)
        self.source_tiers = source_tiers(params, plain, self._matmul_layers)
        for source_tier in self.source_tiers:
            ops = self.tiers[0] if source_tier.first_ops else self.tiers[-1]
            if source_tier.first_ops:
                space.full_only.add(len(space.builds))
            if source_tier.settings.int8_steps:
                space.one_fit_per_tier.add(len(space.builds))
            tier_scheme = replace(scheme, op_types=tuple(ops))
            made = self._source_tier(source_tier, base, calib, tier_scheme, ctx, exclude, summary)
            self._append_tier(space, source_tier.transform, *made, ops=ops)
        last = replace(scheme, op_types=tuple(self.tiers[-1]))
        if params.integer_elementwise_tier and not params.integer_elementwise:
            space.fallback.add(len(space.builds))
            self._append_tier(space, LOWERED, *self._lowered_tier(source, base, calib, last, ctx, exclude, summary, on))
        self.builds = space.builds
        if params.restore_hard_swish:
            space.verified_rewrite = ("hard_swish_restored", restore_hard_swish)
        return space

    def _append_tier(
        self,
        space: SearchSpace,
        transform: str,
        build: Build,
        reference: Callable[[], onnx.ModelProto],
        ops: list[str] | None = None,
    ) -> None:
        """``build`` as one more tier of op types ``ops`` (default: the last plain tier's), named ``transform``."""
        space.builds.append(build)
        space.tiers.append(self.tiers[-1] if ops is None else ops)
        space.transforms.append(transform)
        space.references.append(reference)

    def _lowered_tier(
        self,
        source: onnx.ModelProto,
        base: onnx.ModelProto,
        calib: SampleSet,
        scheme: schemes.Int8Scheme,
        ctx: Any,
        exclude: list[str],
        summary: dict[str, Any],
        int8_steps: tuple[str, ...],
    ) -> tuple[Build, Callable[[], onnx.ModelProto]]:
        """(build, float reference) of a tier with ``integer_elementwise``'s rewrites, searched only when nothing
        before it fits: on the recovery tier's source where the target has one (PP-OCRv4 det on edge-arm fits only
        so), else the last plain tier's."""
        recovery = next((t for t in self.source_tiers if t.transform == RECOVERY), None)
        if recovery is not None:
            return self._source_tier(recovery, base, calib, scheme, ctx, exclude, summary, LOWERED)
        build = self._builder(source, calib, scheme, ctx, LOWERED, exclude, None, int8_steps, lower=True)
        return build, lambda: self.base

    def _chip_norms(self, model: onnx.ModelProto, calib: SampleSet, summary: dict[str, Any]) -> onnx.ModelProto:
        """LayerNorms as the L2 normalisations an integer chip runs, where the target asks (chip_norms.py)."""
        if not self.params.layer_norm_as_l2:
            return model
        if self.params.residual_scaling_alpha is not None and residual_scaling.has_candidates(model):
            why = "residual scaling undoes its scales in front of it"
            kept = {n.name: why for n in model.graph.node if n.op_type == "LayerNormalization"}
            summary["layer_norms_as_l2"] = {"rewritten": 0, "kept": kept}
            return model
        result, norms = norms_as_l2(model, list(calib.feeds(self.params.recovery_samples)))
        summary["layer_norms_as_l2"] = {"rewritten": len(norms.rewritten), "kept": norms.kept}
        return result

    def _weight_blocks(self, model: onnx.ModelProto, alignment: int, summary: dict[str, Any]) -> onnx.ModelProto:
        """``model`` with Convs and Gemms split into blocks of output channels by weight scale, where the target's
        weights are per tensor and the split gains or a layer is wider than the accelerator (weight_blocks.py)."""
        scheme = self.scheme
        if not self.params.weight_blocks or (scheme.per_channel and not scheme.power_of_two):
            return model
        scale_of = schemes.pow2_weight_scale if scheme.power_of_two else max_scale
        model, split = split_weight_blocks(model, scale_of, alignment, widest=self.widest)
        if split:
            summary["weight_blocks"] = split
        return model

    def _matmul_layers(self) -> bool:
        """Whether a MatMul/Gemm of the last tier's op types has constant weights (what SmoothQuant scales)."""
        ops = self.tiers[-1]
        layers = [layer for layer in weight_layers(self.base) if layer.kind != "conv"]
        return any(not ops or layer.node.op_type in ops for layer in layers)

    def _source_tier(
        self,
        tier: SourceTier,
        base: onnx.ModelProto,
        calib: SampleSet,
        scheme: schemes.Int8Scheme,
        ctx: Any,
        exclude: list[str],
        summary: dict[str, Any],
        lowered_tag: str = "",
    ) -> tuple[Build, Callable[[], onnx.ModelProto]]:
        """(build, float reference) of the last tier on the source ``tier``'s steps made (``source_tiers.py``);
        made on first use: the tuner reaches such a tier only when the choice so far keeps layers float.
        ``lowered_tag``: the same source with integer_elementwise's rewrites, as the tier so named."""

        @functools.cache
        def made() -> tuple[Build, onnx.ModelProto]:
            # The int8-model fits run in each build: tiers whose source steps agree share one recovered source.
            key = replace(tier.settings, quantized_adaround=False, quantized_bias_correction=False)
            if key not in self.recovered:
                ctx.progress(f"{tier.transform} tier: {tier.label}")
                try:
                    recovered = self._recovered(base, tier.settings, list(calib.feeds(tier.settings.samples)))
                except Exception as exc:  # an optional tier: whatever stops its steps leaves the choice so far
                    raise TierUnavailable(
                        f"{tier.label} could not run on this model ({exc.__class__.__name__}: {exc})"
                    ) from exc
                self.recovered[key] = recovered
            recovered = self.recovered[key]
            summary[tier.summary_key] = tier_summary(tier, recovered)
            build = self._builder(
                recovered.quantize_source,
                calib,
                scheme,
                ctx,
                lowered_tag or tier.transform,
                exclude + recovered.float_nodes,
                recovered.reference,
                int8_steps=tier.settings.int8_steps,
                lower=True if lowered_tag else None,
            )
            return build, recovered.reference

        return _DeferredBuild(made), (lambda: made()[1])

    def _builder(
        self,
        source: onnx.ModelProto,
        calib: SampleSet,
        scheme: schemes.Int8Scheme,
        ctx: Any,
        tag: str,
        exclude: list[str],
        reference: onnx.ModelProto | None = None,
        int8_steps: tuple[str, ...] = (),
        lower: bool | None = None,
    ) -> Build:
        """(method, float-kept nodes) -> candidate, for one tier; calibration once per method, the fully quantized
        model kept while the same tier and method are asked for (``self.quantized``).
        ``source`` carries recovery's adjusted weights; float-kept nodes read ``reference`` (default ``self.base``);
        ``int8_steps``: fitted on the fully quantized model against the reference (int8_fits.py); ``lower``: the
        integer_elementwise rewrites (default: as the params say)."""
        params, work_dir = self.params, Path(ctx.work_dir)
        base = self.base if reference is None else reference
        ranges: dict[str, Path] = {}
        calib_ops = list(scheme.op_types) or None  # histograms of every tensor are slow: only around quantized ops

        def build(method: str, keep: list[str]) -> onnx.ModelProto:
            key = (tag, method)
            if key not in self.quantized:
                self.quantized.clear()  # before calibrating: the previous model is not needed again soon
                self.channel_scaled.clear()
            if method not in ranges:
                settings = CalibrationSettings(
                    method=method,
                    chunk=params.calib_chunk,
                    max_samples=params.max_calib_samples,
                    percentile=params.percentile,
                    histogram_bins=params.histogram_bins,
                    entropy_bins=params.entropy_bins,
                    power_of_two=scheme.power_of_two,
                )
                label = f"calibrating ({method})"
                data = calibrate(
                    source, calib, settings, lambda done, total: ctx.progress(label, done, total), calib_ops
                )
                self.narrowed[key] = narrow_to_readers(source, data)
                self.sentinel_nodes[key] = sentinel_nodes(source, data)
                ranges[method] = schemes.save_ranges(data, work_dir / f"ranges-{tag}-{method}.json")
            if key not in self.quantized:
                left = list(exclude) + self.sentinel_nodes[key]
                self.quantized[key] = schemes.quantize_int8(source, ranges[method], method, scheme, left, work_dir)
                if params.depthwise_channel_scales:
                    factors = self._depthwise_channels(tag, source, calib, self.quantized[key])
                    self.channel_scaled[key] = scaled_reference(base, factors)
                if int8_steps:
                    self.int8_fits.apply(key, self.quantized[key], base, calib, int8_steps, ctx.progress)
            # Float-kept nodes are bypassed in the fully quantized model, exactly as the search measured them.
            reference = self.channel_scaled.get(key, base)
            return keep_float_nodes(self.quantized[key], reference, keep, params.float_kept_weights == "float")

        return lowered(build) if (params.integer_elementwise if lower is None else lower) else build

    def _depthwise_channels(
        self, tag: str, source: onnx.ModelProto, calib: SampleSet, quantized: onnx.ModelProto
    ) -> dict[str, tuple[np.ndarray, bool]]:
        """``depthwise_scales``: the depthwise inputs of ``quantized`` per channel, from the tier's channel ranges (one
        pass of the source over --calib per tier); the float weights' factors (``per_channel_depthwise_inputs``)."""
        if tag not in self.channel_ranges:
            feeds = calib.feeds(self.params.max_calib_samples)
            self.channel_ranges[tag] = channel_ranges(source, depthwise_inputs(quantized), feeds)
        return per_channel_depthwise_inputs(quantized, self.channel_ranges[tag], self.scheme.activation_symmetric)

    def _recovered(
        self,
        base: onnx.ModelProto,
        settings: RecoverySettings,
        feeds: list[dict[str, np.ndarray]],
        progress: Callable[[str], None] | None = None,
    ) -> Recovered:
        """``recover`` on ``base``. Weight blocks (fpga) join each split conv's blocks with a Concat, which ends every
        equalisation region and conv pair, and are cut by weight scales the graph rewrites change: there those steps
        run on the source before the blocks, split again after them, and the per-layer fits on the blocks."""
        rewrites = [step for step in settings.steps if step in GRAPH_STEPS]
        if not rewrites or self.unblocked is None:
            return recover(base, feeds, self.scheme, settings, progress)
        rewritten = recover(self.unblocked, feeds, self.scheme, settings.only(rewrites), progress)
        source = self._weight_blocks(rewritten.reference, self.alignment, {})
        fits = recover(
            source, feeds, self.scheme, settings.only([s for s in settings.steps if s not in rewrites]), progress
        )
        summary = rewritten.summary | fits.summary
        return Recovered(fits.reference, fits.quantize_source, summary, rewritten.float_nodes + fits.float_nodes)

    def _recover(
        self, base: onnx.ModelProto, calib: SampleSet, summary: dict[str, Any], progress: Callable[[str], None]
    ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
        """(float reference, model to quantize, nodes to leave float) after the enabled recovery steps (recovery.py)."""
        settings = self._recovery_settings(base)
        if not settings.any_step:
            return base, base, []
        feeds = list(calib.feeds(self.params.recovery_samples))
        recovered = self._recovered(base, settings, feeds, progress)
        summary["recovery"] = recovered.summary | {"steps": settings.steps}
        self.recovery = _RecoveryInputs(settings, base, feeds, calib)
        return recovered.reference, recovered.quantize_source, recovered.float_nodes

    def _recovery_settings(self, model: onnx.ModelProto) -> RecoverySettings:
        """The steps the params enable, for ``model`` (the source before any step)."""
        params, alpha = self.params, self.params.residual_scaling_alpha
        post_ln = residual_scaling.has_candidates(model)
        return RecoverySettings(
            equalize=params.equalize,
            activation_equalize=params.activation_equalize,
            # on where the model has such sums: a CNN neither runs the recovery steps for it nor reports a gain row
            residual_scaling_alpha=alpha if alpha is not None and post_ln else None,
            residual_blocks=params.residual_blocks and post_ln,
            gelu_equalize=params.gelu_equalize,
            attention_balance=params.attention_balance and bool(attention_balance.find_sites(model)),
            smoothquant_alpha=params.smoothquant_alpha,
            smoothquant_insert=params.smoothquant_insert,
            conv_smoothing_alpha=params.conv_smoothing_alpha,
            bias_correction=params.bias_correction,
            quantized_bias_correction=params.quantized_bias_correction,
            quantized_adaround=params.quantized_adaround,
            adaround=params.adaround,
            adaround_iterations=params.adaround_iterations,
            adaround_seconds=params.adaround_seconds,
            samples=params.recovery_samples,
        )

    def report_recovery(self, evaluator: Any, best: Any, ctx: Any, summary: dict[str, Any]) -> None:
        """What each recovery step gained on this model: the chosen method's fully quantized model (chosen op types,
        nothing kept float) scored with the enabled steps switched on one at a time, in the order they apply, then
        with the steps of the source tier the search chose (SmoothQuant, or recovery_tier's). The last row is the model
        the search started from."""
        ops = best.op_types if best.op_types is not None else self.tiers[-1]
        rows = self._step_gains(evaluator, best.method, ops, ctx, summary)
        tier = next((t for t in self.source_tiers if t.transform == best.transform), None)
        if tier is not None:
            if not rows:
                rows = [self._searched_or_scored(evaluator, self._plain_build(ops), [], summary, best.method, ops, "")]
            steps = rows[-1]["steps"] + list(tier.added)
            # what the int8-model fits changed in the chosen method's model (each build fits its own)
            fitted = self.int8_fits.changed((best.transform, best.method))
            summary.get(tier.summary_key, {}).setdefault("changed", {}).update(fitted)
            build = self.builds[len(self.tiers) + self.source_tiers.index(tier)]
            row = self._searched_or_scored(evaluator, build, steps, summary, best.method, ops, best.transform)
            rows.append(row | {"changed": tier_changed(tier, summary)})
        if rows:
            recovery = summary.setdefault("recovery", {"steps": []})
            recovery["gains"] = {"method": best.method, "op_types": ops, "float_kept": 0, "rows": rows}

    def _plain_build(self, ops: list[str]) -> Build:
        """The build of the plain (not smoothed) tier quantizing op types ``ops``."""
        return self.builds[self.tiers.index(list(ops))]

    def _searched_or_scored(
        self,
        evaluator: Any,
        build: Build,
        steps: list[str],
        summary: dict[str, Any],
        method: str,
        ops: list[str],
        transform: str,
    ) -> dict[str, Any]:
        """The gains row of ``build``'s fully quantized model: the search's own trial when it scored one."""
        searched = _fully_quantized_trial(summary, method, ops, transform)
        if searched is not None:
            row = _gain_row(steps, searched["drop_pct"], searched["drop_se"], searched["agreement"])
        else:
            score = evaluator.score(build(method, []))
            row = _gain_row(steps, score.drop_pct, score.drop_se, score.agreement)
        return row | {"changed": ""}

    def _step_gains(
        self, evaluator: Any, method: str, ops: list[str], ctx: Any, summary: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Rows for the enabled recovery steps added in order ([] when none is enabled)."""
        inputs = self.recovery
        if inputs is None or "recovery" not in summary:
            return []
        summary["recovery"] |= self.int8_fits.most()
        rows = []
        for count in range(len(inputs.settings.steps) + 1):
            steps = inputs.settings.steps[:count]
            changed = changed_by(steps[-1], summary["recovery"]) if steps else ""
            if count == len(inputs.settings.steps):  # the model the search started from
                last = self._searched_or_scored(evaluator, self._plain_build(ops), steps, summary, method, ops, "")
                rows.append(last | {"changed": changed})
                continue
            ctx.progress(f"recovery gains: {' + '.join(steps) or 'no step'}")
            settings = inputs.settings.only(steps)
            source, extra = inputs.base, []
            if settings.any_step:
                recovered = self._recovered(inputs.base, settings, inputs.feeds)
                source, extra = recovered.quantize_source, recovered.float_nodes
            scheme = replace(inputs.scheme, op_types=tuple(ops))
            tag, left = f"gain{count}", inputs.heads + extra
            build = self._builder(source, inputs.calib, scheme, ctx, tag, left, int8_steps=settings.int8_steps)
            score = evaluator.score(build(method, []))
            rows.append(_gain_row(steps, score.drop_pct, score.drop_se, score.agreement) | {"changed": changed})
        return rows

    def _heads(
        self, model: onnx.ModelProto, calib: SampleSet, ctx: Any, summary: dict[str, Any]
    ) -> tuple[list[str], schemes.Int8Scheme]:
        """(nodes ORT leaves float, scheme with 16-bit overrides) for the heads one int8 scale cannot hold."""
        params, scheme = self.params, self.scheme
        found = find_heads(model, list(calib.feeds(8)), params.head_range_ratio)
        if not found:
            return [], scheme
        precision = params.head_precision
        if precision == "auto":
            precision = "float" if params.max_float_layers > 0 else "int8"
        summary["heads"] = [{"output": h.output, "nodes": h.nodes, "why": h.why, "precision": precision} for h in found]
        nodes = [n for h in found for n in h.nodes]
        if precision == "int8":
            mixed = [
                h for h in found if h.ranges or h.front_end
            ]  # a Concat of far-apart ranges, a log spectrogram's input; an 8-bit Softmax only loses resolution
            if mixed:
                ctx.warn(
                    f"{len(mixed)} head(s) or front end(s) hold ranges one int8 scale cannot ({mixed[0].why}); this target "
                    'keeps them int8: set head_precision = "float" or "int16" where the runtime allows'
                )
            return [], scheme
        if precision == "float":
            return nodes, scheme
        return [], replace(
            scheme, extra=schemes.merged_options(scheme.extra, head_overrides(model, nodes, scheme.activation_type))
        )

    def finish(
        self,
        source: onnx.ModelProto,
        result: onnx.ModelProto,
        ctx: Any,
        summary: dict[str, Any],
        budget_use: BudgetUse | None,
    ) -> PassResult:
        if not quantized_ops(result) and has_subgraphs(source):
            ctx.warn(
                "nothing was quantized: the model computes inside If/Loop branches, which ONNX Runtime's quantizer "
                "leaves float; the compiled model stays float"
            )
            return PassResult(source, summary | {"applied": "none", "int8_weights": 0})
        self._report_float_ops(result, ctx, summary)
        if self.params.integer_io:
            result, converted, kept = make_integer_io(result)
            summary["integer_io"] = converted
            for reason in kept:
                ctx.warn(f"integer_io: {reason}; it stays float")
        if self.params.integer_elementwise or summary.get("transform") == LOWERED:
            summary["integer_elementwise"] = rewritten(result)
        if self.params.dynamic_lstm:
            summary["dynamic_lstm"] = [n.name for n in result.graph.node if n.op_type == DYNAMIC_LSTM]
        recurrent = float_recurrent_warning(result, self.params.dynamic_lstm, summary.get("float_kept") or [])
        if recurrent:
            ctx.warn(recurrent)
        chosen = (self._tier_tag(summary), summary["method"])
        summary["ranges_narrowed_to_readers"] = len(self.narrowed.get(chosen, []))
        if self.params.depthwise_channel_scales:
            summary["depthwise_inputs_per_channel"] = channel_scaled_inputs(result)
        summary |= self.int8_fits.counts.get(chosen, {})
        if isinstance(summary.get(f"{chosen[0]}_tier"), dict):  # a source tier's steps fitted on its int8 model
            summary[f"{chosen[0]}_tier"].setdefault("changed", {}).update(self.int8_fits.changed(chosen))
        if self.sentinel_nodes.get(chosen):
            summary["float_around_mask"] = self.sentinel_nodes[chosen]
        summary["name_bytes_saved"] = shorten_added_names(result, _source_names(self.base))
        if len(result.graph.value_info):  # pre-processing's shape annotations: runtimes infer them again at load
            summary["shape_annotations_dropped"] = len(result.graph.value_info)
            del result.graph.value_info[:]
        summary["int8_weights"] = int8_weights(result)
        return PassResult(result, summary, budget_use=budget_use)

    def _tier_tag(self, summary: dict[str, Any]) -> str:
        """The tag of the tier the summary's choice came from (as ``space`` names the builds)."""
        if summary.get("transform"):
            return summary["transform"]
        return f"t{self.tiers.index(list(summary['op_types']))}"

    def _report_float_ops(self, result: onnx.ModelProto, ctx: Any, summary: dict[str, Any]) -> None:
        found = float_ops(result, list(ctx.target.runtime.supported_ops))
        if not found:
            return
        summary["float_ops"] = found
        if self.params.warn_float_ops:
            ops = ", ".join(sorted({f["op"] for f in found}))
            ctx.warn(f"{len(found)} ops left in float would run on the host: {ops}")
