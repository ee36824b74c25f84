"""fuse: exact graph simplification — constant folding, BatchNorm/bias folding, no-op and dead-node
elimination, LayerNormalization/Gelu fusion, and (ONNX Runtime targets only) ORT's offline graph.

Library checked first: onnxsim (0.8, with its onnxoptimizer fork) already does, by default,
constant folding, Conv+BatchNormalization folding, Add-bias folding into a bias-less Conv,
MatMul+Add → Gemm, Identity/Dropout/no-op elimination, consecutive Transpose and Reshape merging,
common-subexpression and dead-node elimination, and fuses the textbook LayerNormalization (when
the model's opset is exactly 17: its matcher reads ReduceMean's ``axes`` attribute, an input from
opset 18) and Gelu (opset >= 20). We therefore only write by hand what it leaves:

* inference Dropouts that declare an (unread) mask output, which onnxsim keeps;
* an Add of a per-channel constant after a Conv that already has a bias (e.g. after BN folding),
  and an Add of a constant after a Gemm (folded into C);
* the opset bump that lets the LayerNormalization / Gelu fusions fire when the target's
  ``runtime.opset_max`` allows it (onnxsim's ``target_opset_version``), kept only when it fused;
* ONNX Runtime's offline-optimised graph (``SessionOptions.optimized_model_filepath`` at
  ``ORT_ENABLE_EXTENDED`` on the CPU EP) for targets whose deployment runtime is onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from lepton_cli.passes._fuse.activation import fold_scalar_affine, fuse_hard_swish
from lepton_cli.passes._quantize.prequantized import quantized_ops

from lepton_cli.errors import BadInputError
from lepton_cli.model.external_data import has_external
from lepton_cli.model.graph_edit import GraphIndex, drop_unused_initializers, subgraph_names
from lepton_cli.model.initializers import constants_to_initializers, list_initializers_as_inputs
from lepton_cli.model.op_traits import opset
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import PassEnv, PassResult, register_pass, tolerance

LAYER_NORM_OPSET = 17  # LayerNormalization joined the default domain at opset 17
GELU_OPSET = 20  # Gelu at opset 20


@dataclass(frozen=True)
class FuseParams:
    fold_constants: bool = True  # onnxsim constant folding (ConstantOfShape weights in the light zoo)
    # Constants larger than this stay unfolded (vgg19's light-zoo ConstantOfShape fc6 weight would
    # become a 411 MB initializer; the runtime builds it as cheaply from its shape).
    fold_limit_mb: float = 64.0
    fuse_norms: bool = True  # LayerNormalization / Gelu fusion, bumping the opset within runtime.opset_max
    # Decomposed hard-swish -> HardSigmoid + Mul, scalar affine blocks folded into Convs (fuse_activation.py)
    fuse_activations: bool = True
    # ONNX Runtime's offline-optimised graph (contrib fused ops). Only for deployment_runtime = "onnxruntime".
    ort_offline: bool = False

    def __post_init__(self) -> None:
        if self.fold_limit_mb <= 0:
            raise ParamValueError("fold_limit_mb", f"must be > 0, got {self.fold_limit_mb}")


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _simplify(model: onnx.ModelProto, params: FuseParams, opset: int | None = None) -> onnx.ModelProto:
    import onnxsim

    simplified, _ = onnxsim.simplify(
        model,
        check_n=0,
        skip_constant_folding=not params.fold_constants,
        tensor_size_threshold=f"{int(params.fold_limit_mb * 1024 * 1024)}B",
        target_opset_version=opset,
    )
    return simplified


def _norm_candidates(ops: Counter) -> tuple[bool, bool]:
    """(LayerNormalization decomposition likely present, Gelu decomposition likely present)."""
    return (ops["ReduceMean"] >= 2 and ops["Sqrt"] >= 1, ops["Erf"] >= 1)


def _with_opset_for_norms(
    original: onnx.ModelProto, simplified: onnx.ModelProto, params: FuseParams, opset_max: int, notes: list[str]
) -> onnx.ModelProto:
    """Re-simplify at the opset the norm fusions need, keeping the result only if it fused more."""
    current = opset(simplified)
    want_ln, want_gelu = _norm_candidates(_ops(simplified))
    best = simplified
    if want_ln and current < LAYER_NORM_OPSET <= opset_max:
        try:
            trial = _simplify(original, params, LAYER_NORM_OPSET)
        except Exception as exc:  # the version converter has gaps; keep the model's opset
            notes.append(
                f"opset {LAYER_NORM_OPSET} for LayerNormalization not reachable: {str(exc).splitlines()[0][:120]}"
            )
        else:
            if _ops(trial)["LayerNormalization"] > _ops(best)["LayerNormalization"]:
                best = trial
                notes.append(f"opset {current} → {LAYER_NORM_OPSET} to fuse LayerNormalization")
    if want_gelu and opset(best) < GELU_OPSET <= opset_max:
        try:
            trial = _simplify(best, params, GELU_OPSET)
        except Exception as exc:
            notes.append(f"opset {GELU_OPSET} for Gelu not reachable: {str(exc).splitlines()[0][:120]}")
        else:
            if _ops(trial)["Gelu"] > _ops(best)["Gelu"]:
                notes.append(f"opset {opset(best)} → {GELU_OPSET} to fuse Gelu")
                best = trial
    return best


# ---- hand-written folds onnxsim leaves -----------------------------------------------------


def _add_operands(node: onnx.NodeProto, g: GraphIndex, produced: str) -> np.ndarray | None:
    """The constant operand of Add(produced, const) or Add(const, produced)."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == produced else node.input[0]
    if produced not in node.input or other == produced:
        return None
    return g.const(other)


