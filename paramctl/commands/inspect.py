"""Reading commands: ls, tree, info, show."""

from __future__ import annotations

import re
from typing import Any

import click

from paramctl import output
from paramctl.cli import checkpoint_argument, cli, load, output_options, pattern_options, selected, unique_numel
from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Tensor

LS_COLUMNS = ["name", "shape", "dtype", "numel", "nbytes"]


@cli.command("ls")
@checkpoint_argument
@pattern_options
@click.option(
    "--optimizer", "by_param", is_flag=True, help="List optimizer state under each parameter's name (PATTERN: names)."
)
@output_options
def ls_command(ckpt: str, pattern: str | None, exclude: tuple[str, ...], by_param: bool, fmt: str | None) -> None:
    """List tensors: name, shape, dtype, numel, nbytes.

    PATTERN is a regular expression searched in each name, as grep does. A tied name is
    marked with the first name of its tie (column `tie` in a table and in JSON; tab-separated
    rows keep their five columns).

    \b
    Example:
      paramctl ls model.pt '.*weight'
      cat model.pt | paramctl ls - --format json
      paramctl ls run.ckpt --optimizer 'head'
    """
    table = load(ckpt)
    if by_param:
        from paramctl import optimizer

        states = optimizer.find(table)
        for line in optimizer.unmapped_notes(states):
            output.note(line)
        slots = optimizer.matching(optimizer.slot_rows(table, states), pattern, exclude, table.source)
        output.emit(slots, optimizer.LS_COLUMNS, output.resolve(fmt), title=ckpt)
        return
    rows = selected(table, pattern, exclude)
    numel, nbytes = unique_numel(rows)
    footer = {"name": f"{len(rows)} tensors", "numel": numel, "nbytes": nbytes}
    records = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel, "nbytes": t.nbytes, "tie": t.tie}
        for t in rows
    ]
    resolved = output.resolve(fmt)
    marks_ties = resolved in ("json", "jsonl") or (resolved == "table" and any(t.tie for t in rows))
    output.emit(records, LS_COLUMNS + ["tie"] * marks_ties, resolved, footer=footer, title=ckpt)


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
    from paramctl.check import MODEL, OPTIMIZER, roles
    from paramctl.formats import non_tensor_entries

    table = load(ckpt)
    role = roles(table)
    numel, nbytes = unique_numel(table.tensors)
    by_dtype: dict[str, dict[str, int]] = {}
    seen = set()
    for t in table.tensors:
        if (t.tie or t.name) in seen:  # a tie is one tensor: its bytes count once
            continue
        seen.add(t.tie or t.name)
        entry = by_dtype.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    record: dict[str, Any] = {
        "file": output.redact_urls(ckpt),
        "format": table.format,
        "file_size": files_size(table) or table.file_size,
        "tensors": len(table),
        # the model's own tensors; optimizer state and trackers (Lightning callbacks) are counted apart
        "parameters": unique_numel([t for t in table.tensors if role[id(t)] == MODEL])[0],
        "bytes": nbytes,
        "dtypes": by_dtype,
        "tie_groups": table.tie_groups(),
        "metadata": table.metadata,
    }
    optimizer = unique_numel([t for t in table.tensors if role[id(t)] == OPTIMIZER])[0]
    other = numel - record["parameters"] - optimizer
    if optimizer:
        record["optimizer_state"] = optimizer
    if other:
        record["other_tensors"] = other
    entries = non_tensor_entries(table)
    if entries:
        record["entries"] = entries
    if output.resolve(fmt) not in ("json", "jsonl"):
        record["dtypes"] = "; ".join(
            f"{d}: {v['tensors']} tensors, {output.human_bytes(v['bytes'])}" for d, v in by_dtype.items()
        )
        record["tie_groups"] = "; ".join(" = ".join(group) for group in record["tie_groups"])
    output.emit_record(record, fmt)


def files_size(table: Checkpoint) -> int:
    """The bytes of the files a checkpoint read from several (a sharded one: its index and shards)."""
    if table.format != "sharded":
        return 0
    from paramctl import remote

    return remote.size(table.extra.index) + sum(shard.ckpt.file_size for shard in table.extra.shards)


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
