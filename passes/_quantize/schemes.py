"""How each quantization scheme turns a float model into a quantized one.

Libraries checked, and used where they do the job:
- static int8 QDQ: ``onnxruntime.quantization.quantize_static`` (calibration ranges come from our
  streamed calibration through its ``calibration_cache_path``, so one calibration serves every
  tuning candidate); its ``quant_pre_process`` (symbolic shape inference + basic optimisation) first;
- power-of-two scales (DPU style): ORT has no option; we force them through its
  ``TensorQuantOverrides`` (explicit scale and zero point 0 per activation and weight tensor);
- fp16 with fp32 I/O: ``onnxruntime.transformers.float16.convert_float_to_float16`` (ships with
  ORT; onnxconverter-common is not installed) with an op block list and per-node float keeps;
- dynamic int8: ``quantize_dynamic``; int4 weight-only: ``MatMulNBitsQuantizer``;
- int8 weight-only (float compute, int8 storage): ORT's quantizers always quantize activations
  too, so the DequantizeLinear-on-weights rewrite is written here (about thirty lines).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from lepton_cli.passes._quantize.calibration import METHODS, quiet_ort
from lepton_cli.passes._quantize.chip_norms import CHIP_NORM_OPS, l2_overrides
from lepton_cli.passes._quantize.host_edges import float_reads
from lepton_cli.passes._quantize.pow2_grid import candidate_scales, clip_free_scale
from lepton_cli.passes._quantize.recurrent import dynamic_lstm
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from lepton_cli.model.external_data import has_external, save_with_weights_beside, shapes_only_copy, tensor_array
from lepton_cli.model.graph_edit import drop_unused_initializers
from lepton_cli.model.graph_order import move_into_subgraphs, sort_topologically
from lepton_cli.model.op_traits import WEIGHT_OPS, attr

QTYPES = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")  # input 2 is a bias


@dataclass(frozen=True)
class Int8Scheme:
    """A static int8 QDQ scheme: what ORT's quantize_static gets, plus what it lacks (pow2 scales)."""

    activation_type: str = "u8"
    weight_type: str = "s8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    power_of_two: bool = False
    op_types: tuple[str, ...] = ()  # empty: every op ORT can quantize
    dynamic_lstm: bool = False  # LSTMs as DynamicQuantizeLSTM (recurrent.py): ORT's static quantizer leaves them float
    extra: dict[str, Any] = field(default_factory=dict)


