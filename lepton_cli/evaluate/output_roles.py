"""What each graph output is, and so which metric scores it: recognised from the user's word, dtype, graph,
metadata, shape and the source's values on the data, in that order; the reason is kept for the report.

Metrics (names as the report shows them):
- ``exact``: integer or boolean outputs, among them copies of an input (a MiniLM export's ``input_ids``
  passthrough): the share of elements equal to the source's; a float copy is scored by relative error;
- ``ctc_agreement``: a CTC recogniser's ``[N, T, C]`` scores, when the model says so (``lepton.decoding
  = ctc``) or its ``character`` table has C−1 or C−2 entries (blank, table, PaddleOCR's space): a layout
  detector keeping its class names under ``character`` is not a text recogniser; with no ``character``
  entry at all, a Softmax over more classes than steps whose class 0 (the blank) wins at least 30 % of the
  steps on the data (PP-OCRv5 rec keeps its table in a separate file);
- ``detection_f1``: a YOLO-style head, ``[N, 4+nc, A]`` (boxes cx,cy,w,h then class scores) or
  ``[N, A, 5+nc]`` (boxes, objectness, class scores), scores in [0, 1]: decoded, NMS, F1 of the
  candidate's boxes matched to the source's at IoU 0.5 (same class), with the matched score error, averaged over
  confidences 0.1-0.5 (``DETECTION_CONFS``) or at the one the user names (``detection@C``); a raw GFL head
  (``gfl_head.py``) and a YOLO segmentation head (``segment_head.py``) are decoded first;
- ``top1_agreement``: class scores (a Softmax/LogSoftmax result, or named like logits/probs): arg-max agreement
  per row (a 4-D map's per pixel, on the Softmax's own axis), with the top probability and probability cosine as
  secondary numbers;
- ``multilabel_f1@0.3/0.5``: several Sigmoid probabilities per sample (note activations, tags, per-class masks):
  each its own decision, F1 of the candidate's positives against the source's at 0.3 and at 0.5, pooled over the
  samples, the worse counting (``multilabel_f1@T`` when the user names the threshold);
- ``cosine``: embeddings (unit-norm rows, or named like embedding/hidden/pooler/features): mean cosine
  per vector, in points (100 × (1 − cosine));
- ``top1_agreement+cosine``: ``[N, C]`` or ``[N, T, C]`` outputs that could be either and carry no hint:
  both are scored and the worse counts; the report says it could not tell;
- ``mask_f1@0.3/0.5``: one-channel maps with values in [0, 1] (``[N, 1, H, W]`` or ``[N, H, W, 1]``), binarised
  at each threshold; the value is the worst page's F1 (``mask_f1@T`` when the user names the threshold);
- ``decision_agreement@0.5``: one Sigmoid probability per sample (a VAD's speech probability, a binary
  classifier): the share of decisions at 0.5 that agree;
- ``sequence_agreement``: an autoregressive decoder's per-step token probabilities (``[N, T, C]`` whose T follows the
  data, rows summing to 1): the arg-max token sequences, edit distance over the source's tokens; its per-step values
  (cell boxes) by relative error, a step only one model decodes counted in full;
- ``relative_error``: anything else: 100 × ‖candidate − source‖ / ‖source‖ is the drop.
``--eval-metric`` takes one metric for the first output and ``NAME=metric`` entries for any output.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose"}
CLASS_PRODUCERS = {"Softmax", "LogSoftmax"}  # a Sigmoid over several values is multi-label (_multilabel)
CLASS_NAME = re.compile(r"logit|prob|class|cls|score|label|pred", re.I)
EMBEDDING_NAME = re.compile(r"embed|hidden|pool|feature|feat|sentence|vector|encod|token_emb", re.I)
MIN_ANCHORS = 64  # fewer positions than this is not a dense detector head
DETECTION_CONF = 0.25  # ultralytics' and YOLOX's default predict threshold
# The application picks the confidence (ultralytics and YOLOX predict at 0.25, ddddocr at 0.1), so a recognised head is
# scored over that range and the mean counts: one confidence's F1 is a lottery of boxes near it (ddddocr's detector,
# one int8 model: 100.00 at 0.25 and 96.30 at 0.4 on its calibration scenes; docs/decisions.md, session 27).
GFL_LAYOUT = "gfl"  # a decoded GFL head (evaluate/gfl_head.py): v8's layout, scored per class as its applications do
DETECTION_CONFS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
# The graph does not say where a map is binarised: DBNet text detectors use 0.3 (PaddleOCR det_db_thresh),
# segmentation masks 0.5; a recognised map is scored at both and the worse counts.
MAP_THRESHOLDS = (0.3, 0.5)
UNIT_NORM_TOLERANCE = 1e-3
CTC_BLANK = 0  # the blank class: PaddleOCR's and PyTorch CTCLoss's default
# A CTC recogniser's per-step probabilities put the blank first on most steps (between and around characters):
# PP-OCRv5 rec on rendered lines 60-80 %. An embedding or a classifier over steps has no such class.
MIN_BLANK_SHARE = 0.3
MIN_CTC_STEPS = 8
CTC_TIME_MAJOR = "tnc"  # an OutputRole layout: [T, N, C] CTC scores, PyTorch CTCLoss's layout (ddddocr's CRNN keeps it)


@dataclass
class OutputRole:
    index: int
    name: str
    metric: str
    why: str
    # detection_f1: "v8" (boxes, classes on axis 1), "v5" (boxes, objectness, classes on axis 2), "yolox:HxW", or
    # GFL_LAYOUT (v8's layout, every class of a cell its own candidate)
    layout: str | None = None
    threshold: float | None = None  # mask_f1 threshold, the detection confidence the user named
    confidences: tuple[float, ...] | None = None  # detection_f1 with no confidence named: the range averaged
    positions: str | None = None  # cosine over [N, T, C]: the [N, T] 0/1 input whose 0 positions are not scored
    class_axis: int | None = None  # a per-pixel class map: the axis its classes lie on (3 for NHWC, as a Softmax says)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def detection_confidences(self) -> tuple[float, ...]:
        """The confidences a detection F1 is pooled at: the range recognised, or the one the user named."""
        if self.confidences:
            return self.confidences
        return (self.threshold if self.threshold is not None else DETECTION_CONF,)


def _real_producer(model: onnx.ModelProto, tensor: str) -> tuple[str | None, str | None]:
    """(op type, graph input) that really produces ``tensor``, looking through reshapes, casts and identities."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    seen = 0
    while tensor in producer and seen < 16:
        node = producer[tensor]
        if node.op_type not in PASS_THROUGH:
            return node.op_type, None
        tensor, seen = node.input[0], seen + 1
    return None, tensor if tensor in inputs else None


