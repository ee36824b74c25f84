"""Accuracy of a compiled model against its source: every output scored by what it is, against labels or the source.

With labels the first output's metric is top-1 accuracy (``[N, classes]``) or, for a CTC model given
text labels (a string array), *character accuracy* against them: 100 × (1 − edit distance of the
greedy CTC decode, mapped through the model's ``character`` table, / label length), what OCR users
report. Every other output (and the first, without labels) is scored against the source model's
output on the same samples by the metric that fits it — class scores by top-1 agreement, embeddings
by cosine, YOLO-style heads by detection F1, CTC scores by decoded characters, probability maps by
thresholded F1, integers and input copies by exact match, the rest by relative error — recognised
as ``lepton_cli.evaluate.output_roles`` describes, or as ``--eval-metric`` says (one metric for the first
output, ``NAME=metric`` for any). ``mask-f1@T``: DBNet-style detectors binarise at 0.3, so
``mask-f1@0.3``; pixel-value agreement is much stricter than what their post-processing reads. CTC:
per-timestep arg-max is far stricter than the decoded characters users read (docs/decisions.md).
``agreement`` keeps the plain share of arg-max positions
(class-like shapes) or of values within ``CONTINUOUS_TOLERANCE`` of the range.
A score's headline (metric, value, drop) is the output that lost the most; the budget holds for each.
The drop is in percentage points (source value − compiled value), which is what
``--max-accuracy-drop`` and the targets' ``max_accuracy_drop_pct`` budget bound.

Both models run in ONNX Runtime with full graph optimisation, as deployed, so quantized QDQ graphs
are measured with the integer kernels ORT fuses them into, not as simulated float — except where this
host's integer kernels differ from the target's (``scoring_opt_level``): an x86 build host without
VNNI sums 8-bit products pairwise in int16 (VPMADDUBSW) and saturates, which VNNI, Arm (SDOT, SMLAL)
and integer accelerators, accumulating in int32, never do. There the
QDQ graph runs unfused (``basic``: weights' DequantizeLinear folded, activations quantized and
dequantized in float), which is the exact integer result up to fp32 rounding.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from typing import Any

import numpy as np
import onnx

from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.gfl_head import GflHead, find_gfl_head
from lepton_cli.evaluate.input_floor import InputFloor, ValueGrid, dithered, value_grids
from lepton_cli.evaluate.io_grid import io_on_grid, value_ranges
from lepton_cli.evaluate.output_roles import (
    CTC_BLANK,
    CTC_TIME_MAJOR,
    MAP_THRESHOLDS,
    OutputRole,
    ctc_time_major,
    data_axes,
    detection_role,
    from_user,
    image_size,
    recognise,
)
from lepton_cli.evaluate.output_scores import (
    CosineTally,
    DecisionTally,
    DetectionTally,
    EitherTally,
    ExactTally,
    MaskF1Tally,
    MultiLabelTally,
    OutputResult,
    RelativeErrorTally,
    Top1Tally,
    agreement_axis,
    class_axis,
    drop_standard_error,
    source_box_count,
)
from lepton_cli.evaluate.segment_head import SegmentHead, find_segment_head
from lepton_cli.host.parallel import ordered_map
from lepton_cli.model.io_contract import adapt_feed, restore_output
from lepton_cli.model.sessions import make_session
from lepton_cli.samples.sample_set import SampleSet

MASK_NAME = re.compile(r"mask", re.IGNORECASE)  # attention_mask, input_mask: a transformer's padding mask
INTEGER_TYPES = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
}

VNNI_ISA = ("avx512_vnni", "avx_vnni", "avxvnni", "amx_int8")  # u8·s8 dot products into int32: no saturation
X86_ISA = ("avx2", "avx512f", "sse4_2", "avx")
EXACT_INTEGER = "basic"  # ORT level that leaves QDQ pairs unfused
METRICS = (
    "auto",
    "top1",
    "agreement",
    "ctc",
    "mask-f1",
    "multilabel-f1",
    "cosine",
    "detection",
    "exact",
    "relative-error",
)  # mask-f1 and detection take "@threshold"
THRESHOLD_METRICS = ("mask-f1", "multilabel-f1", "detection")
MASK_F1_DEFAULT_THRESHOLD = 0.5
CTC_METADATA_KEYS = (
    "lepton.decoding",
    "character",
)  # "lepton.decoding" = "ctc"; PaddleOCR rec models carry "character"
CONTINUOUS_TOLERANCE = 0.02  # of the reference output's range (max − min)
FLOOR_GRID_SAMPLES = 16  # samples that decide whether an input lies on an 8-bit grid
SNR_CAP_DB = 300.0  # identical outputs: infinite SNR, capped so the report stays valid JSON


# What one counted unit of a metric is, for the data a coarse gate asks for (``Evaluator.coarsest_unit``).
UNIT_NAMES = (
    ("top1_agreement", "samples"),
    ("top1", "labelled samples"),
    ("ctc", "characters"),
    ("sequence_agreement", "decoded tokens"),
    ("detection_f1", "boxes the source detects"),
    ("decision_agreement", "decisions"),
    ("multilabel_f1", "positive decisions"),
)


@dataclass
class AccuracyScore:
    metric: str  # "top1" or "ctc_accuracy" (labels given), "agreement", "ctc_agreement" or "mask_f1@T"
    source_value: float  # percent
    value: float  # percent
    drop_pct: float  # percentage points; > 0 means the candidate is worse
    agreement: dict[str, float]  # cosine, snr_db, max_abs, top1_agreement (worst over outputs)
    samples: int
    drop_se: float = 0.0  # standard error of drop_pct over the samples (paired per-sample differences)
    outputs: list[dict[str, Any]] = field(
        default_factory=list
    )  # every output: name, metric, why, value, drop_pct, drop_se
    output: str = ""  # the output whose drop the headline numbers are (the worst)
    resolution_pct: float = 0.0  # one scored unit's worth (sample, position, character) of the coarsest output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def drop_bound(self, z: float, budget: float = math.inf) -> float:
        """The largest drop + z standard errors over the outputs: the one-sided upper confidence bound the tuning
        holds to the budget (every output must meet it, not the first). Where one unit of a counted metric is within
        ``budget``, its standard error is at least its count's plus one (``count_se``); coarser data is read on its
        standard error alone (the scorer warns that it cannot resolve the budget). No bound passes the most an output
        can lose, its source's value: ``--max-accuracy-drop 100`` accepts a model that lost everything, as it says."""

        def bound(drop: float, se: float, unit: float, most: float) -> float:
            return min(drop + z * max(se, count_se(drop, unit) if unit <= budget else 0.0), max(drop, most))

        if not self.outputs:
            return bound(self.drop_pct, self.drop_se, self.resolution_pct, self.source_value)
        return max(
            bound(o["drop_pct"], o["drop_se"], o.get("resolution_pct", 0.0), o.get("source_value", math.inf))
            for o in self.outputs
        )


