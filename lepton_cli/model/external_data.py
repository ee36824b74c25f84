"""Weights kept in ONNX external data: read on demand, never the whole model in one protobuf.

A model whose tensors live in external data is compiled with those tensors left on disk: the
in-memory ``ModelProto`` holds the graph and references only (protobuf cannot hold 2 GiB), and
every reader of a weight goes through ``tensor_array``, which reads one tensor from the folder
set by ``weights_folder`` after the same confinement check as the loader. ONNX Runtime reads the
files itself (``ort.make_session``), so about one copy of the weights is in memory at a time.
Tensors a pass creates are ordinary in-memory tensors; the bundle writer streams the remaining
external ones into one data file beside the model (``bundle_payload``).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import helper, numpy_helper

from lepton_cli.errors import BadInputError, InternalError

# Most external data read into one protobuf (ORT's quantizers, a bundled model file): protobuf refuses
# 2 GiB, and a serialized copy of more would hold the weights twice over.
INLINE_LIMIT = 1 << 30
BUNDLE_INLINE_LIMIT = INLINE_LIMIT  # above it, a compiled model is bundled as graph + external data file
_folders: list[Path] = []


def use_weights_folder(folder: Path | None) -> Callable[[], None]:
    """Resolve external tensors against ``folder`` (the source model's folder) until the returned release is called."""
    if folder is None:
        return lambda: None
    _folders.append(Path(folder).resolve())
    depth = len(_folders)

    def release() -> None:
        del _folders[depth - 1 :]

    return release


@contextlib.contextmanager
def weights_folder(folder: Path | None) -> Iterator[None]:
    """``use_weights_folder`` for the length of a block."""
    release = use_weights_folder(folder)
    try:
        yield
    finally:
        release()


def current_folder() -> Path:
    if not _folders:
        raise InternalError("a tensor in external data was read outside a compile (no weights folder set)")
    return _folders[-1]


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors  # onnx's own walk over graphs, subgraphs, attributes

    return [t for t in _get_all_tensors(model) if is_external(t)]


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer) or bool(external_tensors(model))


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _span(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """(confined file, offset, length) of one external tensor in the current weights folder."""
    from lepton_cli.model.files import check_external_location

    entries = _entries(tensor)
    path = check_external_location(current_folder(), entries.get("location", ""), tensor.name)
    offset = int(entries.get("offset", 0) or 0)
    length = int(entries.get("length", 0) or 0) or path.stat().st_size - offset
    return path, offset, length


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held outside the protobuf (declared lengths; no file is read)."""
    total = 0
    for tensor in external_tensors(model):
        length = _entries(tensor).get("length")
        total += int(length) if length else _tensor_nbytes(tensor)
    return total


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize if tensor.dims else itemsize


_PLAIN_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
    }
)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` that reads external data from the weights folder, one tensor at a time."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = _span(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in _PLAIN_TYPES and sys.byteorder == "little" and count * dtype.itemsize == length:
        with path.open("rb") as handle:  # straight into the array: one copy of the tensor, not three
            value = np.fromfile(handle, dtype=dtype, count=count, offset=offset)
        if value.size != count:
            raise BadInputError(
                f"tensor {tensor.name!r}: external data ends early in {path.name}",
                "the external data file is truncated; re-export the model",
            )
        return value.reshape(tuple(tensor.dims))
    with path.open("rb") as handle:
        handle.seek(offset)
        raw = handle.read(length)
    if len(raw) != length:
        raise BadInputError(
            f"tensor {tensor.name!r}: external data ends early in {path.name}",
            "the external data file is truncated; re-export the model",
        )
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    del raw
    return numpy_helper.to_array(inline)


def inline_copy(model: onnx.ModelProto, why: str, limit: int | None = None) -> onnx.ModelProto:
    """A copy with every external tensor read in, for tools that take a whole protobuf (ORT's quantizers);
    exit 2 above ``limit`` (default ``INLINE_LIMIT``)."""
    limit = INLINE_LIMIT if limit is None else limit
    size = external_bytes(model)
    if size > limit:
        raise BadInputError(
            f"{why} needs the whole model in one protobuf, and its external data holds {size / 2**30:.2f} GiB "
            f"(limit {limit / 2**30:.2f} GiB)",
            "compile without --calib (int8 weight-only), or use a target whose quantize scheme is weight-only",
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_tensors(copy):
        tensor.CopyFrom(numpy_helper.from_array(tensor_array(tensor), tensor.name))
    return copy


def write_weights_beside(model: onnx.ModelProto, path: Path) -> Path:
    """``model`` at ``path`` with its weights in ``path.data`` (ONNX Runtime maps that file; a loader, and shape
    inference, read the graph alone); ``model``'s tensors are emptied into the file as it is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return path


def save_with_weights_beside(model: onnx.ModelProto, path: Path) -> None:
    """``write_weights_beside`` of a copy: ``model`` untouched; the one transient copy is gone when this returns."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    write_weights_beside(copy, path)


def structure_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external tensors are one-element placeholders: ``onnx.checker`` on an in-memory
    proto resolves external files against the working directory, so the graph is checked without them
    (their files were checked by path, and their ranges, when the model was loaded)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_tensors(copy):
        del tensor.external_data[:]
        del tensor.dims[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = bytes(helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    return copy


SHAPE_ONLY_BYTES = 64 << 10  # initializers above this are weights, never shape values that inference propagates


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    for desc, value in source.ListFields():
        if desc.name == skip:
            continue
        if desc.is_repeated:
            getattr(target, desc.name).extend(value)
        elif desc.type == desc.TYPE_MESSAGE:
            getattr(target, desc.name).CopyFrom(value)
        else:
            setattr(target, desc.name, value)


def shapes_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference: large initializers keep name, type and dims but not their bytes
    (as external references no one reads), so inference does not serialize the weights twice over."""
    light = onnx.ModelProto()
    _copy_fields(model, light, "graph")
    _copy_fields(model.graph, light.graph, "initializer")
    for tensor in model.graph.initializer:
        if is_external(tensor) or tensor.ByteSize() <= SHAPE_ONLY_BYTES:
            light.graph.initializer.append(tensor)
            continue
        stub = light.graph.initializer.add(
            name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, data_location=onnx.TensorProto.EXTERNAL
        )
        stub.external_data.add(key="location", value="(not read: shape inference only)")
    return light


def data_digests(model: onnx.ModelProto) -> dict[str, str]:
    """sha256 of each external data file the model references (location → digest), for provenance."""
    from lepton_cli.model.files import check_external_location, file_sha256

    locations = sorted({_entries(t).get("location", "") for t in external_tensors(model)})
    return {loc: file_sha256(check_external_location(current_folder(), loc, "(provenance)")) for loc in locations}


class ModelBytes(bytes):
    """A serialized model plus the in-memory external data files its tensors name by location
    (``ort.make_session`` hands them to ONNX Runtime; nothing is written to disk)."""

    external_files: dict[str, bytes | memoryview]

    def __new__(cls, graph: bytes, external_files: dict[str, bytes | memoryview] | None = None) -> "ModelBytes":
        blob = super().__new__(cls, graph)
        blob.external_files = dict(external_files or {})
        return blob


@dataclass
class ModelPayload:
    """A compiled model as the bundle stores it: the graph's bytes, and when its weights are too
    large for one protobuf, the spans of files whose concatenation is its external data file."""

    graph: bytes
    data_name: str | None = None  # the location every external tensor of ``graph`` names
    spans: list[tuple[Path | None, int, int]] = field(default_factory=list)  # (file or None: zeros, offset, length)

    @property
    def data_size(self) -> int:
        return sum(length for _, _, length in self.spans)

    def data_blocks(self, block: int = 1 << 20) -> Iterator[bytes]:
        for path, offset, length in self.spans:
            if path is None:  # alignment padding
                yield bytes(length)
                continue
            with path.open("rb") as handle:
                handle.seek(offset)
                left = length
                while left:
                    chunk = handle.read(min(block, left))
                    if not chunk:
                        raise BadInputError(
                            f"external data {path.name} ended early while bundling",
                            "the file changed during the compile; compile again",
                        )
                    left -= len(chunk)
                    yield chunk


def bundle_payload(model: onnx.ModelProto, plain_path: str, limit: int | None = None) -> ModelPayload:
    """The model's bundle form: one self-contained protobuf when it fits ``limit`` (default
    ``BUNDLE_INLINE_LIMIT``), else the graph plus ``<name>.data`` (its external tensors, 64-byte
    aligned, in graph order)."""
    limit = BUNDLE_INLINE_LIMIT if limit is None else limit
    if not has_external(model):
        return ModelPayload(serialize(model))
    if model.ByteSize() + external_bytes(model) <= limit:
        return ModelPayload(serialize(inline_copy(model, "bundling", limit)))
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    data_name = Path(plain_path).name + ".data"
    spans: list[tuple[Path | None, int, int]] = []
    offset = 0
    for tensor in external_tensors(graph):
        path, start, length = _span(tensor)
        pad = -offset % 64
        if pad:
            spans.append((None, 0, pad))
            offset += pad
        spans.append((path, start, length))
        del tensor.external_data[:]
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += length
    return ModelPayload(serialize(graph), data_name, spans)


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes: same inputs, byte-identical compiled model."""
    return model.SerializeToString(deterministic=True)


def model_weights_mb(model: onnx.ModelProto) -> float:
    """The model's size in MiB, its tensors held outside the protobuf included (what each extra session copy costs)."""
    return (model.ByteSize() + external_bytes(model)) / 2**20