def _fold_conv_add(conv: onnx.NodeProto, add: onnx.NodeProto, g: GraphIndex) -> bool:
    weight = g.const(conv.input[1]) if len(conv.input) > 1 else None
    extra = _add_operands(add, g, conv.output[0])
    if weight is None or extra is None or extra.dtype != weight.dtype:
        return False
    rank = weight.ndim  # the conv output has the weight's rank: [N, Co, spatial...]
    if extra.ndim > rank:
        return False
    full = extra.reshape((1,) * (rank - extra.ndim) + extra.shape)
    channels = weight.shape[0]
    if any(d != 1 for axis, d in enumerate(full.shape) if axis != 1) or full.shape[1] not in (1, channels):
        return False
    bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels, weight.dtype)
    if bias is None:
        return False
    new_bias = (bias + np.broadcast_to(full.reshape(-1), (channels,))).astype(weight.dtype)
    name = g.set_const(conv.input[2] if len(conv.input) > 2 and conv.input[2] else conv.output[0] + "_bias", new_bias)
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = name
    return True


def _fold_gemm_add(gemm: onnx.NodeProto, add: onnx.NodeProto, g: GraphIndex) -> bool:
    b = g.const(gemm.input[1])
    extra = _add_operands(add, g, gemm.output[0])
    if b is None or extra is None or extra.dtype != b.dtype or b.ndim != 2:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    n = b.shape[0] if attrs.get("transB", 0) else b.shape[1]
    # Only a row vector / scalar: anything else could change Y's shape or need M.
    if (
        extra.ndim > 2
        or (extra.ndim == 2 and extra.shape[0] != 1)
        or (extra.ndim >= 1 and extra.shape[-1] not in (1, n))
    ):
        return False
    beta = float(attrs.get("beta", 1.0))
    c = g.const(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
    if len(gemm.input) > 2 and gemm.input[2] and c is None:
        return False
    if c is not None and (c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1)):
        return False
    base = np.zeros((n,), b.dtype) if c is None else (np.asarray(beta, b.dtype) * c if beta != 1.0 else c)
    new_c = np.broadcast_to(base.reshape(-1) if base.ndim else base, (n,)) + np.broadcast_to(
        extra.reshape(-1) if extra.ndim else extra, (n,)
    )
    name = g.set_const(gemm.input[2] if c is not None else gemm.output[0] + "_C", new_c.astype(b.dtype))
    while len(gemm.input) < 3:
        gemm.input.append("")
    gemm.input[2] = name
    for attr in list(gemm.attribute):
        if attr.name == "beta":
            gemm.attribute.remove(attr)
    return True


