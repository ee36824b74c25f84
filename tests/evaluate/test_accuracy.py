"""accuracy.Evaluator: top-1 with labels, agreement without, on the trained digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS, needs_ocr
from onnx import numpy_helper

from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.accuracy import (
    Evaluator,
    compare_arrays,
    count_se,
    ctc_agreement_pct,
    ctc_greedy_decode,
    edit_distance,
    scoring_opt_level,
)
from lepton_cli.samples.sample_set import load_samples


@pytest.fixture(scope="module")
def digits():
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    return model, load_samples(DIGITS / "eval.npz", model, role="--eval")


def _perturbed(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(0)
    for init in noisy.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.size > 100:
            init.CopyFrom(
                numpy_helper.from_array(
                    (weights + rng.normal(0, scale * weights.std(), weights.shape)).astype(np.float32), init.name
                )
            )
    return noisy


def test_top1_with_labels_matches_a_direct_count(digits):
    model, samples = digits
    score = Evaluator(model, samples, samples.labels).score(model)
    assert score.metric == "top1" and score.samples == len(samples)
    # the example's README states 98.49% top-1 on eval.npz
    assert score.source_value == score.value == pytest.approx(98.4887, abs=1e-3)
    assert score.drop_pct == 0 and score.agreement["snr_db"] == 300.0


def test_perturbed_weights_lose_accuracy_and_agreement(digits):
    model, samples = digits
    noisy = _perturbed(model, 0.3)
    top1 = Evaluator(model, samples, samples.labels).score(noisy)
    agreement = Evaluator(model, samples).score(noisy)
    assert top1.drop_pct > 1 and agreement.metric == "top1_agreement" and agreement.drop_pct > 1
    assert agreement.value == pytest.approx(100 * agreement.agreement["top1_agreement"])
    assert 0 < agreement.agreement["cosine"] < 0.999 and agreement.agreement["max_abs"] > 0


def test_a_counted_drops_bound_carries_its_counts_error_where_a_unit_fits_the_budget(digits):
    """Agreement on the digits counts disagreeing images: a candidate that loses few has a per-image error near 0,
    but its bound holds at least the Poisson error of one image more (count_se); where one image is worth more than
    the budget, the bound is the drop and its own error (the scorer warns that it cannot resolve the budget)."""
    model, samples = digits
    evaluator = Evaluator(model, samples)
    unit = 100.0 / len(samples)
    same = evaluator.score(model)
    assert same.outputs[0]["resolution_pct"] == pytest.approx(unit, abs=1e-4) and same.drop_se == 0
    assert same.drop_bound(0.84, budget=1.0) == pytest.approx(0.84 * count_se(0.0, unit), rel=1e-3) and unit > 0
    assert same.drop_bound(0.84, budget=unit / 2) == 0.0  # one image is over the budget: the point estimate
    for scale in (0.05, 0.1, 0.2):  # drops of a few images, then more
        noisy = evaluator.score(_perturbed(model, scale))
        floor = count_se(noisy.drop_pct, unit)
        assert floor == pytest.approx(unit * np.sqrt(max(noisy.drop_pct, 0) / unit + 1), rel=1e-3)
        assert noisy.drop_bound(0.84, budget=1.0) == pytest.approx(
            noisy.drop_pct + 0.84 * max(noisy.drop_se, floor), rel=1e-3
        )


def test_nhwc_candidate_is_compared_in_the_source_layout(digits):
    """A candidate declaring NHWC input gets transposed feeds (pipeline.adapt_feed)."""
    model, samples = digits
    nhwc = onnx.ModelProto()
    nhwc.CopyFrom(model)
    name = nhwc.graph.input[0].name
    transposed = name + "_nchw"
    for node in nhwc.graph.node:
        node.input[:] = [transposed if i == name else i for i in node.input]
    nhwc.graph.node.insert(0, onnx.helper.make_node("Transpose", [name], [transposed], perm=[0, 3, 1, 2]))
    nhwc.graph.input[0].CopyFrom(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 8, 8, 1]))
    onnx.helper.set_model_props(nhwc, {"lepton.io_layout." + name: "NHWC"})
    score = Evaluator(model, samples, samples.labels).score(nhwc)
    assert score.drop_pct == 0 and score.agreement["max_abs"] < 1e-4


def _agreement(ref: np.ndarray, got: np.ndarray) -> float:
    from lepton_cli.evaluate.accuracy import _Tally

    tally = _Tally(float(np.ptp(ref)))
    tally.add(ref, got)
    return tally.agreement_pct


def test_continuous_outputs_use_a_range_tolerance():
    ref = np.linspace(0, 1, 1000, dtype=np.float32).reshape(1, 1, 10, 100)
    close = ref + 0.01
    far = ref + 0.05
    assert _agreement(ref, close) == 100.0 and _agreement(ref, far) == 0.0
    assert "top1_agreement" not in compare_arrays(ref, close)


def test_labels_on_a_non_classifier_output_is_a_clear_error():
    from lepton_cli.samples.sample_set import SampleSet

    samples = SampleSet(Path("ctc.npz"), {"x": np.zeros((4, 6, 5), np.float32)}, np.zeros(4, np.int64), {"x": False})
    with pytest.raises(BadInputError, match="not \\[N, classes\\]"):
        Evaluator(_ctc_model(False), samples, samples.labels)


def test_non_finite_outputs_never_agree(digits):
    ref = np.eye(4, dtype=np.float32)
    broken = ref.copy()
    broken[:2] = np.nan  # arg-max of a NaN row is 0, which would "agree" with row 0
    assert _agreement(ref, broken) == 50.0
    # top-1 with labels: a model whose logits are NaN scores 0, even where arg-max lands on the label
    model, samples = digits
    nan_model = onnx.ModelProto()
    nan_model.CopyFrom(model)
    out = nan_model.graph.output[0].name
    for node in nan_model.graph.node:
        node.output[:] = [out + "_raw" if o == out else o for o in node.output]
    nan_model.graph.node.append(onnx.helper.make_node("Mul", [out + "_raw", "nan_scale"], [out]))
    nan_model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_scale"))
    assert Evaluator(model, samples, samples.labels).score(nan_model).value == 0.0


def _ctc_scores(paths: list[list[int]], classes: int = 6) -> np.ndarray:
    """One-hot [N, T, C] scores whose per-step arg-max is ``paths``."""
    scores = np.zeros((len(paths), len(paths[0]), classes), dtype=np.float32)
    for n, path in enumerate(paths):
        scores[n, np.arange(len(path)), path] = 1.0
    return scores


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks():
    assert ctc_greedy_decode(_ctc_scores([[0, 3, 3, 0, 3, 5, 5, 0]])) == [[3, 3, 5]]
    assert (
        edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 4]) == 2 and edit_distance([1, 2], [2, 1]) == 2
    )


def test_ctc_agreement_is_character_accuracy_not_timestep_agreement():
    reference = _ctc_scores([[0, 1, 1, 0, 2, 0], [3, 0, 4, 4, 0, 0]])
    shifted = _ctc_scores([[1, 1, 0, 0, 2, 2], [3, 3, 4, 0, 0, 0]])  # same text, other alignment
    assert ctc_agreement_pct(reference, shifted) == 100.0
    assert compare_arrays(reference, shifted)["top1_agreement"] < 0.7
    wrong = _ctc_scores([[0, 1, 1, 0, 5, 0], [3, 0, 4, 4, 0, 0]])  # one of four characters substituted
    assert ctc_agreement_pct(reference, wrong) == pytest.approx(75.0)
    overflow = reference.copy()
    overflow[0, 1, 1] = np.inf
    assert ctc_agreement_pct(reference, overflow) < 100.0


def _ctc_model(character: bool, classes: int = 5) -> onnx.ModelProto:
    """x [N, T, C] → Softmax: the shape of a CTC recogniser's head."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Softmax", ["x"], ["probs"], axis=-1)],
        "ctc",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6, classes])],
        [h.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 6, classes])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    if character:
        h.set_model_props(model, {"character": "a\nb\nc\nd"})
    return model