def merged_options(options: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """ORT extra options ``options`` with ``more`` on top; per-tensor overrides merged, ``more``'s winning."""
    merged = options | more
    if "TensorQuantOverrides" in options and "TensorQuantOverrides" in more:
        merged["TensorQuantOverrides"] = options["TensorQuantOverrides"] | more["TensorQuantOverrides"]
    return merged


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes stable names: ORT's nodes_to_exclude and our reports refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def _copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's tools drop or keep metadata unpredictably; layout metadata (NHWC I/O) must survive."""
    have = {p.key for p in target.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            target.metadata_props.add(key=prop.key, value=prop.value)
    return target


def preprocess(model: onnx.ModelProto, work_dir: Path, *, optimize: bool = True) -> onnx.ModelProto:
    """ORT's documented pre-processing: symbolic shape inference, basic graph optimisation, onnx shapes.

    Without it quantize_static sees no shapes for many tensors and quantizes far fewer, worse-placed ops.
    """
    folder = Path(tempfile.mkdtemp(prefix="pre-", dir=work_dir))
    src, out = folder / "in.onnx", folder / "model.onnx"
    # A file, not the proto: given a proto, quant_pre_process rewrites it in place to reference external
    # data and (ORT 1.32) fails unpacking raw data of small models.
    onnx.save_model(model, src)
    # Symbolic shape inference needs sympy, which Lepton does not depend on; shapes are bound before
    # the pipeline runs, so ONNX shape inference covers what the quantizer needs.
    symbolic = importlib.util.find_spec("sympy") is not None
    with quiet_ort():
        try:
            quant_pre_process(str(src), str(out), skip_optimization=not optimize, skip_symbolic_shape=not symbolic)
        except Exception:  # symbolic shape inference fails on some graphs: ONNX shape inference alone
            quant_pre_process(str(src), str(out), skip_optimization=not optimize, skip_symbolic_shape=True)
    result = onnx.load(str(out))
    name_nodes(result)
    return _copy_metadata(model, result)


def save_ranges(ranges: TensorsData, path: Path) -> Path:
    save_tensors_data(ranges, path)
    return path


def pow2_weight_scale(values: np.ndarray, qmax: int = 127) -> float:
    """The power-of-two scale with the least squared int8 error on ``values`` (a constant): the smallest one that
    clips nothing, or one or two steps finer when clipping the few largest values costs less than the coarser
    grid costs all of them (Vitis AI's quantizer also picks weight fix-points by error, not by the maximum)."""
    flat = values.astype(np.float64).ravel()
    absmax = float(np.abs(flat).max()) if flat.size else 0.0
    return min(candidate_scales(absmax, 2, qmax), key=lambda scale: rounding_error(flat, scale, qmax))


def rounding_error(values: np.ndarray, scale: float, qmax: int = 127) -> float:
    """Squared error of ``values`` on the symmetric int8 grid of ``scale`` (clipped at ±``qmax``)."""
    return float(np.square(np.clip(np.round(values / scale), -qmax, qmax) * scale - values).sum())


def pow2_overrides(model: onnx.ModelProto, ranges: TensorsData) -> dict[str, list[dict[str, Any]]]:
    """Per-tensor symmetric int8 overrides with power-of-two scales, for activations and weights."""
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, data in ranges.items():
        low, high = data.range_value
        absmax = float(max(abs(float(np.asarray(low).min())), abs(float(np.asarray(high).max()))))
        overrides[name] = [
            {
                "quant_type": QuantType.QInt8,
                "scale": np.array(clip_free_scale(absmax), dtype=np.float32),
                "zero_point": np.array(0, dtype=np.int8),
            }
        ]
    inits = {i.name: i for i in model.graph.initializer}
    # Every constant the quantizer may turn into int8, not only Conv/Gemm weights: else Add/Mul constants
    # (a folded hard-swish's 3 and 1/6) get ORT's min/max scales, which are not powers of two.
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in inits or name in overrides or (node.op_type in BIAS_OPS and index == 2):
                continue  # a bias is int32 at input scale × weight scale: a power of two already
            constant = tensor_array(inits[name])
            if constant.dtype == np.float32 and constant.size:
                overrides[name] = [
                    {
                        "quant_type": QuantType.QInt8,
                        "scale": np.array(pow2_weight_scale(constant), dtype=np.float32),
                        "zero_point": np.array(0, dtype=np.int8),
                    }
                ]
    return overrides


def double_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that read or write a float64 tensor: QuantizeLinear takes none, and ONNX Runtime's quantizer, asked for
    every op, fails on a float64 Softmax the calibrator (float32 only) left without a range (swift-f0's decoder)."""
    inferred = model if model.graph.value_info else onnx.shape_inference.infer_shapes(shapes_only_copy(model))
    graph = inferred.graph
    typed = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    typed |= {t.name: t.data_type for t in graph.initializer}
    double = onnx.TensorProto.DOUBLE
    return [n.name for n in model.graph.node if any(typed.get(x) == double for x in (*n.input, *n.output))]


def unshare_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each bias that several Convs/Gemms read copied per reader under a name no tensor has. ONNX
    Runtime's quantizer copies a shared bias itself as name + the next free number among initializers only, and can
    take a node output's name (basic-pitch's tf2onnx export names a conv's output its bias's name + "2")."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type in BIAS_OPS and len(node.input) > 2 and node.input[2]:
            readers.setdefault(node.input[2], []).append(index)
    inits = {t.name: t for t in model.graph.initializer}
    shared = {name: users for name, users in readers.items() if len(users) > 1 and name in inits}
    if not shared:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    taken = {o for n in result.graph.node for o in n.output} | set(inits) | {i.name for i in result.graph.input}
    for name, users in shared.items():
        for k, user in enumerate(users[1:], start=1):
            copy = f"{name}__bias{k}"
            while copy in taken:
                copy += "_"
            taken.add(copy)
            duplicate = onnx.TensorProto()
            duplicate.CopyFrom(inits[name])
            duplicate.name = copy
            result.graph.initializer.append(duplicate)
            result.graph.node[user].input[2] = copy
    return result


def op_types_with_norms(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str] | None:
    """ORT's op types (``op_types``, or every one it quantizes), plus the ops a LayerNorm written for an integer chip
    became: ORT's quantizer lists neither ReduceMean nor LpNormalization, and would leave them float on the host."""
    if not any(n.op_type == "LpNormalization" for n in model.graph.node):
        return list(op_types) or None
    known = list(op_types) or sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    return [*known, *(op for op in CHIP_NORM_OPS if op not in known)]


def quantize_int8(
    model: onnx.ModelProto, ranges_path: Path, method: str, scheme: Int8Scheme, exclude: list[str], work_dir: Path
) -> onnx.ModelProto:
    """Static int8 QDQ of a pre-processed model from cached calibration ranges (float64 nodes left as they are)."""
    extra: dict[str, Any] = {
        "ActivationSymmetric": scheme.activation_symmetric,
        "WeightSymmetric": scheme.weight_symmetric,
    }
    if scheme.power_of_two:
        extra["TensorQuantOverrides"] = pow2_overrides(model, load_tensors_data(ranges_path))
        extra["QDQDisableWeightAdjustForInt32Bias"] = True  # the adjustment would break power-of-two weight scales
    extra = merged_options(extra, scheme.extra)
    norms = l2_overrides(model, scheme.activation_type)
    if norms:  # the chip's L2_NORMALIZATION writes a fixed grid (chip_norms.py)
        extra = merged_options(extra, {"TensorQuantOverrides": norms})
    model = unshare_biases(model)
    folder = Path(tempfile.mkdtemp(prefix="q-", dir=work_dir))
    out = folder / "model.onnx"
    source: onnx.ModelProto | str = model
    if not has_external(model):
        # Given a proto, quantize_static deep-copies it and keeps that copy while it reloads the model: given a
        # file whose weights sit beside it, it holds only the reload (light_vgg19 cpu-avx: docs/decisions.md).
        source = str(folder / "in.onnx")
        save_with_weights_beside(model, Path(source))
    with quiet_ort():
        quantize_static(
            source,
            str(out),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types_with_norms(model, scheme.op_types),
            per_channel=scheme.per_channel and not scheme.power_of_two,
            reduce_range=scheme.reduce_range,
            activation_type=QTYPES[scheme.activation_type],
            weight_type=QTYPES[scheme.weight_type],
            nodes_to_exclude=[*exclude, *double_nodes(model)],
            calibrate_method=METHODS[method],
            calibration_cache_path=str(ranges_path),
            extra_options=extra,
        )
    quantized = _copy_metadata(model, onnx.load(str(out)))
    float_reads(quantized, exclude)  # a float node reads another's output as it is (host_edges.py)
    if scheme.dynamic_lstm:
        dynamic_lstm(quantized, set(exclude), scheme.reduce_range)
    return quantized


# Ops whose fp16 results overflow (65504) or lose too much (large reductions, exponentials):
# kept in fp32 by default; targets may add more.
FP16_BLOCK_DEFAULT = (
    "Exp",
    "Pow",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "CumSum",
    "Softmax",
    "LayerNormalization",
    "Range",
)


def to_fp16(model: onnx.ModelProto, block_ops: list[str], keep_nodes: list[str]) -> onnx.ModelProto:
    """fp16 compute and weights with fp32 graph inputs/outputs (Casts at the edges)."""
    from onnxruntime.transformers import float16

    with quiet_ort():
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(block_ops)),
            node_block_list=list(keep_nodes) or None,
        )
    # The converter appends the graph-input Casts after their consumers, and puts some of an If branch's
    # Casts in the main graph: move them home, restore topological order.
    move_into_subgraphs(converted.graph)
    if fold_small_constant_casts(converted.graph):
        drop_unused_initializers(converted)
    sort_topologically(converted.graph)
    drop_stale_value_info(converted.graph)
    return _copy_metadata(model, converted)


