"""A LayerNorm written out over one axis (sums, a centered square, Sqrt, Reciprocal) as one LayerNormalization.

onnxsim fuses the ReduceMean/Pow/Div form PyTorch exports; jax2tf and TF exports (flax's LayerNorm in Google's
Magika) write ReduceSum * 1/N, Reshape/Expand to x's shape, ``Reciprocal(Sqrt(var + eps))`` times gamma, and it
stays 13-16 ops. Written out, an int8 target quantizes the variance and its reciprocal square root on an 8-bit grid:
over Magika's near-constant positions (variance 1e-6 to 0.04) that grid is zero, and its tpu model agreed with the
source on 87.5 % of held-out files; with the norm one op (a host op on an integer accelerator, as a transformer's)
100 %. A norm over an inner axis is wrapped in two Transposes (LayerNormalization normalises the trailing axes).
Run after ``center_variances``; needs opset 17.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._fuse.centered_variance import center_variances
from lepton_cli.passes._fuse.moments import BROADCASTS, centered, mean_of, reduced_axes, scalar, square_of
from lepton_cli.passes._fuse.simplify import LAYER_NORM_OPSET
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers, remove_unread_nodes
from lepton_cli.model.graph_order import sort_topologically
from lepton_cli.model.op_traits import opset
from lepton_cli.model.stats import shape_map


@dataclass
class _Norm:
    x: str
    axis: int  # the one normalised axis, non-negative
    rank: int
    epsilon: float
    gamma: np.ndarray
    beta: np.ndarray
    output: str  # the tensor the LayerNormalization writes


def _next(g: GraphIndex, name: str, op_types: tuple[str, ...]) -> onnx.NodeProto | None:
    """The one node reading ``name``, if it is one of ``op_types``."""
    reader = g.only_reader(name)
    return reader if reader is not None and reader.op_type in op_types else None


def _past_broadcasts(g: GraphIndex, name: str) -> str:
    while (node := _next(g, name, BROADCASTS)) is not None and node.input[0] == name:
        name = node.output[0]
    return name


def _mean_source(g: GraphIndex, name: str) -> str:
    """The mean a broadcast chain carries to x's shape (``name`` itself where no broadcast does)."""
    while (node := g.producer.get(name)) is not None and node.op_type in BROADCASTS:
        name = node.input[0]
    return name


def _const_operand(g: GraphIndex, node: onnx.NodeProto | None, name: str) -> np.ndarray | None:
    if node is None or len(node.input) != 2 or list(node.input).count(name) != 1:
        return None
    return g.const(next(i for i in node.input if i != name))


def _channel_vector(value: np.ndarray | None, default: float, rank: int, axis: int, size: int) -> np.ndarray | None:
    """``value`` (broadcast against x) as a vector along ``axis``; None where it varies along another axis."""
    if value is None or value.size == 1:
        return np.full(size, default if value is None else value.reshape(()), dtype=np.float32)
    dims = [1] * (rank - value.ndim) + list(value.shape)
    if value.ndim > rank or value.size != size or dims[axis] != size:
        return None
    return value.reshape(size).astype(np.float32)


def _variance(g: GraphIndex, shapes: dict, square: onnx.NodeProto) -> tuple[str, str, tuple[int, ...]] | None:
    """(d, the variance, its axes) where ``square`` is Mul(d, d) and the variance the mean of d² over some axes."""
    difference = square_of(g, square.output[0])
    reduce = _next(g, square.output[0], ("ReduceSum", "ReduceMean"))
    if difference is None or reduce is None:
        return None
    scaling = _next(g, reduce.output[0], ("Mul", "Div")) if reduce.op_type == "ReduceSum" else None
    variance = (scaling or reduce).output[0]
    found = mean_of(g, shapes, variance)
    axes = reduced_axes(g, reduce)
    return (difference, variance, axes) if found is not None and found[0] == square.output[0] and axes else None


