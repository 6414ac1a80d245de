"""Text, JSON and Markdown renderings of a `Report` (pure functions returning strings)."""

from __future__ import annotations

import json
import math

from bnfold.errors import first_line, worst_exit_code
from bnfold.report import JSON_SCHEMA_VERSION, Report


def _finite_json(value):
    """JSON has no NaN/Infinity: non-finite numbers become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    return value


def _dumps(data: dict) -> str:
    return json.dumps(_finite_json(data), indent=2, default=str, allow_nan=False)


def _op_rows(report: Report) -> list[tuple[str, int, int]]:
    ops = sorted(set(report.ops_before) | set(report.ops_after))
    return [(op, report.ops_before.get(op, 0), report.ops_after.get(op, 0)) for op in ops]


def _verification_lines(report: Report) -> list[str]:
    verification = report.verification
    if verification is None:
        return ["verification: skipped (--no-verify)"]
    lines = [f"verification: {'PASSED' if verification.passed else 'FAILED'}",
             f"  onnx checker: {verification.checker_message if verification.checker_passed else 'FAILED: ' + verification.checker_message}"]
    if verification.tensors:
        worst = max(t.max_ulp_error for t in verification.tensors)
        failed = sum(not t.passed for t in verification.tensors)
        lines.append(f"  analytic check: {len(verification.tensors)} tensors, worst {worst:.3g} ulp, {failed} failed")
    if verification.runtime_engine == "onnxruntime":
        engine = f"onnxruntime (optimizations off, {_data_source(verification)})"
    else:
        engine = f"{verification.runtime_engine}, {_data_source(verification)}"
    status = verification.runtime_status
    lines.append(f"  {engine}: " + (f"verification {status}" if status.startswith("could not run") else status))
    for output in verification.outputs:
        lines.append(f"    {output.name:<24} max abs {output.max_abs_error:.3g}  max rel {output.max_rel_error:.3g}  "
                     f"rtol {output.rtol:.3g} atol {output.atol:.3g}  {_verdict(output)}")
    if verification.intermediate_tensors:
        checks = verification.intermediate_tensors
        worst = max(checks, key=lambda c: c.max_abs_error)
        failed = [c for c in checks if not c.passed]
        lines.append(f"  folded tensors compared: {len(checks)}, worst max abs {worst.max_abs_error:.3g} "
                     f"({worst.name}, atol {worst.atol:.3g}), {len(failed)} failed")
        lines += [f"    {c.name:<24} max abs {c.max_abs_error:.3g}  {_verdict(c)}" for c in failed]
    return lines


def _data_source(verification) -> str:
    """Where the compared inputs came from: a seed, or the user's arrays."""
    if verification.input_source == "user":
        return f"your --inputs arrays ({verification.samples} samples)"
    return f"seed {verification.seed}"


def _verdict(check) -> str:
    if check.passed:
        return "ok"
    if check.not_comparable:
        return f"not comparable ({check.not_comparable})"
    return f"FAIL: {check.note}" if check.note else "FAIL"


def to_text(report: Report, quiet: bool = False, verbose: bool = False) -> str:
    """The human report: op table, one line per BN, verification summary. `quiet`: problems only."""
    if quiet:
        if report.passed:
            return ""
        return "\n".join(_verification_lines(report))
    lines = [f"{report.input_path or 'model'}:", f"  {'op':<24}{'before':>8}{'after':>8}"]
    lines += [f"  {op:<24}{before:>8}{after:>8}" for op, before, after in _op_rows(report)
              if verbose or before != after or op == "BatchNormalization"]
    for record in report.folded:
        if verbose or record.op_type == "BatchNormalization":
            lines.append(f"  folded  {record.op_type} '{record.node}' {record.direction} into {', '.join(record.into)}")
    lines += [f"  merged {r.branches} branches into Conv '{r.node}'" for r in report.merged_branches]
    for record in report.skipped:
        lines.append(f"  skipped {record.op_type} '{record.node}': {record.reason.value} ({record.detail})")
    lines += [f"  repaired {repair.code}: {repair.detail}" for repair in report.repairs]
    lines += _verification_lines(report)
    if report.output_path:
        lines.append(f"wrote {report.output_path}")
    return "\n".join(lines)


def to_markdown(report: Report) -> str:
    """A summary for a CI job page."""
    lines = [f"### bnfold: `{report.input_path or 'model'}`", "", "| op | before | after |", "|---|---:|---:|"]
    lines += [f"| {op} | {before} | {after} |" for op, before, after in _op_rows(report)]
    lines += ["", "| node | decision | detail |", "|---|---|---|"]
    lines += [f"| {r.node} | folded ({r.direction}) | into {', '.join(r.into)} |" for r in report.folded]
    lines += [f"| {r.node} | merged {r.branches} branches | into Conv {r.output} |" for r in report.merged_branches]
    lines += [f"| {r.node} | skipped: `{r.reason.value}` | {r.detail} |" for r in report.skipped]
    verification = report.verification
    if verification is not None:
        verdict = "passed" if verification.passed else "FAILED"
        status = f"{verification.runtime_engine} {verification.runtime_status}, {_data_source(verification)}"
        lines += ["", f"Verification: **{verdict}** ({status})", "",
                  "| output | max abs | max rel | rtol | atol | result |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {o.name} | {o.max_abs_error:.3g} | {o.max_rel_error:.3g} | {o.rtol:.3g} | {o.atol:.3g} | "
                  f"{_verdict(o)} |" for o in verification.outputs + verification.intermediate_tensors]
    return "\n".join(lines) + "\n"


def _result_dict(result, command: str) -> dict:
    data = (result.report or Report()).to_dict()
    if result.report is None:  # the model could not be read: an empty report that did not pass
        data["passed"] = False
    data["input_path"] = str(result.model)
    data["exit_code"] = result.exit_code
    data["error"] = result.error
    data["findings"] = result.findings
    data["command"] = command
    return data


def results_to_json(results: list, command: str, many: bool) -> str:
    """One JSON object: a model's report, or for several models {"models": [...]} (schema in README)."""
    if not many:
        return _dumps(_result_dict(results[0], command))
    data = {"schema_version": JSON_SCHEMA_VERSION, "command": command,
            "exit_code": worst_exit_code(r.exit_code for r in results),
            "models": [_result_dict(r, command) for r in results]}
    return _dumps(data)


def check_text(result) -> str:
    """`bnfold check` for one model: 'clean' or one line per problem."""
    if not result.findings:
        return f"{result.model}: ok, nothing to fold"
    return "\n".join([f"{result.model}: {len(result.findings)} problem(s)"] + [f"  {line}" for line in result.findings])


def _summary_outcome(result, command: str) -> str:
    if result.error:
        return first_line(result.error)
    if command == "check":
        return "ok" if not result.findings else f"{len(result.findings)} problem(s)"
    return "folded" if result.report and result.report.folded else "nothing to fold"


def summary_table(results: list, command: str) -> str:
    """The table at the end of a run over several models; each column as wide as its widest cell,
    so long model paths do not push the numbers out of line."""
    header = ("model", "BN before", "BN after", "exit", "result")
    rows = [(str(r.model),
             str(r.report.ops_before.get("BatchNormalization", 0)) if r.report else "-",
             str(r.report.ops_after.get("BatchNormalization", 0)) if r.report else "-",
             str(r.exit_code), _summary_outcome(r, command)) for r in results]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(4)]
    # The model left-aligned, the numbers right-aligned, two spaces between columns; the outcome,
    # the last column, is not padded.
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  "
                     f"{row[4]}".rstrip() for row in [header, *rows])
