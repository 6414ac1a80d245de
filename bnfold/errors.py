"""Exceptions that cross the public API, the process exit codes they map to, and the one-line
rendering of an error for users.

This module imports nothing from bnfold at run time, so every other module (and a worker process)
can import it without pulling in the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from bnfold.report import Report

# A process killed by signal N exits, by shell convention, with 128 + N. The numbers of these three
# signals are fixed by POSIX (XSI), so they are spelled out rather than read from `signal`, which
# lacks SIGHUP on Windows.
_SIGNAL_EXIT_BASE = 128
_SIGHUP, _SIGINT, _SIGTERM = 1, 2, 15


class ExitCode(IntEnum):
    """Every exit code of the `bnfold` command; the only place they are defined.

    OK, FAILED and BAD_INPUT are per-model outcomes (a batch exits with the worst of them, and the
    JSON report carries them). The INTERRUPTED_* codes end a whole run on a signal: 128 + the
    signal's number, so shells and CI runners recognise them as "killed by SIGHUP/SIGINT/SIGTERM".
    """

    OK = 0  # folded and verified, or nothing to fold; `check`: nothing foldable
    FAILED = 1  # verification failed or could not run (nothing written); `check`: a problem found
    BAD_INPUT = 2  # usage error or bad input: one line on stderr, nothing written
    INTERRUPTED_SIGHUP = _SIGNAL_EXIT_BASE + _SIGHUP  # 129
    INTERRUPTED_SIGINT = _SIGNAL_EXIT_BASE + _SIGINT  # 130
    INTERRUPTED_SIGTERM = _SIGNAL_EXIT_BASE + _SIGTERM  # 143

    @classmethod
    def for_signal(cls, signal_number: int) -> ExitCode:
        """The exit code of a run ended by this signal (ValueError for a signal bnfold does not handle)."""
        return cls(_SIGNAL_EXIT_BASE + int(signal_number))


# The outcomes one model can have; a run's exit code is the worst (largest) of them.
MODEL_EXIT_CODES = (ExitCode.OK, ExitCode.FAILED, ExitCode.BAD_INPUT)


def worst_exit_code(codes: Iterable[int]) -> int:
    """The exit code of a run over several models: the worst of theirs (OK for none)."""
    return int(max(codes, default=ExitCode.OK))


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """What a one-line message shows of an error: its first non-empty line, at most `limit`
    characters (library messages can carry whole graphs), or the exception's type when it says
    nothing."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    line = text.splitlines()[0].strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def check_tolerance(name: str, value: float | None) -> None:
    """Refuse an atol/rtol that is not a finite number >= 0 (None means the per-dtype default).
    One check for the API (`RunConfig`) and the CLI, which passes the flag as `name`."""
    if value is not None and not (value >= 0 and value != float("inf")):  # NaN fails `>= 0`
        raise BadInputError(f"{name} must be a finite number >= 0, got {value}")


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""

    exit_code: int = ExitCode.BAD_INPUT


class BadInputError(BnfoldError):
    """The model, a path or an option cannot be used (exit code 2).

    The message is a single line meant for the user, and names the offending path or option.
    """


class VerificationError(BnfoldError):
    """The folded model does not compute what the original computes (exit code 1).

    Carries the full report, so callers can see which output or which folded tensor failed.
    """

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report
