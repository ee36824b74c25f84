"""The pipeline instruments passes: timing, stats, checker, output comparison, determinism."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import DIGITS, OCR_DET, needs_ocr
from onnx import helper, numpy_helper

from lepton_cli.compile.compiler import CompileOptions, compile_model
from lepton_cli.errors import BadInputError, InternalError, QualityGateError
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.equivalence import NOISE_FLOOR_FACTOR, within_scaled_tolerance
from lepton_cli.pipeline.instruments import Instrument, standard_instruments
from lepton_cli.pipeline.records import StepCheck
from lepton_cli.pipeline.registry import LOSSY, BudgetUse, PassResult, get_pass, register_pass, tolerance
from lepton_cli.pipeline.run import run_pipeline
from lepton_cli.pipeline.targets import PassStep, load_target

REPO = DIGITS.parents[1]


@dataclass(frozen=True)
class _Scale:
    factor: float = 1.001


@register_pass(
    "test_perturb",
    params=_Scale,
    description="test only: scales the first initializer",
    exactness=tolerance(rtol=1e-4, atol=1e-5),
)
def _perturb(model, ctx, params):
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    first = changed.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * params.factor, first.name))
    return PassResult(changed, {"scaled": first.name})


@register_pass(
    "test_invalid",
    params=_Scale,
    description="test only: emits an invalid graph",
    exactness=tolerance(rtol=1e-4, atol=1e-5),
)
def _invalid(model, ctx, params):
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "does_not_exist"
    return PassResult(broken, {})


@dataclass(frozen=True)
class _Spend:
    points: float = 0.0  # what this fake lossy pass costs
    budget_share: float = 0.5


@register_pass("test_lossy_spend", params=_Spend, description="test only: spends budget points", exactness=LOSSY)
def _lossy_spend(model, ctx, params):
    allowed = ctx.lossy_budget(params.budget_share)
    return PassResult(model, {"allowed": allowed, "spent": params.points}, budget_use=BudgetUse(allowed, params.points))


@register_pass(
    "test_lossy_need",
    params=_Spend,
    description="test only: adds its points to the ledger; fails over its budget",
    exactness=LOSSY,
)
def _lossy_need(model, ctx, params):
    allowed = ctx.lossy_budget(params.budget_share)
    reached = ctx.source_drop + params.points  # its result's drop against the source
    if reached > allowed:
        summary = f"needs {reached:g} points, allowed {allowed:g}"
        raise QualityGateError(f"{summary}; tried: x", "raise it", attempt_summary=summary)
    return PassResult(model, {"allowed": allowed, "reached": reached}, budget_use=BudgetUse(allowed, reached))


def _target_with(*steps: PassStep):
    base = load_target("cpu-avx")
    object.__setattr__(base, "passes", list(steps))
    return base


def _digits():
    from lepton_cli.model.load import load_model

    return load_model(DIGITS / "digits_cnn.onnx").model


def test_a_pass_that_changes_outputs_is_caught_and_named():
    ctx = PassContext(target=_target_with(PassStep("test_perturb", _Scale(1.05))))
    with pytest.raises(InternalError, match="pass 'test_perturb' changed the model's outputs"):
        run_pipeline(_digits(), ctx)


def test_within_tolerance_passes_and_is_recorded():
    ctx = PassContext(target=_target_with(PassStep("test_perturb", _Scale(1.0 + 1e-9))))
    model, records = run_pipeline(_digits(), ctx)
    (record,) = records
    assert record.check.ok is True and record.check.samples == 3
    assert record.seconds >= 0 and record.before.nodes == record.after.nodes
    assert record.summary == {"scaled": _digits().graph.initializer[0].name}


def test_invalid_graph_is_caught_by_checker():
    ctx = PassContext(target=_target_with(PassStep("test_invalid", _Scale())))
    with pytest.raises(InternalError, match="pass 'test_invalid' produced an invalid model"):
        run_pipeline(_digits(), ctx)


def test_fuse_reports_stats_before_and_after():
    target = load_target("cpu-avx")
    object.__setattr__(target, "passes", [s for s in target.passes if s.name == "fuse"])
    model, records = run_pipeline(_digits(), PassContext(target=target))
    (record,) = records
    assert record.before.ops.get("BatchNormalization") == 2
    assert record.after.nodes < record.before.nodes
    assert record.check.ok is True


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target", ["cpu-avx", "edge-arm"])
def test_compile_is_deterministic(tmp_path, target):
    def once(out):
        options = CompileOptions(
            model=DIGITS / "digits_cnn.onnx", target=target, output_dir=out, calib=DIGITS / "calib.npz"
        )
        return compile_model(options).model_bytes  # plaintext; the bundle's copy is encrypted afresh each time

    first, second = once(tmp_path / "a"), once(tmp_path / "b")
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()


def test_opset_upgrade_and_shape_binding_are_reported(tmp_path):
    from conftest import LIGHT_DIR

    options = CompileOptions(model=LIGHT_DIR / "light_squeezenet.onnx", target="cpu-avx", output_dir=tmp_path)
    result = compile_model(options)
    assert any("opset 9 → 13" in n for n in result.report["normalisation"])
    compiled = onnx.load_from_string(result.model_bytes)
    assert next(o.version for o in compiled.opset_import if o.domain == "") >= 13


def test_random_check_inputs_are_seeded():
    from lepton_cli.model.sessions import random_feed
    from lepton_cli.model.shapes import graph_inputs

    inputs = graph_inputs(
        helper.make_model(
            helper.make_graph(
                [],
                "g",
                [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
            )
        )
    )
    a = random_feed(inputs, np.random.default_rng(7))["x"]
    b = random_feed(inputs, np.random.default_rng(7))["x"]
    assert np.array_equal(a, b)


def test_tolerance_scales_with_the_output_not_each_element():
    ref = np.array([1.0, 0.5, 1e-6], dtype=np.float32)
    # float reassociation: 5e-5 off on a near-zero element of a map whose values reach 1 (fuse on det)
    assert within_scaled_tolerance(ref, ref + np.array([0, 0, 5e-5], np.float32), rtol=1e-4, atol=1e-5)
    assert not np.allclose(ref + np.array([0, 0, 5e-5], np.float32), ref, rtol=1e-4, atol=1e-5)
    assert not within_scaled_tolerance(ref, ref + np.array([0, 1e-3, 0], np.float32), rtol=1e-4, atol=1e-5)
    assert not within_scaled_tolerance(ref, np.array([1.0, np.nan, 1e-6], np.float32), rtol=1e-4, atol=1e-5)
    assert not within_scaled_tolerance(np.array([np.inf, 1.0]), np.array([1e30, 1.0]), rtol=1e-4, atol=1e-5)
    assert within_scaled_tolerance(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), rtol=0, atol=0)


def test_the_budget_is_one_ledger_of_drop_against_the_source():
    ctx = PassContext(target=load_target("edge-arm"), max_accuracy_drop=1.0)
    ledger = ctx.ledger
    assert ctx.lossy_budget(0.5) == 0.5
    ledger.enter("prune", BudgetUse(0.5, 0.1))  # channel pruning's result is 0.1 below the source; 0.4 carries over
    assert ctx.lossy_budget(0.5) == pytest.approx(1.0)  # int8 may take the model to 1.0 below the source
    assert ctx.lossy_budget(0.25) == pytest.approx(0.75)
    assert ledger.spent == {"prune": pytest.approx(0.1)} and ctx.source_drop == pytest.approx(0.1)
    ledger.enter("other", BudgetUse(0.25, 0.7))  # over its allowance: the next share starts from what it reached
    assert ledger.spent["other"] == pytest.approx(0.6) and ctx.lossy_budget(0.25) == pytest.approx(0.95)
    ledger.enter("other", BudgetUse(0.9, 0.0))
    assert ctx.lossy_budget(0.5) == 1.0  # never more than the whole budget
    assert ledger.yield_for("last") == ["prune"] and ledger.yielded == {"prune"} and ledger.source_drop == 0.0


def test_a_lossy_pass_that_read_no_drop_still_yields_when_a_later_one_fails():
    """Channel pruning that read 0.00 on its few samples has still changed the model: a failing int8 pass after it
    gets a run without it. An exact pass (dead channels only) is no reason to compile again."""
    ledger = PassContext(target=load_target("fpga"), max_accuracy_drop=1.0).ledger
    ledger.enter("prune", BudgetUse(0.5, 0.0, changed=True))
    assert ledger.spenders("quantize") == ["prune"] and ledger.yield_for("quantize") == ["prune"]
    exact = PassContext(target=load_target("fpga"), max_accuracy_drop=1.0).ledger
    exact.enter("prune", BudgetUse(0.5, 0.0))
    assert exact.spenders("quantize") == [] and exact.yield_for("quantize") == []


def test_onnxruntime_notices_never_reach_stdout(monkeypatch, capsys):
    """ORT prints its EP fallback notice to stdout; sessions are made with stdout sent to stderr (--json stays clean)."""
    import onnxruntime

    from lepton_cli.model import sessions as lepton_ort

    class Noisy:
        def __init__(self, *args, **kwargs):
            print("*************** EP Error ***************")

    monkeypatch.setattr(onnxruntime, "InferenceSession", Noisy)
    lepton_ort.new_session(b"", onnxruntime.SessionOptions(), ["CPUExecutionProvider"])
    captured = capsys.readouterr()
    assert captured.out == "" and "EP Error" in captured.err


def test_tolerance_scale_is_per_channel_for_maps():
    ref = np.zeros((1, 2, 4), np.float32)
    ref[0, 0] = 640.0  # box coordinates
    ref[0, 1] = 0.5  # scores
    drifted = ref.copy()
    drifted[0, 1, 0] += 0.01  # a score off by 2%: within 1e-4 of 640, not of 0.5
    assert not within_scaled_tolerance(ref, drifted, rtol=1e-4, atol=1e-5)
    drifted = ref.copy()
    drifted[0, 0, 0] += 0.01
    assert within_scaled_tolerance(ref, drifted, rtol=1e-4, atol=1e-5)


def test_a_lossy_pass_that_cannot_meet_its_budget_gets_the_share_an_earlier_one_spent():
    # pruning reaches 0.2 of its 0.5; int8 (the other half, plus pruning's unspent 0.3) adds 0.6: 0.8, within 1.0
    ctx = PassContext(
        target=_target_with(PassStep("test_lossy_spend", _Spend(0.2)), PassStep("test_lossy_need", _Spend(0.6))),
        max_accuracy_drop=1.0,
    )
    _, records = run_pipeline(_digits(), ctx)
    assert records[1].summary["allowed"] == pytest.approx(1.0) and records[1].summary["reached"] == pytest.approx(0.8)
    assert not ctx.warnings
    # int8 adds 0.9: 1.1 with pruning's 0.2 -> compiled again without pruning
    ctx = PassContext(
        target=_target_with(PassStep("test_lossy_spend", _Spend(0.2)), PassStep("test_lossy_need", _Spend(0.9))),
        max_accuracy_drop=1.0,
    )
    _, records = run_pipeline(_digits(), ctx)
    assert records[0].summary["applied"] == "none" and records[0].check.kind == "skipped"
    assert records[1].summary["reached"] == pytest.approx(0.9)
    assert len(ctx.warnings) == 1 and "compiled again without test_lossy_spend" in ctx.warnings[0]
    assert ctx.warnings[0].endswith("First attempt: needs 1.1 points, allowed 1")  # the summary, not the tries
    # needs more than the whole budget: exit 3 after the retry, with the pass's own message
    ctx = PassContext(
        target=_target_with(PassStep("test_lossy_spend", _Spend(0.2)), PassStep("test_lossy_need", _Spend(1.5))),
        max_accuracy_drop=1.0,
    )
    with pytest.raises(QualityGateError, match="needs 1.5 points, allowed 1"):
        run_pipeline(_digits(), ctx)
    # an earlier pass that spent nothing gives no reason to retry
    ctx = PassContext(
        target=_target_with(PassStep("test_lossy_spend", _Spend(0.0)), PassStep("test_lossy_need", _Spend(1.5))),
        max_accuracy_drop=1.0,
    )
    with pytest.raises(QualityGateError):
        run_pipeline(_digits(), ctx)
    assert not ctx.ledger.yielded


def test_the_final_accuracy_gate_runs_inside_the_retry():
    """A final check failing after earlier lossy passes spent budget: compiled again without them (the last lossy
    pass, which made the model the gate judged, stays); still failing, or nothing earlier to yield: returned."""
    checked = []

    def final_check(model):
        checked.append(set(ctx.ledger.yielded))
        return None if ctx.ledger.yielded else "accuracy dropped 1.2 points"

    steps = PassStep("test_lossy_spend", _Spend(0.2)), PassStep("test_lossy_need", _Spend(0.6))
    ctx = PassContext(target=_target_with(*steps), max_accuracy_drop=1.0)
    _, records = run_pipeline(_digits(), ctx, final_check=final_check)
    assert checked == [set(), {"test_lossy_spend"}] and records[0].summary["applied"] == "none"
    assert records[1].summary["reached"] == pytest.approx(0.6)  # the last lossy pass ran again, not yielded
    assert "the accuracy gate could not meet its accuracy budget" in ctx.warnings[0]
    ctx = PassContext(target=_target_with(PassStep("test_lossy_spend", _Spend(0.2))), max_accuracy_drop=1.0)
    run_pipeline(_digits(), ctx, final_check=lambda model: "over")  # the only spender made the model: no retry
    assert not ctx.ledger.yielded and not ctx.warnings
    ctx = PassContext(target=_target_with(PassStep("test_lossy_spend", _Spend(0.0))), max_accuracy_drop=1.0)
    run_pipeline(_digits(), ctx, final_check=lambda model: "over")  # nothing to yield: the caller reports it
    assert not ctx.ledger.yielded and not ctx.warnings


@needs_ocr
def test_fuse_on_a_deep_detector_is_judged_against_the_float_noise_floor(run_cli, tmp_path):
    # PP-OCRv4 det on rendered pages: folding BatchNorm and hard-swish moves the 0..1 map by 2.5e-4, past
    # rtol 1e-4, while ONNX Runtime's own fusions move the source by 1.3e-4: float noise, not a wrong rewrite.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    np.savez(tmp_path / "pages.npz", x=ocr_textset.make_pages(8, seed=3, role="eval", size=320))
    source = (REPO / "targets" / "cpu-avx.toml").read_text(encoding="utf-8")
    fuse_only = source[: source.index("[[passes]]", source.index("[[passes]]") + 1)].replace(
        'name = "cpu-avx"', 'name = "fuse-only"'
    )
    (tmp_path / "fuse-only.toml").write_text(fuse_only, encoding="utf-8")
    res = run_cli(
        "compile",
        OCR_DET,
        "--target",
        tmp_path / "fuse-only.toml",
        "--input-shape",
        "x=1,3,320,320",
        "--calib",
        tmp_path / "pages.npz",
        "--no-bench",
        "-o",
        tmp_path,
    )
    assert res.code == 0, res.stderr
    report = json.loads(next(tmp_path.glob("*.lepton")).joinpath("report.json").read_text(encoding="utf-8"))
    check = report["pipeline"][0]["check"]
    assert check["ok"] and check["max_abs_error"] > 0
    for name, floor in check.get("noise_floor", {}).items():
        assert check["max_abs_error"] <= NOISE_FLOOR_FACTOR * floor, name


RAN: list[str] = []  # the test passes below that ran


@dataclass(frozen=True)
class _NoParams:
    pass


@register_pass("test_records_run", params=_NoParams, description="test only: notes that it ran", exactness=LOSSY)
def _records_run(model, ctx, params):
    RAN.append("test_records_run")
    ctx.progress("phase one")
    ctx.progress("counting", 1, 2)
    ctx.progress("counting", 2, 2)
    return PassResult(model, {})


def _params_of(target: str, name: str, **changes):
    import dataclasses

    step = next(s for s in load_target(target).passes if s.name == name)
    return dataclasses.replace(step.params, **changes)


@pytest.mark.parametrize(
    ("target", "name", "changes", "message"),
    [
        ("fpga", "fuse", {"ort_offline": True}, "fuse.ort_offline = true on target 'fpga'"),
        ("tpu", "quantize", {}, "needs static int8 quantization and no --calib data was given"),
        ("edge-arm", "quantize", {"dynamic_lstm": True}, "quantize.dynamic_lstm = true on target 'edge-arm'"),
    ],
)
def test_preconditions_fail_before_any_pass_runs(target, name, changes, message):
    """ort_offline or dynamic_lstm on a portable target, and without_calib = "fail" without --calib: exit 2 before the
    first pass."""
    RAN.clear()
    base = load_target(target)
    object.__setattr__(
        base, "passes", [PassStep("test_records_run", _NoParams()), PassStep(name, _params_of(target, name, **changes))]
    )
    with pytest.raises(BadInputError, match=message) as raised:
        run_pipeline(_digits(), PassContext(target=base))
    assert raised.value.exit_code == 2 and RAN == []


def test_a_variants_preconditions_fail_before_the_main_model_compiles(tmp_path):
    """A target whose second variant needs --calib fails before the first variant's passes run."""
    (tmp_path / "two.toml").write_text(
        'extends = "tpu"\nname = "two"\n'
        '[[variants]]\nname = "fp32"\nprecision = "fp32"\nskip = ["quantize"]\n'
        '[[variants]]\nname = "int8"\nprecision = "int8"\n',
        encoding="utf-8",
    )
    started = []
    options = CompileOptions(model=DIGITS / "digits_cnn.onnx", target=str(tmp_path / "two.toml"), output_dir=tmp_path)
    with pytest.raises(BadInputError, match="needs static int8 quantization"):
        compile_model(options, progress=lambda name, phase, record: started.append(name))
    assert started == []


