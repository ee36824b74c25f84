"""LSTM layers as ONNX Runtime's DynamicQuantizeLSTM (passes/_quantize/recurrent.py), on ddddocr's captcha recogniser
(21 convs, a bidirectional LSTM of 512 units, CTC over 8,210 characters) and rendered words."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from conftest import DDDDOCR_COMMON, REPO, needs_ddddocr_common
from lepton_cli.passes._quantize.float_keep import keep_float
from lepton_cli.passes._quantize.plan import int8_weights
from lepton_cli.passes._quantize.recurrent import DYNAMIC_LSTM, dynamic_lstm
from lepton_cli.passes._quantize.sensitivity import quantized_nodes

from lepton_cli.evaluate.accuracy import VNNI_ISA
from lepton_cli.evaluate.costmodel import int8_mac
from lepton_cli.host.detect import detect_host
from lepton_cli.model.load import upgrade_opset
from lepton_cli.model.sessions import make_session
from lepton_cli.model.stats import node_macs, shape_map

pytestmark = needs_ddddocr_common
WIDTH = 128


def _words(count: int, seed: int, fonts: list[str]) -> np.ndarray:
    """Rendered words as ddddocr reads them: grayscale, height 64, edge-padded to WIDTH, [0, 1]."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        word = str(rng.choice(ocr_textset.EVAL_WORDS))[:6]
        line = ocr_textset.render_line(word, ocr_textset.FONT_DIR / str(rng.choice(fonts)), rng).convert("L")
        w = min(WIDTH, max(8, round(line.size[0] * 64 / line.size[1])))
        arr = np.asarray(line.resize((w, 64), Image.BILINEAR), np.float32) / 255.0
        images.append(np.pad(arr, ((0, 0), (0, WIDTH - w)), mode="edge")[None])
    return np.stack(images).astype(np.float32)


@pytest.fixture(scope="module")
def source() -> onnx.ModelProto:
    model, _ = upgrade_opset(onnx.load(DDDDOCR_COMMON), 17, 21)  # its shape arithmetic infers from opset 14
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = WIDTH
    return model


@pytest.fixture(scope="module")
def converted(source) -> tuple[onnx.ModelProto, list[str]]:
    model = onnx.ModelProto()
    model.CopyFrom(source)
    # this host's kernels saturate u8·s8 sums without VNNI (a VNNI target's do not): 7-bit weights there, as such a
    # target gets them
    return model, dynamic_lstm(model, set(), reduce_range=not any(i in VNNI_ISA for i in detect_host().isa))


def _steps(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = make_session(model.SerializeToString())
    name = session.get_inputs()[0].name
    return np.stack([session.run(None, {name: image[None]})[0].argmax(-1).ravel() for image in images])


def test_lstm_becomes_int8_and_reads_the_words_as_the_float_one(source, converted):
    model, names = converted
    assert len(names) == 1 and [n.op_type for n in model.graph.node if n.name == names[0]] == [DYNAMIC_LSTM]
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == DYNAMIC_LSTM)
    assert inits[node.input[1]].data_type == onnx.TensorProto.INT8 and list(inits[node.input[1]].dims) == [2, 512, 2048]
    assert not any(t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [2, 2048, 512] for t in inits.values())
    assert int8_weights(model) == 2  # W and R; their [2, 2048] zero points are not weights
    words = _words(12, 3, ["DejaVuSans.ttf", "DejaVuSerif-Bold.ttf"])
    reference, candidate = _steps(source, words), _steps(model, words)
    # per CTC step, the character the int8 LSTM picks is the float one's on nearly every step of every word
    assert (reference == candidate).mean() >= 0.99
    assert (reference != 0).any(), "the words must read as characters, not all blanks"


def test_lstm_macs_count_the_same_in_both_forms_and_as_int8(source, converted):
    model, _ = converted
    sizes = [shape_map(m, data_prop=True) for m in (source, model)]
    lstm = [
        (node_macs(n, shapes), n)
        for m, shapes in zip((source, model), sizes)
        for n in m.graph.node
        if n.op_type in ("LSTM", DYNAMIC_LSTM)
    ]
    steps = WIDTH // 8
    assert [macs for macs, _ in lstm] == [steps * 2 * 2048 * (512 + 512)] * 2
    assert [int8_mac(n, {}) for _, n in lstm] == [False, True]