def count_se(drop_pct: float, unit_pct: float) -> float:
    """The least standard error a drop counted in wrong units of ``unit_pct`` points can have: the Poisson error of
    one unit more than it counts, ``unit * sqrt(count + 1)``. The paired per-sample error of a candidate that
    happens to lose 0-2 units is ~0, so among many candidates the search would keep the one that read luckiest
    (ddddocr_det: 0.67 ± 0.33 on the gate, 3.12 on other scenes; docs/decisions.md, session 21)."""
    return math.sqrt(unit_pct * (max(drop_pct, 0.0) + unit_pct)) if unit_pct > 0 else 0.0


def _check_class_indices(labels: np.ndarray, classes: int) -> None:
    """Exit 2 unless every label is a class index of a ``classes``-wide output: against labels no output can
    match, the source scores 0 % and every candidate "keeps" it (a drop of 0.00 that measures nothing)."""
    values = labels.astype(np.float64, copy=False) if labels.dtype.kind in "biuf" else None
    if values is None:
        raise BadInputError(
            f"labels of dtype {labels.dtype} are not class indices", "store each sample's class index (0-based)"
        )
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= classes)
    if np.any(bad):
        raise BadInputError(
            f"{int(bad.sum())} of {len(values)} labels are not class indices of the first output ({classes} classes, "
            f"0 to {classes - 1}; e.g. {values[bad][0]:g})",
            "store each sample's class index (0-based) in 'labels', or drop the labels to measure agreement with "
            "the source model",
        )


