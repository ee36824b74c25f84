"""Every output scored by what it is (lepton_cli.evaluate.output_roles / output_scores), on real models and data:
an input copy next to an embedding (MiniLM-like), CTC vs a `character` table that is not one, a YOLOX
head on rendered pages, a classifier whose confidence collapsed; the warnings the compile gives."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DDDDOCR_DET, DIGITS, OCR_REC, needs_ddddocr_det, needs_ocr, perturbed_weights
from onnx import helper, numpy_helper

from lepton_cli.errors import BadInputError
from lepton_cli.evaluate.accuracy import Evaluator, parse_metric_spec
from lepton_cli.evaluate.gate_warnings import accuracy_warnings
from lepton_cli.samples.sample_set import SampleSet, load_samples

sys.path.insert(0, str(DIGITS.parent.parent / "benchmarks"))
from bench_output_metrics import LAYOUT_CLASSES, minilm_like  # noqa: E402  (digits with a MiniLM export's output order)


def _digits() -> tuple[onnx.ModelProto, SampleSet]:
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    return model, load_samples(DIGITS / "eval.npz", model, role="--eval")


def test_an_input_copy_first_output_does_not_hide_a_degraded_embedding():
    model, samples = _digits()
    source = minilm_like(model)
    evaluator = Evaluator(source, samples)
    roles = {r.name: r for r in evaluator.roles}
    assert roles["image_copy"].metric == "relative_error" and "float copy of input 'image'" in roles["image_copy"].why
    assert roles["sentence_embedding"].metric == "cosine" and roles["logits"].metric == "top1_agreement"
    damaged = perturbed_weights(source, 0.5, ("fc1_W",))  # the embedding layer
    score = evaluator.score(damaged)
    by_name = {o["name"]: o for o in score.outputs}
    assert by_name["image_copy"]["drop_pct"] == 0.0  # what a first-output-only gate saw: "drop 0.00"
    assert by_name["sentence_embedding"]["drop_pct"] > 1.0
    assert score.drop_pct == max(o["drop_pct"] for o in score.outputs) > 1.0 and score.output != "image_copy"
    assert score.drop_bound(0.0) == pytest.approx(score.drop_pct)
    assert evaluator.score(source).drop_pct == 0.0


def test_eval_metric_names_outputs():
    model, samples = _digits()
    source = minilm_like(model)
    evaluator = Evaluator(source, samples, metric="sentence_embedding=relative-error,logits=cosine")
    assert [r.metric for r in evaluator.roles] == ["relative_error", "relative_error", "cosine"]
    assert all(r.why == "--eval-metric" for r in evaluator.roles[1:])
    assert parse_metric_spec("mask-f1@0.3,boxes=detection") == ("mask-f1@0.3", {"boxes": "detection"})
    with pytest.raises(BadInputError, match="not an output"):
        Evaluator(source, samples, metric="scores=cosine")
    with pytest.raises(BadInputError, match="two metrics"):
        parse_metric_spec("ctc,cosine")
    with pytest.raises(BadInputError, match="not a YOLO-style head"):
        Evaluator(source, samples, metric="logits=detection")


def test_a_classifier_whose_confidence_collapsed_is_warned_about():
    """top-1 unchanged, every probability flattened (logits x 0.15): 0.9x -> ~0.4, as the issue's classifier."""
    model, samples = _digits()
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    flat.graph.node[-1].output[0] = "logits_raw"
    flat.graph.node.append(helper.make_node("Mul", ["logits_raw", "temperature"], ["logits"]))
    flat.graph.initializer.append(numpy_helper.from_array(np.array(0.15, np.float32), "temperature"))
    score = Evaluator(model, samples, samples.labels).score(flat)
    assert score.drop_pct == 0.0  # top-1 against the labels is unchanged
    top = score.outputs[0]["detail"]["top_probability"]
    assert top[0] > 90 and top[1] < 60
    warnings = accuracy_warnings({"measured": True, "budget_pct": 1.0, **score.to_dict()})
    assert len(warnings) == 1 and "confidence collapsed" in warnings[0]
    assert not accuracy_warnings(
        {"measured": True, "budget_pct": 1.0, **Evaluator(model, samples).score(model).to_dict()}
    )


