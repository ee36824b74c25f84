"""Safe loading and normalising of ONNX models.

Refuses (exit 2) what a hostile or broken file can do: non-ONNX or truncated bytes, external
data that escapes the model's folder (``..``, absolute paths, symlinks, hard links — ONNX Runtime
itself follows a hard link), and op domains outside an allowlist. Then upgrades the opset to the
target's range and binds dynamic dimensions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from lepton_cli.errors import BadInputError
from lepton_cli.model.external_data import INLINE_LIMIT, data_digests, has_external, structure_copy, weights_folder
from lepton_cli.model.files import check_external_location, file_sha256
from lepton_cli.model.opset_down import down_to_17

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_MAX_MODEL_BYTES = 2**31 - 1  # protobuf's own limit for one message


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    sha256: str  # of the model file itself (external data listed separately)
    file_size: int  # model file plus external data, bytes
    external_sha256: dict[str, str] = field(default_factory=dict)  # external data file (location) -> sha256
    weights_folder: Path | None = None  # set when external tensors stay on disk (lepton_cli.model.external_data)
    dropped_domains: list[str] = field(default_factory=list)  # opset imports outside the allowlist that no node used


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors  # onnx's own walk over graphs and subgraphs

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def _used_domains(model: onnx.ModelProto) -> set[str]:
    """Domains that a node uses: in the main graph, any subgraph (If/Loop/Scan bodies) or a local function."""
    used: set[str] = set()

    def walk(nodes) -> None:
        for node in nodes:
            used.add(node.domain or "")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                for sub in attr.graphs:
                    walk(sub.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return used


def _check_domains(model: onnx.ModelProto) -> list[str]:
    """Refuse ops from domains outside the allowlist; drop opset imports no node uses (returned, for a warning).

    Exporters declare domains they never use (Paddle2ONNX: "Paddle"; ORT's quantizer:
    "com.microsoft.nchwc", "ai.onnx.training", ...): only what a node runs can be unsafe or unsupported.
    """
    local_functions = {(f.domain, f.name) for f in model.functions}
    local_domains = {f.domain for f in model.functions}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if domain not in ALLOWED_DOMAINS and (domain, node.op_type) not in local_functions:
                raise BadInputError(
                    f"node {node.name or node.op_type!r} uses op {domain}::{node.op_type} from a domain outside the allowlist",
                    f"Lepton accepts ops from {', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))} and the model's own functions; "
                    "replace or remove custom ops before compiling",
                )
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    used = _used_domains(model)
    unused = [
        o.domain
        for o in model.opset_import
        if o.domain not in ALLOWED_DOMAINS and o.domain not in local_domains and o.domain not in used
    ]
    kept = [o for o in model.opset_import if o.domain not in unused]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS and opset.domain not in local_domains:
            raise BadInputError(
                f"model imports opset domain {opset.domain!r}, which is outside the allowlist",
                "export the model with standard ONNX ops",
            )
    return unused


def load_model(path: str | Path, *, keep_external: bool = False) -> LoadedModel:
    """Parse and check a model file and every external data location.

    ``keep_external``: external tensors stay on disk (read through ``lepton_cli.model.external_data`` with
    ``weights_folder(loaded.weights_folder)``); otherwise they are read into the proto, which protobuf
    limits to 2 GiB.
    """
    path = Path(path)
    model, size = _parse(path)
    dropped_domains = _check_domains(model)
    model_dir = path.parent
    total = size
    external = _external_tensors(model)
    for tensor in external:
        total += _check_external_range(model_dir, tensor)
    if external and not keep_external:
        if total > INLINE_LIMIT:
            raise BadInputError(
                f"{path} and its external data hold {total / 2**30:.2f} GiB, more than this command reads into memory",
                "use `lepton compile`, which keeps large weights on disk",
            )
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(model_dir))
        except Exception as exc:  # onnx raises several types here; all mean the same to the user
            raise BadInputError(
                f"cannot load external data of {path}: {exc}", "check the external data files"
            ) from None
    try:
        # By path when weights stay outside: the checker then resolves external files beside the model.
        onnx.checker.check_model(str(path) if external and keep_external else model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise BadInputError(
            f"{path} fails ONNX validation: {first}", "re-export the model, or fix it with onnx.checker's message"
        ) from None
    kept = bool(external) and keep_external
    digests = {}
    if kept:
        with weights_folder(model_dir):
            digests = data_digests(model)
    return LoadedModel(
        model=model,
        path=path,
        sha256=file_sha256(path),
        file_size=total,
        external_sha256=digests,
        weights_folder=model_dir.resolve() if kept else None,
        dropped_domains=dropped_domains,
    )


def _parse(path: Path) -> tuple[onnx.ModelProto, int]:
    """The model file's proto (external data not read) and its size; exit 2 for anything but ONNX."""
    if not path.exists():
        raise BadInputError(f"model file {path} does not exist", "check the path")
    if path.is_dir():
        raise BadInputError(f"{path} is a folder, not an .onnx file", "pass the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(f"{path} is empty", "re-export the model")
    if size > _MAX_MODEL_BYTES:
        raise BadInputError(f"{path} is larger than 2 GiB", "save large weights as ONNX external data")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror}", "check the file's permissions") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise BadInputError(
            f"{path} is not an ONNX model (it does not parse as ONNX protobuf; truncated or another format)",
            "pass a complete .onnx file exported by your framework",
        ) from None
    if not model.HasField("graph") or not model.graph.output or model.ir_version == 0 or not model.opset_import:
        raise BadInputError(
            f"{path} is not a complete ONNX model (missing graph, outputs, IR version or opset; truncated?)",
            "pass a complete .onnx file exported by your framework",
        )
    return model, size


