"""Per-dimension scales on a post-LN transformer's residual stream: exact in float, undone in front of each LayerNorm.

In a BERT-style encoder every LayerNorm reads ``z = y + b``: ``y`` the previous LayerNorm's output, ``b`` an
attention or feed-forward projection. A few hidden dimensions of ``z`` reach 30-110x the median one (all-MiniLM-L6:
the feed-forward sums), so one int8 scale per tensor leaves the others a handful of levels; on a per-tensor
integer target those sums alone cost the model 20 cosine points (docs/decisions.md, session 21).
With ``s_d = (max|z_d| / median_d max|z_d|)^α`` (at least 1) the graph computes ``z / s`` instead:
* the previous LayerNorm's gamma and beta are divided by ``s`` (it writes ``y / s``), and every weight layer reading
  ``y`` (through shape-only Reshapes) has its input rows multiplied by ``s``;
* the projection writing ``b`` has its output channels and bias divided by ``s``;
* a ``Mul(z / s, s)`` in front of the LayerNorm gives it ``z`` back.
The Add, the Mul and the LayerNorm stay float: the int8 tensors around them are flat, and on an integer accelerator
the LayerNorm is a host op already, which holds ``y`` in float: the sum reads it so (host_edges.py), with no int8
round trip on the residual path. ``α`` trades the activations' flatness against the weights' (their rows grow by s).
LayerNorms written out as ReduceMean/Sub/Pow graphs are not matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.sensitivity import tensor_runs
from lepton_cli.passes._quantize.weight_layers import WeightLayer, from_rows, load, store, to_rows, weight_layers

from lepton_cli.model.graph_edit import FreshNames, GraphIndex
from lepton_cli.model.op_traits import attr

LIMIT = 1e3  # the most a dimension's scale may grow (a dead dimension's median ratio would reach denormals)


@dataclass
class Site:
    add: onnx.NodeProto  # z = y + b, read only by ``norm``
    norm: onnx.NodeProto  # the LayerNorm reading z
    previous: onnx.NodeProto  # the LayerNorm writing y
    readers: list[WeightLayer]  # the weight layers reading y besides the Add (input rows scaled)
    branch: WeightLayer  # the projection writing b (output channels scaled)
    branch_biases: list[str]  # its [D] bias constants: a Gemm's own, the Adds on the way to the residual Add
    between: list[str]  # the nodes from the projection to the residual Add (Reshapes, bias Adds), in graph order


@dataclass
class Scaled:
    sites: int
    float_nodes: list[str]  # the LayerNorms and residual Adds of each site, and the Muls inserted between


def last_dims(model: onnx.ModelProto) -> dict[str, int]:
    """The static last dimension of every tensor whose shape is known (after shape inference when none is noted)."""
    graph = model.graph
    if not graph.value_info:
        graph = onnx.shape_inference.infer_shapes(model).graph
    found = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            found[value.name] = int(dims[-1].dim_value)
    return found


def _keeps_last_dim(index: GraphIndex, node: onnx.NodeProto, dim: int, last: dict[str, int]) -> bool:
    """A Reshape whose input and output both end in ``dim`` (by constant shape or by inferred shapes)."""
    shape = index.const(node.input[1]) if len(node.input) > 1 else None
    if shape is not None and shape.size > 0 and int(shape.reshape(-1)[-1]) == dim:
        return last.get(node.input[0]) == dim
    return last.get(node.input[0]) == dim and last.get(node.output[0]) == dim


def _y_readers(
    index: GraphIndex, y: str, add: onnx.NodeProto, layers: dict, dim: int, last: dict[str, int]
) -> list[WeightLayer] | None:
    """The weight layers reading ``y`` (through last-dim-keeping Reshapes) besides ``add``; None if anything else does."""
    found: list[WeightLayer] = []
    stack = [(node, y) for node in index.readers(y) if node is not add]
    while stack:
        node, tensor = stack.pop()
        if node.op_type == "Shape":
            continue
        if node.op_type == "Reshape" and node.input[0] == tensor and _keeps_last_dim(index, node, dim, last):
            stack += [(reader, node.output[0]) for reader in index.readers(node.output[0])]
            continue
        layer = layers.get(node.name)
        if layer is None or layer.kind == "conv" or node.input[0] != tensor:
            return None
        found.append(layer)
    return found


def _branch(
    index: GraphIndex, tensor: str, layers: dict, dim: int, last: dict[str, int]
) -> tuple[WeightLayer, list[str], list[str]] | None:
    """The projection writing ``tensor``, the bias constants between and the nodes between (Reshapes and
    ``Add(x, [D])`` only, in graph order)."""
    biases: list[str] = []
    between: list[str] = []
    while tensor in index.producer and index.sole_use(tensor):
        node = index.producer[tensor]
        layer = layers.get(node.name)
        if layer is not None and layer.kind != "conv":
            own = _gemm_bias(index, layer, dim)
            ok = _out_channels(index, layer) == dim and own is not None
            return (layer, biases + own, between[::-1]) if ok else None
        between.append(node.name)
        if node.op_type == "Reshape" and _keeps_last_dim(index, node, dim, last):
            tensor = node.input[0]
            continue
        consts = [i for i in node.input if i in index.inits]
        if node.op_type != "Add" or len(consts) != 1 or not index.sole_use(consts[0]):
            return None
        if list(index.inits[consts[0]].dims) != [dim]:
            return None
        biases.append(consts[0])
        tensor = next(i for i in node.input if i not in index.inits)
    return None


def _out_channels(index: GraphIndex, layer: WeightLayer) -> int:
    dims = list(index.inits[layer.weight].dims)
    return int(dims[0] if layer.kind == "gemm_t" else dims[1])


def _gemm_bias(index: GraphIndex, layer: WeightLayer, dim: int) -> list[str] | None:
    """[a Gemm's own bias] (input 2, a [D] constant only it reads), [] without one, None when it cannot be scaled."""
    bias = layer.node.input[2] if layer.node.op_type == "Gemm" and len(layer.node.input) > 2 else ""
    if not bias:
        return []
    ok = bias in index.inits and index.sole_use(bias) and list(index.inits[bias].dims) == [dim]
    return [bias] if ok else None


def _candidates(model: onnx.ModelProto, index: GraphIndex) -> list[tuple[onnx.NodeProto, onnx.NodeProto, int]]:
    """(LayerNorm, the Add it reads, which of the Add's inputs another LayerNorm writes): the pattern alone, so a model
    without it (any CNN) costs one pass over its nodes."""
    found = []
    for norm in model.graph.node:
        add = index.producer.get(norm.input[0]) if norm.op_type == "LayerNormalization" else None
        if add is None or add.op_type != "Add" or not index.sole_use(add.output[0]):
            continue
        writers = [index.producer.get(name) for name in add.input]
        k = next((k for k, w in enumerate(writers) if w is not None and w.op_type == "LayerNormalization"), None)
        if k is not None and len(add.input) == 2:
            found.append((norm, add, k))
    return found


def has_candidates(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has a LayerNorm reading ``LayerNorm output + something`` (``find_sites`` checks the rest)."""
    return bool(_candidates(model, GraphIndex(model.graph)))


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Every LayerNorm reading ``previous LayerNorm output + projection`` that can be rescaled exactly."""
    index = GraphIndex(model.graph)
    candidates = _candidates(model, index)
    if not candidates:
        return []
    layers = {layer.node.name: layer for layer in weight_layers(model)}
    last = last_dims(model)
    sites = []
    for norm, add, k in candidates:
        previous, y = index.producer[add.input[k]], add.input[k]
        if norm.input[1] not in index.inits or attr(norm, "axis", -1) != -1 or attr(previous, "axis", -1) != -1:
            continue
        if y in index.outputs or any(
            p and (p not in index.inits or not index.sole_use(p)) for p in previous.input[1:3]
        ):
            continue
        dim = int(index.inits[norm.input[1]].dims[-1])
        readers = _y_readers(index, y, add, layers, dim, last)
        branch = _branch(index, add.input[1 - k], layers, dim, last)
        if readers is not None and branch is not None:
            sites.append(Site(add, norm, previous, readers, *branch))
    return sites


def dimension_absmax(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict:
    """Largest magnitude per last-axis dimension of each tensor over ``feeds``."""
    found: dict[str, np.ndarray] = {}
    for values in tensor_runs(model, tensors, feeds):
        for name, value in values.items():
            reduced = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            found[name] = np.maximum(found.get(name, reduced), reduced)
    return found


def scales(absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``(max|z_d| / median)^α``, at least 1: only the dimensions over the median shrink."""
    ratio = absmax.astype(np.float64) / max(float(np.median(absmax)), 1e-12)
    return np.clip(ratio, 1.0, LIMIT) ** alpha


def _apply(model: onnx.ModelProto, index: GraphIndex, names: FreshNames, site: Site, scale: np.ndarray) -> str:
    """Rescale one site in place; the name of the Mul put in front of its LayerNorm."""
    for name in site.previous.input[1:3]:
        if name:
            store(model, name, load(model, name) / scale)
    for layer in site.readers:
        weight = load(model, layer.weight)
        store(model, layer.weight, from_rows(layer, to_rows(layer, weight) * scale[None, :], weight.shape))
    layer = site.branch
    weight = load(model, layer.weight)
    store(model, layer.weight, from_rows(layer, to_rows(layer, weight) / scale[:, None], weight.shape))
    for name in site.branch_biases:
        store(model, name, load(model, name) / scale)
    mul_name = names.fresh(f"{site.norm.name}_unscale")
    constant = index.add_initializer(names.fresh(f"{mul_name}_s"), scale.astype(np.float32))
    mul = onnx.helper.make_node("Mul", [site.add.output[0], constant], [names.fresh(f"{mul_name}_out")], name=mul_name)
    index.insert(index.position(site.norm), mul)
    index.set_input(site.norm, 0, mul.output[0])
    return mul_name


def scale_residuals(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], alpha: float) -> Scaled:
    """Rescale every site of ``model`` in place (see the module doc)."""
    sites = find_sites(model)
    if not sites:
        return Scaled(0, [])
    absmax = dimension_absmax(model, [s.add.output[0] for s in sites], feeds)
    index, names = GraphIndex(model.graph), FreshNames(model)
    float_nodes = []
    for site in sites:
        mul = _apply(model, index, names, site, scales(absmax[site.add.output[0]], alpha))
        float_nodes += [name for name in (site.previous.name, site.add.name) if name not in float_nodes]
        float_nodes += [mul, site.norm.name]
    return Scaled(len(sites), float_nodes)
