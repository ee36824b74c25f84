"""Run a model on a corpus .npz one sample at a time (the batch of one it was compiled for)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lepton_cli.evaluate.accuracy import EXACT_INTEGER, scoring_opt_level
from lepton_cli.host.detect import detect_host
from lepton_cli.model.io_contract import adapt_feed, restore_output

from .metrics import Outputs


@functools.cache
def _saturating_host() -> bool:
    """Whether this host's x86 int8 kernels saturate (no VNNI) where a VNNI target's do not: held-out accuracy is
    then read with ORT's basic level (QDQ unfused, exact integer arithmetic), as the compiler's own scorer does."""
    return scoring_opt_level(["avx512_vnni"], list(detect_host().isa)) == EXACT_INTEGER


def session(model: str | Path | bytes, threads: int = 1, timed: bool = False) -> ort.InferenceSession:
    """A session for accuracy runs, or as deployed (``timed``: every graph optimisation, for latency)."""
    options = ort.SessionOptions()
    if not timed and _saturating_host():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
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


def compiled_outputs(candidate: bytes, source_feeds: list[dict[str, np.ndarray]]) -> tuple[Outputs, dict]:
    """A compiled model's outputs on feeds in the source's form, read back in the source's form, and its first feed.

    A Lepton model may declare NHWC or integer I/O (adapt_feed/restore_output); for other models both are no-ops.
    """
    model = onnx.load_from_string(candidate)
    sess = session(candidate)
    names = [o.name for o in model.graph.output]
    candidate_feeds = [adapt_feed(model, feed) for feed in source_feeds]
    outputs = [[restore_output(model, n, v) for n, v in zip(names, sess.run(None, feed))] for feed in candidate_feeds]
    return outputs, candidate_feeds[0]
