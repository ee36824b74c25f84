"""tpu's LayerNorms as the Edge TPU's ops (passes/_quantize/chip_norms.py), on PP-OCRv4 rec and rendered text lines."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
import pytest
from conftest import OCR_REC, REPO, needs_ocr
from det_int8 import fused_model
from lepton_cli.passes._quantize.chip_norms import L2_STEP, norms_as_l2
from onnx import numpy_helper

from lepton_cli.host.detect import HostInfo
from lepton_cli.model.sessions import make_session
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target
from lepton_cli.samples.sample_set import load_samples

pytestmark = needs_ocr


@pytest.fixture(scope="module")
def rec_and_lines():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    model = fused_model(OCR_REC, {"x": [1, 3, 48, 320]}, "tpu")
    calib = ocr_textset.make_set(8, 5, "calib")[0]
    held = ocr_textset.make_set(6, 7, "eval")
    return model, calib, held, ocr_textset


def test_ppocr_rec_norms_become_ops_the_chip_lists_and_read_the_same_text(rec_and_lines):
    model, calib, (held, _), textset = rec_and_lines
    written, norms = norms_as_l2(model, [{"x": line[None]} for line in calib])
    assert len(norms.rewritten) == 5 and not norms.kept
    ops = {n.op_type for n in written.graph.node}
    assert "LayerNormalization" not in ops and {"ReduceMean", "LpNormalization"} <= ops
    assert ops <= set(load_target("tpu").runtime.supported_ops) | {"Shape", "Gather"}
    source, rewritten = make_session(model), make_session(written)
    chars = textset.charset(model)
    for line in held:
        want = source.run(None, {"x": line[None]})[0]
        got = rewritten.run(None, {"x": line[None]})[0]
        np.testing.assert_allclose(got, want, atol=1e-3)  # only eps differs (every row's variance >= 100 eps)
        assert textset.ctc_greedy(got, chars) == textset.ctc_greedy(want, chars)


def test_a_norm_whose_rows_are_too_flat_for_its_eps_stays_a_layer_norm(rec_and_lines):
    model, calib, _, _ = rec_and_lines
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    first = next(n for n in flat.graph.node if n.op_type == "LayerNormalization")
    next(a for a in first.attribute if a.name == "epsilon").f = 0.01  # rows' variances here are 0.16 and up
    written, norms = norms_as_l2(flat, [{"x": line[None]} for line in calib])
    assert list(norms.kept) == [first.name] and "eps" in norms.kept[first.name] and len(norms.rewritten) == 4
    assert [n.name for n in written.graph.node if n.op_type == "LayerNormalization"] == [first.name]


def test_tpu_quantizes_the_written_norms_on_the_chips_grids(rec_and_lines, tmp_path):
    model, calib, _, _ = rec_and_lines
    np.savez(tmp_path / "calib.npz", x=calib)
    target = load_target("tpu")
    step = next(s for s in target.passes if s.name == "quantize")
    quantize = get_pass("quantize")
    table = vars(step.params) | {"tune": False, "methods": ["percentile"], "recovery_tier": []}
    params = from_table(quantize.params_cls, table, "tpu.quantize")
    host = dataclasses.replace(HostInfo.unknown(), arch="x86_64", isa=("avx2", "fma"))
    ctx = PassContext(target=target, calib=load_samples(tmp_path / "calib.npz", model), host=host)
    result = quantize.fn(model, ctx, params)
    assert result.summary["layer_norms_as_l2"]["rewritten"] == 5
    graph = result.model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    l2 = [n for n in graph.node if n.op_type == "LpNormalization"]
    assert len(l2) == 5 and not any(n.op_type == "LayerNormalization" for n in graph.node)
    for node in l2 + [n for n in graph.node if n.op_type == "ReduceMean"]:
        assert producer[node.input[0]].op_type == "DequantizeLinear"  # int8 in, int8 out: no float op on the host
        (q,) = readers[node.output[0]]
        assert q.op_type == "QuantizeLinear"
        if node.op_type == "LpNormalization":  # TFLite's L2_NORMALIZATION grid: 1/128, zero point 0 (int8)
            assert float(inits[q.input[1]]) == L2_STEP and int(inits[q.input[2]]) == 0
