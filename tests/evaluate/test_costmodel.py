"""Cost model: roofline arithmetic on hand-built graphs, liveness and greedy arena on known cases, real models, budgets."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import DIGITS, LIGHT_DIR, OCR_REC, needs_ocr
from onnx import TensorProto, helper, numpy_helper

from lepton_cli.evaluate import costmodel
from lepton_cli.evaluate.costmodel import Buffer, Efficiency
from lepton_cli.model.stats import collect_stats
from lepton_cli.pipeline.targets import Budgets, Hardware, load_target

HW = Hardware(
    peak_int8_tops=4.0,
    peak_fp16_tflops=2.0,
    peak_fp32_tflops=1.0,
    memory_bandwidth_gbps=100.0,
    memory_mb=1024,
    preferred_layout="NCHW",
    channel_alignment=1,
    cores=4,
)
IDEAL = Efficiency(compute=1.0, grouped_compute=1.0, memory=1.0, cache_bandwidth=1.0, node_overhead_us=0.0)


def _matmul(m: int, k: int, n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((k, n), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_roofline_single_matmul_by_hand():
    m, k, n = 64, 256, 128
    est = costmodel.estimate(_matmul(m, k, n), HW, eff=IDEAL)
    macs = m * k * n
    compute = 2 * macs / 1e12
    memory = 4 * (m * k + k * n + m * n) / 100e9
    assert est["macs"] == macs
    assert est["bytes_moved"] == 4 * (m * k + k * n + m * n)
    assert est["latency_ms"] == pytest.approx(max(compute, memory) * 1e3)
    assert est["weights_bytes"] == 4 * k * n and est["complete"]


def test_an_embedding_gather_reads_the_rows_it_selects_not_the_table():
    """all-MiniLM-L6's word embeddings (30522 x 384 fp32, 47 MB) were priced as read whole per sentence: 2.0 of its
    3.2 ms estimate, which hid every difference between its quantized candidates."""
    vocab, hidden, tokens = 30522, 384, 32
    table = numpy_helper.from_array(np.zeros((vocab, hidden), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, tokens])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, tokens, hidden])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    est = costmodel.estimate(model, HW, eff=IDEAL)
    rows = 4 * tokens * hidden
    assert est["bytes_moved"] == 8 * tokens + 2 * rows  # the ids, the rows read, the output written
    assert est["weights_bytes"] == 4 * vocab * hidden  # the table still counts as the model's weights


def test_memory_bound_vs_compute_bound_follows_bandwidth():
    model = _matmul(64, 256, 128)
    slow_memory = Hardware(**{**HW.__dict__, "memory_bandwidth_gbps": 0.1})
    fast_memory = Hardware(**{**HW.__dict__, "memory_bandwidth_gbps": 1e5})
    assert costmodel.estimate(model, slow_memory, eff=IDEAL)["memory_bound_share"] == 1.0
    assert costmodel.estimate(model, fast_memory, eff=IDEAL)["compute_bound_share"] == 1.0


def test_scale_to_cores_shares_peak_and_bandwidth():
    hw = costmodel.scale_to_cores(HW, 2)
    assert hw.cores == 2 and hw.peak_fp32_tflops == pytest.approx(0.5) and hw.memory_bandwidth_gbps == pytest.approx(50)


def _qdq_matmul() -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(DQ(w_int8)): ORT runs this as an integer MatMul."""
    k, n = 256, 128
    inits = [
        numpy_helper.from_array(np.ones((k, n), np.int8), "wq"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_matmul_runs_at_int8_rate_and_its_dqs_inside_the_kernel():
    costs, unknown = costmodel.node_costs(costmodel.infer(_qdq_matmul()), HW, IDEAL)
    by_name = {c.name: c for c in costs}
    assert by_name["mm"].dtype == "int8" and not unknown
    assert [c.op for c in costs] == ["QuantizeLinear", "MatMul"]  # both DQs run inside MatMulIntegerToFloat
    fp32 = {c.name: c for c in costmodel.node_costs(costmodel.infer(_matmul(64, 256, 128)), HW, IDEAL)[0]}["mm"]
    assert by_name["mm"].compute_s == pytest.approx(fp32.compute_s / 4)  # int8 peak is 4x the fp32 one here


def _qdq_hard_swish(channels: int = 64, pixels: int = 1024) -> onnx.ModelProto:
    """x -> Q/DQ -> HardSigmoid -> Q/DQ -> Mul(x, gate) -> Q: a hard-swish with every tensor int8."""
    scale = [
        numpy_helper.from_array(np.array(2.0**-4, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]

    def qdq(name: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}q"]),
            helper.make_node("DequantizeLinear", [f"{name}q", "s", "z"], [f"{name}d"]),
        ]

    nodes = [
        *qdq("x"),
        helper.make_node("HardSigmoid", ["xd"], ["g"], name="gate", alpha=1 / 6, beta=0.5),
        *qdq("g"),
        helper.make_node("Mul", ["xd", "gd"], ["y"], name="swish"),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, pixels])],
        [helper.make_tensor_value_info("yq", TensorProto.INT8, [1, channels, pixels])],
        scale,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_int8_accelerator_runs_quantized_element_wise_units_at_int8_bytes_and_rate():
    """ORT's CPU EP dequantizes, computes and requantizes a QLinearMul's elements (float bytes) and has no integer
    HardSigmoid; the DPU runs both on int8 feature maps (``int8_elementwise``)."""
    model = costmodel.infer(_qdq_hard_swish())
    cpu = {c.name: c for c in costmodel.node_costs(model, HW, IDEAL)[0]}
    dpu = {c.name: c for c in costmodel.node_costs(model, replace(HW, int8_elementwise=True), IDEAL)[0]}
    elements = 64 * 1024
    assert cpu["swish"].bytes == 3 * 4 * elements and dpu["swish"].bytes == 3 * elements
    assert dpu["swish"].dtype == "int8" and dpu["swish"].compute_s == pytest.approx(cpu["swish"].compute_s / 4)
    assert cpu["gate"].dtype == "fp32" and dpu["gate"].dtype == "int8" and dpu["gate"].bytes == 2 * elements
    # on the CPU the float gate's input DQ and output Q run as nodes of their own; on the DPU inside its units
    assert sorted(c.op for c in cpu.values()) == [
        "DequantizeLinear",
        "HardSigmoid",
        "Mul",
        "QuantizeLinear",
        "QuantizeLinear",
    ]
    assert sorted(c.op for c in dpu.values()) == ["HardSigmoid", "Mul", "QuantizeLinear"]


def _check_plan(buffers: list[Buffer], offsets: dict[str, int], arena: int) -> None:
    for a, b in itertools.combinations(buffers, 2):
        if a.first <= b.last and b.first <= a.last:  # alive together: memory must not overlap
            assert offsets[a.name] + a.size <= offsets[b.name] or offsets[b.name] + b.size <= offsets[a.name], (a, b)
    assert all(offsets[b.name] % costmodel.ARENA_ALIGNMENT == 0 for b in buffers)
    assert arena >= costmodel.liveness_peak(buffers)


def test_liveness_and_greedy_arena_on_a_known_case():
    # a chain with one long-lived skip tensor s; live per step: 0: s+a = 80, 1: s+a+b = 112, 2: s+b+c = 96, 3: s+c = 64
    buffers = [Buffer("s", 16, 0, 3), Buffer("a", 64, 0, 1), Buffer("b", 32, 1, 2), Buffer("c", 48, 2, 3)]
    assert costmodel.liveness_peak(buffers) == 112
    arena, offsets = costmodel.greedy_arena(buffers)
    _check_plan(buffers, offsets, arena)
    # largest first at the bottom; c reuses a's bytes (their lifetimes do not meet); b above a; s above b
    assert offsets == {"a": 0, "c": 0, "b": 64, "s": 96} and arena == 112


def test_greedy_reuses_memory_of_dead_tensors():
    buffers = [Buffer("x", 1024, 0, 1), Buffer("y", 1024, 2, 3), Buffer("z", 512, 1, 2)]
    arena, offsets = costmodel.greedy_arena(buffers)
    assert offsets["x"] == offsets["y"] == 0 and arena == 1536 == costmodel.liveness_peak(buffers)


def test_greedy_arena_random_plans_are_valid():
    rng = np.random.default_rng(0)
    for _ in range(30):
        buffers = []
        for i in range(12):
            first = int(rng.integers(-1, 10))
            buffers.append(Buffer(f"t{i}", int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 5))))
        arena, offsets = costmodel.greedy_arena(buffers)
        _check_plan(buffers, offsets, arena)
        assert arena <= sum(costmodel._align(b.size, 16) for b in buffers)


