"""The model as the pipeline receives it: opset upgraded, input shapes bound, with its --calib/--eval data and
the list of what was changed on the way (the report's "normalisation")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from lepton_cli.errors import BadInputError
from lepton_cli.model.load import LoadedModel, upgrade_opset
from lepton_cli.model.sessions import make_session, model_random_feed
from lepton_cli.model.shapes import (
    bind_input_shapes,
    check_input_memory,
    graph_inputs,
    parse_input_shapes,
    rebound_inputs,
)
from lepton_cli.pipeline.targets import Target
from lepton_cli.samples.preprocess import load_image_folder
from lepton_cli.samples.sample_set import SampleSet, check_bound_shapes, load_samples, placeholder_error, survey


@dataclass
class PreparedSource:
    """The model as the pipeline receives it (opset upgraded, shapes bound), its data, and what was changed."""

    model: onnx.ModelProto
    calib: SampleSet | None
    evaluation: SampleSet | None
    shapes: dict[str, list[int]]
    normalisation: list[str]


def prepare_source(
    loaded: LoadedModel,
    target: Target,
    *,
    calib: Path | None,
    evaluation: Path | None,
    preprocess: str | None,
    input_shapes: list[str],
    memory_mb: float | None = None,
) -> PreparedSource:
    """Opset upgrade, the --calib/--eval data, bound input shapes; what of it the report lists. ``memory_mb``: this
    host's usable memory, which bound inputs must leave room in."""
    normalisation: list[str] = []
    if loaded.dropped_domains:  # declared by the exporter, used by no node: nothing of theirs runs
        domains = ", ".join(map(repr, loaded.dropped_domains))
        normalisation.append(f"dropped unused opset imports {domains} (outside the allowlist; no node uses them)")
    model, note = upgrade_opset(loaded.model, target.runtime.opset_min, target.runtime.opset_max)
    if note:
        normalisation.append(note)
    rebinds = bool(rebound_inputs(model, parse_input_shapes(input_shapes)))
    if rebinds:  # bound first: the data is checked against the size the user rebinds a fixed dim to
        model, shapes, note = _bind_shapes(model, input_shapes, None, memory_mb, rebinds=True)
    calib_set = _samples(calib, model, "--calib", preprocess)
    eval_set = _samples(evaluation, model, "--eval", preprocess)
    if not rebinds:
        model, shapes, note = _bind_shapes(model, input_shapes, calib_set, memory_mb)
    if note:
        normalisation.append(note)
    session = _source_session(model)
    for samples, role in ((calib_set, "--calib"), (eval_set, "--eval")):
        if samples is not None:
            check_bound_shapes(samples, model, role, note and note.split(":")[0])
            normalisation += _check_samples(session, samples, role)
    return PreparedSource(model, calib_set, eval_set, shapes, normalisation)


def _samples(path: Path | None, model: onnx.ModelProto, role: str, preprocess: str | None) -> SampleSet | None:
    """An .npz sample set, or a folder of images read with the --preprocess settings."""
    if path is None:
        return None
    if path.is_dir():
        return load_image_folder(path, model, preprocess, role=role)
    return load_samples(path, model, role=role)


def _source_session(model: onnx.ModelProto) -> Any:
    """An ONNX Runtime session of the source, or exit 2: every pass is checked by running the model, so a model
    ONNX Runtime cannot load (an op it has no kernel for, as opset 20's ImageDecoder) failed inside fuse's check."""
    try:
        return make_session(model)
    except Exception as exc:  # ORT's load errors share no base class worth naming
        raise BadInputError(
            f"ONNX Runtime {ort.__version__} cannot load the model, and every pass is checked by running it: "
            f"{str(exc).splitlines()[0][:300]}",
            "replace the ops ONNX Runtime has no kernel for with ones it runs, or run them outside the model",
        ) from None


