"""Statistics and the CI gate: stats, check."""

from __future__ import annotations

import os
import re
from typing import Any

import click

from paramctl import output
from paramctl.cli import (
    checkpoint_argument,
    cli,
    load,
    no_match,
    output_options,
    pattern_options,
    selected,
    unique_numel,
    with_progress,
)
from paramctl.errors import Exit, UsageError

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
@click.argument("more", nargs=-1, metavar="[CKPT...]")
@click.option("--hist", is_flag=True, help="Add a 16-bin histogram over [min, max] (a sparkline on a terminal).")
@click.option(
    "--plot",
    metavar="FILE",
    help="Also draw the tensors into FILE (.png, .svg, .html): histograms and norm/std by layer; lines with --trend.",
)
@click.option(
    "--trend", is_flag=True, help="Follow tensors across checkpoints: stats --trend run/checkpoint-*/ [PATTERN]."
)
@click.option(
    "--optimizer",
    "by_param",
    is_flag=True,
    help="Per parameter: optimizer step, moment norms, Adam's update RMS (PATTERN: parameter names).",
)
@output_options
def stats_command(
    ckpt: str,
    pattern: str | None,
    exclude: tuple[str, ...],
    more: tuple[str, ...],
    hist: bool,
    plot: str | None,
    trend: bool,
    by_param: bool,
    fmt: str | None,
) -> None:
    """Statistics per tensor over its finite values, streamed in bounded memory.

    Columns: mean, std (population), min, max, absmax, norm (L2) over the finite values, in
    float64 whatever the dtype; zeros, nans and infs count values.

    \b
    Example:
      paramctl stats model.safetensors 'weight$' --hist
      paramctl stats run.ckpt --optimizer
      paramctl stats model.safetensors --plot params.png
      paramctl stats run/checkpoint-*/ 'attn.c_attn.weight' --trend --plot trend.png

    With --trend: every argument that is an existing path is a checkpoint, in the order of the
    numbers in their paths (checkpoint-200 before checkpoint-1000); a last one that is not is the
    PATTERN. Rows per tensor per checkpoint: step, mean, std, absmax, norm, and rel_change, how far
    it moved since the previous checkpoint (||x - prev|| / ||prev||).

    With --optimizer: per parameter of each optimizer, its step count, the L2 norms of its
    first and second moments (m_norm, v_norm) and update_rms, the RMS of Adam's step direction
    m_hat / (sqrt(v_hat) + eps) (a step is lr times it).
    """
    if trend or more:
        stats_trend((ckpt, *(a for a in (pattern, *more) if a is not None)), exclude, trend, plot, fmt)
        return
    if by_param:
        from paramctl import optimizer

        table = load(ckpt)
        states = optimizer.find(table)
        for line in optimizer.unmapped_notes(states):
            output.note(line)
        slots = optimizer.matching(optimizer.slot_stats(states), pattern, exclude, table.source)
        output.emit(slots, optimizer.STATS_COLUMNS, output.resolve(fmt), title=ckpt)
        return
    from paramctl.stats import sparkline, stats_rows

    tensors = selected(load(ckpt), pattern, exclude)
    columns = STATS_COLUMNS + (["hist"] if hist else [])
    if plot:
        stats_plot(tensors, plot, ckpt)
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
@click.argument("arguments", metavar="CKPT... [PATTERN]", nargs=-1, required=True)
@click.option("--pattern", "-p", metavar="PATTERN", help="Check only the names matching PATTERN (a regex).")
@click.option(
    "--exclude", "-x", multiple=True, metavar="PATTERN", help="Leave out names matching PATTERN (repeatable)."
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Check trackers too (Lightning's callbacks and loops), not only the model and the optimizer state.",
)
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
    arguments: tuple[str, ...],
    pattern: str | None,
    exclude: tuple[str, ...],
    everything: bool,
    max_abs: float | None,
    want_dtype: str | None,
    no_all_zero: bool,
    expect: str | None,
    fmt: str | None,
) -> None:
    """A CI gate: exit 0 when every rule holds, 1 naming each failing tensor and rule, 2 on error.

    The default rule is no NaN and no Inf. Every CKPT is checked, each on its own (--expect too):
    `check shards/*.safetensors` checks every file. PATTERN selects names; give it with -p, or as
    the last of several arguments when that is not an existing file (`check model.pt 'weight$'`).
    A PATTERN that selects nothing, in every CKPT, is an error (exit 2), as is a CKPT with nothing
    to check: a gate never passes because it looked at nothing.

    Scope: the model's tensors and the optimizer state. Trackers are left out unless --all: in a
    Lightning .ckpt, everything outside state_dict and optimizer_states (callbacks such as
    ModelCheckpoint's best_model_score and kth_value, which is inf by design; loops).

    \b
    Example:
      paramctl check model.safetensors --max-abs 100 --dtype bfloat16
      paramctl check shards/*.safetensors
      paramctl check last.ckpt -p '^state_dict\\.' --no-all-zero
      paramctl ls good.pt --format json > expect.json && paramctl check new.pt --expect expect.json
    """
    from paramctl.check import check, in_scope, read_expectations

    ckpts, pattern = split_check_arguments(arguments, pattern)
    expected = read_expectations(expect, pattern, exclude) if expect else None
    chosen = []
    for path in ckpts:
        table = load(path)
        rows = table.select(pattern, exclude)
        tensors = rows if everything else in_scope(table, rows)
        if not tensors and not pattern:
            why = "no tensors" if not table.tensors else "nothing outside the trackers (check them with --all)"
            raise UsageError(
                f"nothing to check: {why}" if not exclude else "every tensor is left out by --exclude", path
            )
        chosen.append((path, table, rows, tensors))
    if pattern and not any(tensors for *_, tensors in chosen):
        where = chosen[0][0] if len(chosen) == 1 else f"{len(chosen)} checkpoints"
        error = no_match(where, pattern, exclude, matched=any(t.select(pattern) for _, t, *_ in chosen))
        if any(rows for _, _, rows, _ in chosen):
            error = UsageError(f"{output.quoted(pattern)} selects trackers only: check them with --all", where)
        elif len(arguments) > 1 and pattern == arguments[-1] and re.fullmatch(r"[\w./-]+\.\w+", pattern):
            error = UsageError(f"{error.message} (and there is no file of that name)", where)
        raise error
    failures = []
    checked = 0
    for path, _table, _rows, tensors in chosen:
        found = check(
            tensors,
            max_abs=max_abs,
            dtype=want_dtype,
            no_all_zero=no_all_zero,
            expected=expected,
            progress=with_progress,
        )
        failures += [{"file": output.redact_urls(path), **f} for f in found] if len(chosen) > 1 else found
        checked += len(tensors)
    columns = (["file"] if len(chosen) > 1 else []) + ["name", "rule", "detail"]
    what = ckpts[0] if len(chosen) == 1 else f"{len(chosen)} checkpoints"
    resolved = output.resolve(fmt)
    if resolved == "json":
        report: dict[str, Any] = {"ok": not failures, "checked": checked, "failures": failures}
        if len(chosen) > 1:
            report["files"] = ckpts
        output.emit_record(report, "json")
    else:
        output.emit(failures, columns, resolved, title=f"{what}: failing tensors")
    if failures:
        output.note(
            f"{what}: {len(failures)} failure(s) in {len({(f.get('file'), f['name']) for f in failures})} tensor(s)"
        )
        click.get_current_context().exit(Exit.FOUND)
    if output.stderr_is_terminal():
        output.note(f"{what}: ok, {checked} tensors checked")


