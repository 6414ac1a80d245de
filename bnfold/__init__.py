"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, exactly and verifiably.

The public names are imported on first use: the command installs its signal handlers before
onnx and onnxruntime are loaded (see bnfold.__main__).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - what the lazy names are, for type checkers
    from bnfold.api import CheckResult, FoldResult, check, fold, verify
    from bnfold.errors import BadInputError, BnfoldError, ExitCode, VerificationError
    from bnfold.report import Reason, Report
    from bnfold.run_config import RunConfig

_HOMES = {
    "CheckResult": "bnfold.api", "FoldResult": "bnfold.api", "check": "bnfold.api", "fold": "bnfold.api",
    "verify": "bnfold.api", "BadInputError": "bnfold.errors", "BnfoldError": "bnfold.errors",
    "VerificationError": "bnfold.errors", "ExitCode": "bnfold.errors", "Reason": "bnfold.report", "Report": "bnfold.report",
    "RunConfig": "bnfold.run_config",
}
__all__ = sorted(_HOMES)


def _installed_version() -> str:
    """The version from the package metadata, so pyproject.toml is its only source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bnfold")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'bnfold' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


class _Package(types.ModuleType):
    """`bnfold.verify` is the public function, although a submodule has that name too: importing
    the submodule sets this attribute, which must not replace the function."""

    @property
    def verify(self) -> Any:
        return __getattr__("verify")

    @verify.setter
    def verify(self, _submodule: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
