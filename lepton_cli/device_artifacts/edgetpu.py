"""The Edge TPU's documented model requirements, checked on a ``.tflite``; every CPU-fallback op named.

Source: Coral, "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro):
tensors quantized to 8 bits; sizes constant at compile time; parameters (e.g. bias) constant;
tensors 1-, 2- or 3-D, or with only the 3 innermost dimensions larger than 1; only the listed
operations. The Edge TPU compiler maps one contiguous run of supported ops from the start of the
graph: at the first op it cannot map, that op *and every op after it* run on the host CPU.
Parameters beyond the ~8 MB on-chip memory are streamed over the host link on every inference
(Coral, "Edge TPU Compiler": parameter data caching).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# TFLite builtin names of the ops in the Edge TPU's supported-operations table.
SUPPORTED = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "LSTM",
        "UNIDIRECTIONAL_SEQUENCE_LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "SQUARED_DIFFERENCE",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
    }
)
ON_CHIP_PARAM_BYTES = 8 * 1024 * 1024
SOURCE = "coral.ai/docs/edgetpu/models-intro (requirements and supported operations)"


def _problems(op: dict[str, Any], tensors: dict[int, dict[str, Any]], constants: set[int]) -> list[str]:
    name = op["op_name"]
    out: list[str] = []
    if name not in SUPPORTED:
        out.append(f"{name} is not an Edge TPU operation")
    for index in list(op["inputs"]) + list(op["outputs"]):
        if index < 0:
            continue
        t = tensors[index]
        dtype = np.dtype(t["dtype"])
        is_bias = dtype == np.int32 and index in constants
        float_feed = name == "QUANTIZE" and index in op["inputs"]  # the listed Quantize takes the float frame
        if dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) and not is_bias and not float_feed:
            out.append(f"tensor {t['name']} is {dtype.name}, not 8-bit quantized")
        shape = [int(d) for d in t["shape"]]
        if any(d < 0 for d in t.get("shape_signature", shape)):
            out.append(f"tensor {t['name']} has a dynamic shape")
        if (
            index not in constants and len(shape) > 3 and sum(1 for d in shape[:-3] if d > 1)
        ):  # filters are 4-D by design
            out.append(f"tensor {t['name']} {shape}: more than 3 dimensions larger than 1")
    return out


def check(interpreter: Any) -> dict[str, Any]:
    """Which ops of the (allocated) LiteRT interpreter's model the Edge TPU would run, and which fall back to the CPU."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = sorted(interpreter._get_ops_details(), key=lambda o: o["index"])  # execution order
    consumed = {i for o in ops for i in o["inputs"]}
    produced = {i for o in ops for i in o["outputs"]}
    constants = consumed - produced - {d["index"] for d in interpreter.get_input_details()}
    param_bytes = sum(
        int(np.prod(tensors[i]["shape"])) * np.dtype(tensors[i]["dtype"]).itemsize for i in constants if i in tensors
    )
    fallback: list[dict[str, Any]] = []
    first_bad: int | None = None
    for position, op in enumerate(ops):
        problems = _problems(op, tensors, constants)
        if problems and first_bad is None:
            first_bad = position
        if first_bad is not None:
            reason = (
                "; ".join(problems)
                if problems
                else f"after the first unmapped op ({ops[first_bad]['op_name']} #{first_bad})"
            )
            fallback.append({"index": position, "op": op["op_name"], "reason": reason})
    mapped = len(ops) - len(fallback)
    return {
        "source": SOURCE,
        "ops": len(ops),
        "edgetpu_ops": mapped,
        "cpu_ops": fallback,
        "op_counts": _counts(ops),
        "param_bytes": param_bytes,
        "params_streamed": param_bytes > ON_CHIP_PARAM_BYTES,
    }


def _counts(ops: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items()))


def summary(result: dict[str, Any]) -> str:
    cpu = result["cpu_ops"]
    named = ", ".join(f"#{c['index']} {c['op']}" for c in cpu[:8]) + (
        f" (+{len(cpu) - 8} more)" if len(cpu) > 8 else ""
    )
    return f"Edge TPU op check: {result['edgetpu_ops']}/{result['ops']} ops map to the Edge TPU" + (
        f"; on the CPU: {named}" if cpu else "; none fall back to the CPU"
    )
