"""Everything a compile's output depends on, as digests: the provenance statement's materials and the build cache's key.

One function for both, so what the cache keys on is exactly what a bundle's provenance lets a user prove.
Host-dependent measurements (latency) are recorded in the report, not keyed: they never change the model.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from lepton_cli import __version__
from lepton_cli.model.files import file_sha256

LIBRARIES = ("onnx", "onnxruntime", "onnxsim", "numpy")
# Options that change the compiled model, the report or whether the compile passes; keys, versions
# and output paths only change the seal, which a cached compile re-does.
KEYED_OPTIONS = (
    "input_shapes",
    "preprocess",
    "max_accuracy_drop",
    "eval_metric",
    "seed",
    "bench",
    "bench_seconds",
    "max_latency_ratio",
    "baseline_tolerance_pct",
    "enforce_budgets",
)


_DIGESTS: dict[
    tuple[str, int, int], str
] = {}  # (path, mtime, size) -> sha256: a build hashes each input once, not once per target


def sha256_file(path: Path) -> str:
    info = path.stat()
    memo = (str(path.resolve()), info.st_mtime_ns, info.st_size)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = file_sha256(path)
    return _DIGESTS[memo]


def sha256_path(path: Path) -> str:
    """A file's sha256, or for a folder (an image set) the sha256 of its sorted ``relative-path digest`` lines."""
    if not path.is_dir():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def model_files(path: Path) -> list[dict[str, str]]:
    """The model file and each external data file it names, with their sha256 (external names as written)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    files = [{"name": path.name, "sha256": sha256_file(path)}]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unparsable model fails later, in load_model, with its own message
        return files
    locations = sorted(
        {
            e.value
            for t in _get_all_tensors(proto)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data
            if e.key == "location"
        }
    )
    for location in locations:
        candidate = path.parent / location
        if candidate.is_file() and ".." not in Path(location).parts:  # unsafe locations are refused by load_model
            files.append({"name": location, "sha256": sha256_file(candidate)})
    return files


def library_versions() -> dict[str, str]:
    versions = {"lepton-cli": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def compile_inputs(options: Any, target: Any) -> dict[str, Any]:
    """The digests and parameters of one compile (``options``: CompileOptions; ``target``: the resolved Target)."""
    data = {
        role: {"name": Path(getattr(options, role)).name, "sha256": sha256_path(Path(getattr(options, role)))}
        for role in ("calib", "eval")
        if getattr(options, role) is not None
    }
    baseline = options.baseline
    return {
        "model": model_files(Path(options.model)),
        "target": {"name": target.name, "sha256": target.sha256},
        "data": data,
        "baseline_sha256": sha256_file(Path(baseline)) if baseline is not None else None,
        "options": {name: getattr(options, name) for name in KEYED_OPTIONS},
        "pipeline": {"passes": target.resolved.get("passes", []), "variants": target.resolved.get("variants", [])},
        "versions": library_versions(),
    }
