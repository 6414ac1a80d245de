"""How verification feeds, runs and compares the models: the options of `fold`, `check` and
`verify` (and of the CLI's verification flags), in one place."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from bnfold.errors import BadInputError, check_tolerance

DEFAULT_TIMEOUT = 600.0


@dataclass(kw_only=True)
class RunConfig:
    """How verification feeds, runs and compares the models (every field optional). Passed to
    `bnfold.fold`/`check`/`verify` as `verify=RunConfig(...)`, or field by field as keywords."""

    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    inputs: dict[str, np.ndarray] | None = None  # user data; a leading extra axis holds samples
    iterations: int = 1  # random batches (seeds seed, seed+1, ...)
    providers: list[str] = field(default_factory=list)  # extra providers to run the folded model on
    save_inputs: str | None = None
    save_outputs: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds onnxruntime may take for both models, all batches
    isolated: bool = True  # onnxruntime in a child process (False only to measure what that costs)

    def __post_init__(self) -> None:
        self.input_shapes = _checked_shapes(self.input_shapes)
        if self.inputs is not None and not (isinstance(self.inputs, Mapping) and all(
                isinstance(name, str) and isinstance(array, np.ndarray) for name, array in self.inputs.items())):
            raise BadInputError("inputs must map input names to numpy arrays")
        self.save_inputs = None if self.save_inputs is None else os.fspath(self.save_inputs)
        self.save_outputs = None if self.save_outputs is None else os.fspath(self.save_outputs)
        if isinstance(self.providers, str):  # one provider named as a string, not its characters
            self.providers = [self.providers]
        self.providers = list(self.providers)
        if not all(isinstance(provider, str) for provider in self.providers):
            raise BadInputError("providers must be onnxruntime provider names")
        if not (_is_number(self.timeout) and self.timeout > 0 and math.isfinite(self.timeout)):
            raise BadInputError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not (_is_integer(self.seed) and self.seed >= 0):
            raise BadInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (_is_integer(self.iterations) and self.iterations >= 1):
            raise BadInputError(f"iterations must be at least 1, got {self.iterations!r}")
        for name, value in (("atol", self.atol), ("rtol", self.rtol)):
            if value is not None and not _is_number(value):  # True would be a tolerance of 1.0
                raise BadInputError(f"{name} must be a finite number >= 0, got {value!r}")
            check_tolerance(name, value)
        if not isinstance(self.isolated, bool):
            raise BadInputError(f"isolated must be True or False, got {self.isolated!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _checked_shapes(shapes: object) -> dict[str, list[int]]:
    """`input_shapes` as {name: [positive int, ...]}, or a BadInputError saying what is wrong."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise BadInputError(f"input_shapes must map input names to shapes, got {type(shapes).__name__}")
    checked = {}
    for name, shape in shapes.items():
        sequence = (isinstance(shape, Sequence) and not isinstance(shape, str)) or \
            (isinstance(shape, np.ndarray) and shape.ndim == 1)
        if not (isinstance(name, str) and sequence and all(_is_integer(dim) and dim > 0 for dim in shape)):
            raise BadInputError(f"input_shapes['{name}']: expected a list of positive integers, got {shape!r}")
        checked[name] = [int(dim) for dim in shape]
    return checked


RUN_CONFIG_FIELDS = frozenset(f.name for f in fields(RunConfig))
