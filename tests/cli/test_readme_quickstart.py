"""The README's quick-start commands, run exactly as written (a newcomer's first ten minutes)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
from conftest import REPO

QUICKSTART = re.compile(r"<!-- quickstart -->\s*```(?:sh|bash|console)?\n(.*?)```", re.S)


def quickstart_commands() -> list[str]:
    block = QUICKSTART.search((REPO / "README.md").read_text(encoding="utf-8"))
    assert block, "README.md has no <!-- quickstart --> code block"
    lines = [line.split(" #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_quickstart_runs_as_written(tmp_path):
    commands = quickstart_commands()
    assert [c.split()[1] for c in commands] == ["keys", "compile", "verify", "run"]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "LEPTON_HOME": str(tmp_path / "home"), "NO_COLOR": "1"}
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "lepton"
        done = subprocess.run(
            [sys.executable, "-m", "lepton_cli", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        assert "Traceback" not in done.stderr
    # what the quick start promises: a bundle, and the run's outputs for every eval sample
    bundle = next((tmp_path / "out").glob("*.lepton"))
    assert (bundle / "manifest.json").is_file() and (bundle / "model.sig").is_file()
    report = json.loads((bundle / "report.json").read_text())
    assert report["accuracy"]["measured"]
    outputs = np.load(tmp_path / "out" / "logits.npz")
    labels = np.load(REPO / "examples" / "digits" / "eval.npz")["labels"]
    logits = outputs[list(outputs.keys())[0]]
    assert logits.shape == (len(labels), 10)
    assert np.mean(np.argmax(logits, axis=1) == labels) > 0.95
