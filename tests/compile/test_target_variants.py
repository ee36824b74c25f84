"""``[[variants]]`` in target files: each variant is the pipeline with passes skipped or re-parameterised, validated on load."""

from __future__ import annotations

import pytest

from lepton_cli.errors import BadInputError
from lepton_cli.pipeline.targets import load_target

BASE = 'extends = "cpu-avx"\ndescription = "variants test"\n'


def write(tmp_path, body: str):
    path = tmp_path / "t.toml"
    path.write_text(BASE + body)
    return str(path)


def test_no_variants_means_no_variants_key(tmp_path):
    """A target without [[variants]] resolves (and hashes) as before: no 'variants' key at all."""
    target = load_target(write(tmp_path, "variants = []\n"))
    assert target.variants == [] and "variants" not in target.to_dict()


def test_variants_skip_and_override(tmp_path):
    target = load_target(
        write(
            tmp_path,
            """
[pass_params.fuse]
fuse_norms = false

[[variants]]
name = "main"
precision = "int8"
requires_isa = ["avx2", "avx512_vnni|avx_vnni"]
[variants.pass_params.fuse]
fold_constants = false

[[variants]]
name = "fp32"
precision = "fp32"
why = "runs everywhere"
skip = ["fuse"]
""",
        )
    )
    main, fp32 = target.variants
    assert main.requires_isa == ["avx2", "avx512_vnni|avx_vnni"]
    fuse = next(s for s in main.passes if s.name == "fuse")
    assert fuse.params.fold_constants is False and fuse.params.fuse_norms is False  # variant on top of pass_params
    assert "fuse" not in [s.name for s in fp32.passes] and len(fp32.passes) == len(target.passes) - 1
    assert next(s for s in target.passes if s.name == "fuse").params.fold_constants is True  # target itself untouched
    assert target.for_variant(fp32).passes == fp32.passes
    assert [v["name"] for v in target.to_dict()["variants"]] == ["main", "fp32"]
    assert target.sha256 != load_target("cpu-avx").sha256


@pytest.mark.parametrize(
    "body, path_part",
    [
        ('[[variants]]\nname = "a"\n', "missing key variants[0].precision"),
        ('[[variants]]\nname = "a"\nprecision = "int4"\n', "variants[0].precision"),
        ('[[variants]]\nname = "A b"\nprecision = "fp32"\n', "variants[0].name"),
        ('[[variants]]\nname = "a"\nprecision = "fp32"\ncolour = 1\n', "variants[0].colour"),
        ('[[variants]]\nname = "a"\nprecision = "fp32"\nskip = ["quantise"]\n', "variants[0] (a).skip[0]"),
        (
            '[[variants]]\nname = "a"\nprecision = "fp32"\n[[variants]]\nname = "a"\nprecision = "fp16"\n',
            "variants[1] (a).name",
        ),
        (
            '[[variants]]\nname = "a"\nprecision = "fp32"\n[variants.pass_params.nonexistent]\nx = 1\n',
            "variants[0] (a).pass_params.nonexistent",
        ),
        (
            '[[variants]]\nname = "a"\nprecision = "fp32"\nskip = ["fuse"]\n[variants.pass_params.fuse]\nfold_constants = false\n',
            "variants[0] (a).pass_params.fuse",
        ),
        (
            '[[variants]]\nname = "a"\nprecision = "fp32"\n[variants.pass_params.fuse]\nfold_constants = 3\n',
            "variants[0] (a).pass_params: passes[0] (fuse).fold_constants",
        ),
        ('variants = "int8"\n', "variants must be an array"),
    ],
)
def test_bad_variants_name_the_key_path(tmp_path, body, path_part):
    with pytest.raises(BadInputError) as err:
        load_target(write(tmp_path, body))
    assert path_part in err.value.message, err.value.message


def test_builtin_variants_validate():
    """Whatever variants the builtin targets declare load, and their skips leave a non-empty pipeline."""
    from lepton_cli.pipeline.targets import BUILTIN_TARGETS

    for name in BUILTIN_TARGETS:
        for variant in load_target(name).variants:
            assert variant.passes and variant.why, f"{name}: variant {variant.name} needs passes and a why"


