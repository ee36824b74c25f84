"""Passes registered by name: each is a function of (model, context, params) plus what the pipeline needs
to order, check and instrument it: its parameter dataclass, its declared place in a pipeline, its
preconditions (``requires``) and how exact it claims to be.

Modelled on TVM's ``PassInfo`` and onnx-ir's ``requires()``: passes transform, the pipeline instruments.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import onnx

from lepton_cli.errors import BadInputError, InternalError


class PassEnv(Protocol):
    """What a pass and its ``requires`` see of the run (``pipeline.context.PassContext`` provides it)."""

    target: Any  # pipeline.targets.Target, which imports this module
    calib: Any  # samples.sample_set.SampleSet | None

    def warn(self, message: str) -> None: ...


@dataclass(frozen=True)
class Exactness:
    """How the pipeline checks a pass's output against its input.

    ``exact``: outputs bit-identical; ``tolerance``: within ``rtol``/``atol`` of the output's scale;
    ``lossy``: no automatic comparison (the pass owns its accuracy budget, e.g. quantize, prune);
    ``skipped``: the pass did not run (it yielded its share of the accuracy budget).
    """

    kind: Literal["exact", "tolerance", "lossy", "skipped"]
    rtol: float = 0.0
    atol: float = 0.0


LOSSY = Exactness("lossy")
SKIPPED = Exactness("skipped")


def tolerance(rtol: float, atol: float) -> Exactness:
    return Exactness("tolerance", rtol, atol)


@dataclass(frozen=True)
class BudgetUse:
    """A lossy pass's share of the accuracy budget: the drop against the source it was allowed, and measured."""

    allowed: float
    drop: float
    changed: bool = False  # the pass changed the model lossily, whatever its drop read: a later failure may be its


@dataclass
class PassResult:
    """What a pass returns: the new model and a JSON-ready summary of what it did (for the report)."""

    model: onnx.ModelProto
    summary: dict[str, Any] = field(default_factory=dict)
    # A lossy pass whose run this time was exact (e.g. prune removing only dead channels) says so,
    # and the pipeline checks it like any exact pass; None: the exactness the pass registered.
    exactness: Exactness | None = None
    # A lossy pass's use of the accuracy budget; the pipeline enters it in the ledger.
    budget_use: BudgetUse | None = None


PassFn = Callable[[onnx.ModelProto, PassEnv, Any], PassResult]
Requires = Callable[[onnx.ModelProto, PassEnv, Any], None]  # (source, context, params): raise when it cannot work


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: PassFn
    params_cls: type
    description: str
    exactness: Exactness
    needs_static_shapes: bool = False
    order: int | None = None  # place in any pipeline: lower runs first; None: anywhere
    requires: Requires | None = None


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(
    name: str,
    *,
    params: type,
    description: str,
    exactness: Exactness,
    needs_static_shapes: bool = False,
    order: int | None = None,
    requires: Requires | None = None,
) -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn`` as pass ``name`` with its parameter dataclass, order and preconditions."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"pass {name}: params must be a dataclass")

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise InternalError(f"pass {name!r} registered twice")
        _REGISTRY[name] = PassSpec(name, fn, params, description, exactness, needs_static_shapes, order, requires)
        return fn

    return decorate


def _load_all() -> None:
    # Importing each module of lepton_cli.passes registers its pass.
    package = importlib.import_module("lepton_cli.passes")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"lepton_cli.passes.{info.name}")


def all_passes() -> dict[str, PassSpec]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str, path: str = "pass") -> PassSpec:
    passes = all_passes()
    if name not in passes:
        raise BadInputError(f"{path}: unknown pass {name!r}", f"known passes: {', '.join(passes)}")
    return passes[name]
