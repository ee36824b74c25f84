"""The schemes that rewrite weights in one step (no calibration, no search), and static int8's fallback without data."""

from __future__ import annotations

from typing import Any

import onnx
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.plan import Rewrite, RewritePlan, int8_weights

from lepton_cli.pipeline.registry import PassResult

WHAT_FALLBACK = {
    "dynamic": "dynamic int8 (MatMul/Gemm weights int8, activations quantized at run time)",
    "weight_only": "int8 weight-only (weights int8, compute float)",
}


def _weight_only(model: onnx.ModelProto, ctx: Any) -> PassResult:
    result, names = schemes.weight_only_int8(model)
    return PassResult(result, {"scheme": "int8_weight_only", "int8_weights": len(names)})


def _dynamic(per_channel: bool) -> Rewrite:
    def rewrite(model: onnx.ModelProto, ctx: Any) -> PassResult:
        result = schemes.dynamic_int8(model, ctx.work_dir, per_channel)
        return PassResult(result, {"scheme": "int8_dynamic", "int8_weights": int8_weights(result)})

    return rewrite


def _int4(block_size: int) -> Rewrite:
    def rewrite(model: onnx.ModelProto, ctx: Any) -> PassResult:
        result, count = schemes.int4_weight_only(model, block_size)
        return PassResult(result, {"scheme": "int4_weight_only", "matmul_nbits": count})

    return rewrite


def _fallback(without_calib: str, per_channel: bool) -> Rewrite:
    """Static int8 without --calib: weight-only or dynamic int8, warned (``requires`` refuses ``fail``)."""

    def rewrite(model: onnx.ModelProto, ctx: Any) -> PassResult:
        if without_calib == "dynamic":
            result = schemes.dynamic_int8(model, ctx.work_dir, per_channel)
        else:
            result, _ = schemes.weight_only_int8(model)
        ctx.warn(
            f"no --calib data: static int8 needs calibration, fell back to {WHAT_FALLBACK[without_calib]}; "
            "pass --calib for full int8"
        )
        summary = {"scheme": without_calib, "fallback": True, "fallback_reason": "no --calib data"}
        return PassResult(result, summary | {"int8_weights": int8_weights(result)})

    return rewrite


def rewrite_plan(params: Any) -> RewritePlan:
    """The plan of a one-step scheme, or of static int8 without calibration data (``params``: QuantizeParams)."""
    if params.scheme == "int8_weight_only":
        return RewritePlan(params.scheme, _weight_only, whole_model=False)
    if params.scheme == "int8_dynamic":
        return RewritePlan(params.scheme, _dynamic(params.per_channel), whole_model=True)
    if params.scheme == "int4_weight_only":
        return RewritePlan(params.scheme, _int4(params.int4_block_size), whole_model=False)
    return RewritePlan(
        params.without_calib,
        _fallback(params.without_calib, params.per_channel),
        whole_model=params.without_calib != "weight_only",
    )
