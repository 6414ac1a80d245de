"""The `bnfold` command: parse flags, call the API, render, map outcomes to exit codes.

Exit codes: 0 success (also nothing to fold), 1 verification failed (nothing written) or, for
`check`, foldable/training BNs found, 2 usage error or bad input (one line on stderr).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from bnfold import api, render
from bnfold.errors import BadInputError, BnfoldError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _DefaultToFold(click.Group):
    """`bnfold MODEL` means `bnfold fold MODEL`: the first argument picks a subcommand only if it
    names one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["fold", *args]
        return super().parse_args(ctx, args)


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """`NAME:D0,D1,...` -> {NAME: [D0, D1, ...]}; a malformed value is a BadInputError."""
    shapes = {}
    for value in values:
        name, _, dims = value.rpartition(":")
        try:
            parsed = [int(d) for d in dims.split(",")] if dims else []
        except ValueError:
            parsed = None
        if not name or parsed is None or any(d <= 0 for d in parsed):
            raise BadInputError(f"--input-shape '{value}': expected NAME:D0,D1,... with positive integers")
        shapes[name] = parsed
    return shapes


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(code)


def _output_path(model: Path, output: str | None, in_place: bool) -> Path:
    if in_place:
        if output:
            raise BadInputError("--in-place and -o/--output exclude each other")
        return model
    target = Path(output) if output else model.with_name(model.stem + ".folded.onnx")
    if target.exists() and model.exists() and target.resolve() == model.resolve():
        raise BadInputError(f"{target}: output equals the input; pass --in-place to overwrite it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"{target}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{target}: output folder {folder} is not writable")
    return target


@click.group(cls=_DefaultToFold, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, and verify the result.

    `bnfold MODEL` is short for `bnfold fold MODEL`.
    """


@main.command("fold")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", help="Output path (default: MODEL.folded.onnx beside the input).")
@click.option("--in-place", is_flag=True, help="Replace MODEL, only after the result is complete and verified.")
@click.option("--no-verify", is_flag=True, help="Skip the checker, analytic and onnxruntime verification.")
@click.option("--input-shape", multiple=True, metavar="NAME:D0,D1,...", help="Shape for an input with dynamic dims.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random verification inputs.")
@click.option("--atol", type=float, help="Absolute tolerance per output element (default by dtype).")
@click.option("--rtol", type=float, help="Relative tolerance per output element (default by dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.option("--report-md", type=click.Path(path_type=Path), help="Also write a Markdown summary here.")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
@click.option("-v", "--verbose", is_flag=True, help="List every op type and every folded node.")
def fold_command(model: Path, output: str | None, in_place: bool, no_verify: bool, input_shape: tuple[str, ...],
                 seed: int, atol: float | None, rtol: float | None, as_json: bool, report_md: Path | None,
                 quiet: bool, verbose: bool) -> None:
    """Fold MODEL and write the result (nothing is written if verification fails)."""
    try:
        shapes = parse_input_shapes(input_shape)
        for flag, value in (("--atol", atol), ("--rtol", rtol)):
            if value is not None and not value >= 0:
                raise BadInputError(f"{flag} {value}: must be a non-negative number")
        target = _output_path(model, output, in_place)
        result = api.fold(model, verify=not no_verify, seed=seed, input_shapes=shapes, atol=atol, rtol=rtol,
                          raise_on_failure=False)
        if result.report.passed:
            result.save(target)
    except BnfoldError as error:
        _fail(str(error), error.exit_code)
    report = result.report
    if report_md is not None:
        report_md.write_text(render.to_markdown(report))
    if as_json:
        click.echo(render.to_json(report))
    else:
        text = render.to_text(report, quiet=quiet, verbose=verbose)
        if text:
            click.echo(text, err=not report.passed and quiet)
    if not report.passed:
        click.echo("bnfold: verification failed; nothing written", err=True)
        sys.exit(EXIT_FAILED)
