"""The source model with only its float graph inputs and outputs on an 8-bit grid: what an integer chip's edge costs.

A full-integer accelerator (tpu, fpga) takes every float input through 8 bits and returns every output through 8
bits, whatever happens between. Scored against the source, this model's drop is about the least an int8 candidate
reads (a rounding fit can take a little of it back): where an output has no task metric (relative error) and the
budget lies near that drop, the refusal says so instead of naming op types (the pytorch-converted single-op models
on tpu: 0.87-1.48 points of relative error from the edge alone; docs/decisions.md, session 50). The grid is
asymmetric over each tensor's range on the scored samples, the finest any per-tensor 8-bit scheme gives it.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton_cli.model.graph_edit import FreshNames
from lepton_cli.model.op_traits import opset

LEVELS = 255  # uint8
CONTRIB = "com.microsoft"


def _grid(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of the uint8 grid spanning [low, high] and 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / LEVELS or 1.0
    return np.array(scale, np.float32), np.array(round(-low / scale), np.uint8)


def _pair(
    graph: onnx.GraphProto, names: FreshNames, tensor: str, out: str, low: float, high: float, domain: str
) -> list:
    scale, zero = _grid(low, high)
    s = names.fresh(f"{tensor}_grid_scale")
    z = names.fresh(f"{tensor}_grid_zero")
    graph.initializer.extend([numpy_helper.from_array(scale, s), numpy_helper.from_array(zero, z)])
    q = names.fresh(f"{tensor}_grid_q")
    return [
        helper.make_node("QuantizeLinear", [tensor, s, z], [q], names.fresh(f"{tensor}_grid_Q"), domain=domain),
        helper.make_node("DequantizeLinear", [q, s, z], [out], names.fresh(f"{tensor}_grid_DQ"), domain=domain),
    ]


def value_ranges(samples: Iterable[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """(min, max) of each float32 array by name over ``samples`` (a model's feeds, its outputs by name), one at a
    time."""
    found: dict[str, tuple[float, float]] = {}
    for values in samples:
        for name, value in values.items():
            value = np.asarray(value)
            if value.dtype == np.float32 and value.size:
                low, high = found.get(name, (np.inf, -np.inf))
                found[name] = (min(low, float(value.min())), max(high, float(value.max())))
    return found


def io_on_grid(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """``model`` with each graph input and output ``ranges`` names (``value_ranges`` of its feeds and its outputs)
    through a uint8 QuantizeLinear/DequantizeLinear pair over that range."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph, names = result.graph, FreshNames(result)
    domain = "" if opset(result) >= 10 else CONTRIB  # an older model (opset 6) has no QuantizeLinear of its own
    if domain and not any(o.domain == CONTRIB for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    inits = {t.name for t in graph.initializer}
    front: list[onnx.NodeProto] = []
    for value in graph.input:
        if value.name in inits or value.name not in ranges:
            continue
        gridded = names.fresh(f"{value.name}_on_grid")
        for node in graph.node:
            node.input[:] = [gridded if i == value.name else i for i in node.input]
        front += _pair(graph, names, value.name, gridded, *ranges[value.name], domain)
    back: list[onnx.NodeProto] = []
    produced = {o for node in graph.node for o in node.output}
    for name in [o.name for o in graph.output]:
        if name not in produced or name not in ranges:
            continue
        raw = names.fresh(f"{name}_before_grid")
        for node in graph.node:
            node.output[:] = [raw if o == name else o for o in node.output]
            node.input[:] = [raw if i == name else i for i in node.input]
        back += _pair(graph, names, raw, name, *ranges[name], domain)
    nodes = [*front, *graph.node, *back]
    del graph.node[:]
    graph.node.extend(nodes)
    return result
