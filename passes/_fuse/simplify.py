"""onnxsim's simplification, and the opset raise that lets its LayerNormalization / Gelu fusions fire."""

from __future__ import annotations

from collections import Counter

import onnx

from lepton_cli.host.native_stderr import captured_fd, captured_stderr
from lepton_cli.model.op_traits import opset

LAYER_NORM_OPSET = 17  # LayerNormalization joined the default domain at opset 17
GELU_OPSET = 20  # Gelu at opset 20


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def simplify(
    model: onnx.ModelProto, fold_constants: bool, fold_limit_mb: float, opset: int | None = None
) -> onnx.ModelProto:
    """onnxsim with constants over ``fold_limit_mb`` left unfolded, converted to ``opset`` when given."""
    import onnxsim

    # its C++ folder writes "WARNING: failed to run ..." to stderr for every node it cannot fold yet, and its
    # fixed-point loop "the simplification stopped because of timeout" to stdout (SLANet's decoder Loop)
    with captured_stderr(), captured_fd(1):
        simplified, _ = onnxsim.simplify(
            model,
            check_n=0,
            skip_constant_folding=not fold_constants,
            tensor_size_threshold=f"{int(fold_limit_mb * 1024 * 1024)}B",
            target_opset_version=opset,
        )
    return simplified


def _norm_candidates(ops: Counter) -> tuple[bool, bool]:
    """(LayerNormalization decomposition likely present, Gelu decomposition likely present)."""
    return (ops["ReduceMean"] >= 2 and ops["Sqrt"] >= 1, ops["Erf"] >= 1)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]


def with_opset_for_norms(
    original: onnx.ModelProto,
    simplified: onnx.ModelProto,
    fold_constants: bool,
    fold_limit_mb: float,
    opset_max: int,
    notes: list[str],
) -> onnx.ModelProto:
    """Re-simplify at the opset the norm fusions need, keeping the result only if it fused more."""
    current = opset(simplified)
    want_ln, want_gelu = _norm_candidates(op_counts(simplified))
    best = simplified
    if want_ln and current < LAYER_NORM_OPSET <= opset_max:
        try:
            trial = simplify(original, fold_constants, fold_limit_mb, LAYER_NORM_OPSET)
        except Exception as exc:  # the version converter has gaps; keep the model's opset
            notes.append(f"opset {LAYER_NORM_OPSET} for LayerNormalization not reachable: {_first_line(exc)}")
        else:
            if op_counts(trial)["LayerNormalization"] > op_counts(best)["LayerNormalization"]:
                best = trial
                notes.append(f"opset {current} → {LAYER_NORM_OPSET} to fuse LayerNormalization")
    if want_gelu and opset(best) < GELU_OPSET <= opset_max:
        try:
            trial = simplify(best, fold_constants, fold_limit_mb, GELU_OPSET)
        except Exception as exc:
            notes.append(f"opset {GELU_OPSET} for Gelu not reachable: {_first_line(exc)}")
        else:
            if op_counts(trial)["Gelu"] > op_counts(best)["Gelu"]:
                notes.append(f"opset {opset(best)} → {GELU_OPSET} to fuse Gelu")
                best = trial
    return best
