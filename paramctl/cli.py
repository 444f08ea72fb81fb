"""The command line: parse, call the library, hand rows to `output`. Errors become exit codes here."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from paramctl import output
from paramctl.errors import Exit, ParamctlError, UsageError
from paramctl.table import Checkpoint, Tensor


class Paramctl(click.Group):
    """The one error boundary: ParamctlError -> one line on stderr and exit 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except ParamctlError as e:
            if _debug(ctx):
                raise
            output.error(str(e))
            ctx.exit(e.exit_code)
        except BrokenPipeError:  # `paramctl ls big.pt | head`: the reader left, nothing is wrong
            sys.stderr.close()
            ctx.exit(0)
        except KeyboardInterrupt:
            ctx.exit(130)
        except Exception as e:
            if _debug(ctx):
                raise
            output.error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)")
            ctx.exit(Exit.ERROR)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("PARAMCTL_DEBUG") == "1"


@click.group(cls=Paramctl, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks (also PARAMCTL_DEBUG=1).")
@click.version_option(package_name="paramctl")
def cli(debug: bool) -> None:
    """Inspect and edit saved model checkpoints: PyTorch, safetensors and Keras HDF5.

    \b
    Examples:
      paramctl ls model.pt '.*weight'
      paramctl tree model.safetensors --depth 2
      paramctl convert model.pt model.safetensors
    """


# --- shared options ----------------------------------------------------------------------------


def checkpoint_argument(fn: Callable) -> Callable:
    return click.argument("ckpt", metavar="CKPT")(fn)


def pattern_options(fn: Callable) -> Callable:
    fn = click.option(
        "--exclude", "-x", multiple=True, metavar="PATTERN", help="Leave out names matching PATTERN (repeatable)."
    )(fn)
    return click.argument("pattern", required=False)(fn)


def output_options(fn: Callable) -> Callable:
    return click.option(
        "--format",
        "-f",
        "fmt",
        type=click.Choice(output.FORMATS),
        help="Output format (default: table on a terminal, tab-separated rows when piped).",
    )(fn)


def load(path: str) -> Checkpoint:
    from paramctl.formats import load as load_checkpoint

    return load_checkpoint(path)


def selected(ckpt: Checkpoint, pattern: str | None, exclude: tuple[str, ...]) -> list[Tensor]:
    rows = ckpt.select(pattern, exclude)
    if not rows and (pattern or exclude):
        output.note(f"no tensor in {ckpt.source} matches")
    return rows


def unique_numel(tensors: list[Tensor]) -> tuple[int, int]:
    """Parameters and bytes, counting a tie group once."""
    seen = set()
    numel = nbytes = 0
    for t in tensors:
        key = t.tie or t.name
        if key not in seen:
            seen.add(key)
            numel += t.numel
            nbytes += t.nbytes
    return numel, nbytes


# --- commands ----------------------------------------------------------------------------------

LS_COLUMNS = ["name", "shape", "dtype", "numel", "nbytes"]


@cli.command("ls")
@checkpoint_argument
@pattern_options
@output_options
def ls_command(ckpt: str, pattern: str | None, exclude: tuple[str, ...], fmt: str | None) -> None:
    """List tensors: name, shape, dtype, numel, nbytes.

    PATTERN is a regular expression searched in each name, as grep does.

    \b
    Example:
      paramctl ls model.pt '.*weight'
      cat model.pt | paramctl ls - --format json
    """
    table = load(ckpt)
    rows = selected(table, pattern, exclude)
    numel, nbytes = unique_numel(rows)
    footer = {"name": f"{len(rows)} tensors", "numel": numel, "nbytes": nbytes}
    records = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel, "nbytes": t.nbytes} for t in rows
    ]
    output.emit(records, LS_COLUMNS, fmt, footer=footer, title=ckpt)


@cli.command("tree")
@checkpoint_argument
@pattern_options
@click.option("--depth", "-d", type=click.IntRange(min=1), help="Show names down to this many levels.")
@output_options
def tree_command(ckpt: str, pattern: str | None, exclude: tuple[str, ...], depth: int | None, fmt: str | None) -> None:
    """Show the hierarchy of names (split on '.' and '/') with counts per subtree.

    \b
    Example:
      paramctl tree nested.pt --depth 2
    """
    table = load(ckpt)
    rows = tree_rows(selected(table, pattern, exclude), depth)
    resolved = output.resolve(fmt)
    if resolved == "table":
        for row in rows:
            row["path"] = "  " * (row["depth"] - 1) + row["label"]
        tensors = selected(table, pattern, exclude)
        footer = {"path": f"{len(tensors)} tensors", "numel": sum(t.numel for t in tensors)}
        footer["nbytes"] = sum(t.nbytes for t in tensors)
        output.emit(rows, ["path", "tensors", "numel", "nbytes"], resolved, footer=footer, title=ckpt)
    else:
        output.emit(rows, ["path", "depth", "tensors", "numel", "nbytes"], resolved)


def tree_rows(tensors: list[Tensor], depth: int | None) -> list[dict[str, Any]]:
    """One row per prefix of the names, depth first, each with the totals of its subtree."""
    root: dict[str, Any] = {"children": {}}
    for t in tensors:
        cuts = [m.start() for m in re.finditer(r"[./]", t.name)] + [len(t.name)]
        node, start = root, 0
        for level, cut in enumerate(cuts, 1):
            if depth is not None and level > depth:
                break
            path = t.name[:cut]
            node = node["children"].setdefault(
                path,
                {
                    "path": path,
                    "label": t.name[start:cut],
                    "depth": level,
                    "children": {},
                    "tensors": 0,
                    "numel": 0,
                    "nbytes": 0,
                },
            )
            node["tensors"] += 1
            node["numel"] += t.numel
            node["nbytes"] += t.nbytes
            start = cut + 1

    rows: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        for child in node["children"].values():
            rows.append({k: v for k, v in child.items() if k != "children"})
            walk(child)

    walk(root)
    return rows


