"""Warnings a compile that passed its gates may still deserve: a variant that compressed nothing, an output
over the budget on any metric (a secondary one included), a classifier whose confidence collapsed while
its top-1 agreed, a budget finer than the source's own input noise. They go in the report's ``warnings`` and on stderr."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import onnx

from lepton_cli.evaluate.input_floor import noise_clause

INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
CLASS_METRICS = ("top1", "top1_agreement", "top1_agreement+cosine")
# A collapse keeps under nine tenths of the source's mean confidence in its own class (the classifier: 0.93
# -> 0.44). Points of probability are not points of the budget: every int8 Magika read 0.85 -> 0.83-0.84 and was
# warned about with all 512 held-out answers kept (session 34).
CONFIDENCE_KEPT = 0.9


class PassStep(Protocol):
    """What these warnings read of a pipeline step (``pipeline.run.StepRecord``)."""

    @property
    def name(self) -> str: ...

    @property
    def summary(self) -> Mapping[str, Any]: ...


def compression_warnings(steps: Sequence[PassStep], model: onnx.ModelProto) -> list[str]:
    """A quantize step whose scheme promises smaller weights but whose model stores none."""
    out = []
    for step in steps:
        scheme = step.summary.get("scheme") if step.name == "quantize" else None
        if not scheme or step.summary.get("fallback"):
            continue
        inits = model.graph.initializer
        if scheme.startswith("int8") and not any(t.data_type in INT8_TYPES and len(t.dims) >= 2 for t in inits):
            out.append(
                f"scheme {scheme!r} but the compiled model holds no int8 weights: this variant compressed nothing"
            )
        elif scheme == "fp16" and not any(t.data_type == onnx.TensorProto.FLOAT16 for t in inits):
            out.append("scheme 'fp16' but the compiled model holds no fp16 weights: this variant compressed nothing")
        elif scheme == "int4_weight_only" and not step.summary.get("matmul_nbits"):
            out.append("scheme 'int4_weight_only' but no MatMul was packed to 4 bits: this variant compressed nothing")
    return out


def accuracy_warnings(accuracy: dict[str, Any]) -> list[str]:
    """Every output over the budget on its metric or a secondary one (a measured accuracy section)."""
    if not accuracy.get("measured"):
        return []
    budget = accuracy["budget_pct"]
    out = []
    for o in accuracy.get("outputs") or []:
        name, detail = o["name"], o.get("detail") or {}
        if o["drop_pct"] > budget:
            out.append(
                f"output {name!r} lost {o['drop_pct']:.2f} points of {o['metric']} "
                f"({o['source_value']:.2f}% → {o['value']:.2f}%), over the budget of {budget:g}"
            )
        top = detail.get("top_probability")
        cosine = detail.get("probability_cosine")
        if (
            o["metric"] in CLASS_METRICS
            and top
            and (top[1] < CONFIDENCE_KEPT * top[0] or (cosine is not None and 100 * (1 - cosine) > budget))
        ):
            out.append(
                f"output {name!r}: top-1 {o['value']:.2f}% but the confidence collapsed: mean top probability "
                f"{top[0] / 100:.2f} → {top[1] / 100:.2f}, probability cosine {cosine:.3f} (budget {budget:g} points)"
            )
        if o["metric"] == "detection_f1" and 100 * detail.get("score_error_mean", 0.0) > budget:
            out.append(
                f"output {name!r}: detections matched (F1 {o['value']:.2f}%) but their scores moved by "
                f"{detail['score_error_mean']:.3f} on average (max {detail['score_error_max']:.3f}), over the budget of {budget:g} points"
            )
    floor = accuracy.get("input_floor")
    if floor and floor["drop_pct"] > budget:
        out.append(
            f"the budget of {budget:g} points is finer than input noise: {noise_clause(floor)}, "
            "so a drop below that is noise, not quantization"
        )
    return out