def test_compile_at_the_command_line_fails_on_a_precondition_before_any_pass(run_cli, tmp_path):
    result = run_cli("compile", DIGITS / "digits_cnn.onnx", "-t", "tpu", "-o", tmp_path / "out")
    assert result.code == 2 and "needs static int8 quantization" in result.stderr
    assert "→ fuse" not in result.stderr and "Traceback" not in result.stderr


def test_passes_are_listed_in_their_declared_order(tmp_path):
    order = {name: spec.order for name, spec in ((n, get_pass(n)) for n in ("fuse", "prune", "quantize"))}
    assert order["fuse"] < order["prune"] < order["quantize"]
    (tmp_path / "backwards.toml").write_text(
        'extends = "cpu-avx"\n[[passes]]\nname = "quantize"\n[[passes]]\nname = "fuse"\n', encoding="utf-8"
    )
    with pytest.raises(BadInputError, match=r"passes\[1\] \(fuse\) is listed after quantize") as raised:
        load_target(str(tmp_path / "backwards.toml"))
    assert "fuse → prune → layout_transform → quantize" in (raised.value.fix or "")


def test_instruments_observe_in_nested_order_and_may_veto_a_pass():
    calls = []

    class Spy(Instrument):
        def __init__(self, name, veto=()):
            self.name, self.veto = name, veto

        def should_run(self, ctx, step):
            return step.name not in self.veto

        def run_before_pass(self, ctx, step, model, record):
            calls.append(f"{self.name} before {step.name}")

        def run_after_pass(self, ctx, spec, before, result, record):
            calls.append(f"{self.name} after {spec.name}")

    steps = (PassStep("test_perturb", _Scale(1.0)), PassStep("test_records_run", _NoParams()))
    ctx = PassContext(target=_target_with(*steps))
    _, records = run_pipeline(_digits(), ctx, instruments=[Spy("outer"), Spy("inner", veto={"test_records_run"})])
    assert calls == ["outer before test_perturb", "inner before test_perturb", "inner after test_perturb"] + [
        "outer after test_perturb"
    ]
    assert [r.name for r in records] == ["test_perturb"]
    # without the standard instruments nothing is timed, counted or compared
    assert records[0].before is None and records[0].check.kind == "lossy"
    _, records = run_pipeline(_digits(), PassContext(target=_target_with(*steps)), instruments=standard_instruments())
    assert records[0].check.ok is True and records[0].before is not None and len(records) == 2