@pytest.mark.parametrize("name", ["light_squeezenet.onnx", "light_resnet50.onnx"])
def test_real_zoo_models(name):
    model = onnx.load(LIGHT_DIR / name)
    est = costmodel.estimate(model, load_target("cpu-avx").hardware)
    assert est["complete"], est.get("note")
    assert est["macs"] == collect_stats(model).macs
    peak = est["peak_activation_bytes"]
    assert 0 < peak["liveness_lower_bound"] <= peak["greedy_arena"]
    # the planner shares memory: far below the sum of every activation tensor
    buffers, _ = costmodel.activation_buffers(costmodel.infer(model))
    assert peak["greedy_arena"] < sum(b.size for b in buffers) / 2
    # weights are counted once, as the runtime keeps them (ConstantOfShape outputs)
    assert est["weights_bytes"] == pytest.approx(collect_stats(model).params * 4, rel=0.01)
    assert est["top_nodes"][0]["ms"] >= est["top_nodes"][-1]["ms"]


@needs_ocr
def test_ocr_rec_with_bound_shapes_is_complete():
    model = onnx.load(OCR_REC)
    est = costmodel.estimate(model, load_target("edge-arm").hardware, input_shapes={"x": [1, 3, 48, 320]})
    assert est["complete"], est.get("unknown_tensors")
    assert est["latency_ms"] > 0 and est["macs"] > 1e8


