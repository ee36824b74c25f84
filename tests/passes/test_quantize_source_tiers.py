"""Which rewritten sources the quantize search offers as tiers of their own (passes/_quantize/source_tiers.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS
from corpus_runs import compile_for, held_out_char_drop, held_out_top1_flips, int8_macs_pct, needs_corpus
from lepton_cli.passes._quantize.recovery import Recovered, RecoverySettings
from lepton_cli.passes._quantize.source_tiers import (
    FAST_RECOVERY,
    RECOVERY,
    SMOOTHQUANT,
    source_tiers,
    tier_changed,
    tier_summary,
)
from lepton_cli.passes.quantize import QuantizeParams


def test_recovery_tier_adds_only_the_steps_the_plain_tiers_lack():
    params = QuantizeParams(recovery_tier=["adaround", "bias_correction"], bias_correction=True)
    plain = RecoverySettings(bias_correction=True)
    (tier,) = source_tiers(params, plain, matmul_layers=lambda: False)
    assert tier.transform == RECOVERY and tier.added == ("adaround",)
    assert tier.settings.adaround and tier.settings.bias_correction and not tier.settings.equalize
    assert tier.settings.steps == ["adaround", "bias_correction"]


def test_no_recovery_tier_when_every_tier_has_its_steps_already():
    params = QuantizeParams(recovery_tier=["adaround"], adaround=True)
    assert source_tiers(params, RecoverySettings(adaround=True), matmul_layers=lambda: True) == []


def test_smoothquant_tier_needs_matmul_weights_and_comes_first():
    params = QuantizeParams(smoothquant_tier_alpha=0.8, recovery_tier=["adaround"])
    assert [t.transform for t in source_tiers(params, RecoverySettings(), matmul_layers=lambda: False)] == [RECOVERY]
    tiers = source_tiers(params, RecoverySettings(), matmul_layers=lambda: True)
    assert [t.transform for t in tiers] == [SMOOTHQUANT, RECOVERY]
    assert tiers[0].settings.smoothquant_alpha == 0.8 and tiers[0].settings.smoothquant_insert
    assert not tiers[0].settings.adaround  # each tier carries only its own steps on top of the plain ones


def test_the_fast_recovery_tier_comes_first_and_quantizes_the_first_tiers_op_types():
    params = QuantizeParams(
        smoothquant_tier_alpha=0.8, recovery_tier=["adaround"], fast_recovery_tier=["adaround", "quantized_adaround"]
    )
    tiers = source_tiers(params, RecoverySettings(), matmul_layers=lambda: True)
    assert [t.transform for t in tiers] == [FAST_RECOVERY, SMOOTHQUANT, RECOVERY]
    assert tiers[0].first_ops and not any(t.first_ops for t in tiers[1:])
    assert tiers[0].added == ("adaround", "quantized_adaround") and tiers[0].settings.int8_steps == (
        "quantized_adaround",
    )
    assert tiers[0].summary_key == "fast_recovery_tier"


def test_the_report_says_what_the_recovery_tier_changed():
    params = QuantizeParams(recovery_tier=["adaround", "bias_correction"])
    (tier,) = source_tiers(params, RecoverySettings(), matmul_layers=lambda: False)
    model_stub = None
    recovered = Recovered(model_stub, model_stub, {"adaround_layers": 31, "bias_corrected_layers": 33})  # type: ignore[arg-type]
    summary = {tier.summary_key: tier_summary(tier, recovered)}
    assert summary["recovery_tier"]["steps"] == ["adaround", "bias_correction"]
    assert tier_changed(tier, summary) == "adaround: 31 layers, bias_correction: 33 layers (searched as a tier)"


def _digits_space(tmp_path, tiers: dict) -> tuple:
    """(search space, summary) of digits (trained CNN) on cpu-avx, minmax, with the source tiers ``tiers`` names."""
    import dataclasses

    from lepton_cli.passes._quantize import schemes
    from lepton_cli.passes.quantize import make_plan

    from lepton_cli.host.detect import HostInfo
    from lepton_cli.pipeline.context import PassContext
    from lepton_cli.pipeline.params import from_table
    from lepton_cli.pipeline.registry import get_pass
    from lepton_cli.pipeline.targets import load_target
    from lepton_cli.samples.sample_set import load_samples

    model = onnx.load(DIGITS / "digits_cnn.onnx")
    schemes.name_nodes(model)
    target = load_target("cpu-avx")
    step = next(s for s in target.passes if s.name == "quantize")
    table = vars(step.params) | {"methods": ["minmax"], "recovery_tier": [], "fast_recovery_tier": []} | tiers
    params = from_table(get_pass("quantize").params_cls, table, "cpu-avx.quantize")
    host = dataclasses.replace(HostInfo.unknown(), arch="x86_64", isa=("avx512_vnni", "avx2"))
    ctx = PassContext(target=target, calib=load_samples(DIGITS / "calib.npz", model), host=host, work_dir=tmp_path)
    summary: dict = {}
    return make_plan(params, ctx).space(model, ctx, ctx.calib, summary), summary


def _held_out_error(space, model: onnx.ModelProto) -> float:
    """Mean absolute output error against the float model on 128 held-out digits."""
    from lepton_cli.model.sessions import make_session

    images = np.load(DIGITS / "eval.npz")["image"][:128]
    name = space.float_model.graph.input[0].name
    got = make_session(model).run(None, {name: images})[0]
    return float(np.abs(got - make_session(space.float_model).run(None, {name: images})[0]).mean())


def _int32_biases(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT32}


def test_the_recovery_tier_quantizes_the_corrected_source_and_keeps_float_nodes_on_the_reference(tmp_path):
    """digits (trained CNN, its own calibration and held-out images) on cpu-avx with a bias-correction tier: the
    tier's fully quantized model carries corrected int32 biases and is closer to the float model on held-out digits
    than the plain last tier's; a node it keeps float reads the source's float weights and bias, not corrected ones."""
    from onnx import numpy_helper

    space, summary = _digits_space(tmp_path, {"recovery_tier": ["bias_correction"]})
    assert space.transforms == ["", "", SMOOTHQUANT, RECOVERY]  # digits' Gemm gets the SmoothQuant tier offered too
    assert space.tiers[-1] == space.tiers[1]  # the recovery tier quantizes the last plain tier's op types
    assert not space.full_only
    plain, corrected = space.builds[1]("minmax", []), space.builds[-1]("minmax", [])
    assert summary["recovery_tier"]["steps"] == ["bias_correction"]
    assert any(not np.array_equal(a, _int32_biases(corrected)[n]) for n, a in _int32_biases(plain).items())
    assert _held_out_error(space, corrected) < _held_out_error(space, plain)
    conv = next(n for n in space.float_model.graph.node if n.op_type == "Conv")
    kept = space.builds[-1]("minmax", [conv.name])
    source = {t.name: numpy_helper.to_array(t) for t in space.float_model.graph.initializer}
    kept_conv = next(n for n in kept.graph.node if n.name == conv.name)
    initializers = {t.name: numpy_helper.to_array(t) for t in kept.graph.initializer}
    for tensor in conv.input[1:]:
        assert np.array_equal(initializers[kept_conv.input[list(conv.input).index(tensor)]], source[tensor])


def test_the_fast_recovery_tier_quantizes_every_op_of_the_corrected_source_fully_quantized_only(tmp_path):
    """digits on cpu-avx with a fast bias-correction tier: it quantizes the first plain tier's op types (every op),
    is offered fully quantized only, carries corrected biases and is closer to the float model on held-out digits
    than the plain every-op tier."""
    space, summary = _digits_space(tmp_path, {"fast_recovery_tier": ["bias_correction"]})
    assert space.transforms == ["", "", FAST_RECOVERY, SMOOTHQUANT]
    assert space.tiers[2] == space.tiers[0] != space.tiers[1] and space.full_only == {2}
    plain, corrected = space.builds[0]("minmax", []), space.builds[2]("minmax", [])
    assert summary["fast_recovery_tier"]["steps"] == ["bias_correction"]
    assert any(not np.array_equal(a, _int32_biases(corrected)[n]) for n, a in _int32_biases(plain).items())
    assert _held_out_error(space, corrected) < _held_out_error(space, plain)


@pytest.mark.slow
@needs_corpus("ppocrv4_rec")
def test_default_cpu_avx_fits_ppocrv4_rec_fully_quantized_without_the_recovery_tier(tmp_path):
    """PP-OCRv4 rec (rendered lines), scored on all 64 calibration lines (16 held out read a 1-point drop only to
    ±0.7): the plain every-op tier fits fully quantized, so the recovery tier, at the same price, is never searched
    (on the 16 alone the plain tiers read over the budget and the recovery tier was chosen); held out, every MAC int8
    and the character accuracy within the budget."""
    model, summary, saved = compile_for("ppocrv4_rec", "cpu-avx", tmp_path)
    assert summary["scored_on"].startswith("all 64 of --calib")
    assert summary.get("transform", "") == "" and summary["float_kept"] == []
    assert not [t for t in summary["tried"] if t.get("transform") == RECOVERY and t["scored"]]
    assert int8_macs_pct(model, saved) >= 99.0
    assert held_out_char_drop(model, saved) <= 1.0


@pytest.mark.slow
@needs_corpus("table_cls")
def test_default_cpu_avx_ships_table_cls_every_op_int8_through_the_fast_recovery_tier(tmp_path):
    """table-cls (MobileNetV3, rendered ruled and unruled tables): the plain search keeps its 14 leading nodes float
    (77 % int8 MACs); the fast recovery tier's fully quantized model fits, and on the 512 held-out tables no answer
    changes (session 33: 0 flips; plain every op int8 flips 5)."""
    model, summary, saved = compile_for("table_cls", "cpu-avx", tmp_path)
    assert summary.get("transform") == FAST_RECOVERY and summary["float_kept"] == []
    assert not [t for t in summary["tried"] if t.get("transform") == FAST_RECOVERY and t["float_kept"]]
    assert summary["fast_recovery_tier"]["changed"]["quantized_adaround"].endswith("layers")
    assert int8_macs_pct(model, saved) >= 99.0
    flips, total = held_out_top1_flips(model, saved)
    assert total == 512 and flips <= 2