def _check_samples(session: Any, samples: SampleSet, role: str) -> list[str]:
    """One pass over ``samples``: exit 2 on a sample the source model cannot run (a token id past its vocabulary:
    every pass that feeds it would fail later, as an internal error) or on placeholder data; a note on exact repeats
    (kept: they may be how often the deployment sees that input, but the gate counts each as evidence)."""

    def runs(index: int, feed: dict[str, np.ndarray]) -> None:
        try:
            session.run(None, feed)
        except Exception as exc:  # ORT's errors share no base class worth naming
            raise BadInputError(
                f"{role} {samples.path}: the model cannot run sample {index}: {str(exc).splitlines()[0][:300]}",
                "give samples the model takes (token ids within its vocabulary, values its ops accept)",
            ) from None

    found = survey(samples, runs)
    if found.constant is not None:
        raise placeholder_error(found.constant, samples, role)
    if found.distinct == len(samples):
        return []
    return [
        f"{role}: {len(samples) - found.distinct} of {len(samples)} samples repeat another exactly ({found.distinct} "
        "distinct): the accuracy gate counts each repeat as a sample, so it resolves less than it reports "
        "(give distinct samples where you can)"
    ]


def _bind_shapes(
    model: onnx.ModelProto,
    input_shapes: list[str],
    calib: SampleSet | None,
    memory_mb: float | None,
    *,
    rebinds: bool = False,
) -> tuple[onnx.ModelProto, dict[str, list[int]], str | None]:
    """``rebinds``: --input-shape gives a fixed dim another size (``shapes.rebound_inputs``), checked by a run."""
    shapes = parse_input_shapes(input_shapes)
    source = "--input-shape"
    if not shapes and calib is not None:
        dynamic = {sig.name for sig in graph_inputs(model) if not sig.is_static}
        shapes = {name: shape for name, shape in calib.shapes().items() if name in dynamic}
        source = "calibration data"
    if not shapes:
        return model, {}, None
    check_input_memory(graph_inputs(model), shapes, memory_mb)
    bound = bind_input_shapes(model, shapes)
    if rebinds:
        _check_runs_rebound(model, bound, shapes)
    listed = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
    rejected = _rejected_when_bound(model, bound)
    if rejected:
        return (
            model,
            shapes,
            (
                f"kept input shapes dynamic ({listed} from {source} used for checks and data): ONNX Runtime "
                f"rejects the model with them bound ({rejected})"
            ),
        )
    return bound, shapes, f"bound input shapes from {source}: {listed}"


def _check_runs_rebound(model: onnx.ModelProto, bound: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Exit 2 unless ``bound``, fixed input dims rebound to ``shapes``, runs once on a synthetic feed: a graph whose
    reshapes hard-code the export size cannot take another, and shape inference alone does not always say so."""
    fixed = ", ".join(f"{sig.name} {list(sig.dims)}" for sig in graph_inputs(model) if sig.name in shapes)
    try:
        make_session(bound).run(None, model_random_feed(bound, np.random.default_rng(0)))
    except Exception as exc:  # ORT raises its own exception types for shape errors
        wanted = "; ".join(f"{name} {dims}" for name, dims in shapes.items())
        raise BadInputError(
            f"--input-shape rebinds fixed dims ({fixed}), and the model does not run at {wanted}: "
            f"{str(exc).splitlines()[0][:200]}",
            "give the model's own fixed shape, or export the model with dynamic dims",
        ) from None


def _rejected_when_bound(model: onnx.ModelProto, bound: onnx.ModelProto) -> str | None:
    """ORT's error when the bound model fails to load optimised while the source loads, else None.

    Static shapes let ORT type-check If/Loop branches the data never takes (docs/decisions.md, "Pipeline").
    Only models with subgraphs are tried (one session each)."""
    if not any(a.type == onnx.AttributeProto.GRAPH or a.graphs for n in model.graph.node for a in n.attribute):
        return None
    try:
        make_session(bound, opt_level="basic")
        return None
    except Exception as exc:  # ORT raises Fail/InvalidGraph/RuntimeException
        reason = str(exc).split("[ShapeInferenceError]")[-1].strip().splitlines()[0][:160]
    try:
        make_session(model, opt_level="basic")
    except Exception:
        return None  # the source fails too: not the binding's fault; the pipeline reports it
    return reason
