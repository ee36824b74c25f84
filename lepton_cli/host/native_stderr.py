"""Native libraries' own writes to file descriptors 2 and 1 (TensorFlow's logs, onnxsim's folding notes and its
"simplification stopped because of timeout" on stdout), kept out of the CLI's streams, where only Lepton's own output
belongs (a CI job may parse its stdout)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def captured_fd(fd: int) -> Iterator[Any]:
    """Redirect ``fd`` into a temporary file for the block; yields that file (read it to keep what was written)."""
    for stream in (sys.stdout, sys.stderr):  # Python's buffered text first, or it lands in the file
        stream.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield sink
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def captured_stderr() -> contextlib.AbstractContextManager[Any]:
    """``captured_fd(2)``."""
    return captured_fd(2)
