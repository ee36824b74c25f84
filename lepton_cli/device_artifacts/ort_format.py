"""ONNX Runtime Mobile's artifacts: the ``.ort`` file, the reduced-build operator config, the NNAPI/Core ML check.

All three follow ONNX Runtime's own tools (``onnxruntime.tools``): ``convert_onnx_models_to_ort``'s
*runtime* optimization style, which ORT recommends when NNAPI or Core ML may take nodes (fixed-style
CPU fusions would hide ops those EPs support), for an Arm device (int8 QDQ kept as int8), with type
reduction in the config (``create_config_from_models``); and ``mobile_helpers.usability_checker``'s
partitioning per EP, on the model optimised to the basic level as ``check_onnx_model_mobile_usability``
does. The sessions are the tool's, made here so that they cost one copy of the weights, not four
(docs/decisions.md, "light_vgg19 → mobile peak"): the models are written with their weights in an
external file, which ORT maps instead of copying, and weight prepacking, a per-session copy for
faster kernels that a conversion never runs, is off. The files live in a private temporary folder,
removed before returning.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lepton_cli.model.external_data import write_weights_beside

ORT_SUFFIX = ".ort"
OPS_CONFIG = "required_operators_and_types.config"
RUNTIME = "ONNX Runtime Mobile (ORT format)"
# The converter's session settings for an Arm target; prepacking off changes no saved byte, only the session's memory.
_CONVERT_ENTRIES = {"session.qdqisint8allowed": "1", "session.disable_prepacking": "1"}
# The converter's own exclusion at optimization level "all" for a non-x86 platform (NCHWc is an AVX layout).
_DISABLED_OPTIMIZERS = ["NchwcTransformer"]


@dataclass
class OrtConversion:
    files: dict[str, bytes]  # bundle path -> .ort bytes
    ops_config: bytes  # required_operators_and_types.config for a reduced-operator build


def ort_path(onnx_path: str) -> str:
    return onnx_path[: -len(".onnx")] + ORT_SUFFIX if onnx_path.endswith(".onnx") else onnx_path + ORT_SUFFIX


@contextlib.contextmanager
def written(models: dict[str, bytes]) -> Iterator[dict[str, Path]]:
    """Each model (bundle path -> bytes) written once, for the conversion and the usability check, in a private
    folder removed on exit: weights in a file beside it, which ORT maps instead of copying."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="lepton-ort-src-") as tmp:
        yield {
            path: write_weights_beside(onnx.load_from_string(data), Path(tmp) / path) for path, data in models.items()
        }


