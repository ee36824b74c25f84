"""Sample sets for calibration, evaluation and ``lepton run``: an ``.npz`` keyed by input name.

Per input, one array with samples on axis 0: an array of the input's own rank is fed one row at a
time as a batch of one; an array of rank+1 is one batch per entry (SPEC). An optional ``labels``
array holds one label per sample (per batch entry for rank+1 data).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from lepton_cli.errors import BadInputError
from lepton_cli.model.shapes import TensorSig, graph_inputs

LABELS_KEY = "labels"


@dataclass
class SampleSet:
    """Validated samples; ``feeds()`` yields one ONNX Runtime feed dict per sample (batch)."""

    path: Path
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    batched: dict[str, bool]  # True: rank+1 array, each entry a whole batch

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def feed(self, index: int) -> dict[str, np.ndarray]:
        # np.asarray: a scalar input's entry is a NumPy scalar, which ONNX Runtime refuses
        return {
            name: (np.asarray(arr[index]) if self.batched[name] else arr[index : index + 1])
            for name, arr in self.arrays.items()
        }

    def feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        count = len(self) if limit is None else min(limit, len(self))
        for index in range(count):
            yield self.feed(index)

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple["SampleSet", "SampleSet"]:
        """Deterministic split into (kept, held out), e.g. calibration vs agreement checking."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = max(1, int(round(len(self) * (1 - holdout_fraction))))
        parts = []
        for idx in (np.sort(order[:cut]), np.sort(order[cut:])):
            parts.append(
                SampleSet(
                    self.path,
                    {k: v[idx] for k, v in self.arrays.items()},
                    None if self.labels is None else self.labels[idx],
                    dict(self.batched),
                )
            )
        return parts[0], parts[1]

    def shapes(self) -> dict[str, list[int]]:
        """Per-input shape of one feed: binds the model's dynamic dims when --input-shape is absent."""
        return {
            name: list(arr.shape[1:] if self.batched[name] else (1, *arr.shape[1:]))
            for name, arr in self.arrays.items()
        }


def _check_input(name: str, arr: np.ndarray, sig: TensorSig, origin: str) -> bool:
    """Validate one input array; return whether it is batched (rank+1)."""
    rank = len(sig.dims)
    if rank == 0:  # a scalar input: (N,) one value per sample, () one value for every sample (load_samples repeats it)
        if arr.ndim > 1:
            raise BadInputError(
                f"{origin}: array {name!r} has shape {arr.shape}; input {name!r} is a scalar",
                "store one value per sample, shape (N,), or one value for every sample, shape ()",
            )
        batched, sample_shape = True, ()
    elif arr.ndim == rank:
        batched, sample_shape = False, (1, *arr.shape[1:])
    elif arr.ndim == rank + 1:
        batched, sample_shape = True, arr.shape[1:]
    else:
        raise BadInputError(
            f"{origin}: array {name!r} has shape {arr.shape}; input {name!r} has rank {rank} {list(sig.dims)}",
            f"store samples on axis 0: shape (N, ...) with rank {rank} (one row per sample) or {rank + 1} (one batch per entry)",
        )
    if arr.ndim and arr.shape[0] == 0:
        raise BadInputError(f"{origin}: array {name!r} holds no samples", "add at least one sample")
    for axis, (have, want) in enumerate(zip(sample_shape, sig.dims)):
        if isinstance(want, int) and have != want and not (axis == 0 and not batched):
            raise BadInputError(
                f"{origin}: array {name!r} samples have shape {list(sample_shape)}, the input expects {list(sig.dims)}",
                "resize or reshape the samples to the model's input shape",
            )
    _check_dtype(name, arr, sig, origin)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise BadInputError(
            f"{origin}: array {name!r} contains {bad} NaN/Inf values",
            "clean the data; calibration on NaN/Inf is meaningless",
        )
    return batched


def check_whole_input(name: str, arr: np.ndarray, sig: TensorSig, origin: str) -> np.ndarray:
    """One whole input tensor (``lepton run --input``): its rank and fixed dims exactly the input's, its dtype
    converted where no value changes kind; exit 2 otherwise (ONNX Runtime's own refusal would be an internal error)."""
    fixed_ok = all(not isinstance(want, int) or have == want for have, want in zip(arr.shape, sig.dims))
    if arr.ndim != len(sig.dims) or not fixed_ok:
        raise BadInputError(
            f"{origin}: array {name!r} has shape {list(arr.shape)}, the input takes {list(sig.dims)}",
            "save the one tensor the model takes (or pass samples with --inputs DATA.npz)",
        )
    _check_dtype(name, arr, sig, origin)
    return arr.astype(sig.dtype, copy=False)


def _check_dtype(name: str, arr: np.ndarray, sig: TensorSig, origin: str) -> None:
    if arr.dtype != sig.dtype:
        if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(sig.dtype, np.floating):
            pass  # float64 → float32 is a safe, common conversion, done by the loader
        elif (
            np.issubdtype(arr.dtype, np.integer)
            and np.issubdtype(sig.dtype, np.integer)
            and np.can_cast(arr.dtype, sig.dtype)
        ):
            pass  # int32 → int64 (a sample rate, token ids): no value changes
        else:
            raise BadInputError(
                f"{origin}: array {name!r} has dtype {arr.dtype}, the input expects {sig.dtype}",
                f"save it as {sig.dtype}",
            )


