"""A graph input on an 8-bit grid enters int8 on that grid, where a calibrated scale would round every pixel.

An image decoded from 8 bits and normalised per channel (``x = a_c * u + b_c``) takes at most 256 values per channel.
One per-tensor scale over its range puts the channels' values between its steps: that rounding alone takes
PP-OCRv4 det's worst held-out page to 87.8 (docs/decisions.md, "Graph inputs on their own grid"), so the search kept
the stem float. Instead the first Conv reads ``v = (x - o_c) / a_c - 128`` (``o_c`` the channel's smallest calibration
value): integers in [-128, 127], quantized with scale 1, so int8 holds them exactly. The Conv takes ``W * a_c`` and
its bias ``sum(W * (128 a_c + o_c))`` more; its zero padding moves before the affine map as a Pad, so the float model
computes the same function everywhere, borders included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from lepton_cli.passes._quantize.weight_layers import load, store
from onnx import helper

from lepton_cli.evaluate.input_floor import value_grids
from lepton_cli.model.graph_edit import FreshNames, GraphIndex
from lepton_cli.model.op_traits import opset

CENTRE = 128.0  # v = u - 128: one int8 or uint8 (zero point 128) grid holds the 256 levels at scale 1
ON_GRID = 0.02  # of one step: calibration values further from a grid point are not 8-bit pixels


@dataclass(frozen=True)
class GridInput:
    input: str
    conv: str  # the Conv reading it
    levels: str  # the integer-valued tensor the Conv now reads, quantized at scale 1
    nodes: list[str]  # the float Pad/Mul/Add computing it: left float

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "conv": self.conv}


def grid_inputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, list[GridInput]]:
    """(``model`` with each 8-bit grid input read on its grid, those inputs); the model unchanged when none qualifies
    (not on a grid over ``feeds``, read by anything but one 2-D Conv's data input, or an opset without Pad inputs)."""
    if opset(model) < 11:
        return model, []
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    index, names = GraphIndex(edited.graph), FreshNames(edited)
    done = []
    for grid in value_grids(feeds):
        conv = _sole_conv(index, grid.name)
        found = _levels([feed[grid.name] for feed in feeds], grid.steps) if grid.axis == 1 else None
        if conv is None or found is None:
            continue
        done.append(_rewrite(edited, index, names, conv, grid.name, *found))
    return (edited, done) if done else (model, [])


def level_overrides(inputs: list[GridInput], activation_type: str) -> dict[str, list[dict[str, Any]]]:
    """ORT tensor overrides: each grid tensor at scale 1 around the grid's centre."""
    from onnxruntime.quantization import QuantType

    unsigned = activation_type == "u8"
    qtype, zero = (QuantType.QUInt8, np.array(CENTRE, np.uint8)) if unsigned else (QuantType.QInt8, np.array(0, np.int8))
    return {g.levels: [{"quant_type": qtype, "scale": np.array(1.0, np.float32), "zero_point": zero}] for g in inputs}


def _sole_conv(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    conv = index.only_reader(name)
    if conv is None or conv.op_type != "Conv" or conv.input[0] != name or conv.input[1] not in index.inits:
        return None
    if any(index.uses[c] != 1 for c in conv.input[1:] if c):  # a shared weight or bias would change elsewhere too
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    weight = index.const(conv.input[1])
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if weight is None or weight.ndim != 4 or attrs.get("group", 1) != 1 or auto_pad not in (b"NOTSET", "NOTSET"):
        return None
    return conv


def _levels(samples: list[np.ndarray], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, offsets): each channel's step refined over its whole span and its smallest value, when every value
    lies on that grid within 256 levels of the smallest."""
    stacked = np.concatenate([np.asarray(s, np.float64) for s in samples])
    axes = tuple(k for k in range(stacked.ndim) if k != 1)
    low, high = stacked.min(axis=axes), stacked.max(axis=axes)
    count = np.maximum(np.round((high - low) / steps), 1)
    refined = np.where(high > low, (high - low) / count, steps)  # a float32 gap is off by an ulp; a 255-gap span is not
    shape = (1, -1) + (1,) * (stacked.ndim - 2)
    levels = (stacked - low.reshape(shape)) / refined.reshape(shape)
    if np.abs(levels - np.round(levels)).max() > ON_GRID or levels.max() > 2 * CENTRE - 1 + ON_GRID:
        return None
    return refined, low


def _rewrite(
    model: onnx.ModelProto,
    index: GraphIndex,
    names: FreshNames,
    conv: onnx.NodeProto,
    name: str,
    steps: np.ndarray,
    offsets: np.ndarray,
) -> GridInput:
    attrs = {a.name: a for a in conv.attribute}
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    channel = (1, -1, 1, 1)
    nodes, source = [], name
    if any(pads):
        constant = index.add_initializer(names.fresh(f"{name}_grid_pads"), np.array([0, 0, *pads[:2], 0, 0, *pads[2:]]))
        source = names.fresh(f"{name}_padded")
        nodes.append(helper.make_node("Pad", [name, constant], [source], names.fresh(f"{name}_grid_pad")))
        attrs["pads"].ints[:] = [0] * len(pads)
    scale = index.add_initializer(names.fresh(f"{name}_grid_scale"), (1 / steps).astype(np.float32).reshape(channel))
    shift = index.add_initializer(
        names.fresh(f"{name}_grid_shift"), (-offsets / steps - CENTRE).astype(np.float32).reshape(channel)
    )
    scaled, levels = names.fresh(f"{name}_grid_scaled"), names.fresh(f"{name}_levels")
    nodes.append(helper.make_node("Mul", [source, scale], [scaled], names.fresh(f"{name}_grid_mul")))
    nodes.append(helper.make_node("Add", [scaled, shift], [levels], names.fresh(f"{name}_grid_add")))
    weight = load(model, conv.input[1]).astype(np.float64)
    # x = a (v + 128) + o everywhere the Conv reads, padding included (v there is (0 - o) / a - 128).
    moved = (weight * (CENTRE * steps + offsets).reshape(channel)).sum(axis=(1, 2, 3))
    store(model, conv.input[1], weight * steps.reshape(channel))
    if len(conv.input) > 2 and conv.input[2]:
        store(model, conv.input[2], load(model, conv.input[2]) + moved)
    else:
        bias = index.add_initializer(names.fresh(f"{conv.input[1]}_grid_bias"), moved.astype(np.float32))
        conv.input.append(bias)
    position = index.position(conv)
    for offset, node in enumerate(nodes):
        index.insert(position + offset, node)
    index.replace_input(conv, name, levels)
    return GridInput(name, conv.name, levels, [n.name for n in nodes])