def test_evaluator_picks_ctc_agreement_from_metadata_or_when_asked():
    from lepton_cli.samples.sample_set import SampleSet

    samples = SampleSet(
        Path("ctc.npz"), {"x": np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32)}, None, {"x": False}
    )
    assert Evaluator(_ctc_model(True), samples).metric == "ctc_agreement"
    assert (
        Evaluator(_ctc_model(False), samples).metric == "top1_agreement"
    )  # a Softmax without a CTC table: class scores
    assert Evaluator(_ctc_model(False), samples, metric="ctc").metric == "ctc_agreement"
    with pytest.raises(BadInputError, match="needs labels"):
        Evaluator(_ctc_model(False), samples, metric="top1")
    with pytest.raises(BadInputError, match="is not a metric"):
        Evaluator(_ctc_model(False), samples, metric="bleu")


def test_int8_is_scored_exactly_only_where_the_host_kernels_differ_from_the_target():
    vnni_target = ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert scoring_opt_level(vnni_target, ["avx2", "fma"]) == "basic"  # AVX2 host: VPMADDUBSW saturates
    assert scoring_opt_level(vnni_target, ["avx2", "avx_vnni"]) == "all"
    assert scoring_opt_level(["avx2", "fma"], ["avx2", "fma"]) == "all"  # target without VNNI: as deployed
    assert scoring_opt_level(["neon", "dotprod"], ["avx2"]) == "basic"  # Arm accumulates 8-bit products in int32
    assert scoring_opt_level(vnni_target, ["neon", "dotprod"]) == "all"  # not an x86 host: its kernels are not AVX2


