"""ONNX Runtime helpers shared by the pipeline checks, quantization, benchmarks and ``run``."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterable

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from lepton_cli.model.external_data import current_folder, has_external
from lepton_cli.model.shapes import TensorSig, graph_inputs

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Sessions Lepton does not create (ORT's quantization tools, a decoder Loop's shape checks) log warnings such as
# "Removing initializer ..." to stderr by the hundred: errors only, process-wide; they still reach Python as exceptions.
ort.set_default_logger_severity(3)
# What makes ORT replay the optimizations saved in a runtime-style .ort on the nodes no EP took.
REPLAY_OPTIMIZATIONS = "session.enable_saved_runtime_optimizations"


def make_session(
    model: onnx.ModelProto | bytes,
    *,
    opt_level: str = "disable",
    threads: int = 1,
    providers: Iterable[str] = ("CPUExecutionProvider",),
    arena: bool = True,
    prepack: bool = True,
) -> ort.InferenceSession:
    """An inference session from an in-memory model with fixed, recorded settings (deterministic by default).

    External tensors are read by ONNX Runtime itself: from the compile's weights folder for a proto
    (``lepton_cli.model.external_data``), from the in-memory files of a ``ModelBytes`` (a decrypted bundle).
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = OPT_LEVELS[opt_level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors reach Python as exceptions; ORT would also print them in red
    if not prepack:  # a second, kernel-ordered copy of each MatMul/Gemm weight: worth it only over many runs
        options.add_session_config_entry("session.disable_prepacking", "1")
    if isinstance(model, bytes):
        files = getattr(model, "external_files", None)
        if files:
            names = list(files)
            options.add_external_initializers_from_files_in_memory(
                names, [files[n] for n in names], [len(files[n]) for n in names]
            )
        blob = model
    else:
        read_external_from_folder(options, model)
        blob = model.SerializeToString()
    return new_session(blob, options, list(providers))


def read_external_from_folder(options: ort.SessionOptions, model: onnx.ModelProto) -> None:
    """Let ONNX Runtime read the model's external tensors from the compile's weights folder (one copy, no protobuf)."""
    if has_external(model):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(current_folder()))


_STDOUT_SWAP = threading.Lock()  # sys.stdout is process-wide: unserialised swaps from two threads left it on stderr


def new_session(blob: bytes, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    """``InferenceSession`` whose Python-level notices go to stderr: when an execution provider fails to
    initialise (e.g. TensorRT libraries missing beside onnxruntime-gpu) ORT *prints*
    "EP Error ... Falling back" to stdout, which would corrupt a ``--json`` document there. The swap is
    serialised: the scorer opens sessions from several threads, and one thread restoring what another had
    swapped in left stdout on stderr for the rest of the compile (its --json document with it)."""
    with _STDOUT_SWAP, contextlib.redirect_stdout(sys.stderr):
        return ort.InferenceSession(blob, sess_options=options, providers=providers)


def random_feed(
    inputs: list[TensorSig],
    rng: np.random.Generator,
    dims: dict[str, list[int]] | None = None,
    values: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A reproducible random feed; dims must be static (or given in ``dims``); ``values`` fixes an input's
    value (``model_random_feed``: a scalar the model compares with a constant)."""
    feed = {}
    for sig in inputs:
        shape = (dims or {}).get(sig.name) or [d if isinstance(d, int) else 1 for d in sig.dims]
        if sig.name in (values or {}):
            feed[sig.name] = np.broadcast_to(np.asarray(values[sig.name], dtype=sig.dtype), shape).copy()
        elif np.issubdtype(sig.dtype, np.floating):
            feed[sig.name] = rng.uniform(-1.0, 1.0, size=shape).astype(sig.dtype)
        elif sig.dtype == np.bool_:
            feed[sig.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feed[sig.name] = rng.integers(0, 8, size=shape).astype(sig.dtype)
    return feed


def model_random_feed(
    model: onnx.ModelProto, rng: np.random.Generator, dims: dict[str, list[int]] | None = None
) -> dict[str, np.ndarray]:
    """``random_feed`` for ``model``'s inputs, with each integer/bool scalar input that the graph tests for
    equality with a constant set to that constant (``compared_constants``)."""
    return random_feed(graph_inputs(model), rng, dims, compared_constants(model))


_VALUE_KEEPING = (
    "Identity",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Gather",
    "Expand",
)  # of a one-element tensor


def compared_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per integer or bool scalar input, the first constant the graph compares it with (``Equal``).

    Such an input selects a branch: Silero VAD's ``sr`` (int64) runs its 16 kHz network when
    ``sr == 16000`` and the 8 kHz one otherwise, and random values in [0, 8) would always take the
    8 kHz branch, which fails on 16 kHz-sized inputs. The constant is the value the model was built for.
    """
    scalars = {
        sig.name
        for sig in graph_inputs(model)
        if not sig.dims and (np.issubdtype(sig.dtype, np.integer) or sig.dtype == np.bool_)
    }
    constants = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    source = {name: name for name in scalars}  # tensor -> the scalar input whose value it carries unchanged
    found: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type in _VALUE_KEEPING and node.input and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
        if node.op_type != "Equal" or len(node.input) != 2:
            continue
        for mine, other in (node.input, node.input[::-1]):
            if mine in source and source[mine] not in found and other in constants:
                value = onnx.numpy_helper.to_array(constants[other])
                if value.size == 1:
                    found[source[mine]] = value.reshape(())
    return found


def run_feeds(session: ort.InferenceSession, feeds: Iterable[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    return [session.run(None, feed) for feed in feeds]
