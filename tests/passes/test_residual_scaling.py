"""Residual scaling (quantize recovery, residual_scaling.py): a post-LN encoder's residual sums rescaled per
dimension, exact in float, flatter for one int8 scale per tensor. The real-model case (all-MiniLM-L6 on tpu) is
the slow test at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO
from corpus_runs import needs_corpus
from lepton_cli.passes._quantize import host_edges, residual_scaling, schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate
from lepton_cli.passes._quantize.recovery import RecoverySettings, recover
from onnx import TensorProto, helper, numpy_helper

from lepton_cli.errors import BadInputError
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.samples.sample_set import SampleSet

SEQ, HIDDEN, FFN = 16, 32, 64
OUTLIERS = (3, 17)  # hidden dimensions whose residual sums run far above the rest, as BERT's do
TPU_SCHEME = schemes.Int8Scheme(activation_type="s8", weight_type="s8", per_channel=True)


def _encoder(reader: str = "Gemm") -> onnx.ModelProto:
    """Two post-LN sublayers: ln1(x + attention-like projection), then ln2(ln1 + ffn(ln1)). ``reader``: what reads
    ln1's output besides the residual Add (a Gemm in an encoder)."""
    rng = np.random.default_rng(0)

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    gamma1, beta1 = np.ones(HIDDEN), np.zeros(HIDDEN)
    gamma1[list(OUTLIERS)], beta1[list(OUTLIERS)] = 12.0, 6.0
    w2 = rng.standard_normal((FFN, HIDDEN)) / np.sqrt(FFN)
    w2[:, list(OUTLIERS)] *= 30.0
    inits = [
        const("wo", rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)),
        const("bo", np.zeros(HIDDEN)),
        const("w1", rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)),
        const("b1", rng.standard_normal(FFN) * 0.1),
        const("w2", w2),
        const("b2", rng.standard_normal(HIDDEN) * 0.1),
        const("g1", gamma1),
        const("be1", beta1),
        const("g2", np.ones(HIDDEN)),
        const("be2", np.zeros(HIDDEN)),
    ]
    n = helper.make_node
    first = [n("Gemm", ["ln1", "w1", "b1"], ["h"], name="ffn1")]
    if reader != "Gemm":
        first = [n(reader, ["ln1"], ["t"], name="t"), n("Gemm", ["t", "w1", "b1"], ["h"], name="ffn1")]
    nodes = [
        n("Gemm", ["x", "wo", "bo"], ["attn"], name="o"),
        n("Add", ["attn", "x"], ["res1"], name="res1"),
        n("LayerNormalization", ["res1", "g1", "be1"], ["ln1"], name="ln1", axis=-1),
        *first,
        n("Relu", ["h"], ["act"], name="act"),
        n("Gemm", ["act", "w2", "b2"], ["ffn"], name="ffn2"),
        n("Add", ["ffn", "ln1"], ["res2"], name="res2"),
        n("LayerNormalization", ["res2", "g2", "be2"], ["y"], name="ln2", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQ, HIDDEN])],
        inits,
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((SEQ, HIDDEN)).astype(np.float32)} for _ in range(count)]


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.stack([session.run(None, feed)[0] for feed in feeds])


def test_the_ffn_residual_sum_is_a_site_and_the_rewrite_is_exact_in_float():
    model, feeds = _encoder(), _feeds(8, 1)
    sites = residual_scaling.find_sites(model)
    assert [(s.norm.name, s.previous.name, s.branch.name, [r.name for r in s.readers]) for s in sites] == [
        ("ln2", "ln1", "ffn2", ["ffn1"])
    ]
    scaled_model = onnx.ModelProto()
    scaled_model.CopyFrom(model)
    scaled = residual_scaling.scale_residuals(scaled_model, feeds, 0.7)
    assert scaled.sites == 1 and scaled.float_nodes == ["ln1", "res2", "ln2_unscale", "ln2"]
    before, after = _run(model, feeds), _run(scaled_model, feeds)
    np.testing.assert_allclose(after, before, atol=1e-4 * np.abs(before).max())
    res2 = residual_scaling.dimension_absmax(scaled_model, ["res2"], feeds)["res2"]
    assert res2.max() / np.median(res2) < 0.5 * residual_scaling.dimension_absmax(model, ["res2"], feeds)["res2"].max()


def test_a_layernorm_output_read_by_anything_but_weight_layers_is_left_alone():
    assert residual_scaling.find_sites(_encoder(reader="Tanh")) == []


def _int8_error(model: onnx.ModelProto, exclude: list[str], calib: list, held_out: list, tmp_path: Path) -> float:
    samples = SampleSet(Path("synthetic"), {"x": np.stack([f["x"] for f in calib])}, None, {"x": True})
    ranges = schemes.save_ranges(calibrate(model, samples, CalibrationSettings()), tmp_path / "ranges.json")
    int8 = schemes.quantize_int8(model, ranges, "minmax", TPU_SCHEME, exclude, tmp_path)
    reference, candidate = _run(model, held_out), _run(int8, held_out)
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


def test_per_tensor_int8_loses_less_on_the_scaled_residual(tmp_path):
    """One s8 scale per tensor (tpu): the outlier dimensions leave the others a few levels; scaled, they do not."""
    model, calib, held_out = _encoder(), _feeds(24, 2), _feeds(16, 3)
    recovered = recover(model, calib, TPU_SCHEME, RecoverySettings(residual_scaling_alpha=0.7, samples=24))
    assert recovered.summary["residual_sums_scaled"] == 1
    plain = _int8_error(model, [], calib, held_out, tmp_path / "plain")
    scaled = _int8_error(recovered.quantize_source, recovered.float_nodes, calib, held_out, tmp_path / "scaled")
    assert scaled < 0.5 * plain, (plain, scaled)