def _correct_rows(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row of ``[N, classes]``: arg-max equals the label and the row is finite."""
    return (np.argmax(logits, axis=1) == labels.reshape(-1)) & np.all(np.isfinite(logits), axis=1)


def _class_like(role: OutputRole, shape: tuple[int, ...]) -> bool:
    """Whether an output's arg-max agreement means anything: class scores, not a box regression read by its error."""
    return role.metric.startswith("top1") or (role.metric == "agreement" and class_axis(shape) is not None)


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine, SNR (dB), max abs error and arg-max agreement (class-like outputs) of one output."""
    span = float(np.ptp(reference)) if reference.size else 0.0
    tally = _Tally(span)
    tally.add(reference, candidate)
    return tally.summary(class_axis(reference.shape) is not None)


def scoring_opt_level(target_isa: list[str], host_isa: list[str]) -> str:
    """ORT optimisation level to score candidates with: ``basic`` (exact integer arithmetic, see the module
    doc) when this host is an x86 CPU without VNNI and the target is not one; else ``all`` (as deployed)."""

    def saturates(isa: list[str]) -> bool:
        return any(i in X86_ISA for i in isa) and not any(i in VNNI_ISA for i in isa)

    return EXACT_INTEGER if saturates(host_isa) and not saturates(target_isa) else "all"


def parse_metric(text: str) -> tuple[str, float | None]:
    """``"mask-f1@0.3"`` -> ("mask-f1", 0.3), ``"detection@0.1"`` -> ("detection", 0.1) (the application's score
    threshold); other metrics take no parameter. BadInputError (exit 2) otherwise."""
    name, _, arg = text.partition("@")
    fix = f"use one of: {', '.join(METRICS)} (mask-f1@THRESHOLD, e.g. mask-f1@0.3; detection@CONFIDENCE, e.g. detection@0.1)"
    if name not in METRICS or (arg and name not in THRESHOLD_METRICS):
        raise BadInputError(f"--eval-metric {text!r} is not a metric", fix)
    if name not in THRESHOLD_METRICS:
        return name, None
    if not arg:
        return name, MASK_F1_DEFAULT_THRESHOLD if name in ("mask-f1", "multilabel-f1") else None
    try:
        threshold = float(arg)
    except ValueError:
        raise BadInputError(f"--eval-metric {text!r}: the threshold {arg!r} is not a number", fix) from None
    if not math.isfinite(threshold) or (name == "detection" and not 0 < threshold < 1):
        raise BadInputError(f"--eval-metric {text!r}: the threshold must be finite (a confidence in (0, 1))", fix)
    return name, threshold


def parse_metric_spec(text: str) -> tuple[str, dict[str, str]]:
    """``"mask-f1@0.3,boxes=detection"`` -> ("mask-f1@0.3", {"boxes": "detection"}): at most one metric for the
    first output, ``NAME=metric`` for any output. BadInputError (exit 2) on a bad metric."""
    default, per_output = None, {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, eq, metric = entry.rpartition("=")
        parse_metric(metric)
        if eq:
            per_output[name] = metric
        elif default is not None:
            raise BadInputError(
                f"--eval-metric {text!r} names two metrics for the first output",
                "give one metric, and NAME=metric for other outputs (comma-separated)",
            )
        else:
            default = metric
    return default or "auto", per_output


def label_free(metric: str) -> str:
    """The metric to use on data without labels (held-out calibration samples) when ``metric`` was asked for."""
    default, per_output = parse_metric_spec(metric)
    entries = ["auto" if default == "top1" else default] + [f"{k}={v}" for k, v in per_output.items()]
    return ",".join(entries)


def is_ctc_model(model: onnx.ModelProto) -> bool:
    """Whether the model says its first output is decoded with CTC (metadata; see CTC_METADATA_KEYS)."""
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("lepton.decoding", "").lower() == "ctc" or "character" in props


def ctc_greedy_decode(scores: np.ndarray, blank: int = CTC_BLANK) -> list[list[int]]:
    """Best-path decode of ``[N, T, C]`` scores: arg-max per step, repeats collapsed, blanks dropped."""
    # a non-finite step decodes to -1 before repeats collapse: it matches nothing, so overflow never agrees
    best = np.where(np.all(np.isfinite(scores), axis=-1), np.argmax(scores, axis=-1), -1)
    decoded = []
    for steps in best:
        keep = np.ones(len(steps), dtype=bool)
        keep[1:] = steps[1:] != steps[:-1]
        decoded.append([int(c) for c, k in zip(steps, keep) if k and c != blank])
    return decoded


def ctc_characters(model: onnx.ModelProto) -> list[str] | None:
    """Class index -> character for a model with PaddleOCR's ``character`` metadata (one per line):
    0 is the blank, then the table, then the space PaddleOCR appends (``use_space_char``)."""
    table = next((p.value for p in model.metadata_props if p.key == "character"), None)
    return None if table is None else ["", *table.split("\n"), " "]


def ctc_text(decoded: list[list[int]], characters: list[str]) -> list[str]:
    """Decoded class indices as text (indices past the table decode to nothing), ends stripped as PaddleOCR does."""
    return ["".join(characters[c] if 0 <= c < len(characters) else "" for c in seq).strip() for seq in decoded]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance. Hand-written: no edit-distance library is a dependency (rapidfuzz and
    python-Levenshtein checked; neither is installed), and sequences here are tens of symbols."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def ctc_agreement_pct(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Character accuracy of the candidate's CTC decode, with the reference's decode as the truth."""
    if reference.ndim != 3:
        raise BadInputError(
            f"CTC agreement needs a [N, T, classes] output, the model's first output has shape {list(reference.shape)}",
            "use --eval-metric agreement for this model",
        )
    return _ctc_pct(ctc_greedy_decode(reference), ctc_greedy_decode(candidate))


def ctc_read(scores: np.ndarray, table: list[str] | None, layout: str | None = None) -> list[list]:
    """Each line's CTC decode: its text's characters (ends stripped) with a character table, else class indices.
    ``layout`` CTC_TIME_MAJOR: ``scores`` are [T, N, C]."""
    decoded = ctc_greedy_decode(np.moveaxis(scores, 0, 1) if layout == CTC_TIME_MAJOR else scores)
    return decoded if table is None else [list(text) for text in ctc_text(decoded, table)]


def _ctc_pct(truth: list, got: list) -> float:
    errors = sum(edit_distance(t, g) for t, g in zip(truth, got))
    length = sum(len(t) for t in truth)
    if length == 0:
        return 100.0 if errors == 0 else 0.0
    return 100.0 * max(0.0, 1.0 - errors / length)


class _Tally:
    """Sums over samples for one output, so a candidate is scored one sample at a time (memory: one sample)."""

    def __init__(self, span: float, axis: int | None = None):
        self.axis = axis  # the output role's class axis (an NHWC class map's 3), else the shape's
        self.tol = CONTINUOUS_TOLERANCE * span if span > 0 else 1e-6
        self.dot = self.ref_sq = self.got_sq = self.noise = 0.0
        self.max_abs = 0.0
        self.agree = self.positions = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise BadInputError(
                f"the candidate's output has shape {list(candidate.shape)}, the source's {list(reference.shape)}",
                "keep the model's output shapes unchanged",
            )
        ref, got = reference.astype(np.float64), candidate.astype(np.float64)
        self.dot += float(np.sum(ref * got))
        self.ref_sq += float(np.sum(ref * ref))
        self.got_sq += float(np.sum(got * got))
        self.noise += float(np.sum((ref - got) ** 2))
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(ref - got))))
        axis = self.axis if self.axis is not None else class_axis(reference.shape)
        if axis is not None:
            finite = np.all(np.isfinite(candidate), axis=axis)
            same = (np.argmax(reference, axis=axis) == np.argmax(candidate, axis=axis)) & finite
            self.agree += int(np.sum(same))
            self.positions += same.size
        else:
            self.agree += int(np.sum(np.abs(ref - got) <= self.tol))
            self.positions += ref.size

    def summary(self, class_like: bool) -> dict[str, float]:
        denom = math.sqrt(self.ref_sq * self.got_sq)
        cosine = self.dot / denom if denom else (1.0 if self.noise == 0 else 0.0)
        snr = (
            SNR_CAP_DB
            if self.noise == 0
            else (10 * math.log10(self.ref_sq / self.noise) if self.ref_sq else -SNR_CAP_DB)
        )
        result = {"cosine": cosine, "snr_db": min(snr, SNR_CAP_DB), "max_abs": self.max_abs}
        if class_like:
            result["top1_agreement"] = self.agree / max(1, self.positions)
        return result

    @property
    def agreement_pct(self) -> float:
        return 100.0 * self.agree / max(1, self.positions)


