"""Range checks on compile's numeric options, shared by `lepton compile` and `lepton build` (exit 2 before any work).

A negative budget sent the quantize search to its largest float-kept set and a zero measurement time crashed the
benchmark: each value out of range is refused by name instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from lepton_cli.errors import BadInputError


@dataclass(frozen=True)
class OptionRule:
    field: str  # CompileOptions field; a build file's key
    flag: str  # the command-line option
    accepts: Callable[[float], bool]
    must_be: str  # what a valid value is, for the fix


RULES = (
    OptionRule("max_accuracy_drop", "--max-accuracy-drop", lambda v: v >= 0, "a number >= 0, in points (100: any)"),
    OptionRule("bench_seconds", "--bench-seconds", lambda v: v > 0, "a number of seconds > 0, e.g. 1.5"),
    OptionRule("max_latency_ratio", "--max-latency-ratio", lambda v: v > 0, "a ratio > 0, e.g. 0.8 (0.8x the source)"),
    OptionRule("baseline_tolerance_pct", "--baseline-tolerance", lambda v: v >= 0, "a percentage >= 0, e.g. 5"),
    OptionRule("seed", "--seed", lambda v: v >= 0, "an integer >= 0"),
)


class OptionValueError(BadInputError):
    def __init__(self, rule: OptionRule, value: Any) -> None:
        super().__init__(f"{rule.flag} {value:g} is out of range", f"give {rule.must_be}")
        self.field = rule.field


def check_option_values(options: Any) -> None:
    """OptionValueError (exit 2) for the first of ``RULES`` whose value on ``options`` is not finite or is refused."""
    for rule in RULES:
        check_option_value(rule.field, getattr(options, rule.field))


def check_option_value(field: str, value: float | None) -> None:
    """OptionValueError (exit 2) when ``value`` of the option ``field`` names is not finite or is refused (commands
    with an option of the same name, such as `lepton bench --seed`, check it here too)."""
    rule = next(r for r in RULES if r.field == field)
    if value is not None and not (math.isfinite(value) and rule.accepts(value)):
        raise OptionValueError(rule, value)