def test_compile_writes_every_variant_and_runtime_picks_by_host(tmp_path, monkeypatch):
    """A real compile with two variants: both models are written, described for the manifest, and the device choice
    follows the simulated host's ISA."""

    import numpy as np
    from conftest import DIGITS

    from lepton_cli.compile.compiler import CompileOptions, compile_model
    from lepton_cli.host.detect import HostInfo
    from lepton_cli.runtime.select import select_session

    target = write(
        tmp_path,
        """
[[variants]]
name = "fast"
precision = "fp32"
why = "fused graph; pretend it needs VNNI to exercise the choice"
requires_isa = ["avx512_vnni|avx_vnni"]
skip = ["quantize"]            # fp32 both: this test is about the variant mechanics

[[variants]]
name = "plain"
precision = "fp32"
why = "unfused fallback"
skip = ["fuse", "quantize"]
""",
    )
    from lepton_cli.compile import compiler

    written = {}
    real_write = compiler._write_output

    def capture(*args, **kwargs):  # the models handed to the bundle writer, in plaintext
        written.update(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(compiler, "_write_output", capture)
    result = compile_model(
        CompileOptions(
            model=DIGITS / "digits_cnn.onnx", target=target, output_dir=tmp_path / "out", eval=DIGITS / "eval.npz"
        )
    )
    assert set(written) == {"model.onnx", "variants/plain.onnx"}
    files = {p.relative_to(result.bundle_dir).as_posix() for p in result.bundle_dir.rglob("*") if p.is_file()}
    assert any(f.startswith("variants/plain.onnx") for f in files), files  # plain, or .enc once bundles encrypt
    meta = result.manifest_fields["variants"]
    assert [(v["name"], v["path"]) for v in meta] == [("fast", "model.onnx"), ("plain", "variants/plain.onnx")]
    assert all(v["peak_memory_mb"] > 0 for v in meta)
    report = result.report
    assert report["variants"] == meta and report["variant_builds"][0]["accuracy"]["measured"]
    assert "fuse" not in [s["name"] for s in report["variant_builds"][0]["pipeline"]]
    models = dict(written)
    assert models["model.onnx"] != models["variants/plain.onnx"]  # the skipped fuse pass made a difference

    def host(isa):
        return HostInfo(
            arch="x86_64",
            system="linux",
            cpu_model="sim",
            cores_physical=1,
            cores_logical=1,
            isa=isa,
            memory_total_mb=4096,
            memory_available_mb=2048,
            providers=("CPUExecutionProvider",),
        )

    with_vnni = select_session(models, result.manifest_fields, host=host(("avx2", "avx512_vnni")))
    without = select_session(models, result.manifest_fields, host=host(("avx2",)))
    assert (with_vnni.variant.name, without.variant.name) == ("fast", "plain")
    x = np.load(DIGITS / "eval.npz")
    feed_name = with_vnni.session.get_inputs()[0].name
    sample = x[feed_name][:1]
    a = with_vnni.session.run(None, {feed_name: sample})[0]
    b = without.session.run(None, {feed_name: sample})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # both variants compute the same function


def test_estimates_with_and_without_the_cost_model(monkeypatch):
    import onnx
    from conftest import DIGITS

    from lepton_cli.compile.variants import estimate, infer_precision
    from lepton_cli.evaluate import costmodel
    from lepton_cli.model.shapes import bind_input_shapes
    from lepton_cli.model.stats import collect_stats

    model = onnx.load(DIGITS / "digits_cnn.onnx")
    name = model.graph.input[0].name
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    model = bind_input_shapes(model, {name: dims})
    target = load_target("cpu-avx")
    weights_mb = collect_stats(model, with_macs=False).param_bytes / 2**20
    with_cm = estimate(model, target)
    assert with_cm["estimate_source"].startswith("costmodel") and with_cm["est_latency_ms"] > 0
    assert with_cm["peak_memory_mb"] > weights_mb * 0.99  # weights plus activations

    def broken(*args, **kwargs):
        raise KeyError("unknown op")

    monkeypatch.setattr(costmodel, "estimate", broken)
    plain = estimate(model, target)
    assert plain["est_latency_ms"] is None and plain["peak_memory_mb"] == round(weights_mb, 3)
    assert plain["estimate_source"].startswith("cost model failed (KeyError)")
    assert infer_precision(model) == "fp32"


def test_vnni_requirement_widens_when_quantize_used_reduce_range():
    from types import SimpleNamespace

    from lepton_cli.compile.variants import effective_isa

    reduced = [
        SimpleNamespace(name="fuse", summary={}),
        SimpleNamespace(name="quantize", summary={"reduce_range": True}),
    ]
    full = [SimpleNamespace(name="quantize", summary={"reduce_range": False})]
    wanted = ["avx512_vnni|avx_vnni|amx_int8"]
    assert effective_isa(wanted, reduced)[0] == ["avx512_vnni|avx_vnni|amx_int8|avx2"]
    assert effective_isa(wanted, full) == (wanted, None)
    assert effective_isa(["neon"], reduced) == (["neon"], None)  # nothing VNNI-related to widen
