"""The Ray engine: each compile is a Ray task that declares its CPUs and memory; inputs travel by content hash.

The driver puts each distinct input file (model, external data, calibration/evaluation data, baseline)
into Ray's object store once, keyed by its sha256, however many compiles use it; a task writes the
files it needs into a per-node folder named by that hash (reused by later tasks on the node) and
compiles from there. Tasks return models and reports; the driver seals and writes every bundle.
``ray`` is an optional extra: ``pip install 'lepton-cli[ray]'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lepton_cli.build.worker import Outcome, run_compile
from lepton_cli.compile.inputs import sha256_file
from lepton_cli.errors import BadInputError

BASE_MEMORY = 512 * 2**20  # an idle worker with onnx, onnxruntime and numpy loaded
MODEL_FACTOR = 12  # source, working copies, per-pass check sessions and the quantize search's candidates
DATA_FACTOR = 3  # loaded samples plus one batch of activations per session


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInputError(
            "--ray needs the ray package, which is not installed",
            "pip install ray (Lepton's optional ray extra), or drop --ray to use the local process pool",
        ) from None
    return ray


def memory_estimate(files: dict[str, list[tuple[str, str, int]]]) -> int:
    """Bytes a compile needs: a base, plus multiples of its model and data sizes (see the constants)."""
    model = sum(size for _, _, size in files.get("model", []))
    data = sum(size for role in ("calib", "eval") for _, _, size in files.get(role, []))
    return BASE_MEMORY + MODEL_FACTOR * model + DATA_FACTOR * data


def _role_files(path: Path, role: str) -> list[tuple[str, Path]]:
    """(name as the task must see it, local file) for one input; a folder keeps its layout under its own name."""
    if path.is_dir():
        return [(f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in sorted(path.rglob("*")) if p.is_file()]
    files = [(path.name, path)]
    if role == "model":
        from lepton_cli.compile.inputs import model_files

        files += [(f["name"], path.parent / f["name"]) for f in model_files(path)[1:]]
    return files


def _materialise(files: dict[str, list[tuple[str, str, int]]], blobs: dict[str, bytes]) -> dict[str, Path]:
    """On the task's node: write each role's files under a folder named by their digests; return role -> path."""
    out = {}
    for role, entries in files.items():
        digest = hashlib.sha256("".join(f"{n} {s}\n" for n, s, _ in entries).encode()).hexdigest()
        root = Path(tempfile.gettempdir()) / "lepton-ray-inputs" / digest
        if not (root / ".complete").exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=root.parent))
            for name, sha, _ in entries:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(blobs[sha])
            (staging / ".complete").touch()
            try:
                os.rename(staging, root)
            except OSError:  # another task on this node wrote the same inputs first
                shutil.rmtree(staging, ignore_errors=True)
        out[role] = root / entries[0][0].split("/")[0]
    return out


def _remote_compile(
    index: int,
    options: Any,
    target: Any,
    files: dict[str, list[tuple[str, str, int]]],
    refs: dict[str, Any],
    cores: int,
) -> Outcome:
    import ray

    blobs = dict(zip(refs, ray.get(list(refs.values()))))
    local = _materialise(files, blobs)
    options = dataclasses.replace(options, **{role: path for role, path in local.items()})
    return run_compile(index, options, target, cores)


class RayEngine:
    name = "ray"

    def __init__(self, address: str | None, cpus_per_compile: int = 1):
        self.ray = import_ray()
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
            if address == "local":
                self.ray.init(**kwargs)
            else:
                self.ray.init(address=address or "auto", **kwargs)
        self.cpus = cpus_per_compile
        self._task = self.ray.remote(_remote_compile)
        self._refs: dict[str, Any] = {}  # sha256 -> object ref, one per distinct file
        self._pending: dict[Any, int] = {}
        self._uses: dict[str, int] = {}  # sha256 -> pending tasks that need it: freed from the object store at zero
        self._needs: dict[Any, list[str]] = {}
        self.shipped_bytes = 0
        resources = self.ray.cluster_resources()
        self._memory_cap = int(resources.get("memory", 0)) or None
        self._cluster_cpus = resources.get("CPU", 0)
        self.slots = max(2, 2 * int(self._cluster_cpus // cpus_per_compile))

    def describe(self) -> str:
        return f"Ray cluster ({self._cluster_cpus:g} CPUs), {self.cpus} CPU(s) per compile"

    def _ship(self, options: Any) -> tuple[dict[str, list[tuple[str, str, int]]], dict[str, Any]]:
        files: dict[str, list[tuple[str, str, int]]] = {}
        refs = {}
        for role in ("model", "calib", "eval", "baseline"):
            path = getattr(options, role)
            if path is None:
                continue
            entries = []
            for name, local in _role_files(Path(path), role):
                sha = sha256_file(local)
                if sha not in self._refs:
                    data = local.read_bytes()
                    self._refs[sha] = self.ray.put(data)
                    self.shipped_bytes += len(data)
                refs[sha] = self._refs[sha]
                entries.append((name, sha, local.stat().st_size))
            files[role] = entries
        return files, refs

    def submit(self, index: int, options: Any, target: Any) -> None:
        files, refs = self._ship(options)
        memory = memory_estimate(files)
        if self._memory_cap:
            memory = min(memory, self._memory_cap)
        ref = self._task.options(num_cpus=self.cpus, memory=memory, max_retries=1).remote(
            index, options, target, files, refs, self.cpus
        )
        self._pending[ref] = index
        self._needs[ref] = list(refs)
        for sha in refs:
            self._uses[sha] = self._uses.get(sha, 0) + 1

    def _release(self, ref: Any) -> None:
        for sha in self._needs.pop(ref, []):
            self._uses[sha] -= 1
            if not self._uses[sha]:
                del self._uses[sha], self._refs[sha]

    def running(self) -> set[int]:
        return set(self._pending.values())

    def done(self, timeout: float = 0.25) -> Iterator[Outcome]:
        if not self._pending:
            return
        ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        for ref in ready:
            index = self._pending.pop(ref)
            self._release(ref)
            try:
                yield self.ray.get(ref)
            except Exception as exc:  # the task or its node died: this compile fails, the build goes on
                yield Outcome(index, 1, f"Ray task failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._pending:
                self.ray.cancel(ref, force=True)
        self._pending.clear()