def _direct_producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The node producing ``tensor`` through Identity/Cast only (ops that keep every axis where it is)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(tensor)
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producer.get(node.input[0])
    return node


def _class_map_axis(model: onnx.ModelProto, name: str) -> int:
    """The class axis of a 4-D output: a Softmax's own axis where one produces it directly (TF exports keep NHWC:
    MTCNN's PNet scores faces on axis 3 of [N, H, W, 2]), else the channels (NCHW)."""
    node = _direct_producer(model, name)
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    # before opset 13 a Softmax normalises over every axis from ``axis`` on: only the last one is a class axis
    return axis % 4 if opset >= 13 or axis % 4 == 3 else 1


def _one_channel(shape: tuple[int, ...]) -> bool:
    """A one-channel map: [N, 1, H, W], or [N, H, W, 1] as TF exports write it."""
    return shape[1] == 1 or (shape[3] == 1 and shape[1] > 1 and shape[2] > 1)


def ctc_evidence(model: onnx.ModelProto, name: str, refs: list[np.ndarray]) -> tuple[bool, str]:
    """Whether output ``name`` holds CTC scores, and why (not): the model's word, else its ``character`` table,
    else (no table in the model, as PP-OCRv5 rec's dict file) its values."""
    classes = refs[0].shape[-1]
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("lepton.decoding", "").lower() == "ctc":
        return True, "metadata lepton.decoding = ctc"
    if "character" in props:
        entries = len(props["character"].split("\n"))
        if classes in (entries + 1, entries + 2):
            return True, f"metadata 'character' has {entries} entries for {classes} classes (blank, table[, space])"
        return (
            False,
            f"metadata 'character' has {entries} entries but the output has {classes} classes: not a CTC table",
        )
    return _ctc_by_values(model, name, refs)


def ctc_time_major(shape: tuple[int, ...]) -> bool:
    """Whether 3-D CTC scores of ``shape`` are [T, N, C]: a batch axis under MIN_CTC_STEPS after a longer time axis."""
    return len(shape) == 3 and shape[1] < min(shape[0], MIN_CTC_STEPS)


