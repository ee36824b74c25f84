"""Query/key balancing in front of attention scores (quantize recovery, attention_balance.py), on PP-OCRv4 rec's
SVTR neck (a fused QKV projection) with rendered text lines: exact in float, narrower ranges for int8."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import OCR_REC, REPO, needs_ocr
from lepton_cli.passes._quantize import attention_balance, schemes
from lepton_cli.passes._quantize.recovery import RecoverySettings, recover
from lepton_cli.passes._quantize.residual_scaling import dimension_absmax
from lepton_cli.passes._quantize.weight_layers import load
from onnx import helper

from lepton_cli.errors import BadInputError
from lepton_cli.model.initializers import constants_to_initializers
from lepton_cli.model.shapes import bind_input_shapes
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.registry import get_pass

pytestmark = needs_ocr
sys.path.insert(0, str(REPO / "benchmarks"))  # ocr_textset: rendered text lines
TPU_SCHEME = schemes.Int8Scheme(activation_type="s8", weight_type="s8", per_channel=True)


def _lines(count: int, seed: int, role: str) -> list[dict[str, np.ndarray]]:
    import ocr_textset as textset

    images, _ = textset.make_set(count, seed, role, width=160)
    return [{"x": image[None]} for image in images]


@pytest.fixture(scope="module")
def rec() -> onnx.ModelProto:
    model = bind_input_shapes(onnx.load(OCR_REC), {"x": [1, 3, 48, 160]})
    constants_to_initializers(model)  # as fuse hands it on: weights the balancing can rewrite
    return model


def _qkv_peaks(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per fused QKV projection output, each column's largest magnitude over ``feeds``."""
    names = [query.node.output[0] for _, query, _ in attention_balance.find_sites(model)]
    adds = [next(n.output[0] for n in model.graph.node if n.op_type == "Add" and name in n.input) for name in names]
    return dimension_absmax(model, adds, feeds)


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def test_svtr_attention_is_balanced_exactly_and_its_fused_range_narrows(rec):
    calib, held_out = _lines(8, 1, "calib"), _lines(6, 2, "eval")
    sites = attention_balance.find_sites(rec)
    assert len(sites) == 2 and all(query.name == key.name for _, query, key in sites)  # one fused QKV per block
    before = _qkv_peaks(rec, calib)
    balanced, count = attention_balance.balanced(rec, calib)
    assert count == 2
    after = _qkv_peaks(balanced, calib)
    for name, peak in before.items():
        width = peak.shape[0] // 3  # columns: queries, keys, values
        query, key = after[name][:width], after[name][width : 2 * width]
        np.testing.assert_allclose(query, key, rtol=1e-3)  # each pair meets at its geometric mean
        np.testing.assert_allclose(query, np.sqrt(peak[:width] * peak[width : 2 * width]), rtol=1e-3)
        assert after[name].max() < 0.9 * peak.max(), (name, peak.max(), after[name].max())
    source, changed = _run(rec, held_out), _run(balanced, held_out)  # lines the factors were not measured on
    np.testing.assert_allclose(changed, source, atol=1e-4 * np.abs(source).max())
    assert (changed.argmax(-1) == source.argmax(-1)).all()


def test_a_score_operand_read_elsewhere_is_left_alone(rec):
    """The query tensor also leaves the graph: scaling it would change an output, so the exactness check refuses."""
    leaky = onnx.ModelProto()
    leaky.CopyFrom(rec)
    score = attention_balance.find_sites(leaky)[0][0]
    leaky.graph.output.append(helper.make_tensor_value_info(score.input[0], onnx.TensorProto.FLOAT, None))
    weights = {init.name: load(leaky, init.name) for init in leaky.graph.initializer if "w" in init.name.lower()}
    result, count = attention_balance.balanced(leaky, _lines(4, 1, "calib"))
    assert count == 1  # the other block is still balanced
    changed = [name for name, value in weights.items() if not np.array_equal(load(result, name), value)]
    assert len(changed) == 1


def test_the_recovery_step_balances_the_reference_the_search_quantizes(rec):
    """As a recovery step: the float reference itself is balanced (float-kept layers read it), and the summary
    says how many sites changed, for the report's gains table."""
    settings = RecoverySettings(attention_balance=True)
    assert settings.steps == ["attention_balance"] and settings.any_step
    recovered = recover(rec, _lines(4, 1, "calib"), TPU_SCHEME, settings)
    assert recovered.summary["attention_sites_balanced"] == 2
    assert recovered.reference is recovered.quantize_source  # no per-layer step: one model
    held_out = _lines(3, 2, "eval")
    np.testing.assert_allclose(_run(recovered.reference, held_out), _run(rec, held_out), atol=1e-4)
    before, after = _qkv_peaks(rec, held_out), _qkv_peaks(recovered.reference, held_out)
    assert all(after[name].max() < before[name].max() for name in before)


def test_per_tensor_weights_cannot_take_the_factors():
    with pytest.raises(BadInputError, match="attention_balance"):
        from_table(get_pass("quantize").params_cls, {"attention_balance": True, "per_channel": False}, "t.quantize")
