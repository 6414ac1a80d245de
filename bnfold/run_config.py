"""How verification feeds, runs and compares the models: the options of `fold`, `check` and
`verify` (and of the CLI's verification flags), in one place."""

from __future__ import annotations

import math
import os
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
        self.input_shapes = {name: list(shape) for name, shape in (self.input_shapes or {}).items()}
        self.save_inputs = None if self.save_inputs is None else os.fspath(self.save_inputs)
        self.save_outputs = None if self.save_outputs is None else os.fspath(self.save_outputs)
        if isinstance(self.providers, str):  # one provider named as a string, not its characters
            self.providers = [self.providers]
        self.providers = list(self.providers)
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0 and math.isfinite(self.timeout)):
            raise BadInputError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.seed < 0:
            raise BadInputError(f"seed must be a non-negative integer, got {self.seed}")
        if self.iterations < 1:
            raise BadInputError(f"iterations must be at least 1, got {self.iterations}")
        for name, value in (("atol", self.atol), ("rtol", self.rtol)):
            check_tolerance(name, value)


RUN_CONFIG_FIELDS = frozenset(f.name for f in fields(RunConfig))