def _session_options(entries: dict[str, str], saved_to: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the tool's level: no notes about unused initializers removed
    if saved_to is not None:
        saved_to.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(saved_to)
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return options


def _save_ort(source: Path, saved_to: Path, runtime_optimizations: str) -> None:
    """ORT's conversion of one model: runtime optimizations ``save``d (the shipped file) or ``apply``d (config only)."""
    import onnxruntime as ort

    entries = {
        **_CONVERT_ENTRIES,
        "session.save_model_format": "ORT",
        "optimization.minimal_build_optimizations": runtime_optimizations,
    }
    options = _session_options(entries, saved_to)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort.InferenceSession(
        str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=_DISABLED_OPTIMIZERS
    )


def convert(sources: dict[str, Path]) -> OrtConversion:
    """Each ONNX model (bundle path -> file from ``written``) as an ORT-format model ORT can open, and one operator
    config for all."""
    with tempfile.TemporaryDirectory(prefix="lepton-ort-") as tmp:
        root = Path(tmp)
        shipped: dict[str, Path] = {}
        for_config: list[Path] = []
        for path, source in sources.items():
            shipped[ort_path(path)] = root / "runtime" / ort_path(path)
            _save_ort(source, shipped[ort_path(path)], "save")
            # As the tool does: runtime optimizations may not be replayed, so the config needs the ops of both forms.
            for_config += [shipped[ort_path(path)], root / "applied" / ort_path(path)]
            _save_ort(source, for_config[-1], "apply")
        for ort_file in shipped.values():
            load_check(ort_file)
        ops_config = _ops_config(for_config, sorted(shipped))
        files = {path: ort_file.read_bytes() for path, ort_file in shipped.items()}
    return OrtConversion(files, ops_config)


def _ops_config(ort_files: list[Path], bundle_paths: list[str]) -> bytes:
    """``create_config_from_models``' operator config with type reduction, naming the bundle's files, not ours.

    Its loop holds two readers at once, each with two copies of its file (light_vgg19: +1.9 GB); one at a time here.
    """
    from onnxruntime.tools.ort_format_model import OperatorTypeUsageManager, OrtFormatModelProcessor

    required_ops: dict[str, dict[int, set[str]]] = {}
    usage = OperatorTypeUsageManager()
    for ort_file in ort_files:
        reader = OrtFormatModelProcessor(str(ort_file), required_ops, usage)
        reader.process()  # adds the file's ops and types to required_ops and usage
        del reader
    lines = [
        "# Generated by Lepton with onnxruntime.tools.convert_onnx_models_to_ort (runtime optimization style) from:",
        *(f"# - {path}" for path in bundle_paths),
        "# Use with ONNX Runtime's build.py --include_ops_by_config THIS_FILE --enable_reduced_operator_type_support",
    ]
    for domain in sorted(required_ops):
        for opset in sorted(required_ops[domain]):
            if ops := required_ops[domain][opset]:
                entries = [f"{op}{usage.get_config_entry(domain, op) or ''}" for op in sorted(ops)]
                lines.append(f"{domain};{opset};{','.join(entries)}")
    return ("\n".join(lines) + "\n").encode()


def _partitions(info: Any) -> dict[str, Any]:
    supported = {id(node) for group in info.supported_groups for node in group}
    return {
        "partitions": info.num_partitions,
        "nodes": info.num_nodes,
        "supported_nodes": info.num_supported_nodes,
        "partition_sizes": [len(group) for group in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
        "suitability": info.suitability().name,
        "_supported_ids": supported,
    }


def mobile_usability(source: Path) -> dict[str, Any]:
    """ORT's NNAPI / Core ML partitioning of the model (a file from ``written``; basic-level optimised, as its
    checker does), per EP."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lepton-usability-") as tmp:
        optimised = Path(tmp) / "model.basic.onnx"
        # optimize_model's session (basic level, weights written to an external file), without prepacking.
        entries = {
            "session.optimized_model_external_initializers_file_name": "model.basic.data",
            "session.disable_prepacking": "1",
        }
        options = _session_options(entries, optimised)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        # The checker reads initializer names, not values: leaving the weights on disk spares two copies of them
        # (ORT's ModelProtoWithShapeInfo loads them and shape inference copies the model; light_vgg19 +2.6 GB).
        model = onnx.shape_inference.infer_shapes(onnx.load(optimised, load_external_data=False), strict_mode=True)
    return partitions_per_ep(model)


def partitions_per_ep(model: Any) -> dict[str, Any]:
    """ORT's NNAPI / Core ML partitioning of a shape-inferred model, per EP, with the op types left on the CPU."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    checks = {
        "NNAPI": lambda m: uc.check_nnapi_partitions(m, True),
        "CoreML NeuralNetwork": lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_neuralnetwork_ops.md"),
        "CoreML MLProgram": lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_mlprogram_ops.md"),
    }
    result: dict[str, Any] = {"tool": "onnxruntime.tools.mobile_helpers.usability_checker", "eps": {}}
    for ep, check in checks.items():
        entry = _partitions(check(model))
        supported = entry.pop("_supported_ids")
        on_cpu = Counter(node.op_type for node in model.graph.node if id(node) not in supported)
        entry["cpu_ops"] = dict(sorted(on_cpu.items()))
        result["eps"][ep] = entry
    return result


def load_check(ort_file: Path) -> None:
    """Refuse a .ort file ONNX Runtime cannot open (what the device would hit first)."""
    import onnxruntime as ort

    # Weights used in place from the file's bytes, unpacked: opening the file is the check, not running it.
    entries = {
        "session.load_model_format": "ORT",
        "session.use_ort_model_bytes_directly": "1",
        "session.use_ort_model_bytes_for_initializers": "1",
        "session.disable_prepacking": "1",
    }
    ort.InferenceSession(str(ort_file), _session_options(entries), providers=["CPUExecutionProvider"])
