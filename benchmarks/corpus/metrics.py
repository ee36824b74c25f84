"""Task metrics of the yardstick: a candidate model's outputs scored on held-out real data.

Each metric takes the corpus model, its eval arrays, the fp32 source's outputs and the candidate's
outputs (lists over samples of lists over model outputs) and returns one number, higher is better.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from .. import ocr_textset
from .manifest import CorpusModel

Outputs = list[list[np.ndarray]]  # [sample][output]
DB_THRESHOLD = 0.3  # DBNet's binarisation threshold (PaddleOCR det_db_thresh)
IOU = 0.5
YOLOX_SCORE, YOLOX_NMS = 0.1, 0.45  # ddddocr's detection_engine settings
# The source's own box scores move this much under input noise it cannot see (±0.49 grey level, 3 draws, 32 held-out
# scenes: p99 of |score change| 0.026, 8 of 543 boxes crossing 0.1): a box inside the band is told apart by neither.
SCORE_BAND = 0.03


def decode_text(model: CorpusModel, charset: list[str], outputs: Outputs) -> list[str]:
    texts = []
    for sample in outputs:
        first = sample[0]
        if model.name.startswith("ddddocr"):  # [T, 1, C] logits, time first; blank is class 0 as in PaddleOCR
            first = np.moveaxis(first, 0, 1)
        texts.extend(ocr_textset.ctc_greedy(first, charset))
    return texts


def char_accuracy(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """100 × (1 − edit distance / characters) against the rendered truth."""
    truth = [str(t) for t in evaluation["labels"]]
    predicted = decode_text(model, charset, candidate)
    return ocr_textset.char_accuracy(predicted, truth)


def char_agreement(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """100 × (1 − edit distance / characters) against the source's own reading: what quantization alone changed."""
    return ocr_textset.char_accuracy(decode_text(model, charset, candidate), decode_text(model, charset, reference))


def map_f1(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """Per-page F1 of the binarised probability maps against fp32's; the worst page, ×100."""
    return 100.0 * min(ocr_textset.pixel_f1(r[0], c[0], DB_THRESHOLD) for r, c in zip(reference, candidate))


def _pooled_f1(tp: int, fp: int, fn: int) -> float:
    """F1 ×100 of counts pooled over images; no box anywhere on either side agrees."""
    return 100.0 if tp + fp + fn == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)