def test_mask_f1_scores_the_thresholded_map_not_pixel_values():
    from lepton_cli.evaluate.output_scores import MaskF1Tally

    ref = np.zeros((1, 1, 10, 10), np.float32)
    ref[0, 0, 2:6, 2:6] = 0.9  # a 16-pixel "text" region
    shifted = ref * 0.5 + 0.2  # every value moved by 0.2-0.35, the mask at 0.3 unchanged
    tally = MaskF1Tally((0.3,))
    tally.add(ref, shifted)
    assert tally.result().value == 100.0
    grown = ref.copy()
    grown[0, 0, 6, 2:6] = 0.9  # 4 false positives
    lost = ref.copy()
    lost[0, 0, 2, 2:6] = 0.0  # 4 false negatives
    for got, want in ((grown, 2 * 16 / (2 * 16 + 4)), (lost, 2 * 12 / (2 * 12 + 4))):
        tally = MaskF1Tally((0.3,))
        tally.add(ref, got)
        assert tally.result().value == pytest.approx(100 * want)
    empty = MaskF1Tally((0.3,))
    empty.add(np.zeros_like(ref), np.zeros_like(ref))
    assert empty.result().value == 100.0


def test_mask_f1_is_the_worst_page_and_threshold_not_the_pooled_pixels():
    from lepton_cli.evaluate.output_scores import MaskF1Tally

    pages = np.zeros((4, 1, 20, 20), np.float32)
    pages[:, 0, 2:18, 2:18] = 0.9  # three large regions that stay intact ...
    small = pages.copy()
    pages[3, 0] = 0.0
    pages[3, 0, 5:7, 5:9] = 0.9  # ... and one page with a single small line
    small[3, 0] = 0.0  # which the candidate misses entirely
    tally = MaskF1Tally((0.3,))
    tally.add(pages[:2], small[:2])
    tally.add(pages[2:], small[2:])  # pages arrive in batches; each row is a page
    result = tally.result()
    assert result.value == 0.0  # the missed page, though 768 of 776 pixels agree
    assert result.extra["worst_page"] == 3 and result.extra["pages"] == 4
    assert result.extra["pooled_f1"] > 99
    dimmer = pages * 0.5  # 0.45: kept at 0.3, lost at 0.5
    both = MaskF1Tally((0.3, 0.5))
    both.add(pages, dimmer)
    assert both.result().value == 0.0
    only_03 = MaskF1Tally((0.3,))
    only_03.add(pages, dimmer)
    assert only_03.result().value == 100.0


