"""Accuracy of a compiled model against its source: a task metric with labels, output agreement always.

With labels the metric is top-1 accuracy of the first output (``[N, classes]``). Without labels it
is *agreement* with the source model's outputs on the same samples, as a percentage:
- CTC sequence outputs (``[N, T, C]`` of a model that declares CTC decoding, see ``is_ctc_model``, or
  with ``metric="ctc"``): character accuracy of the candidate's greedy CTC decode against the source's
  (100 × (1 − total edit distance / total source length)). Per-timestep arg-max is far stricter than
  what users read: on PP-OCRv4 rec, 2.4 points of timestep agreement cost 0.2 points of characters;
- other class-like outputs (``[N, C]``, ``[N, T, C]`` token sequences, ``[N, C, H, W]`` maps
  with C > 1): the share of positions whose arg-max class is unchanged;
- continuous outputs (e.g. a ``[N, 1, H, W]`` probability map): the share of elements within
  ``CONTINUOUS_TOLERANCE`` of the reference output's value range.
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
METRICS = ("auto", "top1", "agreement", "ctc")  # --eval-metric choices
CTC_BLANK = 0  # the blank class: PaddleOCR's and PyTorch CTCLoss's default
CTC_METADATA_KEYS = ("lepton.decoding", "character")  # "lepton.decoding" = "ctc"; PaddleOCR rec models carry "character"
CONTINUOUS_TOLERANCE = 0.02  # of the reference output's range (max − min)
SNR_CAP_DB = 300.0  # identical outputs: infinite SNR, capped so the report stays valid JSON


@dataclass
class AccuracyScore:
    metric: str  # "top1" (labels given), "agreement" or "ctc_agreement"
    source_value: float  # percent
    value: float  # percent
    drop_pct: float  # percentage points; > 0 means the candidate is worse
    agreement: dict[str, float]  # cosine, snr_db, max_abs, top1_agreement (worst over outputs)
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _class_axis(shape: tuple[int, ...]) -> int | None:
    """The axis that holds classes, or None for a continuous output."""
    if len(shape) in (2, 3) and shape[-1] > 1:
        return len(shape) - 1
    if len(shape) == 4 and shape[1] > 1:
        return 1
    return None


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine, SNR (dB), max abs error and arg-max agreement of one output."""
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref ** 2))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
    cosine = float(np.dot(ref, got) / denom) if denom else (1.0 if noise == 0 else 0.0)
    snr = SNR_CAP_DB if noise == 0 else (10 * math.log10(signal / noise) if signal else -SNR_CAP_DB)
    result = {"cosine": cosine, "snr_db": min(snr, SNR_CAP_DB), "max_abs": float(np.max(np.abs(ref - got))) if ref.size else 0.0}
    axis = _class_axis(reference.shape)
    if axis is not None:
        result["top1_agreement"] = _agreement_pct(reference, candidate) / 100.0
    return result


def _agreement_pct(reference: np.ndarray, candidate: np.ndarray) -> float:
    axis = _class_axis(reference.shape)
    if axis is not None:
        # a non-finite score (fp16 overflow, say) never agrees, even where arg-max happens to match
        finite = np.all(np.isfinite(candidate), axis=axis)
        return 100.0 * float(np.mean((np.argmax(reference, axis=axis) == np.argmax(candidate, axis=axis)) & finite))
    ref = reference.astype(np.float64)
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    tol = CONTINUOUS_TOLERANCE * span if span > 0 else 1e-6
    return 100.0 * float(np.mean(np.abs(ref - candidate.astype(np.float64)) <= tol))


def scoring_opt_level(target_isa: list[str], host_isa: list[str]) -> str:
    """ORT optimisation level to score candidates with: ``basic`` (exact integer arithmetic, see the module
    doc) when this host is an x86 CPU without VNNI and the target is not one; else ``all`` (as deployed)."""
    def saturates(isa: list[str]) -> bool:
        return any(i in X86_ISA for i in isa) and not any(i in VNNI_ISA for i in isa)
    return EXACT_INTEGER if saturates(host_isa) and not saturates(target_isa) else "all"


def label_free(metric: str) -> str:
    """The metric to use on data without labels (held-out calibration samples) when ``metric`` was asked for."""
    return "auto" if metric == "top1" else metric


def is_ctc_model(model: onnx.ModelProto) -> bool:
    """Whether the model says its first output is decoded with CTC (metadata; see CTC_METADATA_KEYS)."""
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("lepton.decoding", "").lower() == "ctc" or "character" in props