@needs_ocr
def test_ctc_needs_a_table_that_fits_the_classes_and_a_float_copy_is_not_scored_exactly(tmp_path):
    """PP-OCRv4 rec (6625 classes, a 6623-entry table) is CTC; the same graph with an 11-name `character`
    entry (a layout detector's class names) is not; with no table at all its blank-dominated Softmax steps
    say CTC; a float input copy before it is scored by relative error."""
    import ocr_textset as textset

    from lepton_cli.model.shapes import bind_input_shapes

    rec = bind_input_shapes(onnx.load(OCR_REC), {"x": [1, 3, 48, 160]})
    images, _ = textset.make_set(3, 5, "eval", width=160)
    samples = SampleSet(Path("lines.npz"), {"x": images}, None, {"x": False})
    with_copy = onnx.ModelProto()
    with_copy.CopyFrom(rec)
    with_copy.graph.node.append(helper.make_node("Identity", ["x"], ["x_copy"], name="copy"))
    with_copy.graph.output.insert(0, helper.make_tensor_value_info("x_copy", onnx.TensorProto.FLOAT, None))
    roles = Evaluator(with_copy, samples).roles
    assert [r.metric for r in roles] == ["relative_error", "ctc_agreement"]  # fp16 rounds a float copy too
    assert "6623 entries for 6625 classes" in roles[1].why
    layout = onnx.ModelProto()
    layout.CopyFrom(rec)
    for prop in layout.metadata_props:
        if prop.key == "character":
            prop.value = "\n".join(LAYOUT_CLASSES)
    (role,) = Evaluator(layout, samples).roles
    assert role.metric == "top1_agreement" and "Softmax" in role.why
    no_table = onnx.ModelProto()  # PP-OCRv5 rec ships its table as a separate file: the blank still shows
    no_table.CopyFrom(rec)
    del no_table.metadata_props[:]
    (role,) = Evaluator(no_table, samples).roles
    assert role.metric == "ctc_agreement" and "the CTC blank) wins" in role.why
    logits = onnx.ModelProto()  # batch first without its Softmax: steps of an embedding look alike, so not CTC
    logits.CopyFrom(no_table)
    (softmax,) = [node for node in logits.graph.node if node.output[0] == logits.graph.output[0].name]
    softmax.op_type = "Identity"
    del softmax.attribute[:]
    (role,) = Evaluator(logits, samples).roles
    assert role.metric != "ctc_agreement"


def _rendered_pages(seed: int, count: int, role: str) -> SampleSet:
    """``count`` rendered 416×416 pages (BGR 0..255, as ddddocr feeds its detector), calibration or held-out fonts."""
    import ocr_textset as textset

    fonts, words = (
        (textset.CALIB_FONTS, textset.CALIB_WORDS) if role == "calib" else (textset.EVAL_FONTS, textset.EVAL_WORDS)
    )
    rng = np.random.default_rng(seed)
    pages = [
        np.asarray(textset.render_page(rng, fonts, words, 416), np.float32).transpose(2, 0, 1) for _ in range(count)
    ]
    return SampleSet(Path("pages.npz"), {"images": np.stack(pages)}, None, {"images": False})


