"""Files that are not regular files (a FIFO, a character device such as /dev/null, a symlink to one
such as /dev/stdout) are refused before any work, exit 2, one line: as `--inputs` (a FIFO would block
np.load for ever) and as the output (replacing it, run as root, would delete /dev/null); the special
file stays what it was."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import conv_bn_model

C = 4


def _conv_bn(path: Path) -> None:
    onnx.save(conv_bn_model(C), path)


def _make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the same device as /dev/null


def test_inputs_fifo_is_refused(tmp_path: Path) -> None:
    _conv_bn(tmp_path / "m.onnx")
    os.mkfifo(tmp_path / "arrays.npz")

    try:
        result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "arrays.npz"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("bnfold blocked reading the FIFO")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["fifo", "char_device"])
@pytest.mark.parametrize("via_symlink", [False, True], ids=["direct", "symlink"])
def test_special_file_output_is_not_replaced(tmp_path: Path, kind: str, via_symlink: bool) -> None:
    _conv_bn(tmp_path / "m.onnx")
    special = tmp_path / "special"
    _make_special(special, kind)
    target = special
    if via_symlink:  # like /dev/stdout -> /proc/self/fd/1
        target = tmp_path / "link"
        target.symlink_to(special)
    mode = os.lstat(target).st_mode

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", str(target), "-q"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)

    assert os.lstat(target).st_mode == mode, "the special file (or link) was replaced by a regular file"
    assert result.returncode == 2, result.stderr
