"""A YOLO instance-segmentation head (ultralytics' ``-seg`` export): ``[N, 4 + nc + nm, A]`` (boxes, class scores
and nm mask coefficients per anchor) and ``[N, nm, mh, mw]`` mask prototypes. Read one output at a time neither has a
task metric: the coefficients are no scores in [0, 1], so the head was read as relative error (captcha-recognizer's
YOLO11s-seg: 10-16 % for int8 models whatever their boxes did). Decoded as the application does, the scorer puts
the boxes and class scores (``[N, 4 + nc, A]``, read by detection F1) in the head's place and, in the prototypes'
place, the union of the instance masks the application draws (``[N, 1, mh, mw]``: each detection kept at
ultralytics' confidence after NMS, coefficients · prototypes > 0 inside its box), read as a mask; in the source's
outputs and every candidate's alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lepton_cli.evaluate.output_roles import (
    DETECTION_CONF,
    MIN_ANCHORS,
    OutputRole,
    detection_role,
    detection_scores,
    kept_by_nms,
)

MASK_THRESHOLD = 0.5  # sigmoid(coefficients · prototypes) > 0.5, ultralytics' process_mask


@dataclass(frozen=True)
class SegmentHead:
    head: int  # output index of the [N, 4 + nc + nm, A] head
    prototypes: int  # output index of the [N, nm, mh, mw] prototypes
    classes: int  # nc
    size: tuple[int, int]  # the image input's height and width: boxes are in its pixels

    def why(self, names: list[str]) -> str:
        return (
            f"a YOLO segmentation head: {names[self.head]} holds boxes, {self.classes} class scores and mask "
            f"coefficients for the prototypes {names[self.prototypes]}"
        )

    def roles(self, names: list[str], refs: list[list[np.ndarray]]) -> dict[int, OutputRole]:
        """Detection F1 on the boxes and class scores; the prototypes' place scored as the decoded instance masks."""
        boxes = [outs[self.head] for outs in refs]
        mask_why = (
            f"the instance masks of {names[self.head]}'s detections at {DETECTION_CONF:g} (coefficients x "
            f"{names[self.prototypes]}, inside each box), their union binarised at {MASK_THRESHOLD:g}"
        )
        return {
            self.head: detection_role(self.head, names[self.head], f"{self.why(names)}; boxes decoded", "v8", boxes),
            self.prototypes: OutputRole(
                self.prototypes,
                names[self.prototypes],
                f"mask_f1@{MASK_THRESHOLD:g}",
                mask_why,
                threshold=MASK_THRESHOLD,
            ),
        }

    def view(self, outs: list[np.ndarray]) -> list[np.ndarray]:
        """``outs`` with the boxes and class scores in the head's place and the instance masks in the prototypes'."""
        viewed = list(outs)
        viewed[self.head] = outs[self.head][:, : 4 + self.classes]
        viewed[self.prototypes] = np.stack(
            [self._masks(outs[self.head][b], outs[self.prototypes][b]) for b in range(outs[self.head].shape[0])]
        )
        return viewed

    def _masks(self, head: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        """``[1, mh, mw]`` in {0, 1}: the union of the detections' masks, each cut to its box (process_mask)."""
        head = head.astype(np.float64)
        nm, mh, mw = prototypes.shape
        union = np.zeros((mh, mw), dtype=bool)
        if not np.isfinite(head).all() or not np.isfinite(prototypes).all():
            return union[None].astype(np.float32)
        scores, classes, boxes = detection_scores(head[: 4 + self.classes], "v8")
        picked = kept_by_nms(scores, classes, boxes, DETECTION_CONF)
        if not picked:
            return union[None].astype(np.float32)
        logits = head[4 + self.classes :, picked].T @ prototypes.reshape(nm, -1).astype(np.float64)
        rows, cols = np.arange(mh)[:, None] + 0.5, np.arange(mw)[None, :] + 0.5
        scale_y, scale_x = mh / self.size[0], mw / self.size[1]
        for logit, (x1, y1, x2, y2) in zip(logits.reshape(-1, mh, mw), boxes[picked]):
            inside = (cols >= x1 * scale_x) & (cols < x2 * scale_x) & (rows >= y1 * scale_y) & (rows < y2 * scale_y)
            union |= (logit > 0.0) & inside  # sigmoid > 0.5
        return union[None].astype(np.float32)


def find_segment_head(size: tuple[int, int] | None, refs: list[list[np.ndarray]]) -> SegmentHead | None:
    """The segmentation head among the source's outputs (``refs``: per sample, per output), or None: a ``[N, C, A]``
    output (A ≥ ``MIN_ANCHORS`` anchors, pixel boxes) and a ``[N, nm, mh, mw]`` one with 4 + nm < C, whose class
    scores (C - 4 - nm channels after the boxes) stay in [0, 1] on every sample."""
    if size is None:
        return None
    first = refs[0]
    heads = [j for j, a in enumerate(first) if a.ndim == 3 and a.shape[2] >= max(MIN_ANCHORS, 4 * a.shape[1])]
    prototypes = [j for j, a in enumerate(first) if a.ndim == 4 and a.dtype.kind == "f"]
    for j in heads:
        for p in prototypes:
            classes = first[j].shape[1] - 4 - first[p].shape[1]
            if classes < 1 or first[p].shape[0] != first[j].shape[0]:
                continue
            scores = [outs[j][:, 4 : 4 + classes] for outs in refs]
            in_unit = all(s.size and float(s.min()) >= 0.0 and float(s.max()) <= 1.0 for s in scores)
            pixel_boxes = any(float(np.max(outs[j][:, :4])) > 1.0 for outs in refs)
            if in_unit and pixel_boxes:
                return SegmentHead(j, p, classes, size)
    return None