@needs_ddddocr_det
def test_a_yolox_head_is_scored_by_its_decoded_boxes():
    """ddddocr's character detector ([1, 3549, 6]: boxes on the YOLOX grids, objectness, one class) on rendered pages:
    fp16 keeps its boxes; halving the objectness drops boxes under the threshold, and detection F1 sees it."""
    from lepton_cli.passes._quantize import schemes

    model = onnx.load(DDDDOCR_DET)
    evaluator = Evaluator(model, _rendered_pages(seed=1, count=3, role="calib"))
    (role,) = evaluator.roles
    assert role.metric == "detection_f1" and role.layout == "yolox:416x416" and "YOLOX" in role.why
    half = schemes.to_fp16(model, list(schemes.FP16_BLOCK_DEFAULT), [])
    fp16 = evaluator.score(half)
    assert fp16.drop_pct < 2.0 and fp16.outputs[0]["detail"]["source_boxes"] > 50
    # one missed box is the smallest drop the gate can see: the resolution it compares with the budget
    assert evaluator.resolution_pct == pytest.approx(100.0 / fp16.outputs[0]["detail"]["source_boxes"])
    weaker = onnx.ModelProto()
    weaker.CopyFrom(model)
    out = weaker.graph.output[0].name
    weaker.graph.node[-1].output[0] = out + "_raw"
    scale = np.ones((1, 1, 6), np.float32)
    scale[..., 4] = 0.3  # objectness x 0.3: most detections fall under 0.25
    weaker.graph.node.append(helper.make_node("Mul", [out + "_raw", "objectness_scale"], [out]))
    weaker.graph.initializer.append(numpy_helper.from_array(scale, "objectness_scale"))
    damaged = evaluator.score(weaker)
    assert damaged.drop_pct > 20
    assert damaged.outputs[0]["detail"]["candidate_boxes"] < damaged.outputs[0]["detail"]["source_boxes"]


@needs_ddddocr_det
def test_a_named_detection_metric_decodes_yolox_and_scores_at_the_applications_confidence():
    """``--eval-metric detection@0.1`` (ddddocr's own score threshold): the head is decoded on its YOLOX grids as
    the automatic role does (not read as raw boxes), and boxes down to 0.1 count, so more of them than at 0.25."""
    from lepton_cli.evaluate.output_roles import DETECTION_CONFS
    from lepton_cli.evaluate.output_scores import source_box_count

    model = onnx.load(DDDDOCR_DET)
    samples = _rendered_pages(seed=5, count=2, role="eval")
    automatic, named = Evaluator(model, samples), Evaluator(model, samples, metric="detection@0.1")
    (auto_role,), (role,) = automatic.roles, named.roles
    assert role.metric == auto_role.metric == "detection_f1" and role.layout == auto_role.layout == "yolox:416x416"
    assert role.threshold == 0.1 and "confidence 0.1" in role.why and role.detection_confidences() == (0.1,)
    assert auto_role.detection_confidences() == DETECTION_CONFS and "0.1-0.5" in auto_role.why
    refs = [outs[0] for outs in named.reference]
    assert source_box_count(refs, role.layout, (0.1,)) > source_box_count(refs, role.layout, (0.25,))
    assert named.score(model).drop_pct == 0.0


@needs_ddddocr_det
def test_boxes_over_a_confidence_are_what_nms_at_that_confidence_keeps():
    """The range is scored from one NMS at its lowest confidence: on ddddocr's detector over rendered pages, the
    boxes over each higher confidence are exactly those NMS keeps when run at it."""
    from lepton_cli.evaluate import output_roles as roles

    model = onnx.load(DDDDOCR_DET)
    evaluator = Evaluator(model, _rendered_pages(seed=2, count=2, role="eval"))
    for outs in evaluator.reference:
        low = roles.detections(outs[0][0], "yolox:416x416", roles.DETECTION_CONFS[0])
        assert len(low[0]) > 10
        for conf in roles.DETECTION_CONFS[1:]:
            direct, derived = roles.detections(outs[0][0], "yolox:416x416", conf), roles.above(low, conf)
            assert all(np.array_equal(a, b) for a, b in zip(direct, derived))