def test_the_cost_model_prices_the_int8_lstm_below_the_float_one(source, converted):
    """The search ranks candidates by this price: a float LSTM costs its MACs at the fp32 rate, the int8 one at VNNI's."""
    from lepton_cli.evaluate.costmodel import infer as infer_shapes
    from lepton_cli.evaluate.costmodel import node_costs
    from lepton_cli.pipeline.targets import load_target

    hardware = load_target("cpu-avx").hardware
    costs = [
        next(c for c in node_costs(infer_shapes(m), hardware)[0] if "LSTM" in c.op) for m in (source, converted[0])
    ]
    assert [c.dtype for c in costs] == ["fp32", "int8"] and costs[0].macs == costs[1].macs > 0
    assert costs[1].seconds < costs[0].seconds / 2


def test_the_search_can_keep_the_lstm_float_again(source, converted):
    model, names = converted
    assert names[0] in quantized_nodes(model)  # a candidate of the sensitivity ranking like any int8 layer
    restored = keep_float(model, source, names[0])
    assert [n.op_type for n in restored.graph.node if n.name == names[0]] == ["LSTM"]
    words = _words(4, 5, ["DejaVuSans.ttf"])
    sessions = [make_session(m.SerializeToString()) for m in (source, restored)]
    for image in words:
        a, b = (s.run(None, {"input1": image[None]})[0] for s in sessions)
        np.testing.assert_array_equal(a, b)


def test_a_float_lstm_left_unchosen_is_warned(source, converted):
    """edge-arm (standard ONNX) ships ddddocr's convs int8 and its LSTM float: the user is told, once."""
    from lepton_cli.passes._quantize.recurrent import float_recurrent_warning

    message = float_recurrent_warning(source, dynamic=False, kept=[])
    assert message and message.startswith("1 recurrent layer(s) (LSTM) stay float") and "standard ONNX" in message
    assert float_recurrent_warning(converted[0], dynamic=True, kept=[]) is None
    name = next(n.name for n in source.graph.node if n.op_type == "LSTM")
    assert float_recurrent_warning(source, dynamic=True, kept=[name]) is None  # the search chose float: no warning


def test_batch_first_and_excluded_lstms_stay_float(source):
    model = onnx.ModelProto()
    model.CopyFrom(source)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    kept = [a for a in node.attribute if a.name != "layout"]  # the opset upgrade wrote layout = 0
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute("layout", 1)])
    assert dynamic_lstm(model, set()) == []  # the contrib op runs sequence-first only
    node.attribute.pop()
    assert dynamic_lstm(model, {node.name}) == []  # a node the search or the user keeps float


@pytest.mark.slow
def test_cpu_avx_compile_ships_the_int8_lstm(run_cli, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input1=_words(32, 1, ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]))
    result = run_cli(
        "compile", DDDDOCR_COMMON, "--target", "cpu-avx", "--input-shape", f"input1=1,1,64,{WIDTH}",
        "--calib", calib, "-o", tmp_path, "--no-bench", "--quiet", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "common.cpu-avx.lepton" / "report.json").read_text())
    quantize = next(s for s in report["pipeline"] if s["name"] == "quantize")["summary"]
    assert quantize["dynamic_lstm"] == ["LSTM_79"]
    assert "LSTM_79" not in quantize.get("float_kept", [])


def test_power_of_two_scales_refuse_it():
    """The contrib op's weight scales are absmax / 127 per gate row, never powers of two (a DPU's shifts)."""
    from lepton_cli.errors import BadInputError
    from lepton_cli.pipeline.params import from_table
    from lepton_cli.pipeline.registry import get_pass

    params_cls = get_pass("quantize").params_cls
    assert from_table(params_cls, {"dynamic_lstm": True}, "passes[quantize]").dynamic_lstm
    with pytest.raises(BadInputError, match="dynamic_lstm"):
        from_table(params_cls, {"dynamic_lstm": True, "power_of_two_scales": True}, "passes[quantize]")
