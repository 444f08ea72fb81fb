"""Metadata: meta."""

from __future__ import annotations

import click

from paramctl import output
from paramctl.cli import checkpoint_argument, cli, output_options, output_target, refuse_terminal
from paramctl.errors import UsageError


@cli.command("meta")
@checkpoint_argument
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Set a metadata key (repeatable).")
@click.option("--unset", multiple=True, metavar="KEY", help="Remove a metadata key (repeatable).")
@click.option("--output", "-o", "output_path", metavar="PATH", help="Where to write the edited checkpoint.")
@click.option("--in-place", is_flag=True, help="Edit CKPT itself (atomically).")
@output_options
def meta_command(
    ckpt: str,
    set_: tuple[str, ...],
    unset: tuple[str, ...],
    output_path: str | None,
    in_place: bool,
    fmt: str | None,
) -> None:
    """Show a checkpoint's metadata as JSON, or edit it with --set/--unset.

    Shown: safetensors __metadata__, a .pt's non-tensor entries, HDF5 root attributes. Edited:
    safetensors __metadata__ (the header is rewritten, the tensor bytes copied unchanged) and
    HDF5 root attributes; values are text. JSON is the default output; --format table or tsv
    gives key/value rows.

    \b
    Example:
      paramctl meta model.safetensors
      paramctl meta model.safetensors --set license=mit --unset format -o out.safetensors
      paramctl meta model.weights.h5 --set note='pruned 20%' --in-place
    """
    from paramctl.meta import edit, parse_assignments, show

    if not set_ and not unset:
        if output_path or in_place:
            raise UsageError("nothing to write: give --set KEY=VALUE or --unset KEY")
        output.emit_record(show(ckpt), fmt or "json")
        return
    if ckpt == "-":
        raise UsageError("meta edits a file, not standard input")
    target = output_target(ckpt, output_path, in_place)
    if target is None:
        raise UsageError("name the output: -o PATH, or --in-place")
    refuse_terminal(target)
    edit(ckpt, target, parse_assignments(set_), unset)
