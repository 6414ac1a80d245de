"""Attack: an output path that is not a regular file (a FIFO, a character device such as /dev/null,
a symlink such as /dev/stdout) is *replaced* by a regular file.

`save_model_atomic` writes a temporary file beside the output and `os.replace`s it over whatever is
there (model_io.py); `file_access.output_target` refuses folders and input files only. So
`bnfold m.onnx -o /dev/null` — a natural way to "only verify" — run as root (CI containers) deletes the
system's /dev/null and leaves a model file in its place. Expected: such an output is refused with
exit 2 before any work (or written *into*, never replaced), and the special file stays what it was.
"""

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
