"""quantize: per-target int8/fp16 schemes, streamed calibration, accuracy-aware tuning within the budget.

Schemes (each target's TOML says which and why): ``int8`` (static QDQ through ONNX Runtime, ``_quantize/int8_plan.py``),
``fp16`` (fp32 I/O, overflowing ops kept fp32, ``_quantize/fp16_plan.py``), and the one-step rewrites
``int8_weight_only``, ``int8_dynamic``, ``int4_weight_only`` (``_quantize/rewrites.py``). The pass builds one plan per
run and asks it; the calibrated plans give the tuner (``_quantize/tuning.py``) candidates to score against the source,
and the one within the budget the target's cost model prices fastest is kept; none: exit 3 with every candidate tried.
Without --calib a static-int8 target falls back to ``without_calib`` or refuses (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import onnx
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.fp16_plan import Fp16Plan
from lepton_cli.passes._quantize.int8_plan import Int8Plan
from lepton_cli.passes._quantize.param_checks import check_params
from lepton_cli.passes._quantize.plan import RewritePlan, SearchPlan
from lepton_cli.passes._quantize.prequantized import describe, quantized_ops
from lepton_cli.passes._quantize.rewrites import rewrite_plan
from lepton_cli.passes._quantize.search_clock import stopped_warning
from lepton_cli.passes._quantize.tuning import TunerSettings, tune, untuned

from lepton_cli.errors import BadInputError
from lepton_cli.model.external_data import has_external, inline_copy
from lepton_cli.pipeline.registry import LOSSY, BudgetUse, PassEnv, PassResult, register_pass

Method = Literal["minmax", "percentile", "entropy", "mse"]
RecoveryStep = Literal[
    "equalize", "activation_equalize", "adaround", "bias_correction", "quantized_bias_correction", "quantized_adaround"
]


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
    # No Q/DQ on MatMul/Gemm outputs: ORT runs them int8 with float results; a float reader loses nothing to rounding
    float_matmul_outputs: bool = True
    # Scalar Adds, HardSigmoid and Sigmoid gates between int8 layers as QLinearAdd/Mul/Sigmoid (ORT's CPU EP), 1 B/element
    integer_elementwise: bool = False
    integer_elementwise_tier: bool = False  # the same as a last tier, searched only when nothing else fits
    dynamic_lstm: bool = False  # LSTMs as ORT's DynamicQuantizeLSTM (int8 weights, run-time activation scales)
    depthwise_channel_scales: bool = False  # depthwise inputs quantized per channel, carried by the weight scales
    restore_hard_swish: bool = False  # float-kept hard-swish at alpha 1/6 (ORT's x86 conv runs it), kept when it scores
    fast_op_types: list[str] | None = None  # tried before op_types (more int8, fewer Q/DQ: faster), kept when one fits
    methods: list[Method] = field(default_factory=lambda: ["minmax", "percentile", "entropy"])  # tried in order
    percentile: float = 99.999
    histogram_bins: int = 2048
    entropy_bins: int = 512
    calib_chunk: int = 16  # samples whose activations are held in memory at once
    max_calib_samples: int = 256
    tune: bool = True  # False: quantize with methods[0], everything, no search
    max_float_layers: int = 32  # most layers the search may keep in float
    max_search_seconds: float | None = None  # no candidate built past it: the best within budget so far, else exit 3
    float_kept_weights: Literal["int8", "float"] = "float"  # int8: float-kept layers compute on int8-stored weights
    budget_confidence: float = 0.8  # a candidate's drop must meet the budget at this one-sided confidence
    max_eval_samples: int = 1000  # as many as the compile's accuracy gate scores: the search sees what it will
    budget_share: float = 1.0  # share of the accuracy budget this pass may spend (earlier lossy passes spend the rest)
    without_calib: Literal["weight_only", "dynamic", "fail"] = "weight_only"
    fp16_block_ops: list[str] = field(default_factory=lambda: list(schemes.FP16_BLOCK_DEFAULT))
    int4_block_size: int = 32
    weight_blocks: bool = False  # per-tensor weights: Convs and Gemms split into blocks of output channels by scale
    preprocess: bool = True  # ORT's quant_pre_process (shape inference + basic optimisation) before int8
    warn_float_ops: bool = False  # integer-only hardware: warn about every op left in float
    layer_norm_as_l2: bool = False  # LayerNorms as ReduceMean/Sub/LpNormalization/Mul/Add, an int8 chip's ops
    integer_io: bool = False  # int8: integer graph inputs/outputs, scale and zero point in metadata
    # Accuracy recovery before any layer is kept float (_quantize/recovery.py); off unless a target measured a gain.
    equalize: bool = False  # cross-layer equalisation of conv pairs joined by ReLU-family activations (exact in float)
    activation_equalize: bool = False  # channel ranges evened out through hard-swish regions (activation_equalize.py)
    residual_scaling_alpha: float | None = None  # post-LN residual sums rescaled per dimension (residual_scaling.py)
    residual_blocks: bool = False  # the same sums float on the host, their projections split by range (per-tensor)
    gelu_equalize: bool = False  # feed-forward hidden channels evened out through GELU (exact: gelu_equalize.py)
    attention_balance: bool = False  # query and key channels balanced per channel (exact: attention_balance.py)
    smoothquant_alpha: float | None = None  # SmoothQuant for MatMul/Gemm inputs after a LayerNorm
    smoothquant_insert: bool = False  # also where nothing absorbs 1/s: a float per-channel Mul on the layer's input
    # The SmoothQuant'ed model (inserted scales) as a tier, searched when the plain choice keeps layers float (cheaper)
    smoothquant_tier_alpha: float | None = None
    conv_smoothing_alpha: float | None = None  # the same for conv inputs whose producer absorbs 1/s (conv_smoothing.py)
    bias_correction: bool = False  # fold each weight layer's mean int8 output error into its bias
    quantized_bias_correction: bool = False  # int8 biases matched to the float output means (quantized_bias.py)
    quantized_bias_samples: int = 8  # --calib samples it measures on: one run each per layer with a bias
    adaround: bool = False  # optimise each layer's weight rounding against its float output on --calib
    quantized_adaround: bool = False  # the same on the int8 model's layer inputs (quantized_adaround.py)
    quantized_adaround_float_share: float | None = None  # of its objective on float inputs (QDrop); None: int8 alone
    adaround_iterations: int = 200
    adaround_seconds: float = 120.0  # whole-model budget; layers past it round to nearest
    recovery_tier: list[RecoveryStep] = field(default_factory=list)  # these steps as a tier, like SmoothQuant's
    fast_recovery_tier: list[RecoveryStep] = field(default_factory=list)  # on the first tier's ops, fully int8 only
    recovery_samples: int = 32  # --calib samples the bias correction and rounding measure layer inputs on
    # Output heads one int8 scale cannot hold (_quantize/heads.py); auto: float where layers may stay float, else int8.
    head_precision: Literal["auto", "float", "int16", "int8"] = "auto"
    head_range_ratio: float = 4.0  # Concat inputs this many times apart in range (2 bits of int8) make a mixed head

    def __post_init__(self) -> None:
        check_params(self)


def make_plan(params: QuantizeParams, ctx: Any) -> RewritePlan | SearchPlan:
    """The one place the scheme name is read: the plan that quantizes with it on this target."""
    if params.scheme == "fp16":
        return Fp16Plan(params.fp16_block_ops, params.max_calib_samples)
    if params.scheme == "int8" and ctx.calib is not None:
        return Int8Plan(params, list(ctx.target.hardware.isa), list(ctx.host.isa))
    return rewrite_plan(params)


def requires(model: onnx.ModelProto, ctx: PassEnv, params: QuantizeParams) -> None:
    """A target that forbids the fallback needs --calib for static int8 (an already quantized model keeps its own);
    DynamicQuantizeLSTM is ONNX Runtime's own op: only a target deployed with ONNX Runtime runs it."""
    if params.dynamic_lstm:
        ctx.target.runtime.require_onnxruntime(
            ctx.target.name,
            "quantize.dynamic_lstm",
            "DynamicQuantizeLSTM is an ONNX Runtime contrib op, not standard ONNX",
        )
    if params.scheme == "int8" and params.without_calib == "fail" and ctx.calib is None and not quantized_ops(model):
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
    if existing:  # the model's own quantization is kept (_quantize/prequantized.py)
        ctx.warn(
            f"the model is already quantized ({describe(existing)}): kept as it is, not quantized again; "
            f"compile the float model for {params.scheme} tuned to the accuracy budget"
        )
        return PassResult(model, {"scheme": params.scheme, "applied": "none", "already_quantized": dict(existing)})
    requires(model, ctx, params)  # also when the pass runs outside a pipeline
    schemes.name_nodes(model)
    plan = make_plan(params, ctx)
    if has_external(model) and plan.whole_model:  # weight-only schemes read a tensor at a time
        model = inline_copy(model, f"quantize scheme {params.scheme!r}")
    if isinstance(plan, RewritePlan):
        return plan.rewrite(model, ctx)
    budget = ctx.lossy_budget(params.budget_share)
    calib, _, _ = ctx.scoring_data()
    scorer, scored_on = ctx.scorer(model)
    evaluator = scorer.subset(params.max_eval_samples) if scorer is not None else None
    summary: dict[str, Any] = {"scheme": params.scheme, "budget_pct": round(budget, 4), "scored_on": scored_on}
    space = plan.space(model, ctx, calib, summary)
    if evaluator is None or not params.tune:
        return plan.finish(model, untuned(space, summary), ctx, summary, None)
    retried_without = tuple(ctx.ledger.spenders(ctx.current_pass))  # a refusal here compiles again without them
    settings = TunerSettings.of(params, ctx.target.hardware, retried_without)
    result, best = tune(space, evaluator, budget, scored_on, settings, summary, ctx.progress)
    if params.max_search_seconds is not None and "search_stopped_s" in summary:
        ctx.warn(stopped_warning(params.max_search_seconds, summary["search_stopped_s"]))
    plan.report_recovery(evaluator, best, ctx, summary)
    return plan.finish(model, result, ctx, summary, BudgetUse(budget, best.drop_pct))