def test_detection_f1_averages_over_the_confidence_range():
    """A box whose score falls from 0.32 to 0.22 is lost at the confidences 0.25 and 0.3 only: two of nine F1s read
    3 of 4 boxes (0.857), so the mean is 96.83, where one confidence reads 100 (0.15) or 85.7 (0.25)."""
    from lepton_cli.evaluate.output_roles import DETECTION_CONFS
    from lepton_cli.evaluate.output_scores import DetectionTally, source_box_count

    head = np.zeros((1, 5, 100), np.float32)  # cx, cy, w, h, one class score
    for k, (x, score) in enumerate([(50, 0.9), (150, 0.9), (250, 0.9), (350, 0.32)]):
        head[0, :, k] = (x, 50, 40, 40, score)
    weaker = head.copy()
    weaker[0, 4, 3] = 0.22
    readings = {}
    for confs in (DETECTION_CONFS, (0.15,), (0.25,)):
        tally = DetectionTally("v8", confs)
        tally.add(head, weaker)
        readings[confs] = tally.result().value
    assert readings[DETECTION_CONFS] == pytest.approx(100 * (7 + 2 * 6 / 7) / 9)
    assert readings[(0.15,)] == 100.0 and readings[(0.25,)] == pytest.approx(100 * 6 / 7)
    assert source_box_count([head], "v8", DETECTION_CONFS) == round((3 * 9 + 5) / 9)  # the 0.32 box up to 0.3


def test_detection_f1_matches_boxes_by_iou_and_class():
    """A v8-layout head ([1, 4+nc, anchors]): a box moved by half its width stops matching; a changed class too."""
    from lepton_cli.evaluate.output_scores import DetectionTally, source_box_count

    anchors = 100
    head = np.zeros((1, 6, anchors), np.float32)  # cx, cy, w, h, two class scores
    for k, (x, y, cls) in enumerate([(50, 50, 0), (150, 60, 1), (300, 200, 0)]):
        head[0, :4, k] = (x, y, 40, 40)
        head[0, 4 + cls, k] = 0.9
    tally = DetectionTally("v8", (0.25,))
    tally.add(head, head)
    assert tally.result().value == 100.0
    assert source_box_count([head], "v8", (0.25,)) == 3  # the gate's resolution unit for detection F1
    moved = head.copy()
    moved[0, 0, 0] += 20  # IoU 0.33
    relabelled = head.copy()
    relabelled[0, 4:6, 1] = relabelled[0, 4:6, 1][::-1]
    for candidate in (moved, relabelled):
        tally = DetectionTally("v8", (0.25,))
        tally.add(head, candidate)
        assert tally.result().value == pytest.approx(100 * 2 * 2 / 6)


# ---- through `compile`: the report states each output's metric; the warnings reach the report and stderr --------


def test_compile_scores_every_output_and_states_how_each_was_recognised(tmp_path):
    from lepton_cli.compile.compiler import CompileOptions, compile_model

    model, _ = _digits()
    onnx.save(minilm_like(model), tmp_path / "minilm_like.onnx")
    result = compile_model(
        CompileOptions(
            model=tmp_path / "minilm_like.onnx",
            target="cpu-avx",
            output_dir=tmp_path,
            calib=DIGITS / "calib.npz",
            bench=False,
        )
    )
    accuracy = result.report["accuracy"]
    outputs = {o["name"]: o for o in accuracy["outputs"]}
    assert [outputs[n]["metric"] for n in ("image_copy", "sentence_embedding", "logits")] == [
        "relative_error",
        "cosine",
        "top1_agreement",
    ]
    assert all(o["why"] and o["drop_pct"] <= accuracy["budget_pct"] for o in outputs.values())
    assert accuracy["drop_pct"] == max(o["drop_pct"] for o in outputs.values())
    assert accuracy["data"].startswith("all 200 of --calib")  # the data quantize chose on (50 held out: too coarse)
    step = next(s for s in result.steps if s.name == "quantize")
    assert step.summary["scored_on"] == accuracy["data"] and step.summary["drop_pct"] == pytest.approx(
        accuracy["drop_pct"], abs=1e-6
    )


