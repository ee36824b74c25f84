"""The yardstick's int8-MAC count (benchmarks/bench_corpus.py) on a compiled model whose input layout_transform made
NHWC: the corpus's NCHW shape fills only the dims the model leaves open (it once overwrote edge-arm's NHWC input, and
PP-OCRv4 det's 84.4 % int8 MACs read 99.5 %: docs/decisions.md, session 27)."""

from __future__ import annotations

import onnx
from conftest import DDDDOCR_COMMON, DIGITS, needs_ddddocr_common

from benchmarks.bench_corpus import mac_counts
from benchmarks.corpus.manifest import by_name
from lepton_cli.model.load import load_model
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target


def test_an_nhwc_input_keeps_its_own_dims_and_the_mac_count_of_its_source():
    source = load_model(DIGITS / "digits_cnn.onnx").model
    shapes = by_name("digits").input_shapes
    target = load_target("edge-arm")
    params = next(s.params for s in target.passes if s.name == "layout_transform")
    copy = onnx.ModelProto()
    copy.CopyFrom(source)
    nhwc = get_pass("layout_transform").fn(copy, PassContext(target=target), params).model
    dims = [d.dim_value for d in nhwc.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [8, 8, 1]  # channels last: the corpus's [1, 1, 8, 8] no longer fits it as written
    _, source_total = mac_counts(source, shapes)
    _, nhwc_total = mac_counts(nhwc, shapes)
    assert source_total > 0 and nhwc_total == source_total


@needs_ddddocr_common
def test_an_lstm_counts_and_counts_as_int8_only_when_it_is():
    """ddddocr's recogniser (opset 12: ONNX inference cannot follow the shape arithmetic before its LSTM) read
    "100 % int8 MACs" with its LSTM float: the LSTM is now counted from one run, float until DynamicQuantizeLSTM."""
    from lepton_cli.passes._quantize.recurrent import dynamic_lstm

    source = onnx.load(DDDDOCR_COMMON)
    shapes = {"input1": [1, 1, 64, 256]}
    int8, total = mac_counts(source, shapes)
    lstm = 32 * 2 * 2048 * (512 + 512)  # 32 steps at width 256, both directions, W and R
    assert int8 == 0 and total == 910_589_952 and lstm == 134_217_728
    converted = onnx.ModelProto()
    converted.CopyFrom(source)
    assert dynamic_lstm(converted, set())
    assert mac_counts(converted, shapes) == (lstm, total)
