"""bnfold's benchmark suites (see benchmarks/README.md); each script runs as `python -m benchmarks.<name>`
from the repository root, or as `python benchmarks/<name>.py`."""
