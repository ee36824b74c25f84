"""``[[variants]]`` in target files: each variant is the pipeline with passes skipped or re-parameterised, validated on load."""
from __future__ import annotations

import pytest

from lepton_cli.errors import BadInputError
from lepton_cli.targets import load_target

BASE = 'extends = "cpu-avx"\ndescription = "variants test"\n'


def write(tmp_path, body: str):
    path = tmp_path / "t.toml"
    path.write_text(BASE + body)
    return str(path)


def test_no_variants_is_the_whole_pipeline_and_hash_unchanged():
    target = load_target("cpu-avx")
    assert target.variants == [] and "variants" not in target.to_dict()


def test_variants_skip_and_override(tmp_path):
    target = load_target(write(tmp_path, '''
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
'''))
    main, fp32 = target.variants
    assert main.requires_isa == ["avx2", "avx512_vnni|avx_vnni"]
    fuse = next(s for s in main.passes if s.name == "fuse")
    assert fuse.params.fold_constants is False and fuse.params.fuse_norms is False  # variant on top of pass_params
    assert "fuse" not in [s.name for s in fp32.passes] and len(fp32.passes) == len(target.passes) - 1
    assert next(s for s in target.passes if s.name == "fuse").params.fold_constants is True  # target itself untouched
    assert target.for_variant(fp32).passes == fp32.passes
    assert [v["name"] for v in target.to_dict()["variants"]] == ["main", "fp32"]
    assert target.sha256 != load_target("cpu-avx").sha256


@pytest.mark.parametrize("body, path_part", [
    ('[[variants]]\nname = "a"\n', "missing key variants[0].precision"),
    ('[[variants]]\nname = "a"\nprecision = "int4"\n', "variants[0].precision"),
    ('[[variants]]\nname = "A b"\nprecision = "fp32"\n', "variants[0].name"),
    ('[[variants]]\nname = "a"\nprecision = "fp32"\ncolour = 1\n', "variants[0].colour"),
    ('[[variants]]\nname = "a"\nprecision = "fp32"\nskip = ["quantise"]\n', "variants[0] (a).skip[0]"),
    ('[[variants]]\nname = "a"\nprecision = "fp32"\n[[variants]]\nname = "a"\nprecision = "fp16"\n', "variants[1] (a).name"),
    ('[[variants]]\nname = "a"\nprecision = "fp32"\n[variants.pass_params.prune]\nx = 1\n', "variants[0] (a).pass_params.prune"),
    ('[[variants]]\nname = "a"\nprecision = "fp32"\nskip = ["fuse"]\n[variants.pass_params.fuse]\nfold_constants = false\n',
     "variants[0] (a).pass_params.fuse"),
    ('[[variants]]\nname = "a"\nprecision = "fp32"\n[variants.pass_params.fuse]\nfold_constants = 3\n',
     "variants[0] (a).pass_params: passes[0] (fuse).fold_constants"),
    ('variants = "int8"\n', "variants must be an array"),
])
def test_bad_variants_name_the_key_path(tmp_path, body, path_part):
    with pytest.raises(BadInputError) as err:
        load_target(write(tmp_path, body))
    assert path_part in err.value.message, err.value.message


def test_builtin_variants_validate():
    """Whatever variants the builtin targets declare load, and their skips leave a non-empty pipeline."""
    from lepton_cli.targets import BUILTIN_TARGETS

    for name in BUILTIN_TARGETS:
        for variant in load_target(name).variants:
            assert variant.passes and variant.why, f"{name}: variant {variant.name} needs passes and a why"
