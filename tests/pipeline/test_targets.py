"""Target profiles: every builtin validates, documents its numbers, and user files extend them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from lepton_cli.errors import BadInputError
from lepton_cli.pipeline.targets import BUILTIN_TARGETS, builtin_names, load_target

TARGET_DIR = Path(__file__).resolve().parents[2] / "targets"


def test_all_six_builtins_present_and_valid():
    assert set(BUILTIN_TARGETS) <= set(builtin_names())
    for name in BUILTIN_TARGETS:
        target = load_target(name)
        assert target.name == name
        assert target.passes and target.passes[0].name == "fuse"
        assert target.runtime.execution_providers[-1] == "CPUExecutionProvider"
        assert len(target.sha256) == 64


@pytest.mark.parametrize("name", BUILTIN_TARGETS)
def test_every_hardware_number_has_a_source_comment(name):
    """Each numeric hardware fact carries a comment on its line or the comment block just above it."""
    lines = (TARGET_DIR / f"{name}.toml").read_text().splitlines()
    section = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
            continue
        if section != "[hardware]" or not re.match(r"^[a-z_0-9]+\s*=\s*[0-9.]+\s*(#.*)?$", stripped):
            continue
        above = lines[index - 1].strip() if index else ""
        assert "#" in stripped or above.startswith("#"), f"{name}.toml:{index + 1}: {stripped!r} has no source comment"


@pytest.mark.parametrize("name", BUILTIN_TARGETS)
def test_every_pass_says_why(name):
    for step in load_target(name).passes:
        assert step.why, f"{name}: pass {step.name} has no 'why'"


def test_channel_alignment_per_issue():
    assert load_target("fpga").hardware.channel_alignment == 16
    assert load_target("tpu").hardware.channel_alignment == 8
    assert load_target("cuda").hardware.channel_alignment == 8


def test_user_file_extends_and_overrides(tmp_path):
    path = tmp_path / "my-board.toml"
    path.write_text(
        'extends = "edge-arm"\ndescription = "my board"\n[hardware]\nmemory_mb = 512\n'
        "[pass_params.fuse]\nfold_constants = false\n"
    )
    target = load_target(str(path))
    base = load_target("edge-arm")
    assert target.name == "my-board"
    assert target.description == "my board"
    assert target.hardware.memory_mb == 512
    assert target.hardware.peak_int8_tops == base.hardware.peak_int8_tops
    assert [s.name for s in target.passes] == [s.name for s in base.passes]
    assert target.passes[0].params.fold_constants is False
    assert target.sha256 != base.sha256


def test_extends_relative_file_and_cycle(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(BadInputError, match="extends"):
        load_target(str(tmp_path / "a.toml"))


@pytest.mark.parametrize(
    "body,message",
    [
        ('extends = "cpu-avx"\nbogus = 1\n', "unknown key 'bogus'"),
        ('extends = "cpu-avx"\n[runtime]\nopset_min = "13"\n', "runtime.opset_min"),
        ('extends = "cpu-avx"\n[runtime]\nopset_min = 30\n', "runtime.opset_min"),
        ('extends = "cpu-avx"\n[hardware]\npreferred_layout = "NCWH"\n', "hardware.preferred_layout"),
        ('extends = "cpu-avx"\n[hardware]\nchannel_alignment = 0\n', "hardware.channel_alignment"),
        ('extends = "cpu-avx"\n[[passes]]\nname = "fuse"\nfold = true\n', "unknown key passes[0] (fuse).fold"),
        ('extends = "cpu-avx"\n[[passes]]\nwhy = "no name"\n', "passes[0].name"),
        ('extends = "cpu-avx"\n[pass_params.prune_everything]\nratio = 1\n', "pass_params.prune_everything"),
        ('description = "x"\n', "missing key 'hardware'"),
    ],
)
def test_validation_names_the_key_path(tmp_path, body, message):
    path = tmp_path / "t.toml"
    path.write_text(body)
    with pytest.raises(BadInputError) as info:
        load_target(str(path))
    assert message in info.value.message


def test_builtin_tomls_parse_standalone():
    for path in TARGET_DIR.glob("*.toml"):
        assert "extends" not in tomllib.loads(path.read_text())


@pytest.mark.parametrize(
    "path", sorted((TARGET_DIR.parent / "examples" / "targets").glob("*.toml")), ids=lambda p: p.stem
)
def test_example_targets_load_and_validate(path):
    """Every target the README points users to loads with its parameters validated (extends resolved)."""
    target = load_target(str(path))
    assert target.name == path.stem and target.passes


def test_targets_cli_list_and_show(run_cli):
    listed = run_cli("targets", "list", "--json")
    assert listed.code == 0
    import json

    names = {t["name"] for t in json.loads(listed.stdout)["targets"]}
    assert set(BUILTIN_TARGETS) <= names
    shown = run_cli("targets", "show", "fpga")
    assert shown.code == 0 and "fuse" in shown.stdout and "channel_alignment" in shown.stdout
    assert run_cli("targets", "show", "nope").code == 2
