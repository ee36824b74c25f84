"""``lepton compile`` exactly as the CLI runs it, in a child process the sweep can time and measure.

    python -m benchmarks.corpus.compile_child [--save-model PATH] -- MODEL --target T [compile options]

With ``--save-model`` the compiled (decrypted) ONNX bytes are also written to PATH, so a benchmark can
score the model the bundle holds without a key round trip.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    save = None
    if argv and argv[0] == "--save-model":
        save, argv = Path(argv[1]), argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    from lepton_cli.cli import main as lepton_main
    from lepton_cli.commands import compile as compile_cmd

    if save is not None:
        original = compile_cmd.compile_model

        def compile_and_keep(*args, **kwargs):
            result = original(*args, **kwargs)
            save.write_bytes(result.model_bytes)
            return result

        compile_cmd.compile_model = compile_and_keep
    lepton_main(["compile", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
