"""captcha-recognizer's slider detector (the ``captcha-recognizer`` 1.0.2 wheel, ultralytics YOLO11s-seg): a head of
boxes, one class score and 32 mask coefficients per anchor beside 32 mask prototypes. The scorer decodes both as the
application does (detection F1 on the boxes, the instance masks as a mask), on rendered slider captchas whose gap it
must find, not relative error on two tensors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import REPO
from onnx import helper
from wheel_models import SLIDER, SLIDER_SIZE, slider_captchas, wheel_member

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.evaluate.output_roles import image_size
from lepton_cli.evaluate.segment_head import find_segment_head
from lepton_cli.model.sessions import make_session
from lepton_cli.samples.sample_set import SampleSet


@pytest.fixture(scope="module")
def slider() -> onnx.ModelProto:
    return onnx.load(wheel_member(*SLIDER))


@pytest.fixture(scope="module")
def captchas() -> tuple[np.ndarray, np.ndarray]:
    return slider_captchas(4, seed=3)


def _samples(images: np.ndarray) -> SampleSet:
    return SampleSet(REPO, {"images": images[:, None]}, None, {"images": True})


def test_the_decoded_masks_are_the_captchas_gaps(slider, captchas):
    images, gaps = captchas
    session = make_session(slider)
    outputs = [session.run(None, {"images": image[None]}) for image in images]
    head = find_segment_head(image_size(slider), outputs)
    assert head is not None and (head.head, head.prototypes, head.classes) == (0, 1, 1)
    for outs, gap in zip(outputs, gaps):
        viewed = head.view(outs)
        assert viewed[0].shape == (1, 5, 8400)  # boxes and the one class score: what detection F1 reads
        mask = viewed[1][0, 0] > 0.5
        cells = SLIDER_SIZE // mask.shape[0]  # the prototypes' resolution: 160 of the 640 pixels
        truth = gap.reshape(mask.shape[0], cells, mask.shape[1], cells).mean(axis=(1, 3)) > 0.5
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85  # the gap the captcha shows, to its blurred edge


def _scaled_output(model: onnx.ModelProto, index: int, factor: float) -> onnx.ModelProto:
    """``model`` with output ``index`` multiplied by ``factor`` (a Mul in front of the graph output)."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    name = edited.graph.output[index].name
    for node in edited.graph.node:
        node.output[:] = [f"{name}~raw" if o == name else o for o in node.output]
        node.input[:] = [f"{name}~raw" if i == name else i for i in node.input]
    edited.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), f"{name}~factor"))
    edited.graph.node.append(helper.make_node("Mul", [f"{name}~raw", f"{name}~factor"], [name]))
    return edited


def test_the_scorer_reads_boxes_and_masks_each_by_what_it_is(slider, captchas):
    evaluator = Evaluator(slider, _samples(captchas[0]))
    boxes, masks = evaluator.roles
    assert boxes.metric == "detection_f1" and "YOLO segmentation head" in boxes.why
    assert masks.metric == "mask_f1@0.5" and "instance masks" in masks.why
    assert evaluator.score(slider).drop_pct == 0.0
    # one gap per captcha: a lost box is a quarter of 4 captchas, and more data means more boxes
    assert evaluator.resolution_pct == 25.0 and evaluator.coarsest_unit == "boxes the source detects"
    # prototypes of the opposite sign: every mask flips inside its box, the boxes stay
    flipped = evaluator.score(_scaled_output(slider, 1, -1.0))
    by_name = {o["name"]: o for o in flipped.outputs}
    assert by_name["output0"]["drop_pct"] == 0.0 and by_name["output1"]["drop_pct"] > 50.0
    assert flipped.output == "output1"  # the worst output is the one the gate holds to the budget
