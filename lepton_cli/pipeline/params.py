"""Typed pass parameters: validate a TOML table into a frozen dataclass, rejecting unknown keys.

ONNX Runtime's quantizer reads a string-keyed ``extra_options`` dict where a typo is silently
ignored; here every key is a dataclass field, checked once when the target file loads.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from lepton_cli.errors import BadInputError


class ParamValueError(ValueError):
    """Raised by a params dataclass's ``__post_init__`` for a bad value of one field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is dict:
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "nothing"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` checked against ``tp``; raise BadInputError naming ``path`` otherwise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise BadInputError(
            f"{path} = {value!r} is not valid: expected {_type_name(tp)}", "use one of the listed values"
        )
    if origin in (Union, types.UnionType):
        if isinstance(value, float) and not math.isfinite(value) and float in get_args(tp):
            return _coerce(value, float, path)  # its own message, not "the wrong type"
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, path)
            except BadInputError:
                continue
        raise BadInputError(
            f"{path} = {value!r} has the wrong type: expected {_type_name(tp)}",
            "fix the value's type in the target file",
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadInputError(
                f"{path} = {value!r} has the wrong type: expected {_type_name(tp)}",
                'write it as a TOML array, e.g. ["a", "b"]',
            )
        (item_tp, *_) = get_args(tp)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInputError(f"{path} has the wrong type: expected a table", "write it as a TOML table")
        key_tp, val_tp = get_args(tp)
        return {k: _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML's nan/inf (and 1e400) pass every range check written as a comparison
                raise BadInputError(f"{path} = {value!r} is not a finite number", "give a finite value")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return from_table(tp, value, path)
    raise BadInputError(
        f"{path} = {value!r} has the wrong type: expected {_type_name(tp)}", "fix the value's type in the target file"
    )


def from_table(cls: type, table: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a TOML table; ``path`` names the table in error messages."""
    if not isinstance(table, dict):
        raise BadInputError(f"{path} must be a table, got {type(table).__name__}", "write it as a TOML table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise BadInputError(
            f"unknown key {path}.{unknown[0]}",
            f"valid keys are: {', '.join(sorted(fields)) or '(none)'}",
        )
    kwargs = {name: _coerce(value, hints[name], f"{path}.{name}") for name, value in table.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise BadInputError(f"missing key {path}.{missing[0]}", "add it to the target file")
    try:
        return cls(**kwargs)
    except ParamValueError as exc:
        raise BadInputError(f"{path}.{exc.field}: {exc.message}", "fix the value in the target file") from None


def to_table(obj: Any) -> dict[str, Any]:
    """The dataclass as plain JSON/TOML-friendly data (tuples become lists)."""
    return json_ready(dataclasses.asdict(obj))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