def test_step_checks_serialise_as_the_report_expects():
    assert StepCheck("lossy").to_dict() == {"kind": "lossy"}
    assert StepCheck("skipped").to_dict() == {"kind": "skipped"}
    assert StepCheck("exact", ok=None, skipped="unbound input dims").to_dict() == {
        "kind": "exact",
        "ok": None,
        "skipped": "unbound input dims",
    }
    assert StepCheck("tolerance", ok=False, detail="output 'y' shape (2,) != (3,)").to_dict() == {
        "kind": "tolerance",
        "ok": False,
        "detail": "output 'y' shape (2,) != (3,)",
    }
    full = StepCheck("tolerance", True, 3, 1e-6, "y", 1e-4, 1e-5, noise_floor={"y": 1e-6}, guessed_dims=True)
    assert list(full.to_dict()) == [
        "kind",
        "ok",
        "samples",
        "max_abs_error",
        "worst_output",
        "rtol",
        "atol",
        "noise_floor",
        "guessed_dims",
    ]


def test_a_pass_reports_progress_through_the_context(tmp_path):
    seen = []
    ctx = PassContext(
        target=_target_with(PassStep("test_records_run", _NoParams())),
        on_progress=lambda *args: seen.append(args),
    )
    run_pipeline(_digits(), ctx)
    assert seen == [
        ("test_records_run", "phase one", None, None),
        ("test_records_run", "counting", 1, 2),
        ("test_records_run", "counting", 2, 2),
    ]


