"""Run a model on a corpus .npz one sample at a time (the batch of one it was compiled for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .metrics import Outputs


def session(model: str | Path | bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = (
        3  # ddddocr's declared output shape is wrong ([1, T] for [T, 1, C]): ORT warns every run
    )
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per sample: row i as a batch of one, or entry i as a whole batch when the array has rank+1 (lepton_cli/samples/sample_set.py)."""
    inputs = sess.get_inputs()
    count = len(arrays[inputs[0].name])
    out = []
    for index in range(count):
        feed = {}
        for spec in inputs:
            arr = arrays[spec.name]
            value = arr[index] if arr.ndim == len(spec.shape) + 1 else arr[index : index + 1]
            feed[spec.name] = (
                value.astype(np.float32) if spec.type == "tensor(float)" and value.dtype != np.float32 else value
            )
        out.append(feed)
    return out


def run_all(sess: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> Outputs:
    return [sess.run(None, feed) for feed in feeds(sess, arrays)]