def test_dynamic_dims_are_reported_not_guessed():
    model = onnx.load(DIGITS / "digits_cnn.onnx")  # batch dim 'N' free
    est = costmodel.estimate(model, HW)
    assert not est["complete"] and "--input-shape" in est["note"]


def test_budget_checks():
    est = {"peak_activation_bytes": {"greedy_arena": 3 * 2**20, "liveness_lower_bound": 2 * 2**20}}
    checks = costmodel.check_budgets(10 * 2**20, est, Budgets(max_model_size_mb=5, max_activation_memory_mb=4), HW)
    by = {c["name"]: c for c in checks}
    assert by["model size"]["ok"] is False and by["model size"]["value"] == pytest.approx(10)
    assert by["activation memory (greedy arena)"]["ok"] is True
    assert by["weights + activations vs device memory"]["value"] == pytest.approx(13)


def test_budgets_skip_memory_when_shapes_are_unknown():
    target = load_target("cpu-avx")
    est = costmodel.estimate(onnx.load(DIGITS / "digits_cnn.onnx"), target.hardware)  # free batch dim
    doc = costmodel.budgets_section(target, 1000, est, "m")
    assert [c["name"] for c in doc["checks"]] == ["model size"] and "activation memory" in doc["skipped"][0]


def test_enforce_budgets_exits_3_on_a_tight_target(run_cli, tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text('extends = "cpu-avx"\nname = "tiny"\n[budgets]\nmax_model_size_mb = 0.01\n', encoding="utf-8")
    res = run_cli(
        "bench",
        DIGITS / "digits_cnn.onnx",
        "--target",
        toml,
        "--runs",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--calib",
        DIGITS / "calib.npz",
        "--enforce-budgets",
    )
    assert res.code == 3, res.stderr
    assert "model size" in res.stderr and "budget" in res.stderr
    ok = run_cli(
        "bench",
        DIGITS / "digits_cnn.onnx",
        "--target",
        "cpu-avx",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--calib",
        DIGITS / "calib.npz",
        "--enforce-budgets",
    )
    assert ok.code == 0, ok.stderr
