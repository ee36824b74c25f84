"""Several Sigmoid probabilities per sample are read as decisions, not as one class (output_scores.MultiLabelTally),
on Spotify's basic-pitch (the ``basic-pitch`` wheel's nmp.onnx: note, onset and contour posteriorgrams, [1, 172, 88]
and [1, 172, 264], each value its own Sigmoid) with harmonic tones, the sounds it transcribes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import perturbed_weights
from wheel_models import BASIC_PITCH, tones, wheel_member

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.evaluate.output_scores import Top1Tally
from lepton_cli.model.sessions import make_session
from lepton_cli.model.shapes import bind_input_shapes
from lepton_cli.samples.sample_set import load_samples

INPUT = "serving_default_input_2:0"


@pytest.fixture(scope="module")
def basic_pitch() -> onnx.ModelProto:
    return bind_input_shapes(onnx.load(wheel_member(*BASIC_PITCH)), {INPUT: [1, 43844, 1]})


def _noisy_last_convs(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """The source with noise on the weights of the convs that feed its Sigmoids (a model that adds and drops notes)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return perturbed_weights(
        model, scale, tuple({producer[n.input[0]].input[1] for n in model.graph.node if n.op_type == "Sigmoid"})
    )


def test_posteriorgrams_are_scored_by_the_f1_of_their_decisions(basic_pitch, tmp_path):
    np.savez(tmp_path / "tones.npz", **{INPUT: tones(6, 3)})  # [6, 1, 43844, 1]: one batch of one per entry
    evaluator = Evaluator(basic_pitch, load_samples(tmp_path / "tones.npz", basic_pitch, role="--eval"))
    assert {r.metric for r in evaluator.roles} == {"multilabel_f1@0.3/0.5"}, evaluator.roles
    assert all("from a Sigmoid" in r.why for r in evaluator.roles)
    assert evaluator.score(basic_pitch).drop_pct == 0.0
    noisy = _noisy_last_convs(basic_pitch, 0.3)
    score = evaluator.score(noisy)
    detail = {o["name"]: o["detail"] for o in score.outputs}
    assert score.drop_pct > 5, detail  # positives added and dropped
    # read as one class per frame the same model looked unchanged: silent frames' values all tie near 0
    top1 = Top1Tally()
    for window in tones(6, 3):
        feed = {INPUT: window}
        top1.add(make_session(basic_pitch).run(None, feed)[0], make_session(noisy).run(None, feed)[0])
    assert 100 - top1.result().value < score.drop_pct / 2
