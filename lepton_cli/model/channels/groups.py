"""The result of the channel-group analysis: which tensors carry which groups' channels, and what to slice.

A *group* is a set of output channels that must be pruned together (a residual Add's operands are one group);
a tensor's *layout* lists the group segments along its axis 1; an *edit* names a constant input to slice when
a group loses channels. Groups form a union-find; ``pinned`` groups are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Seg:
    """``count`` channels of ``group`` on axis 1, each repeated ``repeat`` times (after Flatten)."""

    group: int
    count: int
    repeat: int = 1


@dataclass
class Edit:
    """Slice constant input ``input_index`` of ``node`` along ``axis`` by the kept positions of ``key``'s layout."""

    node: int
    input_index: int
    axis: int
    key: str


@dataclass
class Producer:
    """A Conv/Gemm/ConvTranspose/MatMul whose output channels start a group."""

    node: int
    weight: str
    out_axis: int  # the weight's output-channel axis
    output: str


@dataclass
class Consumer:
    """A Conv/Gemm/ConvTranspose/MatMul whose weight's ``in_axis`` reads the channels of tensor ``input``."""

    node: int
    weight: str
    in_axis: int
    input: str


@dataclass
class ChannelAnalysis:
    layouts: dict[str, list[Seg]] = field(default_factory=dict)
    parent: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)
    edits: list[Edit] = field(default_factory=list)
    group_attr: list[tuple[int, str]] = field(default_factory=list)  # depthwise convs: (node, output key)
    resize_sizes: list[tuple[int, str]] = field(default_factory=list)  # Resize with constant sizes
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    bn_after: dict[str, int] = field(default_factory=dict)  # producer output → BatchNormalization node
    values: dict[str, np.ndarray] = field(default_factory=dict)  # per layout channel: float value, NaN unknown

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def groups(self) -> list[int]:
        return sorted({self.find(g) for g in self.parent})

    def prunable(self) -> list[int]:
        return [g for g in self.groups() if g not in self.pinned]

    def group_of(self, producer: Producer) -> int:
        return self.find(self.layouts[producer.output][0].group)

    def producers_of(self, group: int) -> list[Producer]:
        return [p for p in self.producers if self.group_of(p) == group]

    def positions(self, key: str, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along axis 1 of tensor ``key`` that survive when group ``g`` keeps channels ``keep[g]``."""
        out, offset = [], 0
        for seg in self.layouts[key]:
            root = self.find(seg.group)
            kept = keep.get(root, np.arange(seg.count))
            idx = (kept[:, None] * seg.repeat + np.arange(seg.repeat)[None, :]).reshape(-1)
            out.append(offset + idx)
            offset += seg.count * seg.repeat
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def channel_values(self, key: str, group: int) -> list[np.ndarray]:
        """The dead-channel lattice values of ``group``'s channels in tensor ``key`` (one array per segment)."""
        vals, offset, found = self.values.get(key), 0, []
        for seg in self.layouts[key]:
            if self.find(seg.group) == group and vals is not None:
                found.append(vals[offset : offset + seg.count])
            offset += seg.count
        return found
