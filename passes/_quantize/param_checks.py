"""The cross-field and range checks of ``QuantizeParams``, run when a target file is loaded (exit 2 naming the key)."""

from __future__ import annotations

from typing import Any

from lepton_cli.pipeline.params import ParamValueError

OPEN_UNIT = ("smoothquant_alpha", "smoothquant_tier_alpha", "residual_scaling_alpha", "quantized_adaround_float_share")
COUNTS = ("calib_chunk", "max_calib_samples", "max_eval_samples", "int4_block_size", "quantized_bias_samples")


def check_params(params: Any) -> None:
    """Raise ``ParamValueError`` for the first value ``params`` (QuantizeParams) cannot take."""
    if not params.methods:
        raise ParamValueError("methods", "give at least one calibration method")
    if not 90.0 < params.percentile <= 100.0:
        raise ParamValueError("percentile", f"must be in (90, 100], got {params.percentile}")
    if params.entropy_bins < 256 or params.histogram_bins < 256:
        raise ParamValueError(
            "entropy_bins", "histograms need >= 256 bins (with 128 every entropy threshold is the full range)"
        )
    for name in COUNTS:
        if getattr(params, name) < 1:
            raise ParamValueError(name, "must be >= 1")
    if params.max_float_layers < 0:
        raise ParamValueError("max_float_layers", "must be >= 0")
    if params.max_search_seconds is not None and not params.max_search_seconds > 0:
        raise ParamValueError("max_search_seconds", f"must be > 0 seconds, got {params.max_search_seconds}")
    if (params.integer_elementwise or params.integer_elementwise_tier) and params.power_of_two_scales:
        raise ParamValueError(
            "integer_elementwise",
            "its folded and [0, 1] gate scales are not powers of two: not with power_of_two_scales",
        )
    if params.dynamic_lstm and params.power_of_two_scales:
        raise ParamValueError("dynamic_lstm", "ONNX Runtime's contrib op has no power-of-two scales: not for a DPU")
    if params.integer_io and params.scheme != "int8":
        raise ParamValueError(
            "integer_io", 'needs scheme = "int8" (static quantization gives inputs and outputs a scale)'
        )
    if not 0 < params.budget_share <= 1:
        raise ParamValueError("budget_share", "must be in (0, 1]")
    if not 0.5 <= params.budget_confidence < 1:
        raise ParamValueError("budget_confidence", f"must be in [0.5, 1), got {params.budget_confidence}")
    _check_recovery_steps(params)
    if params.head_precision == "int16" and params.power_of_two_scales:
        raise ParamValueError("head_precision", "int16 heads need 16-bit Q/DQ, which DPU (power-of-two) lacks")
    if params.head_range_ratio <= 1:
        raise ParamValueError("head_range_ratio", f"must be > 1, got {params.head_range_ratio}")
    if params.recovery_samples < 1 or params.adaround_iterations < 1 or params.adaround_seconds <= 0:
        raise ParamValueError(
            "recovery_samples", "recovery_samples, adaround_iterations and adaround_seconds must be > 0"
        )
    if params.int4_block_size & (params.int4_block_size - 1) or params.int4_block_size < 16:
        raise ParamValueError("int4_block_size", "must be a power of two >= 16")


def _check_recovery_steps(params: Any) -> None:
    """The recovery steps' strengths and what each needs of the weights' scales."""
    for name in OPEN_UNIT:
        if getattr(params, name) is not None and not 0 < getattr(params, name) < 1:
            raise ParamValueError(name, f"must be in (0, 1), got {getattr(params, name)}")
    if params.smoothquant_insert and params.smoothquant_alpha is None:
        raise ParamValueError("smoothquant_insert", "needs smoothquant_alpha (the migration strength)")
    if params.conv_smoothing_alpha is not None and not 0 < params.conv_smoothing_alpha <= 1:
        raise ParamValueError("conv_smoothing_alpha", f"must be in (0, 1], got {params.conv_smoothing_alpha}")
    for name in (
        "conv_smoothing_alpha",
        "residual_scaling_alpha",
        "gelu_equalize",
        "depthwise_channel_scales",
        "attention_balance",
    ):
        if getattr(params, name) not in (None, False) and (not params.per_channel or params.power_of_two_scales):
            raise ParamValueError(name, "needs per-channel weight scales (they absorb the channel scales)")
    if params.residual_blocks and params.residual_scaling_alpha is not None:
        raise ParamValueError(
            "residual_blocks", "use it or residual_scaling_alpha: both rewrite the same residual sums"
        )
