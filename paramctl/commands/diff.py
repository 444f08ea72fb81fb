"""Comparing checkpoints: diff."""

from __future__ import annotations

from collections import Counter
from typing import Any

import click

from paramctl import output
from paramctl.cli import cli, load, no_match, output_options, pattern_options
from paramctl.errors import Exit


@cli.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@pattern_options
@click.option(
    "--atol", type=click.FloatRange(min=0), metavar="X", help="Values within atol + rtol * |b| count as the same."
)
@click.option("--rtol", type=click.FloatRange(min=0), metavar="X", help="Relative tolerance (default: bit-identical).")
@click.option("--only-different", is_flag=True, help="Leave out the rows whose status is 'same'.")
@output_options
def diff_command(
    a: str,
    b: str,
    pattern: str | None,
    exclude: tuple[str, ...],
    atol: float | None,
    rtol: float | None,
    only_different: bool,
    fmt: str | None,
) -> None:
    """Compare two checkpoints name by name, across formats; exit 0 when all the same, 1 if not.

    \b
    status   same, values, shape, dtype, only-a, only-b
    max_abs  max |a - b|
    rel_l2   ||a - b|| / ||b||
    cosine   a.b / (||a|| ||b||)

    Without --atol/--rtol, 'same' means bit-identical. Bytes are compared first and values only
    where they differ, streamed in chunks; metrics are in float64 over the positions where both
    values are finite. A table on a terminal adds a detail column (the two shapes or dtypes).

    \b
    Example:
      paramctl diff model.pt model.safetensors
      paramctl diff base.safetensors tuned.safetensors --only-different --atol 1e-6
    """
    from paramctl.diff import COLUMNS, Tolerance, diff_rows

    left, right = load(a), load(b)
    if (pattern or exclude) and not (left.select(pattern, exclude) or right.select(pattern, exclude)):
        matched = bool(left.select(pattern) or right.select(pattern))
        raise no_match(f"{a} and {b}" if a != b else a, pattern, exclude, matched)
    tolerance = None if atol is None and rtol is None else Tolerance(atol or 0.0, rtol or 0.0)
    counts: Counter[str] = Counter()

    def tallied() -> Any:
        for row in diff_rows(left, right, pattern, exclude, tolerance):
            counts[row["status"]] += 1
            if not (only_different and row["status"] == "same"):
                yield row

    resolved = output.resolve(fmt)
    if resolved == "table":
        rows = list(tallied())
        total = sum(counts.values())
        footer = {"name": f"{total} tensors", "status": f"{total - counts['same']} differ"}
        output.emit(rows, [*COLUMNS, "detail"], resolved, footer=footer, title=f"{a} vs {b}", highlight=status_style)
    else:
        output.emit(tallied(), COLUMNS, resolved)
    total = sum(counts.values())
    if total - counts["same"]:
        summary = ", ".join(f"{s}: {counts[s]}" for s in ("values", "shape", "dtype", "only-a", "only-b") if counts[s])
        output.note(f"{total - counts['same']} of {total} tensors differ ({summary})")
        click.get_current_context().exit(Exit.FOUND)
    if output.stderr_is_terminal():
        output.note(f"the same: {counts['same']} tensors")


def status_style(row: dict[str, Any], column: str) -> str | None:
    if column not in ("name", "status", "detail") or row["status"] == "same":
        return None
    return {"values": "yellow", "shape": "red", "dtype": "red"}.get(row["status"], "cyan")
