"""The `bnfold` command: parse flags, call the API, render, map outcomes to exit codes.

Exit codes (`bnfold.errors.ExitCode`): 0 success (also nothing to fold), 1 verification failed
or could not run (onnxruntime crashed or exceeded --timeout; nothing written) or, for `check`,
foldable/training BNs found, 2 usage error or bad input (one line on stderr), 128 + N when ended by
signal N.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from bnfold import batch, file_access, render
from bnfold.errors import BadInputError, BnfoldError, ExitCode, check_tolerance, worst_exit_code
from bnfold.run_config import RunConfig

ERROR_PREFIX = "bnfold: error: "


class OneLineUsageError(click.ClickException):
    """A usage error shown as one line on stderr, like every other bad input (click's own shows
    a usage block, a hint and the message on three lines)."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, error: click.ClickException) -> None:
        message = " ".join(error.format_message().split())  # messages listing choices span lines
        context = getattr(error, "ctx", None)
        if context is not None:
            message += f" (see '{context.command_path} --help')"
        super().__init__(message)

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(ERROR_PREFIX + self.format_message(), err=True)


@contextmanager
def _usage_errors_on_one_line() -> Iterator[None]:
    try:
        yield
    except OneLineUsageError:
        raise
    except click.ClickException as error:
        raise OneLineUsageError(error) from None


class _DefaultToFold(click.Group):
    """`bnfold MODEL` means `bnfold fold MODEL`: the first argument picks a subcommand only if it
    names one. Parsing errors of the group and its commands are shown on one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A bare `bnfold` is `bnfold fold` without a model: a one-line usage error, not the help page.
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = ["fold", *args]
        return super().parse_args(ctx, args)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _usage_errors_on_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_errors_on_one_line():  # the subcommand's options are parsed here
            return super().invoke(ctx)


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """`NAME:D0,D1,...` -> {NAME: [D0, D1, ...]}; a malformed value is a BadInputError."""
    shapes = {}
    for value in values:
        name, _, dims = value.rpartition(":")
        try:
            parsed = [int(d) for d in dims.split(",")] if dims else []
        except ValueError:
            parsed = None
        if not name or not parsed or any(d <= 0 for d in parsed):
            raise BadInputError(f"--input-shape '{value}': expected NAME:D0,D1,... with positive integers")
        shapes[name] = parsed
    return shapes


def _fail(message: str, code: int = ExitCode.BAD_INPUT) -> None:
    click.echo(ERROR_PREFIX + message, err=True)
    sys.exit(code)


@click.group(cls=_DefaultToFold, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold", prog_name="bnfold")  # also under `python -m bnfold`
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, and verify the result.

    `bnfold MODEL` is short for `bnfold fold MODEL`.
    """