def test_the_residual_sum_reads_the_norm_in_float_and_is_reported_as_a_host_op(tmp_path):
    """The Add beside the host LayerNorm stays float: it reads ln1's float output (the host holds it; no int8 round
    trip on the residual path) and the report's float ops name it, as they name everything that runs on the host."""
    from lepton_cli.passes._quantize.int8_plan import float_ops

    model, calib = _encoder(), _feeds(8, 2)
    recovered = recover(model, calib, TPU_SCHEME, RecoverySettings(residual_scaling_alpha=0.7, samples=8))
    samples = SampleSet(Path("synthetic"), {"x": np.stack([f["x"] for f in calib])}, None, {"x": True})
    source = recovered.quantize_source
    ranges = schemes.save_ranges(calibrate(source, samples, CalibrationSettings()), tmp_path / "ranges.json")
    int8 = schemes.quantize_int8(source, ranges, "minmax", TPU_SCHEME, recovered.float_nodes, tmp_path)
    # ORT's quantizer gives the Add ln1's int8 copy here; quantize_int8 rewires it, and nothing is left to rewire
    assert host_edges.float_reads(int8, recovered.float_nodes) == 0
    residual = next(n for n in int8.graph.node if n.name == "res2")
    assert "ln1" in residual.input  # the norm's own output, not a DequantizeLinear of it
    host = {f["node"]: f["why"] for f in float_ops(int8, [])}
    assert {"res2", "ln2_unscale"} <= set(host) and "ffn1" not in host


def test_smoothquant_after_the_scaling_keeps_both_steps_float_nodes():
    """The SmoothQuant tier runs on the scaled source: its inserted Muls join the scaling's Mul and LayerNorm in the
    nodes left float (it used to replace them, so the LayerNorm's outlier input was quantized in that tier)."""
    model, feeds = _encoder(), _feeds(8, 1)
    settings = RecoverySettings(residual_scaling_alpha=0.7, smoothquant_alpha=0.8, smoothquant_insert=True, samples=8)
    recovered = recover(model, feeds, TPU_SCHEME, settings)
    assert {"ln1", "res2", "ln2_unscale", "ln2"} <= set(recovered.float_nodes)
    assert recovered.summary["smoothquant_inserted"] >= 1
    assert len(recovered.float_nodes) == 4 + recovered.summary["smoothquant_inserted"]


@pytest.mark.parametrize(
    "table, message",
    [
        ({"residual_scaling_alpha": 1.5}, "must be in (0, 1)"),
        ({"residual_scaling_alpha": 0.7, "power_of_two_scales": True}, "per-channel weight scales"),
    ],
)
def test_residual_scaling_alpha_is_validated(table, message):
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_table(get_pass("quantize").params_cls, table, "test.quantize")


@pytest.mark.slow
@needs_corpus("minilm_l6")
def test_minilm_on_tpu_loses_a_tenth_of_its_cosine_drop_with_the_residual_scaled(tmp_path):
    """all-MiniLM-L6 every op int8 on tpu (s8 per-tensor activations): the report's recovery gains show the residual
    scaling take the fully quantized drop from ~20 cosine points to under 3 on the gate's sentences."""
    sys.path.insert(0, str(REPO))
    from benchmarks.corpus.manifest import by_name
    from benchmarks.corpus.sweep import run_compile

    run = run_compile(by_name("minilm_l6"), "tpu", tmp_path / "out", timeout=1800, extra=["--max-accuracy-drop", "5"])
    assert run.code == 0, run.message
    report = json.loads(next((tmp_path / "out").glob("*.lepton/report.json")).read_text())
    summary = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    assert summary["recovery"]["residual_sums_scaled"] == 12
    rows = summary["recovery"]["gains"]["rows"]
    assert rows[0]["steps"] == [] and rows[0]["drop_pct"] > 10
    assert rows[1]["steps"] == ["residual_scaling"] and rows[1]["drop_pct"] < 3


@pytest.mark.parametrize("alpha", [0.7, None])
def test_tpu_writes_norms_for_its_chip_only_where_residual_scaling_does_not_rescale_them(alpha, tmp_path):
    """tpu's layer_norm_as_l2 leaves a post-LN encoder's norms to residual scaling, which undoes its per-dimension
    scales in front of each (MiniLM: 21.9 -> 1.44 cosine points, session 21); without it both norms are rewritten."""
    from lepton_cli.passes._quantize.int8_plan import Int8Plan

    from lepton_cli.pipeline.targets import load_target

    step = next(s for s in load_target("tpu").passes if s.name == "quantize")
    params = from_table(get_pass("quantize").params_cls, vars(step.params) | {"residual_scaling_alpha": alpha}, "q")
    calib = SampleSet(tmp_path / "c.npz", {"x": np.stack([f["x"] for f in _feeds(4, 2)])}, None, {"x": True})
    summary: dict = {}
    model = _encoder()
    written = Int8Plan(params, ["int8_only"], ["avx2"])._chip_norms(model, calib, summary)
    norms = [n.name for n in written.graph.node if n.op_type == "LayerNormalization"]
    if alpha is None:
        assert norms == [] and summary["layer_norms_as_l2"] == {"rewritten": 2, "kept": {}}
        np.testing.assert_allclose(_run(written, _feeds(3, 5)), _run(model, _feeds(3, 5)), atol=1e-3)
    else:
        assert written is model and norms == ["ln1", "ln2"] and summary["layer_norms_as_l2"]["rewritten"] == 0
        assert sorted(summary["layer_norms_as_l2"]["kept"]) == ["ln1", "ln2"]
