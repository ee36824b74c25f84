"""On-device choice of variant, execution providers and threads, on simulated hosts with real ORT sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS
from onnx import TensorProto, helper

from lepton_cli.errors import BadInputError
from lepton_cli.host.detect import GpuInfo, HostInfo
from lepton_cli.runtime.select import (
    CPU_EP,
    choose_threads,
    default_session_factory,
    manifest_variants,
    provider_order,
    select_session,
)

CUDA_EP, TRT_EP = "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU = GpuInfo(name="NVIDIA T4", vendor="NVIDIA", memory_total_mb=15360, memory_free_mb=2000, source="nvidia-smi")
REAL = (DIGITS / "digits_cnn.onnx").read_bytes()


def unrunnable_model() -> bytes:
    """Valid ONNX, but its op lives in a domain onnxruntime has no kernel for: session creation fails on CPU."""
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    return model.SerializeToString()


def host(
    isa=("avx2", "fma"),
    providers=(CPU_EP,),
    gpus=(),
    available=8192.0,
    limit=None,
    used=None,
    cpu_limit=None,
    physical=4,
) -> HostInfo:
    return HostInfo(
        arch="x86_64",
        system="linux",
        cpu_model="sim",
        cores_physical=physical,
        cores_logical=physical * 2,
        isa=tuple(isa),
        memory_total_mb=16384,
        memory_available_mb=available,
        cgroup_memory_limit_mb=limit,
        cgroup_memory_used_mb=used,
        cgroup_cpu_limit=cpu_limit,
        gpus=tuple(gpus),
        providers=tuple(providers),
        ort_version="sim",
    )


def manifest(*variants, providers=(CPU_EP,)) -> dict:
    return {
        "execution_providers": list(providers),
        "variants": [
            {
                "name": n,
                "path": p,
                "precision": prec,
                "requires_isa": isa,
                "requires_providers": eps,
                "peak_memory_mb": mem,
                "est_latency_ms": None,
            }
            for n, p, prec, isa, eps, mem in variants
        ],
    }


INT8 = ("int8", "model.onnx", "int8", ["avx2", "avx512_vnni|avx_vnni"], [], 10.0)
FP32 = ("fp32", "variants/fp32.onnx", "fp32", [], [], 40.0)
FP16 = ("fp16", "model.onnx", "fp16", [], [f"{CUDA_EP}|{TRT_EP}"], 20.0)
MODELS = {"model.onnx": REAL, "variants/fp32.onnx": REAL}


def cpu_only_factory(calls: list):
    """A real CPU session whatever was asked; records the provider lists it was called with (ORT's silent fallback)."""

    def factory(blob, providers, threads):
        calls.append(list(providers))
        return default_session_factory(blob, [CPU_EP], threads)

    return factory


def test_single_model_bundle_runs_on_cpu():
    selection = select_session({"model.onnx": REAL}, {}, host=host())
    assert selection.variant.name == "default" and selection.providers == [CPU_EP]
    x = np.zeros(
        [
            d if isinstance(d, int) and d > 0 else 1
            for d in [
                dim.dim_value or 1 for dim in onnx.load_from_string(REAL).graph.input[0].type.tensor_type.shape.dim
            ]
        ],
        dtype=np.float32,
    )
    assert selection.session.run(None, {selection.session.get_inputs()[0].name: x})[0].shape[-1] == 10


def test_int8_chosen_when_host_has_vnni():
    selection = select_session(MODELS, manifest(INT8, FP32), host=host(isa=("avx2", "avx_vnni")))
    assert selection.variant.name == "int8"


def test_isa_missing_falls_back_to_fp32_with_reason():
    selection = select_session(MODELS, manifest(INT8, FP32), host=host(isa=("avx2", "fma")))
    assert selection.variant.name == "fp32"
    assert any("int8" in e and "avx512_vnni|avx_vnni" in e for e in selection.log), selection.log


def test_memory_too_small_skips_variant():
    small = host(isa=("avx2", "avx512_vnni"), available=8192, limit=30.0, used=5.0)  # cgroup leaves 25 MB
    selection = select_session(MODELS, manifest(("big", "model.onnx", "fp32", [], [], 100.0), FP32), host=small)
    assert selection.variant.name == "fp32"
    assert any("big" in e and "25 MB usable" in e for e in selection.log), selection.log


def test_nothing_fits_memory_tries_smallest_anyway():
    tiny = host(available=5.0)
    selection = select_session(MODELS, manifest(("a", "model.onnx", "fp32", [], [], 80.0), FP32), host=tiny)
    assert selection.variant.name == "fp32"  # 40 MB < 80 MB
    assert any("smallest" in e for e in selection.log)


def test_fp16_needs_gpu_provider():
    # CUDA EP in the wheel but no GPU: it is not usable, the fp16 variant is skipped.
    no_gpu = host(providers=(CUDA_EP, CPU_EP))
    selection = select_session(MODELS, manifest(FP16, FP32, providers=(CUDA_EP, CPU_EP)), host=no_gpu)
    assert selection.variant.name == "fp32"
    assert any("fp16" in e and "needs execution provider" in e for e in selection.log)
    assert any("no GPU visible" in e for e in selection.log)


def test_provider_that_raises_is_dropped_and_retried():
    calls: list = []

    def factory(blob, providers, threads):
        calls.append(list(providers))
        if TRT_EP in providers:
            raise RuntimeError("TensorRT EP: libnvinfer.so.10: cannot open shared object file")
        return default_session_factory(blob, [CPU_EP], threads)

    gpu_host = host(providers=(TRT_EP, CUDA_EP, CPU_EP), gpus=[GPU])
    selection = select_session(
        MODELS, manifest(FP32, providers=(TRT_EP, CUDA_EP, CPU_EP)), host=gpu_host, session_factory=factory
    )
    assert calls[0] == [TRT_EP, CUDA_EP, CPU_EP] and calls[1] == [CUDA_EP, CPU_EP]
    assert any("TensorrtExecutionProvider failed to initialise" in e and "libnvinfer" in e for e in selection.log)
    # ORT then silently ran it on CPU: that is logged too, and fp32 accepts it.
    assert any("CUDAExecutionProvider did not initialise" in e for e in selection.log)
    assert selection.providers == [CPU_EP]


def test_silent_fallback_passes_over_variant_that_requires_gpu():
    calls: list = []
    gpu_host = host(providers=(CUDA_EP, CPU_EP), gpus=[GPU])
    selection = select_session(
        MODELS,
        manifest(FP16, FP32, providers=(CUDA_EP, CPU_EP)),
        host=gpu_host,
        session_factory=cpu_only_factory(calls),
    )
    assert selection.variant.name == "fp32" and calls[0] == [CUDA_EP, CPU_EP]
    assert any("fp16: passed over" in e for e in selection.log), selection.log


def test_gpu_memory_checked_when_gpu_leads():
    gpu_host = host(providers=(CUDA_EP, CPU_EP), gpus=[GPU])  # 2000 MB free on the GPU
    big16 = ("fp16", "model.onnx", "fp16", [], [CUDA_EP], 3000.0)
    selection = select_session(
        MODELS, manifest(big16, FP32, providers=(CUDA_EP, CPU_EP)), host=gpu_host, session_factory=cpu_only_factory([])
    )
    assert selection.variant.name == "fp32"
    assert any("free on the GPU" in e for e in selection.log)


def test_variant_whose_session_fails_on_cpu_falls_through():
    models = {"model.onnx": unrunnable_model(), "variants/fp32.onnx": REAL}
    selection = select_session(models, manifest(("odd", "model.onnx", "fp32", [], [], None), FP32), host=host())
    assert selection.variant.name == "fp32"
    assert any("odd: session failed on CPUExecutionProvider" in e for e in selection.log), selection.log


def test_no_variant_runs_is_exit_2_with_every_reason():
    with pytest.raises(BadInputError) as err:
        select_session(
            {"model.onnx": unrunnable_model()},
            manifest(INT8, ("gone", "variants/x.onnx", "fp32", [], [], None)),
            host=host(isa=("avx2", "avx512_vnni")),
        )
    assert "session failed" in err.value.message and "not in the bundle" in err.value.message


def test_provider_order_filters_and_appends_cpu():
    order, notes = provider_order(
        [TRT_EP, CUDA_EP, "XnnpackExecutionProvider"], host(providers=(CUDA_EP, CPU_EP), gpus=[GPU])
    )
    assert order == [CUDA_EP, CPU_EP]
    assert any(TRT_EP in n and "not in this onnxruntime build" in n for n in notes)


@pytest.mark.parametrize(
    "h, requested, expected",
    [
        (host(physical=4), None, 4),
        (host(physical=8, cpu_limit=2.5), None, 2),
        (host(physical=1), None, 1),
        (host(physical=4), 3, 3),
    ],
)
def test_threads(h, requested, expected):
    threads, why = choose_threads(h, requested)
    assert threads == expected and str(expected) in why


def test_threads_reach_the_session():
    selection = select_session(MODELS, manifest(FP32), host=host(physical=2))
    assert selection.threads == 2
    assert selection.session.get_session_options().intra_op_num_threads == 2


def test_manifest_without_variants_has_default():
    assert [v.path for v in manifest_variants({})] == ["model.onnx"]
    assert manifest_variants(manifest(INT8))[0].requires_isa == ("avx2", "avx512_vnni|avx_vnni")


def test_forced_variant_runs_despite_requirements_with_warnings():
    selection = select_session(MODELS, manifest(INT8, FP32), host=host(isa=("avx2",), available=5.0), only="int8")
    assert selection.variant.name == "int8"
    assert any(e.startswith("warning: variant int8 forced although it needs ISA") for e in selection.log)
    assert any("forced although it needs ~10 MB" in e for e in selection.log)
    by_path = select_session(MODELS, manifest(INT8, FP32), host=host(), only="variants/fp32.onnx")
    assert by_path.variant.name == "fp32"
    gpu_less = select_session(MODELS, manifest(FP16, FP32), host=host(), only="fp16")
    assert gpu_less.variant.name == "fp16" and gpu_less.providers == [CPU_EP]
    with pytest.raises(BadInputError) as err:
        select_session(MODELS, manifest(INT8, FP32), host=host(), only="int4")
    assert "int8 (model.onnx)" in err.value.fix


def test_real_bundle_variants_chosen_on_this_host(tmp_path, monkeypatch, run_cli):
    """Compile a two-variant target into a signed, encrypted bundle, open it, and let this real host choose."""
    from pathlib import Path

    from lepton_cli import bundle
    from lepton_cli.bundle.keys import dev_keys
    from lepton_cli.compile.compiler import CompileOptions, compile_model
    from lepton_cli.host.detect import detect_host
    from lepton_cli.runtime.bundle_session import load_bundle

    monkeypatch.setenv("LEPTON_HOME", str(tmp_path / "home"))
    target = tmp_path / "t.toml"
    target.write_text(
        'extends = "cpu-avx"\ndescription = "two variants"\n'
        '[[variants]]\nname = "vnni"\nprecision = "fp32"\nrequires_isa = ["avx512_vnni|avx_vnni"]\nskip = ["quantize"]\n'
        '[[variants]]\nname = "plain"\nprecision = "fp32"\nskip = ["fuse", "quantize"]\n'
    )
    result = compile_model(
        CompileOptions(model=DIGITS / "digits_cnn.onnx", target=str(target), output_dir=tmp_path / "out")
    )
    keys, _ = dev_keys(create=False)
    opened = bundle.open_bundle(
        result.bundle_dir,
        key=str(keys.path("encryption", "private")),
        trust=str(keys.path("signing", "public")),
        state_path=Path(tmp_path / "state.json"),
    )
    assert set(opened.models) == {"model.onnx", "variants/plain.onnx"}
    selection = select_session(opened.models, opened.manifest)
    host = detect_host()
    expected = "vnni" if host.has_isa("avx512_vnni|avx_vnni") else "plain"
    assert selection.variant.name == expected, selection.log
    assert selection.threads == host.usable_cores
    # The same choice through load_bundle (its _plan_session calls runtime_select) and `lepton run`.
    loaded = load_bundle(
        result.bundle_dir,
        key=str(keys.path("encryption", "private")),
        trust=str(keys.path("signing", "public")),
        state_path=tmp_path / "state.json",
    )
    assert loaded.selection.variant.name == expected and loaded.model_path == loaded.selection.variant.path
    forced = load_bundle(
        result.bundle_dir,
        key=str(keys.path("encryption", "private")),
        trust=str(keys.path("signing", "public")),
        state_path=tmp_path / "state.json",
        variant="vnni",
    )
    assert forced.model_path == "model.onnx"
    ran = run_cli("run", result.bundle_dir, "--inputs", DIGITS / "eval.npz", "--state", tmp_path / "state.json")
    assert ran.code == 0, ran.stderr
    assert f"chose variant {expected}" in ran.stderr and "threads" in ran.stderr