def _verification_options(function):
    """Options shared by `fold` and `check`: how verification feeds and compares the models."""
    options = [
        click.option("--input-shape", multiple=True, metavar="NAME:D0,D1,...", help="Shape for an input with dynamic dims."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the random verification inputs."),
        click.option("--iterations", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Random input batches to compare (seeds SEED, SEED+1, ...)."),
        click.option("--inputs", "inputs_npz", type=click.Path(path_type=Path),
                     help="Verify on these arrays (.npz, by input name; an extra leading axis holds samples)."),
        click.option("--atol", type=float, help="Absolute tolerance per output element (default by dtype)."),
        click.option("--rtol", type=float, help="Relative tolerance per output element (default by dtype)."),
        click.option("--providers", default="", help="Comma-separated extra onnxruntime providers to verify on."),
        click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Seconds onnxruntime may take; longer (or a crash) fails verification."),
        click.option("--save-inputs", type=click.Path(path_type=Path), help="Write the verification inputs (.npz)."),
        click.option("--save-outputs", type=click.Path(path_type=Path), help="Write both models' outputs (.npz)."),
        click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Worker processes for several models."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout."),
        click.option("--report-md", type=click.Path(path_type=Path), help="Also write a Markdown summary here."),
        click.option("-q", "--quiet", is_flag=True, help="Print only problems."),
        click.option("-v", "--verbose", is_flag=True, help="List every op type and every folded node."),
        click.option("--no-merge-branches", is_flag=True,
                     help="Do not merge sums of linear branches (RepVGG-style blocks) into one Conv."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _fold_options(verify: bool, input_shape, seed, iterations, inputs_npz, atol, rtol, providers, timeout,
                  save_inputs, save_outputs, no_merge_branches: bool = False) -> dict:
    """Validated keyword arguments for bnfold.fold / bnfold.check; BadInputError for malformed values."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        check_tolerance(flag, value)  # named as the flag the user typed
    config = RunConfig(seed=seed, input_shapes=parse_input_shapes(input_shape), atol=atol, rtol=rtol,
                       iterations=iterations, providers=[p.strip() for p in providers.split(",") if p.strip()],
                       timeout=timeout, save_inputs=save_inputs, save_outputs=save_outputs,
                       inputs=None if inputs_npz is None else load_npz(inputs_npz))
    return {"verify": config if verify else False, "merge_branches": not no_merge_branches}


def load_npz(path: Path) -> dict:
    import numpy as np

    try:  # a FIFO would block, a device never end
        file_access.check_model_file(path, "--inputs arrays")
    except BadInputError as error:
        raise BadInputError(f"--inputs {error}") from None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as error:  # noqa: BLE001 - zipfile, zlib, pickle refusals: all mean "unreadable"
        raise BadInputError(f"--inputs {path}: cannot read arrays ({type(error).__name__}: {error})") from None


def _progress(total: int, quiet: bool):
    """A progress bar on stderr for long interactive runs; a no-op otherwise."""
    if quiet or total < 2 or not sys.stderr.isatty():
        return None
    return click.progressbar(length=total, label="bnfold", file=sys.stderr)


def _run(jobs: list[batch.Job], workers: int, quiet: bool) -> list[batch.JobResult]:
    bar = _progress(len(jobs), quiet)
    if bar is None:
        return batch.run_jobs(jobs, workers)
    with bar:
        return batch.run_jobs(jobs, workers, on_done=lambda _: bar.update(1))


def _emit(results: list[batch.JobResult], as_json: bool, report_md: Path | None, quiet: bool, verbose: bool,
          mode: str, many: bool) -> int:
    """Print per-model reports (or one JSON object), write Markdown, return the worst exit code.
    `many`: several models or a folder were given (a batch, even if it holds one model)."""
    if report_md is not None:
        text = "\n".join(render.to_markdown(r.report) if r.report else f"### `{r.model}`\n\n{r.error}\n" for r in results)
        try:
            report_md.write_text(text)
        except OSError as error:
            click.echo(f"{ERROR_PREFIX}--report-md {report_md}: {error.strerror or error}", err=True)
            return ExitCode.BAD_INPUT
    if as_json:
        click.echo(render.results_to_json(results, mode, many))
    for result in results:
        if not as_json and result.report is not None and not (mode == "check" and quiet):
            text = render.to_text(result.report, quiet=quiet, verbose=verbose) if mode == "fold" else \
                render.check_text(result)
            if text:
                click.echo(text)
        if mode == "check" and quiet and not as_json and result.findings:
            click.echo("\n".join(f"{result.model}: {line}" for line in result.findings))
        if result.error:
            click.echo(ERROR_PREFIX + _naming_the_model(result), err=True)
    if many and not as_json and not quiet:
        click.echo(render.summary_table(results, mode))
    return worst_exit_code(r.exit_code for r in results)


def _naming_the_model(result: batch.JobResult) -> str:
    """A model's error line on stderr, which is read apart from the reports on stdout: it names the
    model unless the message already starts with it."""
    error = result.error or ""
    return error if error.startswith(str(result.model)) else f"{result.model}: {error}"


@main.command("fold")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output path (one model) or folder (several); default MODEL.folded.onnx beside each input.")
@click.option("--in-place", is_flag=True, help="Replace MODEL, only after the result is complete and verified.")
@click.option("--no-verify", is_flag=True, help="Skip the checker, analytic and onnxruntime verification.")
@_verification_options
def fold_command(models: tuple[Path, ...], output: Path | None, in_place: bool, no_verify: bool, jobs: int,
                 as_json: bool, report_md: Path | None, quiet: bool, verbose: bool, **verification) -> None:
    """Fold MODEL(s) (files or folders of *.onnx) and write the results; a model whose verification
    fails is not written."""
    try:
        options = _fold_options(not no_verify, **verification)
        if in_place:  # the API replaces an input only when told to
            options["in_place"] = True
        _check_writable(report_md, "--report-md")
        paths = batch.discover(models)
        many = len(paths) > 1 or any(m.is_dir() for m in models)
        if not paths:
            raise BadInputError(f"no *.onnx files found in {', '.join(map(str, models))}")
        if in_place and output is not None:
            raise BadInputError("--in-place and -o/--output exclude each other")
        targets = batch.output_paths(paths, output, many, in_place)
        for path, target in zip(paths, targets):
            if not in_place:
                _check_target(path, target, many)
                _check_not_an_input(target, paths)
        _check_report_md(report_md, paths, targets)
    except BnfoldError as error:
        _fail(str(error), error.exit_code)
    job_list = [batch.Job(path, target, "fold", options) for path, target in zip(paths, targets)]
    sys.exit(_emit(_run(job_list, jobs, quiet), as_json, report_md, quiet, verbose, "fold", many))


@main.command("check")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--verify", "verify", is_flag=True, help="Also fold in memory and verify the result.")
@_verification_options
def check_command(models: tuple[Path, ...], verify: bool, jobs: int, as_json: bool, report_md: Path | None,
                  quiet: bool, verbose: bool, **verification) -> None:
    """Write nothing; exit 1 if any MODEL still has a foldable or training-mode BatchNormalization."""
    try:
        options = _fold_options(verify, **verification)
        _check_writable(report_md, "--report-md")
        paths = batch.discover(models, skip_folded=False)
        if not paths:
            raise BadInputError(f"no *.onnx files found in {', '.join(map(str, models))}")
        _check_report_md(report_md, paths, [])
    except BnfoldError as error:
        _fail(str(error), error.exit_code)
    job_list = [batch.Job(path, None, "check", options) for path in paths]
    many = len(paths) > 1 or any(m.is_dir() for m in models)
    sys.exit(_emit(_run(job_list, jobs, quiet), as_json, report_md, quiet, verbose, "check", many))


def _check_writable(path: Path | None, flag: str) -> None:
    """Fail before any work if a report file cannot be written (a model must not be written and
    then reported as a failure)."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise BadInputError(f"{flag} {path}: cannot write there")


def _check_report_md(report_md: Path | None, models: list[Path], outputs: list[Path]) -> None:
    """The Markdown report replaces no model of the run, no data file one reads, no output."""
    if report_md is not None:
        read = [*models, *(data for model in models for data in file_access.data_files_of(model))]
        file_access.check_side_output(report_md, "--report-md", read, outputs)


def _check_not_an_input(target: Path, inputs: list[Path]) -> None:
    """With several models, one job's output must not replace another job's input."""
    for other in inputs:
        if file_access.same_file(target, other):
            raise BadInputError(f"{target}: is also an input of this run ({other}); choose another -o")


def _check_target(model: Path, target: Path, many: bool) -> None:
    """Refuse an unusable output before any work (the API checks again, with the input's data files)."""
    if not many and target.is_dir():
        raise BadInputError(f"-o {target}: is a folder: give a file name, or pass several models")
    if target.exists() and model.exists() and target.resolve() == model.resolve():
        raise BadInputError(f"{target}: output equals the input; pass --in-place to overwrite it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"{target}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{target}: output folder {folder} is not writable")