class _LabelTop1:
    """Top-1 of the first output against integer labels."""

    def __init__(self, labels: np.ndarray, source_correct: np.ndarray) -> None:
        self.labels, self.source_correct, self.rows = labels, source_correct, []
        self.confidence = Top1Tally()  # how sure the candidate is of the source's class

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.rows.append(got)
        self.confidence.add(ref, got)

    def result(self) -> OutputResult:
        got = _correct_rows(np.concatenate(self.rows), self.labels)
        se = drop_standard_error(list(self.source_correct.astype(float) - got.astype(float)), len(got))
        return OutputResult(100.0 * float(np.sum(got)) / max(1, len(got)), se, self.confidence.result().extra)


class _CtcAccuracy:
    """Character accuracy of the first output's CTC decode against text labels."""

    def __init__(self, evaluator: "Evaluator") -> None:
        self.evaluator, self.rows = evaluator, []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.rows.append(got)

    def result(self) -> OutputResult:
        ev = self.evaluator
        texts = ev._texts(self.rows)
        errors = [edit_distance(t, g) - e for t, g, e in zip(ev.truth, texts, ev.source_errors)]
        return OutputResult(
            _ctc_pct(ev.truth, texts), drop_standard_error([float(e) for e in errors], sum(len(t) for t in ev.truth))
        )


class _CtcAgreement:
    """Character agreement of the CTC decodes. With the model's character table, of the text it reads, as PaddleOCR
    returns it (ends stripped): a space frame at a line's end, which no reader sees, is not a character lost."""

    def __init__(self, table: list[str] | None, layout: str | None = None) -> None:
        self.table, self.layout = table, layout
        self.truth: list[list] = []
        self.got: list[list] = []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.truth += ctc_read(ref, self.table, self.layout)
        self.got += ctc_read(got, self.table, self.layout)

    def result(self) -> OutputResult:
        se = drop_standard_error(
            [float(edit_distance(t, g)) for t, g in zip(self.truth, self.got)], sum(len(t) for t in self.truth)
        )
        return OutputResult(_ctc_pct(self.truth, self.got), se)


class _SequenceAgreement(_CtcAgreement):
    """Token agreement of a decoder's arg-max sequences (one per batch row), edit distance over the source's tokens,
    as the CTC one but nothing collapsed: an autoregressive decoder's sequences may differ in length between models."""

    def __init__(self) -> None:
        super().__init__(None)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.truth += [row.tolist() for row in np.argmax(ref, axis=-1)]
        self.got += [row.tolist() if np.isfinite(g).all() else [] for row, g in zip(np.argmax(got, axis=-1), got)]


