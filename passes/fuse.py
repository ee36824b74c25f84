"""fuse: exact graph simplification — constant folding, BatchNorm/bias folding, no-op and dead-node
elimination, LayerNormalization/Gelu fusion, and (ONNX Runtime targets only) ORT's offline graph.

onnxsim does most of it (see docs/decisions.md, "Fuse and layout"); the machinery in ``passes/_fuse``
adds what it leaves:

* ``simplify``: onnxsim, and the opset raise (within ``runtime.opset_max``) that lets its
  LayerNormalization / Gelu fusions fire, kept only when it fused;
* ``dropout``: inference Dropouts that declare an unread mask output;
* ``centered_variance``, ``layer_norm``: a LayerNorm written out (flax's E[x²] − E[x]² variance) centered and
  made one LayerNormalization;
* ``integer_chip_ops``: constant Divs, HardSigmoid and HardSwish as Add/Clip/Mul on a target that lists only those;
* ``bias_adds``: an Add of a per-channel constant after a Conv that already has a bias, or after a Gemm;
* ``activation``: decomposed hard-swish and scalar affine blocks folded into their Convs;
* ``saturated_tanh``: GELU's tanh polynomial computed on its input clipped where the Tanh saturates;
* ``deconv_depth``: non-overlapping ConvTranspose chains (a DBNet head) as 1×1 Convs and one DepthToSpace;
* ``gated_residual``: ``x + x * g`` with a squeeze-excite gate as ``x * (1 + g)``;
* ``focus``: YOLO's Focus slices as one SpaceToDepth, the next Convs' weights permuted;
* ``channel_shuffle``: ShuffleNet's Reshape-Transpose-Reshape channel shuffle as one channel Gather;
* ``ort_offline``: ONNX Runtime's offline-optimised graph, for targets that deploy on onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
from lepton_cli.passes._fuse.activation import fold_scalar_affine, fuse_hard_swish
from lepton_cli.passes._fuse.bias_adds import fold_bias_adds
from lepton_cli.passes._fuse.channel_shuffle import channel_shuffles_as_gather
from lepton_cli.passes._fuse.deconv_depth import deconvs_as_depth
from lepton_cli.passes._fuse.dropout import remove_inference_dropouts
from lepton_cli.passes._fuse.focus import focus_as_space_to_depth
from lepton_cli.passes._fuse.gated_residual import fold_gated_residuals
from lepton_cli.passes._fuse.integer_chip_ops import as_integer_chip_ops
from lepton_cli.passes._fuse.layer_norm import written_out_norms
from lepton_cli.passes._fuse.ort_offline import ort_offline_graph
from lepton_cli.passes._fuse.saturated_tanh import clip_saturated_tanh_inputs
from lepton_cli.passes._fuse.simplify import op_counts, simplify, with_opset_for_norms

from lepton_cli.model.external_data import has_external
from lepton_cli.model.initializers import constants_to_initializers, list_initializers_as_inputs
from lepton_cli.model.op_traits import opset
from lepton_cli.model.quantized import quantized_ops
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import PassEnv, PassResult, register_pass, tolerance

if TYPE_CHECKING:
    from lepton_cli.pipeline.context import PassContext


@dataclass(frozen=True)
class FuseParams:
    fold_constants: bool = True  # onnxsim constant folding (e.g. ConstantOfShape weights)
    # Constants larger than this stay unfolded: the runtime builds a huge ConstantOfShape as cheaply from its shape.
    fold_limit_mb: float = 64.0
    fuse_norms: bool = True  # LayerNormalization / Gelu fusion, bumping the opset within runtime.opset_max
    # Decomposed hard-swish -> HardSigmoid + Mul, scalar affine blocks folded into Convs (_fuse/activation.py), a
    # Tanh's polynomial on its input clipped where the Tanh saturates (_fuse/saturated_tanh.py); on an integer chip
    # without them, constant Divs and hard activations as Add/Clip/Mul (_fuse/integer_chip_ops.py)
    fuse_activations: bool = True
    # ConvTranspose with kernel = stride -> 1×1 Conv + DepthToSpace, chained (_fuse/deconv_depth.py)
    deconv_as_depth: bool = True
    gated_residuals: bool = True  # x + x * g (g a squeeze-excite gate) -> x * (1 + g) (_fuse/gated_residual.py)
    focus_as_depth: bool = True  # YOLO's Focus slices -> SpaceToDepth where the target runs it (_fuse/focus.py)
    shuffle_as_gather: bool = False  # ShuffleNet channel shuffles -> one Gather (_fuse/channel_shuffle.py)
    # ONNX Runtime's offline-optimised graph (contrib fused ops). Only for deployment_runtime = "onnxruntime".
    ort_offline: bool = False

    def __post_init__(self) -> None:
        if self.fold_limit_mb <= 0:
            raise ParamValueError("fold_limit_mb", f"must be > 0, got {self.fold_limit_mb}")


def _simplified(model: onnx.ModelProto, ctx: PassContext, params: FuseParams, notes: list[str]) -> onnx.ModelProto:
    """onnxsim's result (at the norm fusions' opset where that fused more), or a copy where onnxsim fails."""
    try:
        if has_external(model):  # onnxsim reads weights from one in-memory protobuf only
            raise ValueError("the weights are kept in external data, which onnxsim cannot read")
        result = simplify(model, params.fold_constants, params.fold_limit_mb)
    except Exception as exc:  # onnxsim's C++ core rejects some graphs (e.g. ops newer than its schemas)
        reason = str(exc).splitlines()[0][:160]
        ctx.warn(f"onnxsim could not simplify this model ({reason}); only Lepton's own folds ran")
        result = onnx.ModelProto()
        result.CopyFrom(model)
        notes.append("onnxsim skipped: " + reason)
        return result
    if params.fuse_norms:
        opset_max = ctx.target.runtime.opset_max
        result = with_opset_for_norms(model, result, params.fold_constants, params.fold_limit_mb, opset_max, notes)
    return result


def _activation_rewrites(
    source: onnx.ModelProto, result: onnx.ModelProto, ctx: PassContext, params: FuseParams, notes: list[str]
) -> tuple[int, int, int]:
    """(hard-swishes fused, scalar affine blocks folded, Tanh polynomials clipped), rewriting ``result`` in place."""
    supported = ctx.target.runtime.supported_ops
    hard_sigmoid_ok = not supported or "HardSigmoid" in supported  # only where the target runs HardSigmoid
    # an already-quantized model keeps its float rounding: its quantizer's scales were chosen for it
    activations = params.fuse_activations and not quantized_ops(source)
    if params.fuse_activations and not activations:
        notes.append("activation rewrites skipped: the model is already quantized")
    hard_swish = fuse_hard_swish(result) if activations and hard_sigmoid_ok else 0
    affine_folds = fold_scalar_affine(result) if activations else 0
    return hard_swish, affine_folds, clip_saturated_tanh_inputs(result) if activations else 0


def _gated_residual_rewrites(source: onnx.ModelProto, result: onnx.ModelProto, params: FuseParams) -> int:
    """``x + x * g`` folded in place; not in an already-quantized model (its scales were chosen for both ops)."""
    return fold_gated_residuals(result) if params.gated_residuals and not quantized_ops(source) else 0


def _deconv_rewrites(source: onnx.ModelProto, result: onnx.ModelProto, ctx: PassContext, params: FuseParams) -> int:
    """ConvTransposes rewritten as 1×1 Convs before a DepthToSpace, in place; only where the target runs DepthToSpace
    and the model is not quantized already (its quantizer's scales sit around the ConvTranspose)."""
    supported = ctx.target.runtime.supported_ops
    if not params.deconv_as_depth or (supported and "DepthToSpace" not in supported) or quantized_ops(source):
        return 0
    return deconvs_as_depth(result)


def _op_changes(before: Counter, after: Counter) -> dict:
    removed = {op: before[op] - after[op] for op in before if before[op] > after[op]}
    added = {op: after[op] - before[op] for op in after if after[op] > before[op]}
    return {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "removed_ops": dict(sorted(removed.items())),
        "added_ops": dict(sorted(added.items())),
    }


def requires(model: onnx.ModelProto, ctx: PassEnv, params: FuseParams) -> None:
    """ort_offline writes ONNX Runtime's own fused ops: only a target deployed with ONNX Runtime runs them."""
    if params.ort_offline:
        ctx.target.runtime.require_onnxruntime(
            ctx.target.name, "fuse.ort_offline", "ORT's fused ops are not standard ONNX"
        )


@register_pass(
    "fuse",
    params=FuseParams,
    description="Constant folding, BatchNorm/bias folding, no-op/dead-node elimination, LayerNorm/Gelu fusion "
    "(exact up to rounding); optionally ONNX Runtime's offline-optimised graph.",
    exactness=tolerance(rtol=1e-4, atol=1e-5),
    order=10,
    requires=requires,
)
def fuse(model: onnx.ModelProto, ctx: PassContext, params: FuseParams) -> PassResult:
    requires(model, ctx, params)  # also when the pass runs outside a pipeline
    before_ops = op_counts(model)
    notes: list[str] = []
    result = _simplified(model, ctx, params, notes)
    constants_to_initializers(result)
    result, centered, norms = written_out_norms(result, params.fuse_norms, ctx.target.runtime.opset_max, notes)
    dropouts = remove_inference_dropouts(result)
    # first, so their Adds fold into Conv biases; not in a quantized model (its scales sit around the ops)
    rewrite_chip_ops = params.fuse_activations and not quantized_ops(model)
    chip_ops = as_integer_chip_ops(result, ctx.target.runtime.supported_ops) if rewrite_chip_ops else 0
    bias_folds = fold_bias_adds(result)
    hard_swish, affine_folds, tanh_clips = _activation_rewrites(model, result, ctx, params, notes)
    deconvs = _deconv_rewrites(model, result, ctx, params)
    gated = _gated_residual_rewrites(model, result, params)
    supported = ctx.target.runtime.supported_ops
    depth_ok = params.focus_as_depth and (not supported or "SpaceToDepth" in supported)
    focus = focus_as_space_to_depth(result) if depth_ok and not quantized_ops(model) else 0
    gather_ok = params.shuffle_as_gather and (not supported or "Gather" in supported)
    shuffles = channel_shuffles_as_gather(result) if gather_ok else 0
    list_initializers_as_inputs(result)
    if params.ort_offline and has_external(result):
        ctx.warn("ort_offline skipped: ONNX Runtime would write the optimised graph with every weight inline")
    elif params.ort_offline:
        result = ort_offline_graph(result, ctx.work_dir)
        notes.append("ONNX Runtime offline graph (ORT_ENABLE_EXTENDED, CPU EP)")
    summary = {
        **_op_changes(before_ops, op_counts(result)),
        "bias_adds_folded": bias_folds,
        "hard_swish_fused": hard_swish,
        "as_integer_chip_ops": chip_ops,
        "scalar_affine_folded": affine_folds,
        "tanh_inputs_clipped": tanh_clips,
        "deconvs_as_depth": deconvs,
        "gated_residuals_folded": gated,
        "focus_as_space_to_depth": focus,
        "channel_shuffles_as_gather": shuffles,
        "dropouts_removed": dropouts,
        "variances_centered": centered,
        "layer_norms_fused": norms,
        "opset": opset(result),
        "ort_offline": params.ort_offline,
    }
    if notes:
        summary["notes"] = notes
    return PassResult(result, summary)
