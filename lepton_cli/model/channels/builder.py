"""The channel analysis under construction: the model's constants and inferred shapes, and the union-find edits."""

from __future__ import annotations

import numpy as np
import onnx

from lepton_cli.model.channels.groups import ChannelAnalysis
from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.stats import shape_map


class AnalysisBuilder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.shapes = shape_map(model)  # the shapes collect_stats uses for MACs, so reports agree
        self.a = ChannelAnalysis()
        self.next_group = 0

    def const(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name`` (read once), or None when it is not a constant."""
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = tensor_array(self.inits[name])
        return self._arrays[name]

    def new_group(self, size: int, pinned: bool = False) -> int:
        g = self.next_group
        self.next_group += 1
        self.a.parent[g] = g
        self.a.sizes[g] = size
        if pinned:
            self.a.pinned.add(g)
        return g

    def union(self, x: int, y: int) -> None:
        rx, ry = self.a.find(x), self.a.find(y)
        if rx == ry:
            return
        self.a.parent[ry] = rx
        if rx in self.a.pinned or ry in self.a.pinned:
            self.a.pinned.add(rx)

    def pin(self, name: str) -> None:
        for seg in self.a.layouts.get(name, []):
            self.a.pinned.add(self.a.find(seg.group))

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def channels(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return shape[1] if shape and len(shape) > 1 else None
