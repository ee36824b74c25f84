"""How much each channel of a group matters: its weight norms where it is produced and where it is read."""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx

from lepton_cli.model.channels.groups import ChannelAnalysis
from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.op_traits import attr


def channel_importance(
    model: onnx.ModelProto, a: ChannelAnalysis, norm: Literal["l1", "l2"] = "l2"
) -> dict[int, np.ndarray]:
    """Per group: each channel's summed, per-layer-normalised weight norm over its producers (output
    slices, scaled by a following BatchNormalization's gamma/std) and consumers (input slices)."""
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = tensor_array(inits[name]).astype(np.float64)
        return arrays[name]

    scores: dict[int, np.ndarray] = {g: np.zeros(a.sizes[g]) for g in a.groups()}
    nodes = model.graph.node
    for p in a.producers:
        n = _normalised(_row_norms(arr(p.weight), p.out_axis, norm))
        bn = a.bn_after.get(p.output)
        if bn is not None:
            scale, _, _, var = (arr(i) for i in nodes[bn].input[1:5])
            n = n * np.abs(scale) / np.sqrt(var + attr(nodes[bn], "epsilon", 1e-5))
        scores[a.group_of(p)] += n
    for c in a.consumers:
        w = arr(c.weight)
        per_pos = np.moveaxis(w, c.in_axis, 0).reshape(w.shape[c.in_axis], -1)
        pos_norm = np.abs(per_pos).sum(1) if norm == "l1" else (per_pos**2).sum(1)
        offset = 0
        for seg in a.layouts[c.input]:
            block = pos_norm[offset : offset + seg.count * seg.repeat].reshape(seg.count, seg.repeat).sum(1)
            scores[a.find(seg.group)] += _normalised(block if norm == "l1" else np.sqrt(block))
            offset += seg.count * seg.repeat
    return scores


def _row_norms(w: np.ndarray, axis: int, norm: str) -> np.ndarray:
    m = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return np.abs(m).sum(1) if norm == "l1" else np.sqrt((m**2).sum(1))


def _normalised(n: np.ndarray) -> np.ndarray:
    """Divided by the layer's mean, so that wide and narrow layers weigh alike."""
    mean = n.mean()
    return n / mean if mean > 0 else n