SMALL_CONSTANT = 64  # elements: shape-like inputs (Resize roi/scales), not weights whose fp16 copy is the point


def fold_small_constant_casts(graph: onnx.GraphProto) -> int:
    """Casts the fp16 converter puts on small constants, folded into constants of the cast type. ONNX Runtime reads
    a Resize's scales only from a constant: an empty scales beside sizes (wired-table-rec's upsampling) behind a Cast
    reads as both given, and the model fails to load. Returns folds done."""
    inits = {t.name: t for t in graph.initializer}
    folded = []
    for node in graph.node:
        source = inits.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if source is None or np.prod(source.dims, dtype=np.int64) > SMALL_CONSTANT:
            continue
        value = numpy_helper.to_array(source).astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def drop_stale_value_info(graph: onnx.GraphProto) -> int:
    """Remove shape annotations (``value_info``) of names that no node produces, in every (sub)graph.

    Exporters and earlier passes leave annotations for initializers and for tensors that no longer
    exist; the fp16 converter retypes them all to float16, also those of initializers it keeps fp32
    (e.g. LayerNormalization weights), and onnx's shape inference then fails on the
    contradiction ("Inferred elem type differs from existing elem type: (1) vs (10)")."""
    produced = {o for n in graph.node for o in n.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for value in stale:
        graph.value_info.remove(value)
    for node in graph.node:
        for attribute in node.attribute:
            graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for sub in graphs:
                drop_stale_value_info(sub)
    return len(stale)


def weight_only_int8(model: onnx.ModelProto, min_elements: int = 256) -> tuple[onnx.ModelProto, list[str]]:
    """Store Conv/Gemm/MatMul weights as per-channel symmetric int8 with a DequantizeLinear in front.

    Compute stays float; the model shrinks about 4x (XNNPACK/NNAPI load int8 weights directly).
    """
    inits = {init.name: init for init in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    done: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits and node.input[1] not in done:
            init = inits[node.input[1]]
            weight = tensor_array(init)
            if weight.dtype != np.float32 or weight.size < min_elements or weight.ndim < 2:
                continue
            if node.op_type == "Gemm":
                trans_b = attr(node, "transB", 0)
                axis = 0 if trans_b else 1
            elif node.op_type == "MatMul":
                axis = weight.ndim - 1
            elif node.op_type == "ConvTranspose":
                axis = 1
            else:
                axis = 0
            reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
            absmax = np.abs(weight).max(axis=reduce_axes)
            scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
            shape = [1] * weight.ndim
            shape[axis] = -1
            q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
            base = init.name
            init.CopyFrom(numpy_helper.from_array(q, base + "_int8"))
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(scale, base + "_scale"),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), base + "_zero_point"),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [base + "_int8", base + "_scale", base + "_zero_point"],
                    [base],
                    name=base + "_DequantizeLinear",
                    axis=axis,
                )
            )
            done.append(base)
    # DequantizeLinear nodes go first: graph order must stay topological.
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, done


