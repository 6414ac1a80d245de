"""The typed 'no' every rule returns instead of folding: a stable reason code plus an explanation."""

from __future__ import annotations

from dataclasses import dataclass

from bnfold.report import Reason


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    detail: str