def split_check_arguments(arguments: tuple[str, ...], pattern: str | None) -> tuple[list[str], str | None]:
    """`check`'s positional ARGUMENTS as checkpoints and a pattern.

    With -p PATTERN, or a single argument, every argument is a checkpoint. Otherwise the last one
    is the PATTERN unless it names a checkpoint (an existing path, '-' or a URL): so
    `check shards/*.safetensors` checks every shard and `check model.pt 'weight$'` keeps its meaning."""
    if pattern is not None or len(arguments) == 1:
        return list(arguments), pattern
    *ckpts, last = arguments
    if last == "-" or "://" in last or os.path.exists(last):
        return list(arguments), None
    return ckpts, last


# --- pictures and trends (stats --plot, stats --trend) ----------------------------------------------


def stats_plot(tensors: list, path: str, title: str) -> None:
    """Draw TENSORS into PATH (matplotlib is imported here only)."""
    from paramctl.plots import check_target, plot_stats
    from paramctl.stats import stats_rows

    check_target(path)
    rows = list(stats_rows(tensors))
    shown = plot_stats(tensors, rows, path, title, STATS_COLUMNS)
    more = f"; {len(tensors) - shown} more not drawn (narrow with PATTERN)" if shown < len(tensors) else ""
    output.note(f"wrote {path}: histograms of {shown} tensors{more}")


def stats_trend(
    arguments: tuple[str, ...], exclude: tuple[str, ...], trend: bool, plot: str | None, fmt: str | None
) -> None:
    """stats --trend: the checkpoints among ARGUMENTS (the last one may be the PATTERN) in order."""
    from paramctl.trend import COLUMNS, ordered, trend_rows

    if not trend:
        raise UsageError("stats takes one CKPT and a PATTERN; for several checkpoints, add --trend")
    paths, pattern = split_check_arguments(arguments, None)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UsageError("no such checkpoint", missing[0])
    paths = ordered(paths)
    if plot:
        from paramctl.plots import check_target

        check_target(plot)
    checkpoints = [(p, load(p)) for p in paths]
    rows = trend_rows(checkpoints, pattern, exclude)
    if not rows and (pattern or exclude):
        where = paths[0] if len(paths) == 1 else f"{len(paths)} checkpoints"
        raise no_match(where, pattern, exclude, matched=any(c.select(pattern) for _, c in checkpoints))
    if plot:
        from paramctl.plots import plot_trend

        plot_trend(rows, plot, f"{len(paths)} checkpoints" + (f", {pattern}" if pattern else ""), COLUMNS)
        output.note(f"wrote {plot}")
    output.emit(rows, COLUMNS, output.resolve(fmt), title=f"{len(paths)} checkpoints, in order")