def fold_bias_adds(model: onnx.ModelProto) -> int:
    """Fold ``Add(const)`` after a biased Conv / a Gemm into the bias / C. Returns folds done."""
    g = GraphIndex(model.graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded, removed = 0, []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or not g.sole_use(node.output[0]):
            continue
        (add,) = consumers.get(node.output[0], [None])[:1] or [None]
        if add is None or add.op_type != "Add":
            continue
        fold = _fold_conv_add if node.op_type == "Conv" else _fold_gemm_add
        if fold(node, add, g):
            node.output[0] = add.output[0]  # the fused node now produces what the Add produced
            removed.append(add)
            folded += 1
    for add in removed:
        model.graph.node.remove(add)
    if folded:
        drop_unused_initializers(model)
    return folded


def remove_inference_dropouts(model: onnx.ModelProto) -> int:
    """Drop inference-mode Dropouts whose mask output nobody reads.

    onnxsim's ``eliminate_nop_dropout`` keeps a Dropout that declares its mask output (the light
    zoo's, after the opset-9 → 13 upgrade), even when nothing reads the mask.
    """
    graph = model.graph
    g = GraphIndex(graph)
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        training = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if training is not None and (g.const(training) is None or bool(g.const(training))):
            continue
        if len(node.output) > 1 and node.output[1] and g.uses[node.output[1]] + (node.output[1] in g.outputs) > 0:
            continue
        out, source = node.output[0], node.input[0]
        if out in g.outputs or out in subgraph_names(graph):
            identity = _identity(source, out, node.name)
            graph.node.insert(list(graph.node).index(node), identity)
        else:
            for other in graph.node:
                for k, name in enumerate(other.input):
                    if name == out:
                        other.input[k] = source
        graph.node.remove(node)
        removed += 1
    if removed:
        drop_unused_initializers(model)
    return removed


def _identity(source: str, out: str, name: str) -> onnx.NodeProto:
    return onnx.helper.make_node("Identity", [source], [out], name=name)


# ---- ONNX Runtime offline graph ---------------------------------------------------------------


def ort_offline_graph(model: onnx.ModelProto, work_dir: Path) -> onnx.ModelProto:
    """ONNX Runtime's own offline optimisation (extended level, CPU EP), read back as a model."""
    import onnxruntime as ort

    path = Path(work_dir) / "fuse.ort_offline.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def requires(model: onnx.ModelProto, ctx: PassEnv, params: FuseParams) -> None:
    """ort_offline writes ONNX Runtime's own fused ops: only a target deployed with ONNX Runtime runs them."""
    runtime = ctx.target.runtime
    if params.ort_offline and runtime.deployment_runtime != "onnxruntime":
        raise BadInputError(
            f"fuse.ort_offline = true on target {ctx.target.name!r}, whose deployment runtime is "
            f"{runtime.deployment_runtime!r}: ORT's fused ops are not standard ONNX",
            'set ort_offline = false, or use a target with deployment_runtime = "onnxruntime"',
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
def fuse(model: onnx.ModelProto, ctx, params: FuseParams) -> PassResult:
    runtime = ctx.target.runtime
    if params.ort_offline and runtime.deployment_runtime != "onnxruntime":
        raise BadInputError(
            f"fuse.ort_offline = true on target {ctx.target.name!r}, whose deployment runtime is "
            f"{runtime.deployment_runtime!r}: ORT's fused ops are not standard ONNX",
            'set ort_offline = false, or use a target with deployment_runtime = "onnxruntime"',
        )
    before_ops = _ops(model)
    notes: list[str] = []
    try:
        if has_external(model):  # onnxsim reads weights from one in-memory protobuf only
            raise ValueError("the weights are kept in external data, which onnxsim cannot read")
        result = _simplify(model, params)
    except Exception as exc:  # onnxsim's C++ core rejects some graphs (e.g. ops newer than its schemas)
        ctx.warn(
            f"onnxsim could not simplify this model ({str(exc).splitlines()[0][:160]}); only Lepton's own folds ran"
        )
        result = onnx.ModelProto()
        result.CopyFrom(model)
        notes.append("onnxsim skipped: " + str(exc).splitlines()[0][:160])
    else:
        if params.fuse_norms:
            result = _with_opset_for_norms(model, result, params, runtime.opset_max, notes)
    constants_to_initializers(result)
    dropouts = remove_inference_dropouts(result)
    bias_folds = fold_bias_adds(result)
    # HardSigmoid only where the target runs it (tpu's and fpga's op lists do not name it)
    hard_sigmoid_ok = not runtime.supported_ops or "HardSigmoid" in runtime.supported_ops
    # an already-quantized model keeps its float rounding (lepton_cli/quant/prequantized.py)
    activations = params.fuse_activations and not quantized_ops(model)
    if params.fuse_activations and not activations:
        notes.append("activation rewrites skipped: the model is already quantized")
    hard_swish = fuse_hard_swish(result) if activations and hard_sigmoid_ok else 0
    affine_folds = fold_scalar_affine(result) if activations else 0
    list_initializers_as_inputs(result)
    if params.ort_offline and has_external(result):
        ctx.warn("ort_offline skipped: ONNX Runtime would write the optimised graph with every weight inline")
    elif params.ort_offline:
        result = ort_offline_graph(result, ctx.work_dir)
        notes.append("ONNX Runtime offline graph (ORT_ENABLE_EXTENDED, CPU EP)")
    after_ops = _ops(result)
    removed = {op: before_ops[op] - after_ops[op] for op in before_ops if before_ops[op] > after_ops[op]}
    added = {op: after_ops[op] - before_ops[op] for op in after_ops if after_ops[op] > before_ops[op]}
    summary = {
        "nodes_before": sum(before_ops.values()),
        "nodes_after": sum(after_ops.values()),
        "removed_ops": dict(sorted(removed.items())),
        "added_ops": dict(sorted(added.items())),
        "bias_adds_folded": bias_folds,
        "hard_swish_fused": hard_swish,
        "scalar_affine_folded": affine_folds,
        "dropouts_removed": dropouts,
        "opset": opset(result),
        "ort_offline": params.ort_offline,
    }
    if notes:
        summary["notes"] = notes
    return PassResult(result, summary)