def _inverse_std(g: GraphIndex, variance: str) -> tuple[float, str] | None:
    """(epsilon, 1/sqrt(var + epsilon)) following the variance through Max(·, 0), broadcasts, Add, Sqrt, Reciprocal."""
    node = _next(g, variance, ("Max",))
    if node is not None and scalar(g, next((i for i in node.input if i != variance), "")) == 0.0:
        variance = node.output[0]  # a centered variance is never negative
    variance = _past_broadcasts(g, variance)
    add = _next(g, variance, ("Add",))
    epsilon = scalar(g, next((i for i in add.input if i != variance), "")) if add is not None else None
    sqrt = _next(g, add.output[0], ("Sqrt",)) if add is not None and epsilon and epsilon > 0 else None
    inverse = _next(g, sqrt.output[0], ("Reciprocal", "Div")) if sqrt is not None else None
    if (
        inverse is None
        or inverse.op_type == "Div"
        and (inverse.input[1] != sqrt.output[0] or scalar(g, inverse.input[0]) != 1.0)
    ):
        return None
    return float(epsilon), _past_broadcasts(g, inverse.output[0])


def _match(g: GraphIndex, shapes: dict, square: onnx.NodeProto) -> _Norm | None:
    """The LayerNorm around ``square`` = Mul(d, d): d = x − mean(x) over one axis, scaled by 1/sqrt(mean(d²) + eps),
    times gamma and plus beta where they are constants."""
    found = _variance(g, shapes, square)
    sub = g.producer.get(found[0]) if found else None
    if found is None or sub is None or sub.op_type != "Sub" or len(found[2]) != 1:
        return None
    difference, variance, (axis,) = found
    x, dims = sub.input[0], shapes.get(sub.input[0])
    mean = mean_of(g, shapes, _mean_source(g, sub.input[1]))
    if mean is None or mean[0] != x or centered(g, x, _mean_source(g, sub.input[1])) != difference or not dims:
        return None
    if [a % len(dims) for a in reduced_axes(g, mean[1]) or ()] != [axis % len(dims)]:
        return None  # the mean and the variance over different axes: not a norm
    axis %= len(dims)
    scale = _inverse_std(g, variance)
    if scale is None or dims[axis] is None:
        return None
    return _affine(g, _Norm(x, axis, len(dims), scale[0], None, None, ""), dims[axis], difference, scale[1])  # type: ignore[arg-type]


def _affine(g: GraphIndex, norm: _Norm, size: int, difference: str, inverse: str) -> _Norm | None:
    """``norm`` completed where ``1/sqrt(var + eps)`` (times gamma) multiplies d, and beta is added."""
    node, gamma = _next(g, inverse, ("Mul",)), None
    if node is not None and difference not in node.input:  # gamma multiplies the inverse first
        gamma = _const_operand(g, node, inverse)
        inverse = _past_broadcasts(g, node.output[0]) if gamma is not None else inverse
        node = _next(g, inverse, ("Mul",)) if gamma is not None else None
    if node is None or sorted(node.input) != sorted([difference, inverse]):
        return None
    output = node.output[0]
    if gamma is None and (gamma := _const_operand(g, _next(g, output, ("Mul",)), output)) is not None:
        output = _next(g, output, ("Mul",)).output[0]  # type: ignore[union-attr]
    beta = _const_operand(g, _next(g, output, ("Add",)), output)
    output = _next(g, output, ("Add",)).output[0] if beta is not None else output  # type: ignore[union-attr]
    norm.gamma = _channel_vector(gamma, 1.0, norm.rank, norm.axis, size)  # type: ignore[assignment]
    norm.beta = _channel_vector(beta, 0.0, norm.rank, norm.axis, size)  # type: ignore[assignment]
    norm.output = output
    return norm if norm.gamma is not None and norm.beta is not None else None


