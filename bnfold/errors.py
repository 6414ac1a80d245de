"""Exceptions that cross the public API; each maps to one CLI exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from bnfold.report import Report


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""

    exit_code = 2


class BadInputError(BnfoldError):
    """The model, a path or an option cannot be used (exit code 2).

    The message is a single line meant for the user, and names the offending path or option.
    """


class VerificationError(BnfoldError):
    """The folded model does not compute what the original computes (exit code 1).

    Carries the full report, so callers can see which output or which folded tensor failed.
    """

    exit_code = 1

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report