def _scored_boxes(raw: np.ndarray, size: tuple[int, int], score: float) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr's YOLOX decode + class-agnostic NMS: ([K, 4] xyxy boxes, [K] scores) scoring over ``score``."""
    pred = raw[0].astype(np.float64).copy()
    grids, strides = [], []
    for stride in (8, 16, 32):
        h, w = size[0] // stride, size[1] // stride
        xv, yv = np.meshgrid(np.arange(w), np.arange(h))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((h * w, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(np.clip(pred[:, 2:4], -20, 20)) * stride
    scores = (pred[:, 4:5] * pred[:, 5:]).max(1)
    keep = scores > score
    boxes = np.concatenate([pred[keep, :2] - pred[keep, 2:4] / 2, pred[keep, :2] + pred[keep, 2:4] / 2], 1)
    kept = _nms(boxes, scores[keep], YOLOX_NMS)
    return boxes[kept], scores[keep][kept]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order, keep = list(np.argsort(-scores)), []
    while order:
        best = order.pop(0)
        keep.append(best)
        if order:
            overlap = _iou(boxes[[best]], boxes[order])[0]
            order = [o for o, v in zip(order, overlap) if v <= threshold]
    return keep


def _pairs(boxes: np.ndarray, others: np.ndarray) -> dict[int, int]:
    """Row of ``boxes`` -> the row of ``others`` it matches at IoU 0.5, greedily, each of ``others`` used once."""
    iou = _iou(boxes, others) if len(boxes) and len(others) else np.zeros((len(boxes), len(others)))
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for row in range(len(boxes)):
        for col in np.argsort(-iou[row]):
            if iou[row, col] < IOU:
                break
            if col not in used:
                used.add(int(col))
                pairs[row] = int(col)
                break
    return pairs


def det_f1(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """Detection F1 at IoU 0.5 against the fp32 model's boxes after NMS, pooled over images, ×100."""
    size = tuple(model.input_shapes[next(iter(model.input_shapes))][2:])
    tp = fp = fn = 0
    for r, c in zip(reference, candidate):
        want, got = _scored_boxes(r[0], size, YOLOX_SCORE)[0], _scored_boxes(c[0], size, YOLOX_SCORE)[0]
        matched = len(_pairs(got, want))  # greedy: each fp32 box matches at most one candidate box
        tp, fp, fn = tp + matched, fp + len(got) - matched, fn + len(want) - matched
    return _pooled_f1(tp, fp, fn)


LAYOUT_SCORE = 0.5  # rapid-layout's RapidLayout(conf_thres=0.5) default


@functools.cache
def _layout_post_processing() -> Any:
    """rapid-layout's ``post_prepross`` module, read from the pinned wheel once (numpy only, never installed)."""
    import importlib.util

    from . import pins
    from .fetch import cache_dir, extract_member

    member = "rapid_layout/utils/post_prepross.py"
    spec = importlib.util.spec_from_file_location(
        "rapid_layout_post", extract_member(pins.RAPID_LAYOUT, member, cache_dir() / "rapid_layout_post.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layout_boxes(outputs: list[np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """rapid-layout's own post-processing (``PPPostProcess``): ([K, 4] boxes, [K] classes)."""
    module = _layout_post_processing()
    labels = [str(k) for k in range(outputs[0].shape[-1])]
    post = module.PPPostProcess(labels, conf_thres=LAYOUT_SCORE)
    boxes, _, names = post(size, np.zeros((1, 3, *size)), outputs)
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray([int(n) for n in names], np.int64)


def layout_f1(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """Layout-block F1 at IoU 0.5, same class, against the fp32 model's blocks as the application reports them
    (its decode, confidence 0.5 and NMS), pooled over pages, ×100."""
    size = tuple(model.input_shapes[next(iter(model.input_shapes))][2:])
    tp = fp = fn = 0
    for r, c in zip(reference, candidate):
        (want, want_cls), (got, got_cls) = _layout_boxes(r, size), _layout_boxes(c, size)
        matched = sum(len(_pairs(got[got_cls == k], want[want_cls == k])) for k in set(want_cls) & set(got_cls))
        tp, fp, fn = tp + matched, fp + len(got) - matched, fn + len(want) - matched
    return _pooled_f1(tp, fp, fn)


def det_f1_banded(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """``det_f1`` where a box on the other side of the threshold is no error while its score moved by at most
    ``SCORE_BAND`` (the source's own jitter under input noise it cannot see): the decisions the source itself does
    not hold are told apart by neither. A box whose score moved further, or that vanished, still counts."""
    size = tuple(model.input_shapes[next(iter(model.input_shapes))][2:])
    low = YOLOX_SCORE - SCORE_BAND
    tp = fp = fn = 0
    for r, c in zip(reference, candidate):
        (want, want_score), (got, got_score) = _scored_boxes(r[0], size, low), _scored_boxes(c[0], size, low)
        pairs = _pairs(want, got)
        back = {col: row for row, col in pairs.items()}
        for row, score in enumerate(want_score):
            col = pairs.get(row)
            other = got_score[col] if col is not None else -np.inf
            if score > YOLOX_SCORE:
                tp += other > YOLOX_SCORE
                fn += other <= YOLOX_SCORE and score - other > SCORE_BAND
        for col, score in enumerate(got_score):
            row = back.get(col)
            other = want_score[row] if row is not None else -np.inf
            fp += score > YOLOX_SCORE and other <= YOLOX_SCORE and score - other > SCORE_BAND
    return _pooled_f1(tp, fp, fn)


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask.reshape(-1, 1).astype(np.float64)
    return (hidden.reshape(-1, hidden.shape[-1]) * weights).sum(0) / max(1.0, weights.sum())


def embedding_cosine(
    model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None
) -> float:
    """Mean cosine (×100) between fp32 and candidate sentence embeddings (mean pooling over real tokens)."""
    cosines = []
    for index, (r, c) in enumerate(zip(reference, candidate)):
        mask = evaluation["attention_mask"][index]
        a, b = _mean_pool(r[0], mask), _mean_pool(c[0], mask)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
    return 100.0 * float(np.mean(cosines))


def top1(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """Top-1 accuracy against the labels, ×100."""
    predicted = np.array([int(np.argmax(c[0])) for c in candidate])
    return 100.0 * float(np.mean(predicted == evaluation["labels"][: len(predicted)]))


def top1_agreement(model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None) -> float:
    """Share of samples whose arg-max class equals fp32's, ×100 (the light zoo has no labels)."""
    return 100.0 * float(np.mean([np.argmax(r[0]) == np.argmax(c[0]) for r, c in zip(reference, candidate)]))


def output_agreement(
    model: CorpusModel, evaluation: dict, reference: Outputs, candidate: Outputs, charset=None
) -> float:
    """Worst cosine (×100) between fp32 and candidate over every output of every sample."""
    worst = 1.0
    for r, c in zip(reference, candidate):
        for a, b in zip(r, c):
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            worst = min(worst, 1.0 if denom == 0 and np.array_equal(a, b) else float(a @ b / denom) if denom else 0.0)
    return 100.0 * worst


METRICS: dict[str, Callable[..., float]] = {
    "char_accuracy": char_accuracy,
    "map_f1": map_f1,
    "det_f1": det_f1,
    "layout_f1": layout_f1,
    "embedding_cosine": embedding_cosine,
    "top1": top1,
    "top1_agreement": top1_agreement,
    "output_agreement": output_agreement,
}
# The same metric with the decisions the source itself does not hold under input noise left out: a diagnostic column
# (how much of a drop is threshold flips), never the yardstick's value.
BANDED: dict[str, Callable[..., float]] = {"det_f1": det_f1_banded}
# Against the source's output, not the truth: where the source itself misreads, a tool can gain or lose a character
# by chance (ddddocr_common on 512 held-out lines: ORT +2 against the truth, tied with Lepton against the source).
AGAINST_SOURCE: dict[str, Callable[..., float]] = {"char_accuracy": char_agreement, "top1": top1_agreement}
