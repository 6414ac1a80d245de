"""Attack 4: external data read through the descriptors opened at the check (bnfold/file_access.py
`_open_as_checked`, bnfold/tensors.py `TensorStore.open_files`).

Every data file a model names is opened at load time and its descriptor kept for the store's
lifetime. onnx writes one data file per tensor with `all_tensors_to_one_file=False`, so a valid
model with more data files than the process may hold open (1024 by default on Linux) is now
refused with "Too many open files"; before the change (files opened per read, then closed) it
folded. The check must not cost a descriptor per file for as long as the model is held.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold

FILES = 300
FD_LIMIT = 200  # below FILES: the limit a default shell gives (1024) scaled down to keep the test small


def _model_with_many_data_files(folder: Path) -> Path:
    """x -> Add(c0) -> ... -> Add(c{FILES-1}) -> Conv -> BN, every initializer in its own data file."""
    nodes, inits, current = [], [], "x"
    for i in range(FILES):
        inits.append(numpy_helper.from_array(np.zeros((1, 4, 1, 1), np.float32), f"c{i}"))
        nodes.append(helper.make_node("Add", [current, f"c{i}"], [f"a{i}"]))
        current = f"a{i}"
    rng = np.random.default_rng(0)
    inits += [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "W"),
              numpy_helper.from_array(np.full(4, 2.0, np.float32), "s"),
              numpy_helper.from_array(np.full(4, 0.5, np.float32), "b"),
              numpy_helper.from_array(np.zeros(4, np.float32), "m"),
              numpy_helper.from_array(np.ones(4, np.float32), "v")]
    nodes += [helper.make_node("Conv", [current, "W"], ["c"]),
              helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info("y", 1, [1, 4, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return path


_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import bnfold
result = bnfold.fold(sys.argv[1], verify=False, output=sys.argv[2])
print(len(result.report.folded))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_a_model_with_more_data_files_than_the_descriptor_limit_folds(tmp_path):
    model = _model_with_many_data_files(tmp_path)
    assert len(list(tmp_path.iterdir())) > FD_LIMIT
    root = str(Path(bnfold.__file__).resolve().parents[1])
    child = subprocess.run([sys.executable, "-c", _CHILD.format(limit=FD_LIMIT), str(model),
                            str(tmp_path / "out.onnx")],
                           capture_output=True, text=True, check=False,
                           env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert child.returncode == 0, child.stderr.strip().splitlines()[-1:]
    assert int(child.stdout.strip()) >= 1  # the BN at least (the zero Adds fold too)
