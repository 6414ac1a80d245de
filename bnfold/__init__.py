"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, exactly and verifiably."""

from bnfold.api import CheckResult, FoldResult, check, fold, verify
from bnfold.errors import BadInputError, BnfoldError, ExitCode, VerificationError
from bnfold.report import Reason, Report

__all__ = [
           "BadInputError",
           "BnfoldError",
           "CheckResult",
           "ExitCode",
           "FoldResult",
           "Reason",
           "Report",
           "VerificationError",
           "check",
           "fold",
           "verify",
]


def _installed_version() -> str:
    """The version from the package metadata, so pyproject.toml is its only source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bnfold")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()
