"""Native libraries' own writes to file descriptor 2 (TensorFlow's logs, onnxsim's folding notes), kept out of the
CLI's stderr, where only Lepton's one-line diagnostics belong."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def captured_stderr() -> Iterator[Any]:
    """Redirect fd 2 into a temporary file for the block; yields that file (read it to keep what was written)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