def test_compile_shows_a_passes_progress_unless_quiet(run_cli, tmp_path):
    target = tmp_path / "progress.toml"
    target.write_text('extends = "cpu-avx"\nname = "progress"\npasses = [{ name = "test_records_run" }]\n')
    args = ("compile", DIGITS / "digits_cnn.onnx", "-t", target, "-o", tmp_path / "out", "--no-bench")
    shown = run_cli(*args)
    assert shown.code == 0, shown.stderr
    assert "test_records_run: phase one" in shown.stderr
    quiet = run_cli(*args, "--quiet")
    assert quiet.code == 0 and "phase one" not in quiet.stderr
    as_json = run_cli(*args, "--json")
    assert as_json.code == 0 and "phase one" not in as_json.stderr and json.loads(as_json.stdout)["target"]


def test_sessions_opened_from_threads_leave_stdout_where_it_was(monkeypatch):
    """The scorer opens sessions from several threads: each swaps sys.stdout to stderr while ORT may print, and an
    unserialised swap could restore another thread's swap (a --json document then went to stderr)."""
    import threading
    import time

    import onnxruntime

    from lepton_cli.model import sessions as lepton_ort

    seen_inside = []

    class Slow:
        def __init__(self, *args, **kwargs):
            seen_inside.append(sys.stdout is sys.stderr)
            time.sleep(0.01)  # long enough for another thread's swap to land in between

    monkeypatch.setattr(onnxruntime, "InferenceSession", Slow)
    original = sys.stdout
    threads = [
        threading.Thread(target=lepton_ort.new_session, args=(b"", None, ["CPUExecutionProvider"])) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sys.stdout is original and all(seen_inside) and len(seen_inside) == 8
