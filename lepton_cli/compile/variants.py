"""Compile a target's extra ``[[variants]]`` and describe every variant for the bundle manifest.

The compiler runs the first variant (or the whole pipeline when a target declares none) as
``model.onnx``; this module runs each further variant through the same ``run_pipeline`` with
its own pass list, giving ``variants/<name>.onnx``, its step records, accuracy and warnings.
``manifest_variants`` lists them all, in the target's preference order, with what
``runtime_select`` needs on the device.

Estimates: ``lepton_cli.evaluate.costmodel.estimate`` gives the roofline latency on the target's
hardware and peak memory = weights + its greedy activation arena; if the cost model is missing or
fails on a graph, peak memory is the weights' size (``stats.collect_stats().param_bytes``,
activations not counted) and latency is unknown — ``estimate_source`` says which.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Callable

import onnx

from lepton_cli.bundle.manifest import PRIMARY_MODEL
from lepton_cli.compile.listeners import Listeners
from lepton_cli.evaluate import costmodel
from lepton_cli.evaluate.accuracy import VNNI_ISA
from lepton_cli.evaluate.gate_warnings import accuracy_warnings, compression_warnings
from lepton_cli.model.external_data import ModelPayload, bundle_payload
from lepton_cli.model.stats import collect_stats
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.records import StepRecord
from lepton_cli.pipeline.run import run_pipeline
from lepton_cli.pipeline.targets import Target, Variant

PRIMARY_PATH = PRIMARY_MODEL


def variant_path(index: int, variant: Variant | None) -> str:
    return PRIMARY_PATH if index == 0 or variant is None else f"variants/{variant.name}.onnx"


@dataclass
class BuiltVariant:
    variant: Variant
    path: str
    model: onnx.ModelProto
    steps: list[StepRecord]
    accuracy: dict[str, Any]
    warnings: list[str]

    def report(self) -> dict[str, Any]:
        return {
            "name": self.variant.name,
            "path": self.path,
            "precision": self.variant.precision,
            "pipeline": [s.to_dict() for s in self.steps],
            "compiled": collect_stats(self.model).to_dict(),
            "accuracy": self.accuracy,
            "warnings": self.warnings,
        }


def compile_extra_variants(
    model: onnx.ModelProto,
    ctx: PassContext,
    target: Target,
    listeners: Listeners,
    make_gate: Callable[[PassContext], Any],
) -> list[BuiltVariant]:
    """Run variants[1:] of ``target`` on ``model`` (the normalised source); ``ctx`` supplies data, host and budgets."""
    return [
        _compile_variant(model, ctx, target, index, variant, listeners.for_variant(variant.name), make_gate)
        for index, variant in enumerate(target.variants[1:], start=1)
    ]


def _compile_variant(
    model: onnx.ModelProto,
    ctx: PassContext,
    target: Target,
    index: int,
    variant: Variant,
    listeners: Listeners,
    make_gate: Callable[[PassContext], Any],
) -> BuiltVariant:
    vctx = PassContext(
        target=target.for_variant(variant),
        calib=ctx.calib,
        eval=ctx.eval,
        host=ctx.host,
        seed=ctx.seed,
        max_accuracy_drop=ctx.max_accuracy_drop,
        input_shapes=ctx.input_shapes,
        eval_metric=ctx.eval_metric,
        on_warning=listeners.on_warning,
        on_progress=listeners.on_progress,
        scorers=ctx.scorers,
    )
    gate = make_gate(vctx)  # the variant's own accuracy gate, inside its pipeline's retry
    try:
        compiled, steps = run_pipeline(model, vctx, listeners.progress, final_check=gate)
        compiled.producer_name = "lepton"
        accuracy = gate.accuracy
        for text in [*compression_warnings(steps, compiled), *accuracy_warnings(accuracy)]:
            vctx.warn(text)
    finally:
        shutil.rmtree(vctx.work_dir, ignore_errors=True)
    return BuiltVariant(variant, variant_path(index, variant), compiled, steps, accuracy, list(vctx.warnings))


def estimate(model: onnx.ModelProto, target: Target) -> dict[str, Any]:
    """Latency and peak memory of one compiled variant on the target: the cost model's, else the weights' size."""
    try:
        doc = costmodel.estimate(model, target.hardware)
    except Exception as exc:  # a cost-model gap must not fail the compile; fall back to the plain size below
        fallback = f"cost model failed ({exc.__class__.__name__}); "
    else:
        arena = (doc.get("peak_activation_bytes") or {}).get("greedy_arena") or 0
        peak_mb = (doc.get("weights_bytes", 0) + arena) / 2**20
        return {
            "est_latency_ms": round(doc["latency_ms"], 4),
            "peak_memory_mb": round(peak_mb, 3),
            "estimate_source": "costmodel (weights + greedy activation arena)"
            + ("" if doc.get("complete") else "; incomplete: some tensor sizes unknown"),
        }
    weights_mb = collect_stats(model, with_macs=False).param_bytes / 2**20
    return {
        "est_latency_ms": None,
        "peak_memory_mb": round(weights_mb, 3),
        "estimate_source": fallback + "weights only (stats.param_bytes): activations not counted, latency unknown",
    }


_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "MatMulNBits",
}


def infer_precision(model: onnx.ModelProto) -> str:
    """int8 when the graph quantizes, fp16 when its weights are half, else fp32 (for targets without [[variants]])."""
    if any(n.op_type in _INT8_OPS for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def effective_isa(requires: list[str], steps: list[StepRecord]) -> tuple[list[str], str | None]:
    """A VNNI requirement widened to AVX2 when this variant's quantize step ran with ``reduce_range``.

    Why: on AVX2 without VNNI, VPMADDUBSW sums u8·s8 pairs in int16 and saturates at full 8-bit range;
    7-bit weights (reduce_range, which the quantize pass turns on when the target or build host lacks
    VNNI) cannot saturate, so that model is as correct on AVX2 as on VNNI. Returns (requires, why or None).
    """
    if not any(s.name == "quantize" and s.summary.get("reduce_range") for s in steps):
        return list(requires), None
    widened = [r + "|avx2" if set(r.split("|")) & set(VNNI_ISA) and "avx2" not in r.split("|") else r for r in requires]
    if widened == list(requires):
        return widened, None
    return (
        widened,
        "quantize ran with reduce_range (7-bit weights): AVX2 without VNNI cannot saturate, so AVX2 suffices",
    )


def manifest_variants(target: Target, models: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """``manifest_fields["variants"]``: one entry per (variant, bundle path, compiled model[, step records]), preference order."""
    entries = []
    for variant, path, model, *rest in models:
        requires_isa, why = effective_isa(list(variant.requires_isa) if variant else [], rest[0] if rest else [])
        entries.append(
            {
                "name": variant.name if variant else "default",
                "path": path,
                "precision": variant.precision if variant else infer_precision(model),
                "requires_isa": requires_isa,
                "requires_providers": list(variant.requires_providers) if variant else [],
                **({"requires_isa_why": why} if why else {}),
                **estimate(model, target),
            }
        )
    return entries


def serialize_all(built: list[BuiltVariant]) -> dict[str, ModelPayload]:
    """Each variant's bundle form (``external_data.bundle_payload``: one protobuf, or graph plus data file)."""
    return {b.path: bundle_payload(b.model, b.path) for b in built}