def test_mask_f1_metric_on_a_map_model_and_bad_metric_names(tmp_path):
    from lepton_cli.evaluate.accuracy import parse_metric
    from lepton_cli.samples.sample_set import SampleSet

    def sigmoid_model(scale: float) -> onnx.ModelProto:
        node = [onnx.helper.make_node("Mul", ["x", "k"], ["z"]), onnx.helper.make_node("Sigmoid", ["z"], ["y"])]
        graph = onnx.helper.make_graph(
            node,
            "map",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
            [numpy_helper.from_array(np.array(scale, np.float32), "k")],
        )
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])

    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    samples = SampleSet(Path("maps.npz"), {"x": x}, None, {"x": False})
    source = sigmoid_model(1.0)
    sharper = sigmoid_model(3.0)  # same sign everywhere: the same mask at 0.5, other values
    score = Evaluator(source, samples, metric="mask-f1").score(sharper)
    assert score.metric == "mask_f1@0.5" and score.drop_pct == 0.0
    recognised = Evaluator(source, samples).score(sharper)  # a one-channel map in [0, 1]: both thresholds
    assert recognised.metric == "mask_f1@0.3/0.5" and recognised.drop_pct > 0  # differs at 0.3, as below
    assert (
        Evaluator(source, samples, metric="agreement").score(sharper).drop_pct > 10
    )  # value agreement sees the difference
    at_03 = Evaluator(source, samples, metric="mask-f1@0.3").score(sharper)
    assert at_03.metric == "mask_f1@0.3" and at_03.drop_pct > 0  # sigmoid(x)>0.3 and sigmoid(3x)>0.3 differ
    assert parse_metric("mask-f1@0.3") == ("mask-f1", 0.3) and parse_metric("ctc") == ("ctc", None)
    assert parse_metric("detection@0.1") == ("detection", 0.1) and parse_metric("detection") == ("detection", None)
    for bad in ("mask-f1@x", "ctc@0.3", "f1", "mask-f1@nan", "detection@1.5", "detection@0"):
        with pytest.raises(BadInputError):
            parse_metric(bad)


def test_compile_rejects_a_bad_eval_metric_with_exit_2(run_cli, tmp_path):
    result = run_cli(
        "compile",
        str(DIGITS / "digits_cnn.onnx"),
        "--target",
        "cpu-avx",
        "--eval-metric",
        "mask-f1@high",
        "--output",
        str(tmp_path / "out"),
    )
    assert result.code == 2 and "threshold" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_text_labels_score_character_accuracy_of_a_ctc_model(tmp_path):
    from lepton_cli.samples.sample_set import SampleSet

    # classes: 0 blank, 1..4 = a b c d, 5 = the space PaddleOCR appends
    source_paths = [[1, 1, 0, 2, 0, 0], [3, 0, 4, 5, 1, 0]]  # "ab", "cd a"
    x = np.log(_ctc_scores(source_paths) + 1e-6).astype(np.float32)  # the model is a Softmax: feed log-probs
    labels = np.array(["ab", "cd b"])  # the source misreads one character of the second line
    samples = SampleSet(Path("ctc.npz"), {"x": x}, labels, {"x": False})
    evaluator = Evaluator(_ctc_model(True, 6), samples, samples.labels)
    assert evaluator.metric == "ctc_accuracy"
    assert evaluator.source_value == pytest.approx(100 * (1 - 1 / 6))  # 1 edit over 6 label characters
    fixed = _ctc_model(True, 6)  # a "compiled" model that happens to read "b": better than the source, drop < 0
    bias = np.zeros((6, 6), np.float32)
    bias[4, 1], bias[4, 2] = -50.0, 50.0
    fixed.graph.node.insert(0, onnx.helper.make_node("Add", ["x", "bias"], ["x_biased"]))
    fixed.graph.node[1].input[0] = "x_biased"
    fixed.graph.initializer.append(numpy_helper.from_array(bias, "bias"))
    score = evaluator.score(fixed)
    assert score.value == 100.0 and score.drop_pct < 0
    assert score.drop_se == pytest.approx(
        100 * np.sqrt(2) * np.std([0, -1], ddof=1) / 6, abs=1e-4
    )  # per-line error changes
    assert evaluator.score(_ctc_model(True, 6)).drop_se == 0.0  # the source itself: no difference anywhere
    # text labels need a CTC model with a character table, and one label per line
    with pytest.raises(BadInputError, match="character table"):
        Evaluator(_ctc_model(False, 6), samples, samples.labels)
    with pytest.raises(BadInputError, match="3 text labels for 2"):
        Evaluator(_ctc_model(True, 6), samples, np.array(["ab", "cd", "x"]))
    with pytest.raises(BadInputError, match="class labels"):
        Evaluator(_ctc_model(True, 6), samples, samples.labels, metric="top1")
    assert Evaluator(_ctc_model(True, 6), samples, samples.labels, metric="agreement").metric == "agreement"