def test_an_int8_variant_that_compressed_nothing_is_a_warning(run_cli, tmp_path):
    target = tmp_path / "pool-only.toml"
    target.write_text(
        'extends = "cpu-avx"\nname = "pool-only"\n[pass_params.quantize]\nop_types = ["MaxPool"]\n'
        'fast_op_types = ["MaxPool"]\n',
        encoding="utf-8",
    )
    result = run_cli(
        "compile",
        str(DIGITS / "digits_cnn.onnx"),
        "--target",
        str(target),
        "--calib",
        str(DIGITS / "calib.npz"),
        "--no-bench",
        "--output",
        str(tmp_path / "out"),
    )
    assert result.code == 0, result.stderr
    assert "holds no int8 weights: this variant compressed nothing" in result.stderr
    report = next((tmp_path / "out").glob("*.lepton/report.json"))
    import json

    assert any("compressed nothing" in w for w in json.loads(report.read_text())["warnings"])


def test_one_sigmoid_probability_per_sample_is_scored_by_its_decisions():
    """digits turned into a binary "is it a 7?" detector ([N, 1] Sigmoid, as a VAD's speech probability)."""
    model, samples = _digits()
    binary = onnx.ModelProto()
    binary.CopyFrom(model)
    binary.graph.node.extend(
        [
            helper.make_node("Slice", ["logits", "s", "e", "a"], ["seven"]),
            helper.make_node("Sigmoid", ["seven"], ["is_seven"]),
        ]
    )
    binary.graph.initializer.extend(
        [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s", 7), ("e", 8), ("a", 1))]
    )
    del binary.graph.output[:]
    binary.graph.output.append(helper.make_tensor_value_info("is_seven", onnx.TensorProto.FLOAT, ["N", 1]))
    evaluator = Evaluator(binary, samples)
    assert evaluator.metric == "decision_agreement@0.5"
    score = evaluator.score(perturbed_weights(binary, 0.5, ("fc2_W", "fc1_W")))
    assert 0 < score.drop_pct < 50 and evaluator.score(binary).drop_pct == 0.0


def _token_encoder(noise_where: str | None) -> onnx.ModelProto:
    """hidden = tanh(embeddings @ W), as a transformer's last_hidden_state [N, T, C] beside its attention_mask;
    ``noise_where`` ("padding" or "tokens") adds a large error at the positions where the mask is 0 or 1."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")]
    nodes = [
        helper.make_node("MatMul", ["embeddings", "w"], ["mixed"]),
        helper.make_node("Tanh", ["mixed"], ["hidden"]),
    ]
    output = "hidden"
    if noise_where is not None:
        inits.append(numpy_helper.from_array(np.array(5.0, np.float32), "big"))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["kept"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["kept", "last_axis"], ["kept3"]),
            helper.make_node("Mul", ["kept3", "big"], ["scaled"]),
        ]
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "last_axis"))
        if noise_where == "padding":  # 5 * (1 - mask)
            inits.append(numpy_helper.from_array(np.array(5.0, np.float32), "five"))
            nodes.append(helper.make_node("Sub", ["five", "scaled"], ["noise"]))
        else:
            nodes.append(helper.make_node("Identity", ["scaled"], ["noise"]))
        nodes.append(helper.make_node("Add", ["hidden", "noise"], ["noisy"]))
        output = "noisy"
    nodes.append(helper.make_node("Identity", [output], ["last_hidden_state"]))
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("embeddings", onnx.TensorProto.FLOAT, [1, 12, 16]),
            helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [1, 12]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", onnx.TensorProto.FLOAT, [1, 12, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_padded_token_positions_are_not_scored():
    """A hidden state at a padded position is never read (attention and pooling mask it): a candidate that is wrong
    only there keeps its score, one wrong at real tokens loses it, and the report says which positions count."""
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((8, 1, 12, 16)).astype(np.float32)
    lengths = [12, 9, 5, 7, 12, 3, 10, 6]
    mask = np.array([[[1] * n + [0] * (12 - n)] for n in lengths], np.int64)
    samples = SampleSet(
        Path("tokens.npz"),
        {"embeddings": embeddings, "attention_mask": mask},
        None,
        {"embeddings": True, "attention_mask": True},
    )
    evaluator = Evaluator(_token_encoder(None), samples)
    role = evaluator.roles[0]
    assert role.metric == "cosine" and role.positions == "attention_mask"
    assert "positions where attention_mask is 0 (padding) are not scored" in role.why
    assert evaluator.score(_token_encoder("padding")).drop_pct == 0.0
    assert evaluator.score(_token_encoder("tokens")).drop_pct > 10.0
    assert evaluator.subset(4).score(_token_encoder("padding")).drop_pct == 0.0


def _time_shifted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its [T, N, C] output moved one step later in time (the first step repeated): the same text."""
    shifted = onnx.ModelProto()
    shifted.CopyFrom(model)
    graph = shifted.graph
    out = graph.output[0].name
    graph.node[-1].output[0] = "unshifted"
    one = lambda name, v: numpy_helper.from_array(np.array([v], np.int64), name)  # noqa: E731
    graph.initializer.extend([one("zero", 0), one("first_end", 1), one("last_end", -1)])
    graph.node.extend(
        [
            helper.make_node("Slice", ["unshifted", "zero", "first_end", "zero"], ["first_step"]),
            helper.make_node("Slice", ["unshifted", "zero", "last_end", "zero"], ["all_but_last"]),
            helper.make_node("Concat", ["first_step", "all_but_last"], [out], axis=0),
        ]
    )
    return shifted


@needs_ddddocr_det
def test_a_time_major_crnn_is_scored_by_its_decoded_text(tmp_path):
    """ddddocr's common.onnx returns [T, 1, C] logits (PyTorch CTCLoss's layout). Scored per step, every blank/character
    boundary that moved counted (its fpga models failed at 1.3-2 points of steps); its decoded text is what a reader
    gets: a copy one step later in time reads the same text and loses nothing."""
    sys.path.insert(0, str(DIGITS.parent.parent / "benchmarks"))
    import ocr_textset

    from lepton_cli.model.shapes import bind_input_shapes

    rec = bind_input_shapes(onnx.load(DDDDOCR_DET.with_name("common.onnx")), {"input1": [1, 1, 64, 256]})
    rng = np.random.default_rng(3)
    words = [str(w)[:7] for w in rng.choice(ocr_textset.EVAL_WORDS, 12)]
    images = []
    for word in words:
        line = ocr_textset.render_line(word, ocr_textset.FONT_DIR / "DejaVuSans.ttf", rng).convert("L")
        width = min(224, max(8, round(line.size[0] * 64 / line.size[1])))  # blank steps after the text
        arr = np.asarray(line.resize((width, 64)), np.float32) / 255.0
        images.append(np.pad(arr, ((0, 0), (0, 256 - width)), mode="edge")[None])
    np.savez(tmp_path / "words.npz", input1=np.stack(images))
    evaluator = Evaluator(rec, load_samples(tmp_path / "words.npz", rec))
    (role,) = evaluator.roles
    assert role.metric == "ctc_agreement" and role.layout == "tnc" and "time first" in role.why
    characters = sum(len(w) for w in words)
    assert 0.8 * characters <= 100.0 / evaluator.resolution_pct <= 1.2 * characters  # characters, not steps
    shifted = _time_shifted(rec)
    steps = [evaluator.reference[i][0] for i in range(len(words))]
    moved = [np.argmax(np.concatenate([s[:1], s[:-1]]), -1) != np.argmax(s, -1) for s in steps]
    assert np.mean(np.concatenate(moved)) > 0.05  # per step, the shifted copy disagrees on many steps
    assert evaluator.score(shifted).drop_pct == 0.0
    named = Evaluator(rec, load_samples(tmp_path / "words.npz", rec), metric="387=ctc")  # --eval-metric 387=ctc
    assert named.roles[0].layout == "tnc" and named.score(shifted).drop_pct == 0.0
