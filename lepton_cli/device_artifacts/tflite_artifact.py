"""The tpu target's ``model.tflite``: exported with Lepton's ranges, run in LiteRT, scored, checked for the Edge TPU.

Needs the optional extra ``lepton-cli[tflite]`` (tensorflow-cpu for the converter, ai-edge-litert
for the interpreter). Without it, or when the graph holds an op the exporter cannot map, the
bundle keeps its ONNX model only and the report says why and how to get the ``.tflite``: a
warning, not a failure. When it is produced, the ``.tflite`` is scored in LiteRT on the same
``--eval`` (else ``--calib``) data as the ONNX model and its drop goes through the same accuracy
gate (exit 3), and its outputs are compared with the ONNX model's.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np
import onnx

from lepton_cli.bundle.manifest import PRIMARY_MODEL
from lepton_cli.device_artifacts import edgetpu, tflite_export
from lepton_cli.evaluate.accuracy import Evaluator, label_free
from lepton_cli.evaluate.input_floor import ValueGrid, dithered
from lepton_cli.model.io_contract import IoContract, adapt_feed, restore_output
from lepton_cli.pipeline.targets import Target
from lepton_cli.runtime.litert_session import INSTALL_HINT, RUNTIME, LiteRTSession

TFLITE_PATH = "model.tflite"
COMPARE_SAMPLES = 32  # ONNX-vs-LiteRT output comparison (the accuracy run covers the whole set)


class _LiteRTEvaluator(Evaluator):
    """The accuracy evaluator, scoring a LiteRT session instead of an ONNX candidate."""

    def _outputs(self, model: Any, dither: list[ValueGrid] | None = None):
        if not isinstance(model, LiteRTSession):
            yield from super()._outputs(model, dither)
            return
        names = [o.name for o in model.get_outputs()]
        for index, feed in enumerate(self.samples.feeds(self.limit)):
            yield model.run(names, dithered(feed, dither, index) if dither else feed)


def _missing_packages() -> list[str]:
    wanted = {"tensorflow": "tensorflow-cpu", "ai_edge_litert": "ai-edge-litert"}
    return [package for module, package in wanted.items() if importlib.util.find_spec(module) is None]


def _layouts(model: onnx.ModelProto) -> dict[str, str]:
    return dict(IoContract.of(model).layouts)


def _not_produced(section: dict[str, Any], reason: str, warn: Callable[[str], None], out: Any) -> None:
    section.update({"produced": False, "reason": reason})
    warn(f"no {TFLITE_PATH} in the bundle: {reason}")
    out.report["tflite"] = section


def _accuracy(source: onnx.ModelProto, session: LiteRTSession, ctx: Any) -> dict[str, Any]:
    samples, name = (ctx.eval, "--eval") if ctx.eval is not None else (ctx.calib, "--calib")
    if samples is None:
        return {"measured": False, "reason": "no --eval or --calib data: accuracy not measured"}
    from lepton_cli.pipeline.context import SCORE_SAMPLE_LIMIT

    metric = ctx.eval_metric if samples.labels is not None else label_free(ctx.eval_metric)
    evaluator = _LiteRTEvaluator(
        source, samples, samples.labels, limit=SCORE_SAMPLE_LIMIT, metric=metric, opt_level=ctx.scoring_opt_level
    )
    score = evaluator.score(session)
    return {
        "measured": True,
        "data": name,
        "budget_pct": ctx.accuracy_budget,
        "arithmetic": f"{TFLITE_PATH} in {RUNTIME}",
        "model": TFLITE_PATH,
        **score.to_dict(),
    }


def _compare(compiled: onnx.ModelProto, session: LiteRTSession, ctx: Any) -> dict[str, Any] | None:
    """Largest output difference, LiteRT vs ONNX Runtime on the compiled ONNX model, over the first samples."""
    samples = ctx.eval if ctx.eval is not None else ctx.calib
    if samples is None:
        return None
    from lepton_cli.model.sessions import make_session

    onnx_session = make_session(compiled, opt_level=ctx.scoring_opt_level)
    names = [o.name for o in onnx_session.get_outputs()]
    worst = 0.0
    count = 0
    for feed in samples.feeds(COMPARE_SAMPLES):
        reference = [
            restore_output(compiled, n, np.asarray(v))
            for n, v in zip(names, onnx_session.run(None, adapt_feed(compiled, feed)))
        ]
        got = session.run(names, feed)
        worst = max(
            worst,
            max(float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) for r, g in zip(reference, got)),
        )
        count += 1
    return {"samples": count, "max_abs_diff_vs_onnx": round(worst, 6)}


def _why_not_exportable(compiled: onnx.ModelProto) -> str | None:
    missing = _missing_packages()
    if missing:
        return f"{', '.join(missing)} not installed; {INSTALL_HINT}"
    unmapped = tflite_export.unsupported_ops(compiled)
    if unmapped:
        return f"the exporter has no TFLite mapping for {', '.join(unmapped)}"
    return None


def _export(compiled: onnx.ModelProto, integer_io: bool) -> tuple[Any, str | None]:
    """(the exported model, None), or (None, why not): a failed export leaves the ONNX bundle standing."""
    try:
        return tflite_export.convert(compiled, integer_io), None
    except tflite_export.UnsupportedOp as exc:
        return None, f"the exporter cannot map it: {exc}"
    except tflite_export.ConverterFailed as exc:  # TensorFlow's converter refused the graph
        return None, f"TFLiteConverter failed: {exc}"
    except ImportError as exc:  # installed but broken (e.g. a numpy TensorFlow was not built for)
        return None, f"TensorFlow does not import ({exc}); {INSTALL_HINT}"


def _check_session(
    section: dict[str, Any],
    session: LiteRTSession,
    compiled: onnx.ModelProto,
    source: onnx.ModelProto | None,
    ctx: Any,
    target: Target,
    out: Any,
    warn: Callable[[str], None],
) -> None:
    """The Edge TPU check (where the target asks), the comparison with ONNX Runtime, the accuracy in LiteRT."""
    if "edgetpu" in target.runtime.device_checks:
        section["edgetpu"] = edgetpu.check(session.interpreter)
        if section["edgetpu"]["cpu_ops"]:
            warn(edgetpu.summary(section["edgetpu"]))
    if source is not None and ctx is not None:
        section["vs_onnx"] = _compare(compiled, session, ctx)
        section["accuracy"] = _accuracy(source, session, ctx)
        if section["accuracy"].get("measured"):
            out.accuracy.append(section["accuracy"])


def build(
    compiled: onnx.ModelProto,
    source: onnx.ModelProto | None,
    ctx: Any,
    target: Target,
    out: Any,
    warn: Callable[[str], None],
) -> None:
    """Fill ``out`` (DeviceArtifacts) with ``model.tflite`` and its report section, or say why it is absent."""
    section: dict[str, Any] = {
        "runtime": RUNTIME,
        "path": TFLITE_PATH,
        "converter": "Lepton Q/DQ -> FakeQuant export + tf.lite.TFLiteConverter (ranges kept, no re-calibration)",
    }
    reason = _why_not_exportable(compiled)
    if reason:
        return _not_produced(section, reason, warn, out)
    integer_io = any(
        i.type.tensor_type.elem_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for i in compiled.graph.input
    )
    exported, reason = _export(compiled, integer_io)
    if reason:
        return _not_produced(section, reason, warn, out)
    names = {"inputs": exported.inputs, "outputs": exported.outputs}
    layouts = _layouts(compiled)
    session = LiteRTSession(exported.data, names, layouts)
    section.update(
        {
            "produced": True,
            "size_bytes": len(exported.data),
            "integer_io": integer_io,
            "io": {
                "inputs": [vars(a) for a in session.get_inputs()],
                "outputs": [vars(a) for a in session.get_outputs()],
            },
        }
    )
    _check_session(section, session, compiled, source, ctx, target, out, warn)
    out.models[TFLITE_PATH] = exported.data
    out.manifest.append(
        {
            "format": "tflite",
            "path": TFLITE_PATH,
            "from": PRIMARY_MODEL,
            "runtime": RUNTIME,
            "io_names": names,
            "io_layout": layouts,
        }
    )
    out.report["tflite"] = section