def _ctc_by_values(model: onnx.ModelProto, name: str, refs: list[np.ndarray]) -> tuple[bool, str]:
    """Per-step scores whose blank class wins many steps: CTC without a table; decoded index sequences are compared,
    so the table is not needed. [N, T, C] must be a Softmax result; [T, N, C] (``ctc_time_major``) may be logits,
    as CRNN exports leave them for PyTorch's CTCLoss."""
    time_major = ctc_time_major(refs[0].shape)
    steps, classes = refs[0].shape[0 if time_major else 1], refs[0].shape[2]
    softmax = _real_producer(model, name)[0] == "Softmax"
    # classes > steps: a character set; a tagger's few labels ("O" first in NER) are scored per step instead
    if steps < MIN_CTC_STEPS or classes <= steps or not (softmax or time_major):
        return False, "no CTC metadata"
    scores = "Softmax" if softmax else "logit"
    winners = np.concatenate([np.argmax(r, axis=-1).ravel() for r in refs])
    share = float(np.mean(winners == CTC_BLANK))
    if share < MIN_BLANK_SHARE:
        return False, f"no CTC metadata, and class {CTC_BLANK} wins only {100 * share:.0f} % of the steps"
    return True, (
        f"no character table, but class {CTC_BLANK} (the CTC blank) wins {100 * share:.0f} % of the "
        f"{steps} {scores} steps{' (time first)' if time_major else ''} on the data: decoded index sequences compared"
    )


def _in_unit_range(values: list[np.ndarray]) -> bool:
    return all(v.size and np.isfinite(v).all() and float(v.min()) >= 0.0 and float(v.max()) <= 1.0 for v in values)


def _detector_layout(refs: list[np.ndarray]) -> tuple[str | None, str]:
    """ "v8"/"v5" when every reference sample looks like a YOLO-style head, with the reason either way."""
    shape = refs[0].shape
    if len(shape) != 3:
        return None, ""
    small, large = (1, 2) if shape[1] < shape[2] else (2, 1)
    if shape[large] < MIN_ANCHORS or shape[small] < 5 or shape[large] < 4 * shape[small]:
        return None, ""
    channels = [np.moveaxis(r, small, -1) for r in refs]  # [N, A, C]
    if not any(float(np.max(c[..., :4])) > 1.0 for c in channels):  # pixel boxes (or YOLOX grid offsets) exceed 1
        return (
            None,
            f"shape {list(shape)} looks like a detector head but no box value exceeds 1 (not pixel boxes): not decoded",
        )
    if small == 1:  # ultralytics v8+: cx, cy, w, h, class scores
        if _in_unit_range([c[..., 4:] for c in channels]):
            return (
                "v8",
                f"shape {list(shape)}: boxes and {shape[1] - 4} class scores (in [0, 1]) for {shape[2]} anchors",
            )
        return None, f"shape {list(shape)} looks like a detector head but its scores are not in [0, 1]: not decoded"
    if _in_unit_range([c[..., 4:] for c in channels]):  # v5 / YOLOX: cx, cy, w, h, objectness, class scores
        return (
            "v5",
            f"shape {list(shape)}: boxes, objectness and {shape[2] - 5} class scores (in [0, 1]) for {shape[1]} anchors",
        )
    return None, f"shape {list(shape)} looks like a detector head but its scores are not in [0, 1]: not decoded"


YOLOX_STRIDES = (8, 16, 32)


def _raw_sizes(refs: list[np.ndarray]) -> bool:
    """Box widths or heights below zero: log-space sizes of an undecoded (YOLOX-style) head."""
    return any(float(np.min(r[..., 2:4])) < 0 for r in refs)


def image_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(height, width) of the model's first 4-D input with both fixed (NCHW), or None."""
    for inp in model.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] > 0 and dims[3] > 0:
            return dims[2], dims[3]
    return None


