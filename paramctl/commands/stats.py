"""Statistics and the CI gate: stats, check."""

from __future__ import annotations

from typing import Any

import click

from paramctl import output
from paramctl.cli import (
    checkpoint_argument,
    cli,
    load,
    output_options,
    pattern_options,
    selected,
    unique_numel,
    with_progress,
)
from paramctl.errors import Exit

STATS_COLUMNS = [
    "name",
    "shape",
    "dtype",
    "numel",
    "mean",
    "std",
    "min",
    "max",
    "absmax",
    "norm",
    "zeros",
    "nans",
    "infs",
]


@cli.command("stats")
@checkpoint_argument
@pattern_options
@click.option("--hist", is_flag=True, help="Add a 16-bin histogram over [min, max] (a sparkline on a terminal).")
@output_options
def stats_command(ckpt: str, pattern: str | None, exclude: tuple[str, ...], hist: bool, fmt: str | None) -> None:
    """Statistics per tensor over its finite values, streamed in bounded memory.

    Columns: mean, std (population), min, max, absmax, norm (L2) over the finite values, in
    float64 whatever the dtype; zeros, nans and infs count values.

    \b
    Example:
      paramctl stats model.safetensors 'weight$' --hist
    """
    from paramctl.stats import sparkline, stats_rows

    tensors = selected(load(ckpt), pattern, exclude)
    columns = STATS_COLUMNS + (["hist"] if hist else [])
    resolved = output.resolve(fmt)
    rows = stats_rows(tensors, hist, with_progress)
    if resolved in ("json", "jsonl"):
        output.emit(rows, columns, resolved)
        return
    if resolved != "table":
        rows = ({**r, "hist": ",".join(map(str, r["hist"]["counts"]))} if hist else r for r in rows)
        output.emit(rows, columns, resolved)
        return
    shown = list(rows)
    for r in shown:
        if hist:
            r["hist"] = sparkline(r["hist"]["counts"])
    numel, nbytes = unique_numel(tensors)
    footer = {
        "name": f"{len(shown)} tensors, {output.human_bytes(nbytes)}",
        "numel": numel,
        "nans": sum(r["nans"] for r in shown),
        "infs": sum(r["infs"] for r in shown),
    }
    output.emit(shown, columns, resolved, footer=footer, title=ckpt, highlight=problem_style)


def problem_style(row: dict[str, Any], column: str) -> str | None:
    if column in ("nans", "infs") and row[column]:
        return "bold red"
    if column == "name" and (row["nans"] or row["infs"]):
        return "red"
    if column in ("mean", "std", "min", "max", "absmax") and row["numel"] and row[column] is None:
        return "red"
    if column == "zeros" and row["numel"] and row["zeros"] == row["numel"]:
        return "yellow"
    return None


@cli.command("check")
@checkpoint_argument
@pattern_options
@click.option("--max-abs", type=float, metavar="X", help="Fail a tensor with a finite |value| above X.")
@click.option("--dtype", "want_dtype", metavar="D", help="Fail a floating tensor whose dtype is not D.")
@click.option("--no-all-zero", is_flag=True, help="Fail a non-empty tensor that is entirely zero.")
@click.option(
    "--expect",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="JSON from `ls --format json`: fail on any missing, extra, reshaped or retyped tensor.",
)
@output_options
def check_command(
    ckpt: str,
    pattern: str | None,
    exclude: tuple[str, ...],
    max_abs: float | None,
    want_dtype: str | None,
    no_all_zero: bool,
    expect: str | None,
    fmt: str | None,
) -> None:
    """A CI gate: exit 0 when every rule holds, 1 naming each failing tensor and rule, 2 on error.

    The default rule is no NaN and no Inf anywhere.

    \b
    Example:
      paramctl check model.safetensors --max-abs 100 --dtype bfloat16
      paramctl ls good.pt --format json > expect.json && paramctl check new.pt --expect expect.json
    """
    from paramctl.check import check, read_expectations

    table = load(ckpt)
    tensors = selected(table, pattern, exclude)
    expected = read_expectations(expect, pattern, exclude) if expect else None
    failures = check(
        tensors, max_abs=max_abs, dtype=want_dtype, no_all_zero=no_all_zero, expected=expected, progress=with_progress
    )
    resolved = output.resolve(fmt)
    if resolved == "json":
        report = {"ok": not failures, "checked": len(tensors), "failures": failures}
        output.emit_record(report, "json")
    else:
        output.emit(failures, ["name", "rule", "detail"], resolved, title=f"{ckpt}: failing tensors")
    if failures:
        output.note(f"{ckpt}: {len(failures)} failure(s) in {len({f['name'] for f in failures})} tensor(s)")
        click.get_current_context().exit(Exit.FOUND)
    if output.stderr_is_terminal():
        output.note(f"{ckpt}: ok, {len(tensors)} tensors checked")