def _aligned(ref: np.ndarray, got: np.ndarray, variable: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """``ref`` and ``got`` zero-padded to one shape along the axes whose length follows the data (``variable``): a step
    only one model decoded is compared with nothing, so it counts in full. Other shapes must match."""
    if ref.shape == got.shape:
        return ref, got
    differ = {a for a in range(ref.ndim) if ref.shape[a] != got.shape[a]} if ref.ndim == got.ndim else None
    if differ is None or not differ <= variable:
        raise BadInputError(
            f"the candidate's output has shape {list(got.shape)}, the source's {list(ref.shape)}",
            "keep the model's output shapes unchanged",
        )
    return zero_padded(ref, got)


def zero_padded(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays of one rank zero-padded at the end of each axis to the larger length: what one has and the other
    lacks (a decoder step) is compared with zeros."""
    shape = np.maximum(ref.shape, got.shape)
    return tuple(np.pad(a, [(0, n - k) for n, k in zip(shape, a.shape)]) for a in (ref, got))  # type: ignore[return-value]


class _Agreement:
    """The plain agreement of ``--eval-metric agreement``: arg-max of class-like shapes, else values within tolerance."""

    def __init__(self, span: float) -> None:
        self.tally, self.losses = _Tally(span), []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        before = self.tally.positions - self.tally.agree
        self.tally.add(ref, got)
        self.losses.append(float(self.tally.positions - self.tally.agree - before))

    def result(self) -> OutputResult:
        return OutputResult(self.tally.agreement_pct, drop_standard_error(self.losses, self.tally.positions))


class Evaluator:
    """Scores candidate models against the source on fixed samples; the source runs once.

    Every output is scored by what it is (lepton_cli.evaluate.output_roles); the score's headline is the output
    that lost the most. Samples are read again for every candidate (an image folder decodes one at a time)
    and candidates are scored sample by sample: memory holds the source's outputs, not the inputs.
    """

    def __init__(
        self,
        source_model: onnx.ModelProto,
        samples: SampleSet,
        labels: np.ndarray | None = None,
        *,
        limit: int | None = None,
        threads: int = 1,
        metric: str = "auto",
        opt_level: str = "all",
        workers: int = 1,
    ) -> None:
        default_text, per_output = parse_metric_spec(metric)
        default, self.mask_threshold = parse_metric(default_text)
        self.samples, self.limit = samples, limit
        self.count = len(samples) if limit is None else min(limit, len(samples))
        if not self.count:
            raise BadInputError("the evaluation set is empty", "give at least one sample")
        self.threads = threads
        self.workers = workers  # samples (and sensitivity candidates) run side by side, each on ``threads``
        self.opt_level = opt_level
        self.labels = (
            labels[: self.count] if labels is not None and limit is not None else labels
        )  # per sample (or batch)
        self.head: GflHead | SegmentHead | None = None  # a head the scorer decodes before reading it
        self.reference = list(self._outputs(source_model))  # per sample, per output, source layout
        self.output_names = [o.name for o in make_session(source_model).get_outputs()]
        unknown = sorted(set(per_output) - set(self.output_names))
        if unknown:
            raise BadInputError(
                f"--eval-metric names {', '.join(map(repr, unknown))}, not an output of the model",
                f"name one of: {', '.join(self.output_names)}",
            )
        if not per_output and default == "auto":  # a metric the user named is read as named
            size = image_size(source_model)
            self.head = find_gfl_head(size, self.reference) or find_segment_head(size, self.reference)
            self.reference = [self.head.view(outs) for outs in self.reference] if self.head else self.reference
        self._check_labels_fit(default)
        self.spans = []
        for j in range(len(self.reference[0])):  # the continuous tolerance is a share of the reference's whole range
            lows = [float(np.min(outs[j])) for outs in self.reference if outs[j].size]
            highs = [float(np.max(outs[j])) for outs in self.reference if outs[j].size]
            self.spans.append(max(highs) - min(lows) if lows else 0.0)
        self.table = ctc_characters(source_model)  # CTC scores read text where the model carries its table
        # axes whose length follows the data (a decoder's steps): a candidate may decode more or fewer
        self.variable_axes = [data_axes([outs[j] for outs in self.reference]) for j in range(len(self.reference[0]))]
        self.roles = self._roles(source_model, default, default_text, per_output)
        self.position_masks = self._position_masks(source_model)
        self.metric = self.roles[0].metric
        self.source_value = self._source_value()
        self.resolution_pct = self._resolution()
        self._source = source_model
        self._floor: InputFloor | None | bool = False  # False: not measured yet
        self._io_floor: float | None | bool = False

    def _check_labels_fit(self, default: str) -> None:
        if default == "top1" and self.labels is None:
            raise BadInputError(
                "--eval-metric top1 needs labels, and the evaluation data has none",
                "add a 'labels' array to the .npz, or use --eval-metric agreement",
            )
        text_labels = self.labels is not None and self.labels.dtype.kind in ("U", "S")
        if default == "top1" and text_labels:
            raise BadInputError(
                "--eval-metric top1 needs class labels (integers); these labels are text",
                "use --eval-metric auto or ctc for a text recogniser",
            )
        if default not in ("auto", "top1") and not (default == "ctc" and text_labels):
            self.labels = None  # an explicit label-free metric ignores labels

    def _roles(
        self, model: onnx.ModelProto, default: str, default_text: str, per_output: dict[str, str]
    ) -> list[OutputRole]:
        feed = next(iter(self.samples.feeds(1)), None)
        roles = []
        for j, name in enumerate(self.output_names):
            refs = [outs[j] for outs in self.reference]
            if j == 0 and self.labels is not None and self.labels.dtype.kind in ("U", "S"):
                self._check_text_labels(refs[0])
                roles.append(
                    OutputRole(0, name, "ctc_accuracy", "text labels given: character accuracy of the CTC decode")
                )
            elif j == 0 and self.labels is not None:
                self._check_labels(refs[0])
                roles.append(OutputRole(0, name, "top1", "class labels given: top-1 accuracy"))
            elif name in per_output or (j == 0 and default != "auto"):
                chosen, threshold = parse_metric(per_output.get(name, default_text))
                roles.append(from_user(j, name, chosen, threshold))
                if roles[-1].metric == "ctc_agreement":
                    ctc_agreement_pct(refs[0], refs[0])  # shape check up front
                    if ctc_time_major(refs[0].shape):
                        roles[-1] = replace(roles[-1], layout=CTC_TIME_MAJOR, why="--eval-metric; [T, N, C] scores")
                if roles[-1].metric == "detection_f1":
                    roles[-1] = self._user_detection(model, j, name, refs, threshold)
            else:
                roles.append(recognise(model, j, name, refs, feed))
        return self._head_roles(roles) if self.head else roles

    def _head_roles(self, roles: list[OutputRole]) -> list[OutputRole]:
        """A decoded head's roles (GFL: detection F1 where it is carried; segmentation: boxes and masks)."""
        assert self.head is not None
        for j, role in self.head.roles(self.output_names, self.reference).items():
            roles[j] = role
        return roles

    def _position_masks(self, model: onnx.ModelProto) -> list[np.ndarray]:
        """Per sample, the padding mask of the cosine-scored token outputs (empty when none is scored so).

        A transformer's hidden state at a padded position is never read (attention and pooling mask it), so a
        candidate is not charged for it. The mask is the one rank-2 integer graph input named like a mask whose
        values are 0/1 and whose shape is the output's leading [N, T]."""
        inputs = [
            i.name
            for i in model.graph.input
            if MASK_NAME.search(i.name)
            and i.type.tensor_type.elem_type in INTEGER_TYPES
            and len(i.type.tensor_type.shape.dim) == 2
        ]
        if len(inputs) != 1:
            return []
        name = inputs[0]
        masks = [np.asarray(feed[name]) for feed in self.samples.feeds(self.limit) if name in feed]
        if len(masks) != self.count or not all(np.isin(m, (0, 1)).all() for m in masks):
            return []
        for j, role in enumerate(self.roles):
            shapes = [outs[role.index].shape for outs in self.reference]
            if role.metric == "cosine" and all(len(s) == 3 and s[:2] == m.shape for s, m in zip(shapes, masks)):
                why = f"{role.why}; positions where {name} is 0 (padding) are not scored"
                self.roles[j] = replace(role, positions=name, why=why)
        return masks if any(role.positions for role in self.roles) else []

    def _user_detection(
        self, model: onnx.ModelProto, j: int, name: str, refs: list[np.ndarray], conf: float | None
    ) -> OutputRole:
        from lepton_cli.evaluate.output_roles import _detector_layout, decoded_layout

        layout, why = decoded_layout(model, refs, *_detector_layout(refs))
        if layout is None:
            raise BadInputError(
                f"--eval-metric {name}=detection: output {name!r} of shape {list(refs[0].shape)} is not a "
                "YOLO-style head ([N, 4+classes, anchors] or [N, anchors, 5+classes], scores in [0, 1])",
                "use relative-error for this output",
            )
        if conf is None:
            return detection_role(j, name, f"--eval-metric; {why}", layout, refs)
        return OutputRole(j, name, "detection_f1", f"--eval-metric (confidence {conf:g}); {why}", layout, conf)

    def _source_value(self) -> float:
        if self.roles[0].metric == "ctc_accuracy":
            source_texts = self._texts([outs[0] for outs in self.reference])
            self.source_errors = [edit_distance(t, g) for t, g in zip(self.truth, source_texts)]
            return _ctc_pct(self.truth, source_texts)
        if self.roles[0].metric == "top1":
            firsts = [outs[0] for outs in self.reference]
            self.source_correct = _correct_rows(np.concatenate(firsts), self.labels)
            return self._top1_pct(firsts)
        return 100.0

    def _tally(self, role: OutputRole, span: float) -> Any:
        metric = role.metric
        if metric == "top1":
            return _LabelTop1(self.labels, self.source_correct)
        if metric == "ctc_accuracy":
            return _CtcAccuracy(self)
        if metric == "ctc_agreement":
            return _CtcAgreement(self.table, role.layout)
        if metric == "sequence_agreement":
            return _SequenceAgreement()
        if metric.startswith("mask_f1"):
            return MaskF1Tally((role.threshold,) if role.threshold is not None else MAP_THRESHOLDS)
        if metric.startswith("multilabel_f1"):
            return MultiLabelTally((role.threshold,) if role.threshold is not None else MAP_THRESHOLDS)
        if metric.startswith("decision_agreement"):
            return DecisionTally(role.threshold if role.threshold is not None else 0.5)
        if metric == "detection_f1":
            return DetectionTally(role.layout or "v8", role.detection_confidences())
        simple = {
            "exact": ExactTally,
            "relative_error": RelativeErrorTally,
            "cosine": CosineTally,
            "top1_agreement+cosine": EitherTally,
        }
        if metric == "top1_agreement":
            return Top1Tally(role.class_axis)
        return simple[metric]() if metric in simple else _Agreement(span)

    def subset(self, count: int) -> "Evaluator":
        """This evaluator on its first ``count`` samples (a search's quicker measurements); the source is not run again."""
        if count >= self.count:
            return self
        part = copy.copy(self)
        part.count = part.limit = count
        part.reference = self.reference[:count]
        part.position_masks = self.position_masks[:count]
        rows = sum(len(outs[0]) for outs in part.reference)
        if self.labels is not None:
            part.labels = self.labels[:rows]
        if hasattr(self, "truth"):
            part.truth = self.truth[:rows]
        part.source_value = part._source_value()
        part.resolution_pct = part._resolution()
        part._floor = part._io_floor = False
        return part

    def input_floor(self) -> InputFloor | None:
        """The source's drop against itself with its 8-bit-grid inputs dithered by under half a step (measured
        once): a budget under it cannot tell a candidate from input noise. None when no input is on such a grid."""
        if self._floor is False:
            grids = value_grids(self.first_feeds(FLOOR_GRID_SAMPLES))
            score = self.score(self._source, grids) if grids else None
            self._floor = InputFloor(score.drop_pct, [g.name for g in grids]) if score else None
        return self._floor

    def io_floor(self) -> float | None:
        """The source's drop with only its float inputs and outputs on an 8-bit grid (io_grid.py), measured once:
        what a full-integer chip's edge alone costs. The outputs' ranges are the source's held ones; None when it
        reads no drop, or the outputs held are a decoded head's view (its own metric reads that edge)."""
        if self._io_floor is False and self.head is not None:
            self._io_floor = None
        if self._io_floor is False:
            outputs = (dict(zip(self.output_names, outs)) for outs in self.reference)
            ranges = value_ranges(chain(self.samples.feeds(self.limit), outputs))
            drop = self.score(io_on_grid(self._source, ranges)).drop_pct
            self._io_floor = drop if drop > 0 else None
        return self._io_floor

    def _resolution(self) -> float:
        """The smallest drop the coarsest output can show, in points: one wrong unit of its metric (a row for
        top-1, a position for arg-max agreement, a character for CTC, a source box for detection F1); 0.0 when
        every metric is continuous. Each output's own is ``unit_pcts``."""
        self.unit_pcts = [100.0 / n if n else 0.0 for n in (self._units(role) for role in self.roles)]
        return max(self.unit_pcts, default=0.0)

    def _units(self, role: OutputRole) -> int | None:
        """How many units ``role``'s metric counts over the scored samples, or None for a continuous metric."""
        refs = [outs[role.index] for outs in self.reference]
        metric = role.metric
        if metric == "top1":
            return sum(len(r) for r in refs)
        if metric.startswith("top1_agreement") or (metric == "agreement" and class_axis(refs[0].shape) is not None):
            axis = agreement_axis(refs[0].shape, role.class_axis)
            return sum(r.size // max(1, r.shape[axis]) for r in refs)
        if metric == "ctc_accuracy":
            return sum(len(t) for t in self.truth)
        if metric == "ctc_agreement":
            return sum(len(seq) for r in refs for seq in ctc_read(r, self.table, role.layout))
        if metric == "sequence_agreement":
            return sum(r.shape[0] * r.shape[1] for r in refs)
        if metric.startswith("decision_agreement"):
            return sum(r.size for r in refs)
        if metric.startswith("multilabel_f1"):  # a flipped decision costs about 1 / (2 x the source's positives)
            threshold = role.threshold if role.threshold is not None else max(MAP_THRESHOLDS)
            return sum(2 * int(np.sum(r > threshold)) for r in refs)
        if metric == "detection_f1":  # one source box missed (or replaced by a wrong one) costs 100/boxes points
            return source_box_count(refs, role.layout or "v8", role.detection_confidences())
        return None

    @property
    def coarsest_unit(self) -> str:
        """What one unit of the coarsest output counts ("rows", "boxes the source detects"): what more data must add."""
        if not self.unit_pcts or max(self.unit_pcts) == 0.0:
            return "samples"
        metric = self.roles[self.unit_pcts.index(max(self.unit_pcts))].metric
        for prefix, unit in UNIT_NAMES:
            if metric.startswith(prefix):
                return unit
        return "samples"

    @property
    def worst_case(self) -> bool:
        """Whether an output's metric is the worst sample's (a map's worst page), not a sum over samples."""
        return any(role.metric.startswith("mask_f1") for role in self.roles)

    def first_feeds(self, count: int) -> list[dict[str, np.ndarray]]:
        """The first ``count`` samples (sensitivity and latency probes)."""
        return list(self.samples.feeds(min(count, self.count)))

    def _outputs(self, model: onnx.ModelProto, dither: list[ValueGrid] | None = None):
        """Per sample: every output of ``model``, in the source model's layout (its grid inputs dithered)."""
        session = make_session(model, opt_level=self.opt_level, threads=self.threads)
        names = [o.name for o in session.get_outputs()]

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            outputs = session.run(None, adapt_feed(model, feed))
            restored = [restore_output(model, names[i], np.asarray(v)) for i, v in enumerate(outputs)]
            return self.head.view(restored) if self.head else restored

        feeds = self.samples.feeds(self.limit)
        if dither:
            feeds = (dithered(feed, dither, index) for index, feed in enumerate(feeds))
        yield from ordered_map(run, feeds, self.workers)

    def _check_labels(self, first: np.ndarray) -> None:
        if first.ndim != 2:
            raise BadInputError(
                f"labels were given but the model's first output has shape {list(first.shape)}, not [N, classes]",
                "drop the labels array to measure agreement with the source model instead",
            )
        rows = sum(len(outs[0]) for outs in self.reference)
        if len(self.labels.reshape(-1)) != rows:
            raise BadInputError(
                f"{len(self.labels.reshape(-1))} labels for {rows} model outputs", "give one label per sample"
            )
        _check_class_indices(self.labels.reshape(-1), first.shape[1])

    def _check_text_labels(self, first: np.ndarray) -> None:
        if first.ndim != 3 or self.table is None:
            raise BadInputError(
                "text labels need a CTC model: a [N, T, classes] first output and the character table in "
                "the model's metadata 'character' (one per line, class 1 first)",
                "add the table to the model's metadata, or drop the labels to measure agreement with the source",
            )
        rows = sum(len(outs[0]) for outs in self.reference)
        flat = self.labels.reshape(-1)
        if len(flat) != rows:
            raise BadInputError(f"{len(flat)} text labels for {rows} recognised lines", "give one label per sample")
        self.truth = [list(str(t).strip()) for t in flat]

    def _texts(self, firsts: list[np.ndarray]) -> list[list[str]]:
        return [seq for out in firsts for seq in ctc_read(out, self.table, self.roles[0].layout)]

    def _top1_pct(self, firsts: list[np.ndarray]) -> float:
        correct = _correct_rows(np.concatenate(firsts), self.labels)
        return 100.0 * float(np.sum(correct)) / max(1, len(correct))

    def score(self, candidate: onnx.ModelProto, dither: list[ValueGrid] | None = None) -> AccuracyScore:
        tallies = [self._tally(role, span) for role, span in zip(self.roles, self.spans)]
        summaries = [_Tally(span, role.class_axis) for span, role in zip(self.spans, self.roles)]
        for k, (ref_outs, outs) in enumerate(zip(self.reference, self._outputs(candidate, dither))):
            if len(outs) != len(ref_outs):
                raise BadInputError(
                    f"the candidate has {len(outs)} outputs, the source {len(ref_outs)}",
                    "keep the model's outputs unchanged",
                )
            for role, tally, summary, variable, ref, got in zip(
                self.roles, tallies, summaries, self.variable_axes, ref_outs, outs
            ):
                aligned = _aligned(ref, got, variable)
                summary.add(*aligned)
                if isinstance(tally, _SequenceAgreement):
                    tally.add(ref, got)  # sequences of their own lengths
                elif role.positions:
                    tally.add(*aligned, keep=self.position_masks[k])
                else:
                    tally.add(*aligned)
        outputs = []
        for j, (role, tally) in enumerate(zip(self.roles, tallies)):
            result = tally.result()
            source = self.source_value if j == 0 else 100.0
            outputs.append(
                role.to_dict()
                | {
                    "source_value": round(source, 4),
                    "value": round(result.value, 4),
                    "drop_pct": round(source - result.value, 4),
                    "drop_se": round(result.drop_se, 4),
                    "resolution_pct": round(self.unit_pcts[j], 4),
                    **({"detail": result.extra} if result.extra else {}),
                }
            )
        worst = max(range(len(outputs)), key=lambda j: outputs[j]["drop_pct"])
        per_output = [
            t.summary(_class_like(role, ref.shape)) for t, role, ref in zip(summaries, self.roles, self.reference[0])
        ]
        agreement = {
            "cosine": min(p["cosine"] for p in per_output),
            "snr_db": min(p["snr_db"] for p in per_output),
            "max_abs": max(p["max_abs"] for p in per_output),
        }
        top1s = [p["top1_agreement"] for p in per_output if "top1_agreement" in p]
        if top1s:
            agreement["top1_agreement"] = min(top1s)
        head = outputs[worst]
        return AccuracyScore(
            head["metric"],
            head["source_value"],
            head["value"],
            head["drop_pct"],
            agreement,
            self.count,
            head["drop_se"],
            outputs,
            head["name"],
            round(self.resolution_pct, 4),
        )
