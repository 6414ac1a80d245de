"""bnfold: fold BatchNormalization into neighbouring layers of ONNX models, exactly and verifiably."""

from bnfold.api import CheckResult, FoldResult, check, fold, verify
from bnfold.errors import BadInputError, BnfoldError, VerificationError
from bnfold.report import Reason, Report

__all__ = [
           "BadInputError",
           "BnfoldError",
           "CheckResult",
           "FoldResult",
           "Reason",
           "Report",
           "VerificationError",
           "check",
           "fold",
           "verify",
]
__version__ = "0.1.0"
