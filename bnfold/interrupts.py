"""SIGINT, SIGTERM and SIGHUP as an exception, so that every `finally` runs — temporary files are
removed, onnxruntime children are stopped — and the command exits 128 + the signal's number.

`Interrupted` derives from BaseException: the `except Exception` that keeps one broken model from
stopping a batch must not swallow a user's Ctrl-C. Handlers are installed only by the command's
entry point (bnfold.__main__); a library caller keeps its own.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from bnfold.errors import ExitCode

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_deferring = 0  # depth of `deferred()` blocks running now
_pending: list[int] = []  # signals that arrived inside one


class Interrupted(BaseException):
    """A signal asked bnfold to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return ExitCode.for_signal(self.signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def install() -> None:
    """Raise `Interrupted` on the first of SIGNALS (in the main thread)."""
    for signum in SIGNALS:
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, _frame: object) -> None:
    if _deferring:
        _pending.append(signum)
        return
    # Further signals must not cut the cleanup that this one starts short.
    for other in SIGNALS:
        signal.signal(other, _record)
    raise Interrupted(signum)


def _record(signum: int, _frame: object) -> None:
    _pending.append(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Steps that must complete together (renaming a model and its data file into place): a
    signal that arrives meanwhile is raised when they are done."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending and signal.getsignal(_pending[0]) is _interrupt:
        _interrupt(_pending.pop(0), None)
