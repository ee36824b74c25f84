"""Where a refused int8 model loses its accuracy (loss_attribution.py): each quantized op type kept float on its
own, scored. Fast case: the digits CNN's tpu build on its own images; slow case: all-MiniLM-L6's exit 3 on tpu."""

from __future__ import annotations

import re

import onnx
import pytest
from conftest import DIGITS
from corpus_runs import needs_corpus
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.int8_plan import Int8Plan
from lepton_cli.passes._quantize.loss_attribution import MIN_SHARE, SHOWN, LossByOpType, OpTypeLoss, loss_by_op_type
from lepton_cli.passes._quantize.sensitivity import quantized_nodes
from lepton_cli.passes._quantize.tuning import ranking_build

from lepton_cli.evaluate.accuracy import Evaluator, scoring_opt_level
from lepton_cli.host.detect import detect_host
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.params import from_table
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target
from lepton_cli.samples.sample_set import load_samples


def _tpu_build():
    """The tpu int8 plan's every-op build of the digits CNN, calibrated on its calibration images."""
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    calib = load_samples(DIGITS / "calib.npz", model)
    target = load_target("tpu")
    step = next(s for s in target.passes if s.name == "quantize")
    params = from_table(get_pass("quantize").params_cls, dict(vars(step.params)), "tpu.quantize")
    schemes.name_nodes(model)
    plan = Int8Plan(params, list(target.hardware.isa), ["avx512_vnni"])
    space = plan.space(model, PassContext(target=target, calib=calib), calib, {})
    return model, space.builds[-1]


def _quantized_op_types(build) -> dict[str, int]:
    quantized = ranking_build(build)("minmax", [])
    kinds = {n.name: n.op_type for n in quantized.graph.node}
    counts: dict[str, int] = {}
    for name in quantized_nodes(quantized):
        counts[kinds[name]] = counts.get(kinds[name], 0) + 1
    return counts


def test_each_op_type_kept_float_is_scored_and_the_helpful_ones_are_named():
    model, build = _tpu_build()
    evaluation = load_samples(DIGITS / "eval.npz", model, role="--eval")
    # a continuous reading of the loss, in the arithmetic the compiler scores tpu with on this host (exact integer
    # where the host's x86 int8 kernels saturate: on AVX2 the fused kernels' own error hides the Gemms' share)
    level = scoring_opt_level(list(load_target("tpu").hardware.isa), list(detect_host().isa))
    evaluator = Evaluator(model, evaluation, None, metric="relative-error", opt_level=level)
    base = evaluator.score(build("minmax", [])).drop_pct
    where = loss_by_op_type(build, ranking_build(build), "minmax", base, lambda m: evaluator.score(m).drop_pct)
    assert {loss.op_type: loss.nodes for loss in where.losses} == _quantized_op_types(build) and where.unscored == 0
    drops = {loss.op_type: loss.drop_pct for loss in where.losses}
    # the classifier's Gemms kept float take back about half of the output error; a Flatten moves nothing
    assert drops["Gemm"] < 0.75 * base and drops["Flatten"] == pytest.approx(base)
    clause = where.clause()
    assert clause.startswith(f"; where it is lost (minmax, drop {base:.2f} with every op int8")
    named = re.findall(r"(\w+) \((\d+) nodes?\) ([\d.]+)", clause)
    helpful = sorted((op for op in drops if drops[op] <= (1 - MIN_SHARE) * base), key=drops.get)
    assert named[0][0] == "Gemm" and [op for op, _, _ in named] == helpful[:SHOWN]


def test_op_types_that_take_back_under_a_tenth_of_the_drop_are_not_named_and_the_loss_reads_spread():
    # PP-OCRv5 det on cpu-avx named GlobalAveragePool for 3.66 -> 3.54 (± 0.66): float for nothing
    losses = [OpTypeLoss("Conv", 40, 3.70), OpTypeLoss("GlobalAveragePool", 10, 3.54), OpTypeLoss("Resize", 6, 3.66)]
    spread = LossByOpType("fast_recovery:percentile", 3.66, losses, 0)
    assert spread.helpful() == []
    assert spread.clause().endswith(
        "kept float): no one op type takes back 10% of it (the closest, GlobalAveragePool (10 nodes), leaves 3.54): "
        "the loss is spread through the graph"
    )
    held = LossByOpType("mse", 1.47, [OpTypeLoss("Mul", 30, 1.06), OpTypeLoss("LayerNormalization", 1, 1.40)], 0)
    assert held.clause().endswith("kept float): Mul (30 nodes) 1.06")  # 1.40 is within a tenth of 1.47
    assert LossByOpType("mse", 1.0, [OpTypeLoss("Add", 3, 1.2)], 0).clause() == ""  # nothing lowers it


def test_a_time_limit_says_how_many_op_types_it_left_out():
    model, build = _tpu_build()
    where = loss_by_op_type(build, ranking_build(build), "minmax", 1.0, lambda m: 0.5, seconds=0.0)
    assert where.losses == [] and where.unscored == len(_quantized_op_types(build))  # none scored, all said
    assert where.clause() == ""  # nothing measured, nothing named


@pytest.mark.slow
@needs_corpus("minilm_l6")
def test_minilm_refused_on_tpu_says_where_it_is_lost(tmp_path):
    """all-MiniLM-L6 on tpu at the default budget exits 3 (~1.5 cosine points, session 21); the error line names the
    op types whose float copies bring the drop down, each under the every-op drop it states."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from benchmarks.corpus.manifest import by_name
    from benchmarks.corpus.sweep import run_compile

    run = run_compile(by_name("minilm_l6"), "tpu", tmp_path / "out", timeout=1800)
    assert run.code == 3, run.message
    found = re.search(
        r"where it is lost \((\S+), drop ([\d.]+) with every op int8[^:]*: (.*?)(?: \(fix|;|$)", run.message
    )
    assert found, run.message
    base = float(found.group(2))
    named = re.findall(r"(\w+) \((\d+) nodes?\) ([\d.]+)", found.group(3))
    assert named and all(float(drop) < base for _, _, drop in named)