NPY_MAGIC = b"\x93NUMPY"


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz (read here: object arrays fail on access), or None for a single .npy array."""
    with open(path, "rb") as handle:
        if handle.read(len(NPY_MAGIC)) == NPY_MAGIC:  # refused unread: it may be large
            return None
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def load_samples(path: str | Path, model: onnx.ModelProto, *, role: str = "--calib") -> SampleSet:
    """Load and validate an ``.npz`` sample set against the model's inputs (exit 2 on any mismatch)."""
    path = Path(path)
    origin = f"{role} {path}"
    if not path.is_file():
        raise BadInputError(f"{origin} does not exist or is not a file", "pass an .npz keyed by input name")
    inputs = {sig.name: sig for sig in graph_inputs(model)}
    savez = f"numpy.savez(path, {', '.join(f'{name}=array' for name in inputs) or 'input_name=array'})"
    try:
        raw = _read_npz(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BadInputError(
            f"{origin} is not a readable .npz file ({exc.__class__.__name__})", f"save it with {savez}"
        ) from None
    if raw is None:  # a .npy: one array, no input name to match
        raise BadInputError(
            f"{origin} is a single .npy array, not an .npz keyed by input name", f"save it with {savez}"
        )
    labels = raw.pop(LABELS_KEY, None)
    unknown = sorted(set(raw) - set(inputs))
    if unknown:
        raise BadInputError(
            f"{origin}: array {unknown[0]!r} names no input of the model",
            f"the model's inputs are: {', '.join(inputs)}",
        )
    missing = sorted(set(inputs) - set(raw))
    if missing:
        raise BadInputError(f"{origin}: no array for input {missing[0]!r}", f"add an array named {missing[0]!r}")
    batched = {name: _check_input(name, arr, inputs[name], origin) for name, arr in raw.items()}
    counts = {len(arr) for arr in raw.values() if arr.ndim}
    if len(counts) > 1:
        raise BadInputError(
            f"{origin}: arrays hold different sample counts {sorted(counts)}",
            "give every input the same number of samples",
        )
    count = counts.pop() if counts else 1
    raw = {name: (np.full(count, arr, dtype=arr.dtype) if arr.ndim == 0 else arr) for name, arr in raw.items()}
    arrays = {name: arr.astype(inputs[name].dtype, copy=False) for name, arr in raw.items()}
    if labels is not None and len(labels) != count:
        raise BadInputError(
            f"{origin}: 'labels' has {len(labels)} entries for {len(next(iter(arrays.values())))} samples",
            "give one label per sample",
        )
    return SampleSet(path, arrays, labels, batched)


@dataclass
class Survey:
    """What one pass over a sample set found."""

    distinct: int  # samples that differ from every earlier one (in some input or the label)
    constant: dict[str, Any] | None  # each input's one value when no input varies anywhere (placeholder data)


def survey(samples: SampleSet, visit: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> Survey:
    """One pass over ``samples`` through ``feeds`` (an image folder is decoded once): exact repeats and placeholder
    data, with ``visit(index, feed)`` called on each sample (the caller's own check of it)."""
    seen: set[bytes] = set()
    first: dict[str, Any] = {}
    varies = False
    for index, feed in enumerate(samples.feeds()):
        if visit is not None:
            visit(index, feed)
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(feed):
            flat = np.ascontiguousarray(feed[name]).reshape(-1)
            digest.update(flat.tobytes())
            if flat.size and not varies:
                first.setdefault(name, flat[0])
                varies = bool(np.any(flat != first[name]))  # not min/max: string inputs have neither
        if samples.labels is not None:
            digest.update(np.ascontiguousarray(samples.labels[index]).tobytes())
        seen.add(digest.digest())
    return Survey(len(seen), None if varies else first)


def placeholder_error(constant: dict[str, Any], samples: SampleSet, role: str) -> BadInputError:
    """Every input holds one value in every sample (an all-zero array, a blank image): the model would be
    calibrated and scored on one point no deployment sends, and every candidate would agree with it."""
    held = ", ".join(
        f"{name!r} = {value.item() if hasattr(value, 'item') else value}" for name, value in constant.items()
    )
    return BadInputError(
        f"{role} {samples.path}: every input holds one value in every sample ({held}): calibration and the "
        "accuracy gate would see nothing of the data the model runs on",
        "save real inputs (images, text, audio as the model's preprocessing makes them), not placeholders",
    )


def check_bound_shapes(samples: SampleSet, model: onnx.ModelProto, role: str, bound_by: str | None) -> None:
    """Exit 2 when a sample's shape differs from the shape the model's input was bound to (by
    --input-shape, or by other data): the model cannot run it, and every pass that feeds it would fail."""
    inputs = {sig.name: sig for sig in graph_inputs(model)}
    for name, shape in samples.shapes().items():
        want = list(inputs[name].dims)
        if len(shape) == len(want) and all(not isinstance(w, int) or w == h for w, h in zip(want, shape)):
            continue
        raise BadInputError(
            f"{role} {samples.path}: input {name!r} samples have shape {shape}, but the model's input is {want}"
            + (f" ({bound_by})" if bound_by else ""),
            f"give samples of shape {want} (resize them, or set --preprocess size=), or bind the input to the "
            f"samples' shape with --input-shape {name}={','.join(map(str, shape))}",
        )
