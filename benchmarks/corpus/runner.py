"""Run a model on a corpus .npz one sample at a time (the batch of one it was compiled for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .metrics import Outputs


def session(model: str | Path | bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per sample: row i of each input array, as a batch of one, in the dtype the session expects."""
    names = [i.name for i in sess.get_inputs()]
    count = len(arrays[names[0]])
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))
              if "float" in i.type else None for i in sess.get_inputs()}
    out = []
    for index in range(count):
        feed = {}
        for name in names:
            value = arrays[name][index:index + 1]
            feed[name] = value.astype(dtypes[name]) if dtypes[name] is not None and value.dtype != dtypes[name] else value
        out.append(feed)
    return out


def run_all(sess: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> Outputs:
    return [sess.run(None, feed) for feed in feeds(sess, arrays)]
