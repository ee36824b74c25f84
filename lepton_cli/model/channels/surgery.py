"""Removing channels: slice every constant the analysis recorded, and the attributes that count channels."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.model.channels.groups import ChannelAnalysis
from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import drop_unused_initializers


def apply_keep(model: onnx.ModelProto, a: ChannelAnalysis, keep: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` where group ``g`` keeps only channels ``keep[g]`` (sorted indices)."""
    keep = {a.find(g): np.sort(np.asarray(k, np.int64)) for g, k in keep.items()}
    return _taken(model, a, keep, {g for g, k in keep.items() if len(k) != a.sizes[g]})


def apply_order(model: onnx.ModelProto, a: ChannelAnalysis, order: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` where group ``g``'s channels come in the order ``order[g]`` (a permutation): the same
    function, each channel's weights and per-channel constants, and the readers' input slices, moved with it."""
    order = {a.find(g): np.asarray(o, np.int64) for g, o in order.items()}
    for g, o in order.items():
        if not np.array_equal(np.sort(o), np.arange(a.sizes[g])):
            raise ValueError(f"group {g}: not a permutation of its {a.sizes[g]} channels")
    return _taken(model, a, order, {g for g, o in order.items() if not np.array_equal(o, np.arange(len(o)))})


def _taken(
    model: onnx.ModelProto, a: ChannelAnalysis, keep: dict[int, np.ndarray], changed: set[int]
) -> onnx.ModelProto:
    """A copy of ``model`` where each group in ``changed`` takes channels ``keep[g]``, in that order."""
    for g in keep:
        if g in a.pinned:
            raise ValueError(f"group {g} is pinned")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    if not changed:
        return result

    def touches(key: str) -> bool:
        return any(a.find(s.group) in changed for s in a.layouts[key])

    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    sliced = _slice_constants(graph, inits, a, keep, touches)
    for index, key in a.group_attr:
        if touches(key):
            for at in graph.node[index].attribute:
                if at.name == "group":
                    at.i = len(a.positions(key, keep))
    for index, key in a.resize_sizes:
        if touches(key):
            new_name = _resize_to(graph, inits, graph.node[index], len(a.positions(key, keep)), len(sliced))
            sliced[(new_name, 0, b"")] = new_name  # counted, so that the next new name stays unique
    drop_unused_initializers(result)
    del graph.value_info[:]  # the resized tensors' shapes are stale
    return result


def _slice_constants(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    a: ChannelAnalysis,
    keep: dict[int, np.ndarray],
    touches: Callable[[str], bool],
) -> dict[tuple[str, int, bytes], str]:
    """Point each recorded edit's input at a sliced copy (one copy per constant, axis and kept positions)."""
    sliced: dict[tuple[str, int, bytes], str] = {}
    for e in a.edits:
        if not touches(e.key):
            continue
        node = graph.node[e.node]
        name = node.input[e.input_index]
        pos = a.positions(e.key, keep)
        cache_key = (name, e.axis, pos.tobytes())
        if cache_key not in sliced:
            value = tensor_array(inits[name])
            new_name = f"{name}__pruned{len(sliced)}"
            tensor = numpy_helper.from_array(np.ascontiguousarray(np.take(value, pos, axis=e.axis)), new_name)
            graph.initializer.append(tensor)
            inits[new_name] = tensor
            sliced[cache_key] = new_name
        node.input[e.input_index] = sliced[cache_key]
    return sliced


def _resize_to(
    graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], node: onnx.NodeProto, channels: int, number: int
) -> str:
    """Give a Resize with constant ``sizes`` a copy whose channel count is ``channels``."""
    sizes = tensor_array(inits[node.input[3]]).copy()
    sizes[1] = channels
    new_name = f"{node.input[3]}__pruned{number}"
    graph.initializer.append(numpy_helper.from_array(sizes, new_name))
    node.input[3] = new_name
    return new_name
