"""Accuracy of a compiled model against its source: a task metric with labels, output agreement always.

With labels the metric is top-1 accuracy of the first output (``[N, classes]``) or, for a CTC model
given text labels (a string array), *character accuracy* against them: 100 × (1 − edit distance of
the greedy CTC decode, mapped through the model's ``character`` table, / label length), what OCR
users report. Without labels it is *agreement* with the source model's outputs on the same samples,
as a percentage:
- CTC sequence outputs (``[N, T, C]`` of a model that declares CTC decoding, see ``is_ctc_model``, or
  with ``metric="ctc"``): character accuracy of the candidate's greedy CTC decode against the source's
  (100 × (1 − total edit distance / total source length)). Per-timestep arg-max is far stricter than
  what users read: on PP-OCRv4 rec, 2.4 points of timestep agreement cost 0.2 points of characters;
- other class-like outputs (``[N, C]``, ``[N, T, C]`` token sequences, ``[N, C, H, W]`` maps
  with C > 1): the share of positions whose arg-max class is unchanged;
- continuous outputs (e.g. a ``[N, 1, H, W]`` probability map): the share of elements within
  ``CONTINUOUS_TOLERANCE`` of the reference output's value range;
- with ``metric="mask-f1@T"`` (T defaults to 0.5): the F1 score of the candidate's first output
  thresholded at T (> T) against the source's, over all elements of all samples: what a detector's
  post-processing reads (PP-OCRv4 det / DBNet binarise their probability map at 0.3, so
  ``mask-f1@0.3``). Pixel-value agreement is much stricter than that: on PP-OCRv4 det int8, 1 point
  of agreement lost was 5 points of mask F1 in one model and 0.5 in another.
The drop is in percentage points (source value − compiled value), which is what
``--max-accuracy-drop`` and the targets' ``max_accuracy_drop_pct`` budget bound.

Both models run in ONNX Runtime with full graph optimisation, as deployed, so quantized QDQ graphs
are measured with the integer kernels ORT fuses them into, not as simulated float — except where this
host's integer kernels differ from the target's (``scoring_opt_level``): an x86 build host without
VNNI sums 8-bit products pairwise in int16 (VPMADDUBSW) and saturates, which VNNI, Arm (SDOT, SMLAL)
and integer accelerators, accumulating in int32, never do. There the
QDQ graph runs unfused (``basic``: weights' DequantizeLinear folded, activations quantized and
dequantized in float), which is the exact integer result up to fp32 rounding.
Libraries checked: ONNX Runtime's quantization tools compare tensors (``qdq_loss_debug``) but have
no model-level metric over a data set; nothing in onnx/onnxruntime does this.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from .data import SampleSet
from .errors import BadInputError
from .ort import make_session
from .pipeline import adapt_feed, restore_output

VNNI_ISA = ("avx512_vnni", "avx_vnni", "avxvnni", "amx_int8")  # u8·s8 dot products into int32: no saturation
X86_ISA = ("avx2", "avx512f", "sse4_2", "avx")
EXACT_INTEGER = "basic"  # ORT level that leaves QDQ pairs unfused
METRICS = ("auto", "top1", "agreement", "ctc", "mask-f1")  # --eval-metric choices; mask-f1 takes "@threshold"
MASK_F1_DEFAULT_THRESHOLD = 0.5
CTC_BLANK = 0  # the blank class: PaddleOCR's and PyTorch CTCLoss's default
CTC_METADATA_KEYS = ("lepton.decoding", "character")  # "lepton.decoding" = "ctc"; PaddleOCR rec models carry "character"
CONTINUOUS_TOLERANCE = 0.02  # of the reference output's range (max − min)
SNR_CAP_DB = 300.0  # identical outputs: infinite SNR, capped so the report stays valid JSON


@dataclass
class AccuracyScore:
    metric: str  # "top1" or "ctc_accuracy" (labels given), "agreement", "ctc_agreement" or "mask_f1@T"
    source_value: float  # percent
    value: float  # percent
    drop_pct: float  # percentage points; > 0 means the candidate is worse
    agreement: dict[str, float]  # cosine, snr_db, max_abs, top1_agreement (worst over outputs)
    samples: int
    drop_se: float = 0.0  # standard error of drop_pct over the samples (paired per-sample differences)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def drop_bound(self, z: float) -> float:
        """drop_pct + z standard errors: the one-sided upper confidence bound the tuning holds to the budget."""
        return self.drop_pct + z * self.drop_se


def _correct_rows(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row of ``[N, classes]``: arg-max equals the label and the row is finite."""
    return (np.argmax(logits, axis=1) == labels.reshape(-1)) & np.all(np.isfinite(logits), axis=1)