def _insert_norm(g: GraphIndex, names: FreshNames, norm: _Norm, at: int) -> None:
    """LayerNormalization over ``norm.axis`` writing ``norm.output``, between two Transposes for an inner axis."""
    gamma = g.add_initializer(names.fresh(norm.output + "_gamma"), norm.gamma)
    beta = g.add_initializer(names.fresh(norm.output + "_beta"), norm.beta)
    last = norm.axis == norm.rank - 1
    perm = [a for a in range(norm.rank) if a != norm.axis] + [norm.axis]
    nodes = []
    source = norm.x
    if not last:
        source = names.fresh(norm.x + "_axis_last")
        nodes.append(helper.make_node("Transpose", [norm.x], [source], name=names.fresh(source), perm=perm))
    normed = norm.output if last else names.fresh(norm.output + "_axis_last")
    nodes.append(
        helper.make_node(
            "LayerNormalization",
            [source, gamma, beta],
            [normed],
            name=names.fresh(norm.output + "_norm"),
            axis=-1,
            epsilon=norm.epsilon,
        )
    )
    if not last:
        nodes.append(
            helper.make_node(
                "Transpose", [normed], [norm.output], name=names.fresh(norm.output), perm=list(np.argsort(perm))
            )
        )
    for k, node in enumerate(nodes):
        g.insert(at + k, node)


def _norms(model: onnx.ModelProto) -> tuple[GraphIndex, list[_Norm]]:
    """The model's index and every written-out one-axis LayerNorm (centered variance) in it."""
    g = GraphIndex(model.graph)
    shapes = shape_map(model, data_prop=True)
    found = (_match(g, shapes, n) for n in model.graph.node if n.op_type in ("Mul", "Pow"))
    return g, [norm for norm in found if norm is not None]


def fuse_layer_norms(model: onnx.ModelProto, norms: list[_Norm] | None = None) -> int:
    """Rewrite, in place, each written-out one-axis LayerNorm (centered variance) as LayerNormalization; how many.
    The model's opset must be 17 or later. ``norms``: the model's, where ``_norms`` found them already."""
    g, found = _norms(model) if norms is None else (GraphIndex(model.graph), norms)
    names = FreshNames(model)
    for norm in found:
        writer = g.producer[norm.output]
        g.set_output(writer, 0, names.fresh(norm.output + "_unfused"))
        _insert_norm(g, names, norm, g.position(writer) + 1)
    if found:
        remove_unread_nodes(g)  # the written-out norms, now unread
        sort_topologically(model.graph)
        drop_unused_initializers(model)
    return len(found)


def written_out_norms(
    model: onnx.ModelProto, fuse_norms: bool, opset_max: int, notes: list[str]
) -> tuple[onnx.ModelProto, int, int]:
    """(model, variances centered, LayerNorms fused): moment-form variances centered in place, then, with
    ``fuse_norms``, each written-out norm made one LayerNormalization, raising the opset to 17 where
    ``opset_max`` allows and there is a norm to fuse."""
    centered_count = center_variances(model)
    ops = {n.op_type for n in model.graph.node}
    if not fuse_norms or "Sqrt" not in ops or not ops & {"ReduceSum", "ReduceMean"}:
        return model, centered_count, 0
    current = opset(model)
    if current < LAYER_NORM_OPSET and LAYER_NORM_OPSET > opset_max:
        return model, centered_count, 0
    _, norms = _norms(model)
    if current >= LAYER_NORM_OPSET or not norms:
        return model, centered_count, fuse_layer_norms(model, norms)
    try:
        model = onnx.version_converter.convert_version(model, LAYER_NORM_OPSET)
    except Exception as exc:  # the version converter has gaps; the centered norms stay written out
        notes.append(
            f"opset {LAYER_NORM_OPSET} for written-out LayerNorms not reachable: {str(exc).splitlines()[0][:120]}"
        )
        return model, centered_count, 0
    notes.append(f"opset {current} → {LAYER_NORM_OPSET} to fuse written-out LayerNorms")
    return model, centered_count, fuse_layer_norms(model)  # found again: the converter may rewrite nodes