def _yolox_layout(model: onnx.ModelProto, anchors: int, why: str) -> tuple[str | None, str]:
    size = image_size(model)
    if size and sum((size[0] // s) * (size[1] // s) for s in YOLOX_STRIDES) == anchors:
        return (
            f"yolox:{size[0]}x{size[1]}",
            why
            + f"; boxes on the stride {'/'.join(map(str, YOLOX_STRIDES))} grids of {size[0]}x{size[1]} (YOLOX), decoded",
        )
    return None, why + "; its box sizes are negative (undecoded) and no YOLOX grid fits the anchors: not decoded"


def decoded_layout(
    model: onnx.ModelProto, refs: list[np.ndarray], layout: str | None, why: str
) -> tuple[str | None, str]:
    """``layout``, or a YOLOX layout where a "v5" head's boxes are still on the grid (decoded as YOLOX's demo does)."""
    if layout == "v5" and _raw_sizes(refs):
        return _yolox_layout(model, refs[0].shape[1], why)
    return layout, why


def yolox_grid(layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(grid cell [A, 2], stride [A, 1]) of a ``yolox:HxW`` layout, as YOLOX's demo_postprocess builds them."""
    height, width = (int(v) for v in layout.split(":")[1].split("x"))
    grids, strides = [], []
    for stride in YOLOX_STRIDES:
        xv, yv = np.meshgrid(np.arange(width // stride), np.arange(height // stride))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), stride))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strides).astype(np.float64)


def _multilabel(shape: tuple[int, ...]) -> tuple[str, str]:
    """Several Sigmoid probabilities per sample: each its own yes/no (``MultiLabelTally``), not one class."""
    thresholds = " and ".join(f"{t:g}" for t in MAP_THRESHOLDS)
    return (
        "multilabel_f1@" + "/".join(f"{t:g}" for t in MAP_THRESHOLDS),
        f"shape {list(shape)} from a Sigmoid: independent probabilities, F1 of the decisions over {thresholds} "
        "(the worse counts), pooled over the samples",
    )


def _class_or_embedding(model: onnx.ModelProto, name: str, refs: list[np.ndarray]) -> tuple[str, str]:
    op, _ = _real_producer(model, name)
    if op == "Sigmoid":
        return _multilabel(refs[0].shape)
    if op in CLASS_PRODUCERS:
        return "top1_agreement", f"class scores: produced by {op}"
    if EMBEDDING_NAME.search(name):
        return "cosine", f"an embedding: the name {name!r}"
    if CLASS_NAME.search(name):
        return "top1_agreement", f"class scores: the name {name!r}"
    norms = [np.linalg.norm(r.reshape(-1, r.shape[-1]).astype(np.float64), axis=-1) for r in refs]
    if all(np.all(np.abs(n - 1.0) < UNIT_NORM_TOLERANCE) for n in norms):
        return "cosine", "an embedding: every row has unit L2 norm"
    return (
        "top1_agreement+cosine",
        f"shape {list(refs[0].shape)}: class scores or an embedding, cannot tell (no producer, "
        f"name or norm hint); scored both ways, the worse counts; say which with --eval-metric {name}=top1, "
        f"{name}=cosine, or {name}=relative-error for values (a score, box offsets)",
    )


def recognise(
    model: onnx.ModelProto, index: int, name: str, refs: list[np.ndarray], feed: dict[str, np.ndarray] | None = None
) -> OutputRole:
    """The role of output ``index`` (``name``) from the source's values ``refs`` (one array per sample)."""
    first = refs[0]
    if first.dtype.kind in "biuU" or first.dtype == np.bool_:
        return OutputRole(index, name, "exact", f"{first.dtype} output: exact match")
    _, copied = _real_producer(model, name)
    if copied is None and feed is not None:
        copied = next((k for k, v in feed.items() if v.shape == first.shape and np.array_equal(v, first)), None)
    if copied is not None:  # fp16 and int8 targets round a float copy too (a PixelShuffle is only Reshape/Transpose)
        return OutputRole(index, name, "relative_error", f"a float copy of input {copied!r}: relative error")
    if first.ndim == 3 and (steps := _decoded_steps(refs)) is not None:
        return _decoded_sequence(index, name, refs, steps)
    if first.ndim == 3:
        fits, why = ctc_evidence(model, name, refs)
        if fits:
            layout = CTC_TIME_MAJOR if ctc_time_major(first.shape) else None
            return OutputRole(index, name, "ctc_agreement", f"CTC scores: {why}", layout)
        layout, det_why = (
            _detector_layout(refs) if _real_producer(model, name)[0] not in ("Softmax", "LogSoftmax") else (None, "")
        )
        layout, det_why = decoded_layout(model, refs, layout, det_why)
        if layout is not None:
            return detection_role(index, name, f"YOLO-style head, {det_why}", layout, refs)
        if det_why and not EMBEDDING_NAME.search(name):  # a [1, 32, 384] last_hidden_state is no detector head
            return OutputRole(index, name, "relative_error", det_why)
    if first.ndim in (2, 3) and first.shape[-1] > 1:
        metric, why = _class_or_embedding(model, name, refs)
        return OutputRole(index, name, metric, why)
    if first.ndim <= 3 and first.shape[-1:] in ((1,), ()) and _real_producer(model, name)[0] == "Sigmoid":
        return OutputRole(
            index,
            name,
            "decision_agreement@0.5",
            "one probability per sample (Sigmoid): decisions at 0.5",
            threshold=0.5,
        )
    if first.ndim == 4 and _one_channel(first.shape) and _in_unit_range(refs):
        return OutputRole(
            index,
            name,
            "mask_f1@" + "/".join(f"{t:g}" for t in MAP_THRESHOLDS),
            "a one-channel map in [0, 1]: F1 of the map binarised at "
            + " and at ".join(f"{t:g}" for t in MAP_THRESHOLDS)
            + ", worst page and threshold",
        )
    if first.ndim == 4:
        op, axis = _real_producer(model, name)[0], _class_map_axis(model, name)
        if first.shape[axis] > 1 and op == "Sigmoid":
            metric, why = _multilabel(first.shape)
            return OutputRole(index, name, metric, why)
        if first.shape[axis] > 1 and op in CLASS_PRODUCERS:  # axis 1 unless this very Softmax says otherwise
            where = "channels" if axis == 1 else f"axis {axis}, as its {op} says"
            return OutputRole(
                index, name, "top1_agreement", f"a per-pixel class map (Softmax over {where})", class_axis=axis
            )
    return OutputRole(
        index, name, "relative_error", f"shape {list(first.shape)}: no task metric recognised, relative error"
    )


def data_axes(arrays: list[np.ndarray]) -> set[int]:
    """The axes whose length differs between the source's samples: they follow the data (a decoder's steps)."""
    ranks = {a.ndim for a in arrays}
    if len(ranks) != 1:
        return set()
    return {axis for axis in range(ranks.pop()) if len({a.shape[axis] for a in arrays}) > 1}


def _decoded_steps(refs: list[np.ndarray]) -> tuple[int, int] | None:
    """(fewest, most) steps where a ``[N, T, C]`` output's T, and only T, follows the data (an autoregressive decoder
    stops at its end token, as SLANet's table-structure Loop does), else None: a CTC head's T is fixed by its input."""
    if data_axes(refs) != {1}:
        return None
    lengths = [r.shape[1] for r in refs]
    return min(lengths), max(lengths)


def _decoded_sequence(index: int, name: str, refs: list[np.ndarray], steps: tuple[int, int]) -> OutputRole:
    """A decoder's per-step output: token probabilities as the arg-max sequence, anything else per step (cell boxes)
    by relative error; steps one model decodes and the other does not count as lost."""
    follows = f"its step count follows the data ({steps[0]}-{steps[1]} steps: decoded until an end token)"
    rows = [r.reshape(-1, r.shape[-1]).astype(np.float64) for r in refs]
    if _in_unit_range(refs) and all(np.allclose(r.sum(axis=-1), 1.0, atol=1e-3) for r in rows):
        why = f"per-step token probabilities, {follows}: the arg-max token sequences compared by edit distance"
        return OutputRole(index, name, "sequence_agreement", why)
    why = f"per-step values, {follows}: relative error, a step only one model decodes counted in full"
    return OutputRole(index, name, "relative_error", why)


def detection_role(index: int, name: str, why: str, layout: str, refs: list[np.ndarray]) -> OutputRole:
    """A detector head's role scored over the confidence range (``_detection_confs``), the range stated in ``why``."""
    confs = _detection_confs(refs, layout)
    why = f"{why}; F1 averaged over confidences {confs[0]:g}-{confs[-1]:g}"
    return OutputRole(index, name, "detection_f1", why, layout, confidences=confs)


def _detection_confs(refs: list[np.ndarray], layout: str) -> tuple[float, ...]:
    """``DETECTION_CONFS``, scaled down to end at the source's best score where that never reaches their top."""
    best = max(float(np.max(detection_scores(r[b], layout)[0], initial=0.0)) for r in refs for b in range(r.shape[0]))
    scale = min(1.0, best / DETECTION_CONFS[-1])
    return tuple(round(conf * scale, 6) for conf in DETECTION_CONFS)


def from_user(index: int, name: str, metric: str, threshold: float | None) -> OutputRole:
    """The role the user named (--eval-metric), in report names."""
    names = {
        "top1": "top1_agreement",
        "ctc": "ctc_agreement",
        "cosine": "cosine",
        "exact": "exact",
        "relative-error": "relative_error",
        "agreement": "agreement",
        "detection": "detection_f1",
    }
    if metric == "mask-f1":
        return OutputRole(index, name, f"mask_f1@{threshold:g}", "--eval-metric", threshold=threshold)
    if metric == "multilabel-f1":
        return OutputRole(index, name, f"multilabel_f1@{threshold:g}", "--eval-metric", threshold=threshold)
    return OutputRole(index, name, names[metric], "--eval-metric")


# ---- detector heads -------------------------------------------------------------------------------


def detection_scores(sample: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [A], classes [A], boxes xyxy [A, 4]) of one sample of a YOLO-style head."""
    rows = (sample.T if layout in ("v8", GFL_LAYOUT) else sample).astype(np.float64)  # [A, C]
    if layout.startswith("yolox"):
        grid, stride = yolox_grid(layout)
        rows = rows.copy()
        rows[:, :2] = (rows[:, :2] + grid) * stride
        rows[:, 2:4] = np.exp(np.clip(rows[:, 2:4], None, 30.0)) * stride
    if layout == "v8":
        cls = rows[:, 4:]
        scores, classes = cls.max(axis=1), cls.argmax(axis=1)
    elif layout == GFL_LAYOUT:  # GFL applications threshold each class apart: one cell can be two classes' block
        cls = rows[:, 4:]
        scores, classes = cls.ravel(), np.tile(np.arange(cls.shape[1]), len(cls))
        rows = np.repeat(rows[:, :4], cls.shape[1], axis=0)  # the box columns, once per class: all that is read below
    elif rows.shape[1] > 5:
        cls = rows[:, 5:] * rows[:, 4:5]
        scores, classes = cls.max(axis=1), cls.argmax(axis=1)
    else:
        scores, classes = rows[:, 4], np.zeros(len(rows), dtype=np.int64)
    cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return np.nan_to_num(scores, nan=-1.0), classes, boxes


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    left, top = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    right, bottom = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(area > 0, inter / np.where(area > 0, area, 1), 0.0)


NMS_IOU, MATCH_IOU, MAX_BOXES = 0.45, 0.5, 300


def above(found: tuple[np.ndarray, ...], conf: float) -> tuple[np.ndarray, ...]:
    """``detections`` at a higher confidence from those at a lower one: greedy NMS by score never lets a lower box
    suppress a higher one, so the boxes over ``conf`` are exactly what NMS at ``conf`` keeps."""
    keep = found[1] > conf
    return tuple(a[keep] for a in found)


def detections(sample: np.ndarray, layout: str, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class NMS of one sample: (boxes [K, 4], scores [K], classes [K]), best first."""
    scores, classes, boxes = detection_scores(sample, layout)
    chosen = kept_by_nms(scores, classes, boxes, conf)
    return boxes[chosen], scores[chosen], classes[chosen]


def kept_by_nms(scores: np.ndarray, classes: np.ndarray, boxes: np.ndarray, conf: float) -> list[int]:
    """The rows per-class NMS keeps over ``conf``, best first (``detection_scores``'s arrays)."""
    keep = np.flatnonzero(scores > conf)
    keep = keep[np.argsort(-scores[keep], kind="stable")][: 10 * MAX_BOXES]
    chosen: list[int] = []
    for i in keep:
        same = [j for j in chosen if classes[j] == classes[i]]
        if not same or iou(boxes[i], boxes[same]).max() <= NMS_IOU:
            chosen.append(int(i))
            if len(chosen) == MAX_BOXES:
                break
    return chosen


def match(source: tuple, candidate: tuple) -> tuple[int, list[float]]:
    """Greedy matching, best candidate first, at IoU >= 0.5 and the same class: (matches, |score errors|)."""
    s_boxes, s_scores, s_classes = source
    c_boxes, c_scores, c_classes = candidate
    free = np.ones(len(s_boxes), dtype=bool)
    errors: list[float] = []
    for box, score, cls in zip(c_boxes, c_scores, c_classes):
        if not free.any():
            break
        overlap = np.where(free & (s_classes == cls), iou(box, s_boxes) if len(s_boxes) else 0.0, -1.0)
        best = int(np.argmax(overlap))
        if overlap[best] >= MATCH_IOU:
            free[best] = False
            errors.append(abs(float(score) - float(s_scores[best])))
    return len(errors), errors