def ctc_greedy_decode(scores: np.ndarray, blank: int = CTC_BLANK) -> list[list[int]]:
    """Best-path decode of ``[N, T, C]`` scores: arg-max per step, repeats collapsed, blanks dropped."""
    best = np.argmax(scores, axis=-1)
    finite = np.all(np.isfinite(scores), axis=-1)
    decoded = []
    for steps, ok in zip(best, finite):
        keep = np.ones(len(steps), dtype=bool)
        keep[1:] = steps[1:] != steps[:-1]
        # a non-finite step decodes to -1, which matches nothing: overflow never agrees
        decoded.append([int(c) if good else -1 for c, good, k in zip(steps, ok, keep) if k and (c != blank or not good)])
    return decoded


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
    truth, got = ctc_greedy_decode(reference), ctc_greedy_decode(candidate)
    errors = sum(edit_distance(t, g) for t, g in zip(truth, got))
    length = sum(len(t) for t in truth)
    if length == 0:
        return 100.0 if errors == 0 else 0.0
    return 100.0 * max(0.0, 1.0 - errors / length)


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], threads: int, opt_level: str = "all") -> list[np.ndarray]:
    """All outputs of ``model`` over ``feeds``, concatenated on axis 0, in the source model's layout."""
    session = make_session(model, opt_level=opt_level, threads=threads)
    names = [o.name for o in session.get_outputs()]
    per_output: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for index, value in enumerate(session.run(None, adapt_feed(model, feed))):
            per_output[index].append(restore_output(model, names[index], np.asarray(value)))
    return [np.concatenate(chunks, axis=0) if chunks and chunks[0].ndim else np.stack(chunks) for chunks in per_output]


def _top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    if outputs.ndim != 2:
        raise BadInputError(f"labels were given but the model's first output has shape {list(outputs.shape)}, not [N, classes]",
                            "drop the labels array to measure agreement with the source model instead")
    flat = labels.reshape(-1)
    if len(flat) != len(outputs):
        raise BadInputError(f"{len(flat)} labels for {len(outputs)} model outputs", "give one label per sample")
    return 100.0 * float(np.mean((np.argmax(outputs, axis=1) == flat) & np.all(np.isfinite(outputs), axis=1)))


class Evaluator:
    """Scores candidate models against the source on fixed samples; the source runs once."""

    def __init__(self, source_model: onnx.ModelProto, samples: SampleSet, labels: np.ndarray | None = None,
                 *, limit: int | None = None, threads: int = 1, metric: str = "auto", opt_level: str = "all") -> None:
        if metric not in METRICS:
            raise BadInputError(f"unknown evaluation metric {metric!r}", f"use one of: {', '.join(METRICS)}")
        self.feeds = list(samples.feeds(limit))
        if not self.feeds:
            raise BadInputError("the evaluation set is empty", "give at least one sample")
        self.threads = threads
        self.opt_level = opt_level
        self.labels = labels[: len(self.feeds)] if labels is not None and limit is not None and not any(samples.batched.values()) else labels
        self.reference = _run(source_model, self.feeds, threads, opt_level)
        if metric == "top1" and self.labels is None:
            raise BadInputError("--eval-metric top1 needs labels, and the evaluation data has none",
                                "add a 'labels' array to the .npz, or use --eval-metric agreement")
        if metric in ("agreement", "ctc"):
            self.labels = None  # an explicit agreement metric ignores labels
        if self.labels is not None:
            self.metric = "top1"
        elif metric == "ctc" or (metric == "auto" and self.reference[0].ndim == 3 and is_ctc_model(source_model)):
            self.metric = "ctc_agreement"
            ctc_agreement_pct(self.reference[0], self.reference[0])  # shape check up front
        else:
            self.metric = "agreement"
        self.source_value = _top1(self.reference[0], self.labels) if self.labels is not None else 100.0

    def score(self, candidate: onnx.ModelProto) -> AccuracyScore:
        outputs = _run(candidate, self.feeds, self.threads, self.opt_level)
        if len(outputs) != len(self.reference):
            raise BadInputError(f"the candidate has {len(outputs)} outputs, the source {len(self.reference)}",
                                "keep the model's outputs unchanged")
        if self.metric == "top1":
            value = _top1(outputs[0], self.labels)
        elif self.metric == "ctc_agreement":
            value = ctc_agreement_pct(self.reference[0], outputs[0])
        else:
            value = _agreement_pct(self.reference[0], outputs[0])
        per_output = [compare_arrays(ref, got) for ref, got in zip(self.reference, outputs)]
        agreement = {
            "cosine": min(p["cosine"] for p in per_output),
            "snr_db": min(p["snr_db"] for p in per_output),
            "max_abs": max(p["max_abs"] for p in per_output),
        }
        top1s = [p["top1_agreement"] for p in per_output if "top1_agreement" in p]
        if top1s:
            agreement["top1_agreement"] = min(top1s)
        return AccuracyScore(self.metric, round(self.source_value, 4), round(value, 4),
                             round(self.source_value - value, 4), agreement, len(self.feeds))
