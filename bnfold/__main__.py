"""The `bnfold` command and `python -m bnfold`.

Signal handlers go in before anything heavy (onnx, onnxruntime, click) is imported, so a Ctrl-C
during start-up is handled like a later one: one line, exit 128 + signal, no traceback.
"""

import sys

from bnfold.interrupts import Interrupted, install


def main() -> None:
    install()
    try:
        from bnfold.cli import main as command

        command()
    except Interrupted as interrupted:
        try:
            sys.stderr.write(f"bnfold: interrupted ({interrupted.signal_name}); "
                             "unfinished outputs not written, temporary files removed\n")
            sys.stderr.flush()
        except OSError:  # the terminal that sent SIGHUP may be gone
            pass
        sys.exit(interrupted.exit_code)


if __name__ == "__main__":
    main()
