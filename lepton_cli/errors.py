"""Lepton's own error type: every expected failure carries an exit code and a one-line fix.

The CLI turns these into one message in one place (``cli.main``); nothing else prints tracebacks.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes (README, ``lepton --help``, SPEC)."""

    OK = 0
    INTERNAL = 1  # a bug in Lepton: short message plus the log path
    BAD_INPUT = 2  # bad file, model, TOML, data, key or usage
    QUALITY_GATE = 3  # accuracy, size or memory budget not met
    VERIFICATION = 4  # signature, integrity, decryption, rollback, expiry


class LeptonError(Exception):
    """An expected failure: ``message`` names the problem, ``fix`` says what to do."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, fix: str | None = None, *, exit_code: ExitCode | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message


class BadInputError(LeptonError):
    """Exit 2: the user gave us something we cannot use."""

    exit_code = ExitCode.BAD_INPUT


class QualityGateError(LeptonError):
    """Exit 3: the result exists but misses a budget the user or target set.

    ``attempt_summary``: the failure in one clause, without the detail of every attempt (the pipeline's
    retry quotes it as the first attempt); None: the message says it.
    """

    exit_code = ExitCode.QUALITY_GATE

    def __init__(
        self,
        message: str,
        fix: str | None = None,
        *,
        exit_code: ExitCode | None = None,
        attempt_summary: str | None = None,
    ):
        super().__init__(message, fix, exit_code=exit_code)
        self.attempt_summary = attempt_summary  # the failure in one clause, for a retry's warning


class VerificationError(LeptonError):
    """Exit 4: a bundle failed signature, integrity, decryption, rollback or expiry checks."""

    exit_code = ExitCode.VERIFICATION


class InternalError(LeptonError):
    """Exit 1: a check inside Lepton failed; this is our bug, not the user's."""

    exit_code = ExitCode.INTERNAL