def drop_standard_error(losses: list[float], weights: float) -> float:
    """Standard error, in points, of ``100 * sum(losses) / weights`` for per-sample losses (candidate
    minus source, in the metric's units: errors, wrong rows, disagreeing positions)."""
    if len(losses) < 2 or weights <= 0:
        return 0.0
    return float(100.0 * math.sqrt(len(losses)) * np.std(losses, ddof=1) / weights)


def _class_axis(shape: tuple[int, ...]) -> int | None:
    """The axis that holds classes, or None for a continuous output."""
    if len(shape) in (2, 3) and shape[-1] > 1:
        return len(shape) - 1
    if len(shape) == 4 and shape[1] > 1:
        return 1
    return None


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine, SNR (dB), max abs error and arg-max agreement (class-like outputs) of one output."""
    span = float(np.ptp(reference)) if reference.size else 0.0
    tally = _Tally(span)
    tally.add(reference, candidate)
    return tally.summary(_class_axis(reference.shape) is not None)


def scoring_opt_level(target_isa: list[str], host_isa: list[str]) -> str:
    """ORT optimisation level to score candidates with: ``basic`` (exact integer arithmetic, see the module
    doc) when this host is an x86 CPU without VNNI and the target is not one; else ``all`` (as deployed)."""
    def saturates(isa: list[str]) -> bool:
        return any(i in X86_ISA for i in isa) and not any(i in VNNI_ISA for i in isa)
    return EXACT_INTEGER if saturates(host_isa) and not saturates(target_isa) else "all"


def parse_metric(text: str) -> tuple[str, float | None]:
    """``"mask-f1@0.3"`` -> ("mask-f1", 0.3); other metrics take no parameter. BadInputError (exit 2) otherwise."""
    name, _, arg = text.partition("@")
    fix = f"use one of: {', '.join(METRICS)} (mask-f1@THRESHOLD, e.g. mask-f1@0.3)"
    if name not in METRICS or (arg and name != "mask-f1"):
        raise BadInputError(f"--eval-metric {text!r} is not a metric", fix)
    if name != "mask-f1":
        return name, None
    try:
        threshold = float(arg) if arg else MASK_F1_DEFAULT_THRESHOLD
    except ValueError:
        raise BadInputError(f"--eval-metric {text!r}: the threshold {arg!r} is not a number", fix) from None
    if not math.isfinite(threshold):
        raise BadInputError(f"--eval-metric {text!r}: the threshold must be finite", fix)
    return name, threshold


def label_free(metric: str) -> str:
    """The metric to use on data without labels (held-out calibration samples) when ``metric`` was asked for."""
    return "auto" if metric == "top1" else metric


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
        raise BadInputError(f"CTC agreement needs a [N, T, classes] output, the model's first output has shape {list(reference.shape)}",
                            "use --eval-metric agreement for this model")
    return _ctc_pct(ctc_greedy_decode(reference), ctc_greedy_decode(candidate))


def _ctc_pct(truth: list, got: list) -> float:
    errors = sum(edit_distance(t, g) for t, g in zip(truth, got))
    length = sum(len(t) for t in truth)
    if length == 0:
        return 100.0 if errors == 0 else 0.0
    return 100.0 * max(0.0, 1.0 - errors / length)


class _Tally:
    """Sums over samples for one output, so a candidate is scored one sample at a time (memory: one sample)."""

    def __init__(self, span: float, mask_threshold: float | None = None):
        self.tol = CONTINUOUS_TOLERANCE * span if span > 0 else 1e-6
        self.dot = self.ref_sq = self.got_sq = self.noise = 0.0
        self.max_abs = 0.0
        self.agree = self.positions = 0
        self.mask_threshold = mask_threshold
        self.true_pos = self.false_pos = self.false_neg = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise BadInputError(f"the candidate's output has shape {list(candidate.shape)}, the source's {list(reference.shape)}",
                                "keep the model's output shapes unchanged")
        ref, got = reference.astype(np.float64), candidate.astype(np.float64)
        self.dot += float(np.sum(ref * got))
        self.ref_sq += float(np.sum(ref * ref))
        self.got_sq += float(np.sum(got * got))
        self.noise += float(np.sum((ref - got) ** 2))
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(ref - got))))
        if self.mask_threshold is not None:
            want, have = ref > self.mask_threshold, got > self.mask_threshold
            self.true_pos += int(np.sum(want & have))
            self.false_pos += int(np.sum(~want & have))
            self.false_neg += int(np.sum(want & ~have))
        axis = _class_axis(reference.shape)
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
        snr = SNR_CAP_DB if self.noise == 0 else (10 * math.log10(self.ref_sq / self.noise) if self.ref_sq else -SNR_CAP_DB)
        result = {"cosine": cosine, "snr_db": min(snr, SNR_CAP_DB), "max_abs": self.max_abs}
        if class_like:
            result["top1_agreement"] = self.agree / max(1, self.positions)
        return result

    @property
    def agreement_pct(self) -> float:
        return 100.0 * self.agree / max(1, self.positions)

    @property
    def mask_f1_pct(self) -> float:
        marked = 2 * self.true_pos + self.false_pos + self.false_neg
        return 100.0 if marked == 0 else 100.0 * 2 * self.true_pos / marked  # both masks empty: identical


class Evaluator:
    """Scores candidate models against the source on fixed samples; the source runs once.

    Samples are read again for every candidate (an image folder decodes one at a time) and
    candidates are scored sample by sample: memory holds the source's outputs, not the inputs
    (PP-OCRv4 det at 640x640 on 256 images: 1.3 GB of inputs never held at once).
    """

    def __init__(self, source_model: onnx.ModelProto, samples: SampleSet, labels: np.ndarray | None = None,
                 *, limit: int | None = None, threads: int = 1, metric: str = "auto", opt_level: str = "all") -> None:
        metric, self.mask_threshold = parse_metric(metric)
        self.samples, self.limit = samples, limit
        self.count = len(samples) if limit is None else min(limit, len(samples))
        if not self.count:
            raise BadInputError("the evaluation set is empty", "give at least one sample")
        self.threads = threads
        self.opt_level = opt_level
        self.labels = labels[: self.count] if labels is not None and limit is not None else labels  # per sample (or batch)
        self.reference = list(self._outputs(source_model))  # per sample, per output, source layout
        if metric == "top1" and self.labels is None:
            raise BadInputError("--eval-metric top1 needs labels, and the evaluation data has none",
                                "add a 'labels' array to the .npz, or use --eval-metric agreement")
        text_labels = self.labels is not None and self.labels.dtype.kind in ("U", "S")
        if metric == "top1" and text_labels:
            raise BadInputError("--eval-metric top1 needs class labels (integers); these labels are text",
                                "use --eval-metric auto or ctc for a text recogniser")
        if metric in ("agreement", "mask-f1") or (metric == "ctc" and not text_labels):
            self.labels = None  # an explicit agreement metric ignores labels
        first = self.reference[0][0]
        if self.labels is not None and text_labels:
            self.metric = "ctc_accuracy"
            self._check_text_labels(source_model, first)
        elif self.labels is not None:
            self.metric = "top1"
            self._check_labels(first)
        elif metric == "ctc" or (metric == "auto" and first.ndim == 3 and is_ctc_model(source_model)):
            self.metric = "ctc_agreement"
            ctc_agreement_pct(first, first)  # shape check up front
            self.ref_decoded = [seq for outs in self.reference for seq in ctc_greedy_decode(outs[0])]
        elif metric == "mask-f1":
            self.metric = f"mask_f1@{self.mask_threshold:g}"
        else:
            self.metric = "agreement"
        outputs = len(self.reference[0])
        self.spans = []
        for j in range(outputs):  # the continuous tolerance is a share of the reference's whole range
            lows = [float(np.min(outs[j])) for outs in self.reference if outs[j].size]
            highs = [float(np.max(outs[j])) for outs in self.reference if outs[j].size]
            self.spans.append(max(highs) - min(lows) if lows else 0.0)
        if self.metric == "ctc_accuracy":
            source_texts = self._texts([outs[0] for outs in self.reference])
            self.source_errors = [edit_distance(t, g) for t, g in zip(self.truth, source_texts)]
            self.source_value = _ctc_pct(self.truth, source_texts)
        elif self.labels is not None:
            firsts = [outs[0] for outs in self.reference]
            self.source_value = self._top1_pct(firsts)
            self.source_correct = _correct_rows(np.concatenate(firsts), self.labels)
        else:
            self.source_value = 100.0

    def first_feeds(self, count: int) -> list[dict[str, np.ndarray]]:
        """The first ``count`` samples (sensitivity and latency probes)."""
        return list(self.samples.feeds(min(count, self.count)))

    def _outputs(self, model: onnx.ModelProto):
        """Per sample: every output of ``model``, in the source model's layout."""
        session = make_session(model, opt_level=self.opt_level, threads=self.threads)
        names = [o.name for o in session.get_outputs()]
        for feed in self.samples.feeds(self.limit):
            yield [restore_output(model, names[i], np.asarray(v)) for i, v in enumerate(session.run(None, adapt_feed(model, feed)))]

    def _check_labels(self, first: np.ndarray) -> None:
        if first.ndim != 2:
            raise BadInputError(f"labels were given but the model's first output has shape {list(first.shape)}, not [N, classes]",
                                "drop the labels array to measure agreement with the source model instead")
        rows = sum(len(outs[0]) for outs in self.reference)
        if len(self.labels.reshape(-1)) != rows:
            raise BadInputError(f"{len(self.labels.reshape(-1))} labels for {rows} model outputs", "give one label per sample")

    def _check_text_labels(self, model: onnx.ModelProto, first: np.ndarray) -> None:
        self.characters = ctc_characters(model)
        if first.ndim != 3 or self.characters is None:
            raise BadInputError("text labels need a CTC model: a [N, T, classes] first output and the character table in "
                                "the model's metadata 'character' (one per line, class 1 first)",
                                "add the table to the model's metadata, or drop the labels to measure agreement with the source")
        rows = sum(len(outs[0]) for outs in self.reference)
        flat = self.labels.reshape(-1)
        if len(flat) != rows:
            raise BadInputError(f"{len(flat)} text labels for {rows} recognised lines", "give one label per sample")
        self.truth = [list(str(t).strip()) for t in flat]

    def _texts(self, firsts: list[np.ndarray]) -> list[list[str]]:
        return [list(text) for out in firsts for text in ctc_text(ctc_greedy_decode(out), self.characters)]

    def _top1_pct(self, firsts: list[np.ndarray]) -> float:
        correct = _correct_rows(np.concatenate(firsts), self.labels)
        return 100.0 * float(np.sum(correct)) / max(1, len(correct))

    def score(self, candidate: onnx.ModelProto) -> AccuracyScore:
        tallies = [_Tally(span, self.mask_threshold if j == 0 else None) for j, span in enumerate(self.spans)]
        firsts: list[np.ndarray] = []
        decoded: list[list[int]] = []
        losses: list[float] = []  # per sample, agreement / mask F1: what this sample lost
        for ref_outs, outs in zip(self.reference, self._outputs(candidate)):
            if len(outs) != len(ref_outs):
                raise BadInputError(f"the candidate has {len(outs)} outputs, the source {len(ref_outs)}",
                                    "keep the model's outputs unchanged")
            first = tallies[0]
            before = (first.agree, first.positions, first.true_pos, first.false_pos, first.false_neg)
            for tally, ref, got in zip(tallies, ref_outs, outs):
                tally.add(ref, got)
            if self.metric in ("top1", "ctc_accuracy"):
                firsts.append(outs[0])
            elif self.metric == "ctc_agreement":
                decoded.extend(ctc_greedy_decode(outs[0]))
            elif self.mask_threshold is not None:
                tp, fp, fn = (now - then for now, then in zip((first.true_pos, first.false_pos, first.false_neg), before[2:]))
                losses.append(0.0 if 2 * tp + fp + fn == 0 else 1.0 - 2 * tp / (2 * tp + fp + fn))
            else:
                losses.append(float((first.positions - before[1]) - (first.agree - before[0])))
        if self.metric == "top1":
            value = self._top1_pct(firsts)
            got = _correct_rows(np.concatenate(firsts), self.labels)
            se = drop_standard_error(list(self.source_correct.astype(float) - got.astype(float)), len(got))
        elif self.metric == "ctc_accuracy":
            texts = self._texts(firsts)
            value = _ctc_pct(self.truth, texts)
            errors = [edit_distance(t, g) - e for t, g, e in zip(self.truth, texts, self.source_errors)]
            se = drop_standard_error([float(e) for e in errors], sum(len(t) for t in self.truth))
        elif self.metric == "ctc_agreement":
            value = _ctc_pct(self.ref_decoded, decoded)
            se = drop_standard_error([float(edit_distance(t, g)) for t, g in zip(self.ref_decoded, decoded)],
                                     sum(len(t) for t in self.ref_decoded))
        elif self.mask_threshold is not None:
            value = tallies[0].mask_f1_pct
            se = drop_standard_error(losses, len(losses))
        else:
            value = tallies[0].agreement_pct
            se = drop_standard_error(losses, tallies[0].positions)
        per_output = [t.summary(_class_axis(ref.shape) is not None) for t, ref in zip(tallies, self.reference[0])]
        agreement = {
            "cosine": min(p["cosine"] for p in per_output),
            "snr_db": min(p["snr_db"] for p in per_output),
            "max_abs": max(p["max_abs"] for p in per_output),
        }
        top1s = [p["top1_agreement"] for p in per_output if "top1_agreement" in p]
        if top1s:
            agreement["top1_agreement"] = min(top1s)
        return AccuracyScore(self.metric, round(self.source_value, 4), round(value, 4),
                             round(self.source_value - value, 4), agreement, self.count, round(se, 4))