@needs_ocr
def test_ppocr_rec_text_labels_give_the_benchmark_character_accuracy(tmp_path):
    import sys

    sys.path.insert(0, str(DIGITS.parent.parent / "benchmarks"))
    import ocr_textset as textset
    from conftest import OCR_REC

    from lepton_cli.model.sessions import make_session
    from lepton_cli.model.shapes import bind_input_shapes

    model = bind_input_shapes(onnx.load(OCR_REC), {"x": [1, 3, 48, 320]})
    images, texts = textset.make_set(12, 3, "eval")
    np.savez(tmp_path / "eval.npz", x=images, labels=np.array(texts))
    samples = load_samples(tmp_path / "eval.npz", model, role="--eval")
    evaluator = Evaluator(model, samples, samples.labels)
    session = make_session(model)
    probs = np.concatenate([session.run(None, {"x": images[i : i + 1]})[0] for i in range(len(images))])
    assert evaluator.metric == "ctc_accuracy"
    assert evaluator.source_value == pytest.approx(
        textset.char_accuracy(textset.ctc_greedy(probs, textset.charset(model)), texts)
    )
    assert 90 < evaluator.source_value <= 100


def test_the_worst_pages_spread_is_how_far_the_worst_pages_lie_apart():
    from lepton_cli.evaluate.output_scores import MaskF1Tally

    def tally(page_f1s: list[float]) -> MaskF1Tally:
        t = MaskF1Tally((0.5,))
        t.pages = page_f1s
        return t

    one_bad = tally([0.99] * 7 + [0.80]).result()
    even = tally([0.99] * 7 + [0.98]).result()
    assert one_bad.value == pytest.approx(80.0) and even.value == pytest.approx(98.0)
    assert one_bad.drop_se > 5 * even.drop_se > 0  # one outlier page: the next set of pages may not hold it
    assert one_bad.drop_se == tally([0.99] * 7 + [0.80]).result().drop_se  # deterministic


def _with_bump(model: onnx.ModelProto, frame: int, cls: int) -> onnx.ModelProto:
    """``model`` whose CTC probabilities gain 2.0 at (``frame``, ``cls``) on every line: that class wins that frame."""
    bumped = onnx.ModelProto()
    bumped.CopyFrom(model)
    graph = bumped.graph
    out = graph.output[0]
    steps, classes = 40, out.type.tensor_type.shape.dim[2].dim_value or 6625
    bump = np.zeros((1, steps, classes), np.float32)
    bump[0, frame, cls] = 2.0
    graph.initializer.append(numpy_helper.from_array(bump, "bump"))
    for node in graph.node:
        node.output[:] = [f"{name}_raw" if name == out.name else name for name in node.output]
    graph.node.append(onnx.helper.make_node("Add", [f"{out.name}_raw", "bump"], [out.name]))
    return bumped


@needs_ocr
def test_ctc_agreement_reads_the_text_a_reader_gets_not_a_trailing_space_frame():
    """PP-OCRv4 rec on rendered lines: a space decoded in the last frame is stripped from the text PaddleOCR returns
    (no reader sees it), so it costs no agreement (5.1 points when class indices were compared); a character changed
    inside the line does."""
    import sys

    from conftest import OCR_REC, REPO

    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.samples.sample_set import SampleSet

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    source = bind_input_shapes(onnx.load(OCR_REC), {"x": [1, 3, 48, 320]})
    lines, _ = ocr_textset.make_set(8, 3, "eval")
    evaluator = Evaluator(source, SampleSet(Path("lines.npz"), {"x": lines}, None, {"x": False}))
    assert evaluator.metric == "ctc_agreement"
    space, letter = len(evaluator.table) - 1, evaluator.table.index("a")
    assert evaluator.score(_with_bump(source, 39, space)).drop_pct == 0.0
    assert evaluator.score(_with_bump(source, 20, letter)).drop_pct > 1.0