def dynamic_int8(model: onnx.ModelProto, work_dir: Path, per_channel: bool) -> onnx.ModelProto:
    """int8 weights, activations quantized at run time: for MatMul-heavy models (transformers, LSTMs)."""
    src = Path(tempfile.mkdtemp(prefix="dyn-", dir=work_dir))
    onnx.save_model(model, src / "in.onnx")
    with quiet_ort():
        quantize_dynamic(
            str(src / "in.onnx"),
            str(src / "out.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=["MatMul", "Gemm", "Attention", "LSTM", "GRU"],
        )
    return _copy_metadata(model, onnx.load(str(src / "out.onnx")))


def int4_weight_only(model: onnx.ModelProto, block_size: int) -> tuple[onnx.ModelProto, int]:
    """MatMul weights as symmetric 4-bit blocks along K (com.microsoft MatMulNBits); other ops untouched.

    ORT's ``MatMulNBitsQuantizer`` does this too but imports ``onnx_ir``, which is not installed;
    the packing is short: per output column, blocks of ``block_size`` along K, scale = absmax / 7,
    q + 8 in a nibble (low nibble first), no zero-point input (the op's default is 8).
    """
    inits = {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        weight = tensor_array(inits[node.input[1]]) if node.op_type == "MatMul" and node.input[1] in inits else None
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or min(weight.shape) < 16:
            nodes.append(node)
            continue
        k, n = weight.shape
        blocks = -(-k // block_size)
        padded = np.zeros((blocks * block_size, n), dtype=np.float32)
        padded[:k] = weight
        w = padded.T.reshape(n, blocks, block_size)
        scale = np.abs(w).max(axis=2) / 7.0
        scale[scale == 0] = 1.0
        q = (np.clip(np.round(w / scale[..., None]), -7, 7) + 8).astype(np.uint8)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        base = node.input[1]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(packed, base + "_q4"),
                numpy_helper.from_array(scale.reshape(-1).astype(np.float32), base + "_q4_scale"),
            ]
        )
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], base + "_q4", base + "_q4_scale"],
                list(node.output),
                name=node.name,
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block_size,
            )
        )
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model, count
