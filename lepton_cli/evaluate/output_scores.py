"""Per-output tallies: each sums one output's agreement with the source over samples, one sample at a time,
and gives (value %, its standard error, secondary numbers). Which tally fits which output: output_roles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton_cli.evaluate import output_roles as roles


def drop_standard_error(losses: list[float], weights: float) -> float:
    """Standard error, in points, of ``100 * sum(losses) / weights`` for per-sample losses (candidate
    minus source, in the metric's units: errors, wrong rows, disagreeing positions)."""
    if len(losses) < 2 or weights <= 0:
        return 0.0
    return float(100.0 * math.sqrt(len(losses)) * np.std(losses, ddof=1) / weights)


def _worst_standard_error(values: list[float], resamples: int = 200) -> float:
    """Standard error, in points, of the smallest of ``values`` (bootstrap over them, fixed seed: deterministic).
    A minimum is no mean: its spread is how far the worst few samples lie apart."""
    if len(values) < 2:
        return 0.0
    rng = np.random.default_rng(0)
    draws = np.asarray(values)[rng.integers(0, len(values), (resamples, len(values)))]
    return float(100.0 * np.std(draws.min(axis=1), ddof=1))


@dataclass
class OutputResult:
    value: float  # percent; the source scores 100 against itself
    drop_se: float
    extra: dict[str, Any] = field(default_factory=dict)


class ExactTally:
    def __init__(self) -> None:
        self.equal = self.total = 0
        self.losses: list[float] = []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        same = (ref == got) | ((ref != ref) & (got != got)) if ref.dtype.kind == "f" else ref == got
        self.equal += int(np.sum(same))
        self.total += same.size
        self.losses.append(float(same.size - np.sum(same)))

    def result(self) -> OutputResult:
        return OutputResult(100.0 * self.equal / max(1, self.total), drop_standard_error(self.losses, self.total))


class DecisionTally(ExactTally):
    """Agreement of thresholded decisions (``> threshold``)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        super().add(ref > self.threshold, np.where(np.isfinite(got), got > self.threshold, ~(ref > self.threshold)))


class RelativeErrorTally:
    def __init__(self) -> None:
        self.noise = self.signal = 0.0
        self.losses: list[float] = []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r, g = ref.astype(np.float64), got.astype(np.float64)
        noise = float(np.sum((r - g) ** 2)) if np.isfinite(g).all() else math.inf
        signal = float(np.sum(r * r))
        self.noise += noise
        self.signal += signal
        self.losses.append(min(1.0, math.sqrt(noise / signal)) if signal > 0 else float(noise > 0))

    def result(self) -> OutputResult:
        error = min(1.0, math.sqrt(self.noise / self.signal)) if self.signal > 0 else float(self.noise > 0)
        return OutputResult(
            100.0 * (1.0 - error),
            drop_standard_error(self.losses, len(self.losses)),
            {"relative_error": round(error, 6)},
        )


def _row_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    g = got.reshape(-1, got.shape[-1]).astype(np.float64)
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    dot = np.sum(r * g, axis=1)
    cos = np.where((nr > 0) & (ng > 0), dot / np.where((nr > 0) & (ng > 0), nr * ng, 1.0), np.where(nr == ng, 1.0, 0.0))
    return np.where(np.isfinite(cos), np.clip(cos, -1.0, 1.0), 0.0)


class CosineTally:
    """Mean cosine of each vector along the last axis (a sentence embedding, a token's hidden state)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.rows = 0
        self.worst = 1.0
        self.losses: list[float] = []

    def add(self, ref: np.ndarray, got: np.ndarray, keep: np.ndarray | None = None) -> None:
        """``keep``: which vectors count (an attention mask over ``ref``'s leading axes); None: all."""
        cos = _row_cosines(ref, got)
        if keep is not None:
            cos = cos[np.asarray(keep).reshape(-1) != 0]
        self.total += float(np.sum(cos))
        self.rows += cos.size
        self.worst = min(self.worst, float(cos.min(initial=1.0)))
        self.losses.append(float(np.sum(1.0 - cos)))

    def result(self) -> OutputResult:
        mean = self.total / max(1, self.rows)
        return OutputResult(
            100.0 * mean,
            drop_standard_error(self.losses, self.rows),
            {"mean_cosine": round(mean, 6), "worst_cosine": round(self.worst, 6)},
        )


def _is_probability(x: np.ndarray, axis: int) -> bool:
    """Rows that already are probabilities (a Softmax's output): non-negative, summing to 1."""
    return bool(np.all(x >= 0) and np.allclose(np.sum(x, axis=axis), 1.0, atol=1e-3))


def _probabilities(x: np.ndarray, axis: int, as_given: bool) -> np.ndarray:
    """Rows as probabilities: as they are (``as_given``), else a softmax."""
    x = x.astype(np.float64)
    if as_given:
        return x
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


# A row whose source puts two classes within one point of probability has not decided between them: int8 moves a
# class's probability by more (Magika, every op int8 on cpu-avx: mean top 0.85 -> 0.83), so taking the other one is a
# coin toss, not a loss. Magika's 64 calibration files hold one such file twice (0.221 vs 0.212): it alone refused a
# Conv/MatMul/Gemm-int8 model that kept all 512 held-out answers (docs/decisions.md, session 34).
SOURCE_TIE = 0.01


def agreement_axis(shape: tuple[int, ...], axis: int | None = None) -> int:
    """Where arg-max agreement looks for classes: ``axis`` (a role's), else a 4-D map's channels, else the last axis."""
    if axis is not None:
        return axis
    return 1 if len(shape) == 4 else len(shape) - 1


def class_axis(shape: tuple[int, ...]) -> int | None:
    """``agreement_axis`` of a 2-D, 3-D or 4-D output, or None where it holds one value or the rank is other (a
    continuous output)."""
    if len(shape) not in (2, 3, 4):
        return None
    axis = agreement_axis(shape)
    return axis if shape[axis] > 1 else None


class Top1Tally:
    """Arg-max agreement per row (or pixel), with how sure each model is: the mean top probability and the
    probabilities' cosine (a collapsed confidence keeps the arg-max and loses these). A row where the source's top
    classes tie (within ``SOURCE_TIE``) agrees with either of them."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis  # the class axis; None: the last, a 4-D map's channels
        self.agree = self.positions = self.ties = 0
        self.top_ref = self.top_got = 0.0
        self.dot = self.ref_sq = self.got_sq = 0.0
        self.losses: list[float] = []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        axis = agreement_axis(ref.shape, self.axis)
        finite = np.all(np.isfinite(got), axis=axis)
        picked = np.expand_dims(np.argmax(got, axis=axis), axis)
        same = np.argmax(ref, axis=axis) == np.squeeze(picked, axis)
        # The source decides: an int8 Softmax output sums to 1 only within its rounding (4 classes at 1/255 steps:
        # ±0.008), and a softmax over probabilities reads a 0.92 top as 0.47 (a false "confidence collapsed").
        as_given = _is_probability(ref, axis)
        with np.errstate(invalid="ignore", over="ignore"):  # rows of -inf scores have no probabilities: no tie
            p = _probabilities(ref, axis, as_given)
            margin = np.max(p, axis=axis) - np.squeeze(np.take_along_axis(p, picked, axis), axis)
        tied = ~same & (margin <= SOURCE_TIE)
        same = (same | tied) & finite
        self.ties += int(np.sum(tied & finite))
        self.agree += int(np.sum(same))
        self.positions += same.size
        self.losses.append(float(same.size - np.sum(same)))
        if np.isfinite(got).all():
            q = _probabilities(got, axis, as_given)
            self.top_ref += float(np.sum(np.max(p, axis=axis)))
            self.top_got += float(np.sum(np.take_along_axis(q, np.expand_dims(np.argmax(p, axis=axis), axis), axis)))
            self.dot += float(np.sum(p * q))
            self.ref_sq += float(np.sum(p * p))
            self.got_sq += float(np.sum(q * q))

    def result(self) -> OutputResult:
        n = max(1, self.positions)
        denom = math.sqrt(self.ref_sq * self.got_sq)
        extra = {
            "top_probability": [round(100 * self.top_ref / n, 4), round(100 * self.top_got / n, 4)],
            "probability_cosine": round(self.dot / denom, 6) if denom else 0.0,
        }
        if self.ties:
            extra["source_ties"] = self.ties  # rows counted as agreeing because the source's top classes tie
        return OutputResult(100.0 * self.agree / n, drop_standard_error(self.losses, n), extra)


class EitherTally:
    """Class scores or an embedding, cannot tell: both tallies; the worse value counts."""

    def __init__(self) -> None:
        self.top1, self.cosine = Top1Tally(), CosineTally()

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.top1.add(ref, got)
        self.cosine.add(ref, got)

    def result(self) -> OutputResult:
        a, b = self.top1.result(), self.cosine.result()
        worse = a if a.value <= b.value else b
        return OutputResult(worse.value, worse.drop_se, {"top1_agreement": round(a.value, 4), **a.extra, **b.extra})


def _f1(tp: int, fp: int, fn: int) -> float:
    """F1 of a binary mask; two empty masks agree."""
    return 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _decision_counts(ref: np.ndarray, got: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(true, false, missed) positives of ``got``'s decisions over ``threshold`` against ``ref``'s; non-finite is no."""
    want, have = ref > threshold, np.isfinite(got) & (got > threshold)
    return int(np.sum(want & have)), int(np.sum(~want & have)), int(np.sum(want & ~have))


class MultiLabelTally:
    """Independent probabilities (a Sigmoid over several values: note activations, tags, per-class masks) read as an
    application reads them, as decisions over a threshold: F1 of the candidate's positives against the source's,
    pooled over every sample, at each threshold; the worse counts. Arg-max agreement reads them wrongly: in a silent
    frame every value is near 0, the source "ties" them all, and a model that adds or drops notes keeps agreeing."""

    def __init__(self, thresholds: tuple[float, ...]) -> None:
        self.thresholds = thresholds
        self.counts = np.zeros((len(thresholds), 3), np.int64)  # tp, fp, fn per threshold
        self.wrong: list[list[float]] = [[] for _ in thresholds]  # per sample, per threshold: fp + fn

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        for k, threshold in enumerate(self.thresholds):
            tp, fp, fn = _decision_counts(ref, got, threshold)
            self.counts[k] += (tp, fp, fn)
            self.wrong[k].append(float(fp + fn))

    def result(self) -> OutputResult:
        f1s = [_f1(*(int(c) for c in counts)) for counts in self.counts]
        worst = int(np.argmin(f1s))
        tp, fp, fn = (int(c) for c in self.counts[worst])
        extra = {
            "f1_by_threshold": {f"{t:g}": round(100.0 * f, 4) for t, f in zip(self.thresholds, f1s)},
            "source_positives": tp + fn,
            "candidate_positives": tp + fp,
        }
        return OutputResult(100.0 * f1s[worst], drop_standard_error(self.wrong[worst], 2 * tp + fp + fn), extra)


class MaskF1Tally:
    """F1 of the binarised map per page (batch row) and threshold; the value is the worst page, since a text
    detector that misses one page's lines has failed that page whatever the others score."""

    def __init__(self, thresholds: tuple[float, ...]) -> None:
        self.thresholds = thresholds
        self.pages: list[float] = []  # per page: its worst F1 over the thresholds
        self.tp = self.fp = self.fn = 0  # pooled at the first threshold, for the report

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        for b in range(ref.shape[0]):
            page = []
            for k, threshold in enumerate(self.thresholds):
                tp, fp, fn = _decision_counts(ref[b], got[b], threshold)
                page.append(_f1(tp, fp, fn))
                if k == 0:
                    self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
            self.pages.append(min(page))

    def result(self) -> OutputResult:
        if not self.pages:
            return OutputResult(100.0, 0.0)
        extra = {
            "pages": len(self.pages),
            "worst_page": int(np.argmin(self.pages)),
            "mean_page_f1": round(100.0 * float(np.mean(self.pages)), 4),
            "pooled_f1": round(100.0 * _f1(self.tp, self.fp, self.fn), 4),
            "thresholds": list(self.thresholds),
        }
        return OutputResult(100.0 * min(self.pages), _worst_standard_error(self.pages), extra)


def source_box_count(refs: list[np.ndarray], layout: str, confs: tuple[float, ...]) -> int:
    """How many boxes the source detects (after NMS) over ``refs``, each a batch of raw head outputs, averaged over
    ``confs``: a box is the unit, not a box at one confidence (a lost box is lost at every confidence it had)."""
    counts = [0] * len(confs)
    for ref in refs:
        for b in range(ref.shape[0]):
            found = roles.detections(ref[b], layout, min(confs))
            for k, conf in enumerate(confs):
                counts[k] += len(roles.above(found, conf)[0])
    return round(float(np.mean(counts)))


class DetectionTally:
    """F1 of the candidate's detections (after NMS) against the source's, matched at IoU 0.5 with the same class,
    pooled per confidence in ``confs``; the value is their mean (one confidence when the user named it)."""

    def __init__(self, layout: str, confs: tuple[float, ...]) -> None:
        self.layout, self.confs = layout, confs
        self.matched, self.source_boxes, self.candidate_boxes = ([0] * len(confs) for _ in range(3))
        self.score_errors: list[float] = []  # of the boxes matched at the lowest confidence
        self.losses: list[float] = []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        low = min(self.confs)
        for b in range(ref.shape[0]):
            source = roles.detections(ref[b], self.layout, low)
            candidate = (
                roles.detections(got[b], self.layout, low)
                if np.isfinite(got[b]).all()
                else (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
            )
            losses = []
            for k, conf in enumerate(self.confs):
                wanted, found = roles.above(source, conf), roles.above(candidate, conf)
                hits, errors = roles.match(wanted, found)
                self.matched[k] += hits
                self.source_boxes[k] += len(wanted[0])
                self.candidate_boxes[k] += len(found[0])
                self.score_errors += errors if conf == low else []
                marked = len(wanted[0]) + len(found[0])
                losses.append(0.0 if marked == 0 else 1.0 - 2 * hits / marked)
            self.losses.append(float(np.mean(losses)))

    def result(self) -> OutputResult:
        f1s = [
            1.0 if s + c == 0 else 2 * m / (s + c)
            for m, s, c in zip(self.matched, self.source_boxes, self.candidate_boxes)
        ]
        extra = {  # box counts averaged over the confidences, as the gate's unit (``source_box_count``)
            "source_boxes": round(float(np.mean(self.source_boxes))),
            "candidate_boxes": round(float(np.mean(self.candidate_boxes))),
            "matched": round(float(np.mean(self.matched))),
            "confidence": self.confs[0] if len(self.confs) == 1 else list(self.confs),
            "score_error_mean": round(float(np.mean(self.score_errors)), 6) if self.score_errors else 0.0,
            "score_error_max": round(float(np.max(self.score_errors)), 6) if self.score_errors else 0.0,
        }
        if len(self.confs) > 1:
            extra["f1_by_confidence"] = {f"{c:g}": round(100.0 * f, 4) for c, f in zip(self.confs, f1s)}
        value = 100.0 * float(np.mean(f1s))
        return OutputResult(value, drop_standard_error(self.losses, len(self.losses)), extra)