def _check_external_range(model_dir: Path, tensor: onnx.TensorProto) -> int:
    """Bytes one external tensor occupies, after checking its location and range."""
    entries = {e.key: e.value for e in tensor.external_data}
    resolved = check_external_location(model_dir, entries.get("location", ""), tensor.name)
    try:
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0) or 0)
    except ValueError:
        raise BadInputError(
            f"tensor {tensor.name!r}: external data offset/length are not integers", "re-export the model"
        ) from None
    file_size = resolved.stat().st_size
    if offset < 0 or length < 0 or offset + length > file_size:
        raise BadInputError(
            f"tensor {tensor.name!r}: external data range {offset}+{length} is past the end of {entries['location']!r} ({file_size} bytes)",
            "the external data file is truncated; re-export the model",
        )
    return length or (file_size - offset)


def model_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 0


def _channel_prelu_slopes(model: onnx.ModelProto) -> onnx.ModelProto:
    """PRelu before opset 7 applies a [C] slope along axis 1; from 7 it broadcasts from the last axis (the converter
    keeps [C]), so the slope becomes [C, 1, ...] first. A copy when anything changes."""
    inits = {t.name: t for t in model.graph.initializer}
    shaped = [*model.graph.input, *model.graph.value_info]
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in shaped if v.type.tensor_type.HasField("shape")}
    nodes = [n for n in model.graph.node if n.op_type == "PRelu" and len(n.input) > 1 and n.input[1] in inits]
    todo = {n.input[1]: ranks.get(n.input[0], 0) for n in nodes if list(inits[n.input[1]].dims) not in ([], [1])}
    todo = {name: rank for name, rank in todo.items() if rank > 2 and len(inits[name].dims) == 1}
    if not todo:
        return model
    model = copy.deepcopy(model)
    for tensor in model.graph.initializer:
        if tensor.name in todo:
            tensor.dims.extend([1] * (todo[tensor.name] - 2))  # same element order: no data moves
    for value in model.graph.input:  # IR < 4 lists initialisers as inputs too
        if value.name in todo and len(value.type.tensor_type.shape.dim) == 1:
            for _ in range(todo[value.name] - 2):
                value.type.tensor_type.shape.dim.add().dim_value = 1
    return model


def upgrade_opset(model: onnx.ModelProto, opset_min: int, opset_max: int) -> tuple[onnx.ModelProto, str | None]:
    """Bring the default-domain opset into [opset_min, opset_max]; returns (model, note or None)."""
    current = model_opset(model)
    if opset_min <= current <= opset_max:
        return model, None
    if current == 18 and opset_max == 17:  # PyTorch's dynamo export for a TFLite/DPU runtime
        lowered, why = down_to_17(model)
        if lowered is not None:
            return lowered, f"opset 18 -> 17 for the target's runtime ({why} rewritten to their opset-17 form)"
    if current > opset_max:
        reason = f" ({why} has no opset-17 form)" if current == 18 and opset_max == 17 else ""
        raise BadInputError(
            f"model uses opset {current}, but the target's runtime supports at most opset {opset_max}{reason}",
            "re-export the model at a lower opset, or raise runtime.opset_max in your target file",
        )
    if current < 7:
        model = _channel_prelu_slopes(model)
    try:
        upgraded = version_converter.convert_version(model, opset_min)
        # The converter keeps the ir_version; the new opset needs its own IR (ORT too), and IR < 4 rejects the
        # initialisers the converter adds (e.g. Pad's pads) for not also being graph inputs.
        upgraded.ir_version = max(
            upgraded.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset_min)])
        )
        onnx.checker.check_model(structure_copy(upgraded) if has_external(upgraded) else upgraded)
    except Exception as exc:  # the converter raises RuntimeError/ValidationError/IndexError for gaps
        raise BadInputError(
            f"cannot upgrade the model from opset {current} to {opset_min}: {str(exc).splitlines()[0][:200]}",
            f"re-export the model at opset {opset_min} or newer",
        ) from None
    return upgraded, f"upgraded opset {current} → {opset_min}"