@cli.command("info")
@checkpoint_argument
@output_options
def info_command(ckpt: str, fmt: str | None) -> None:
    """Summarise a checkpoint: format, size, counts, bytes by dtype, metadata, non-tensor entries.

    \b
    Example:
      paramctl info model.ckpt --format json
    """
    from paramctl.formats import non_tensor_entries

    table = load(ckpt)
    numel, nbytes = unique_numel(table.tensors)
    by_dtype: dict[str, dict[str, int]] = {}
    for t in table.tensors:
        entry = by_dtype.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    record: dict[str, Any] = {
        "file": ckpt,
        "format": table.format,
        "file_size": table.file_size,
        "tensors": len(table),
        "parameters": numel,
        "bytes": nbytes,
        "dtypes": by_dtype,
        "tie_groups": table.tie_groups(),
        "metadata": table.metadata,
    }
    entries = non_tensor_entries(table)
    if entries:
        record["entries"] = entries
    if output.resolve(fmt) not in ("json", "jsonl"):
        record["dtypes"] = "; ".join(
            f"{d}: {v['tensors']} tensors, {output.human_bytes(v['bytes'])}" for d, v in by_dtype.items()
        )
        record["tie_groups"] = "; ".join(" = ".join(group) for group in record["tie_groups"])
    output.emit_record(record, fmt)


@cli.command("show")
@checkpoint_argument
@click.argument("name")
@click.argument("index", required=False)
@output_options
def show_command(ckpt: str, name: str, index: str | None, fmt: str | None) -> None:
    """Print the values of one tensor, numpy-style, summarised when large.

    INDEX is numpy indexing with integers, slices and '...', e.g. '[0, :5]'.

    \b
    Example:
      paramctl show mlp.pt 0.weight '[0, :5]'
    """
    import numpy as np

    from paramctl.indexing import parse_index

    tensor = load(ckpt)[name]
    key = parse_index(index) if index else ()
    try:
        values = tensor.array()[key]
    except IndexError as e:
        raise UsageError(f"index {index} does not fit {name!r} of shape {list(tensor.shape)}: {e}") from None
    if output.resolve(fmt) in ("json", "jsonl"):
        record = {"name": name, "shape": list(tensor.shape), "dtype": tensor.dtype, "index": index}
        record["values"] = json_values(np.asarray(values))
        output.emit_record(record, fmt)
        return
    with np.printoptions(threshold=1000, edgeitems=3, linewidth=100):
        click.echo(np.array2string(np.asarray(values), separator=", "))


def json_values(values: Any) -> Any:
    """Nested lists of JSON numbers; NaN and infinities as the strings 'nan', 'inf', '-inf'."""
    import numpy as np

    if values.dtype.kind in "iub":
        return values.tolist()
    if values.dtype.kind == "c":
        return np.stack([values.real, values.imag], axis=-1).astype(np.float64).tolist()
    as_float = values.astype(np.float64)
    if np.isfinite(as_float).all():
        return as_float.tolist()
    return np.where(np.isfinite(as_float), as_float.astype(object), np.char.mod("%r", as_float).astype(object)).tolist()


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
    rows = stats_rows(with_progress(tensors), hist)
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


def with_progress(tensors: list[Tensor]) -> Any:
    """TENSORS, with a progress bar on stderr when it is a terminal and the work is large."""
    total = sum(t.nbytes for t in tensors)
    if not output.stderr_is_terminal() or total < 256 << 20:
        yield from tensors
        return
    from rich.progress import Progress

    with Progress(transient=True, console=output.stderr_console()) as progress:
        task = progress.add_task("reading", total=total)
        for t in tensors:
            yield t
            progress.advance(task, t.nbytes)


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
        with_progress(tensors), max_abs=max_abs, dtype=want_dtype, no_all_zero=no_all_zero, expected=expected
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


@cli.command("convert")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--to", "to", type=click.Choice(["pt", "safetensors", "hdf5", "keras"]), help="Output format.")
@click.option("--dtype", help="Cast floating tensors to this dtype (e.g. bfloat16).")
def convert_command(src: str, dst: str, to: str | None, dtype: str | None) -> None:
    """Write SRC in another format (DST's extension, or --to); DST '-' is standard output.

    Ties are kept where the target can hold them; what the target cannot hold (non-tensor
    entries of a .pt in safetensors) is named on stderr.

    \b
    Example:
      paramctl convert model.pt model.safetensors
      paramctl convert model.safetensors - --to pt > model.pt
    """
    from paramctl.formats import losses, output_format, save

    refuse_terminal(dst)
    table = load(src)
    fmt = output_format(dst, table, to)
    for loss in losses(table, fmt):
        output.note(f"warning: {loss}")
    if dtype:
        table.cast(table.floating(), dtype)
    save(table, dst, fmt)


def refuse_terminal(dst: str) -> None:
    if dst == "-" and output.stdout_is_terminal():
        raise UsageError("refusing to write a binary checkpoint to a terminal: redirect it, or name a file")


def main() -> None:
    cli(prog_name="paramctl")
