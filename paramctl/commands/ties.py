"""Ties: tied (find them), tie (make one), untie (materialize copies)."""

from __future__ import annotations

import click

from paramctl import output
from paramctl.cli import (
    checkpoint_argument,
    cli,
    load,
    output_options,
    output_target,
    pattern_options,
    selected,
    write_checkpoint,
    write_options,
)


@cli.command("tied")
@checkpoint_argument
@pattern_options
@click.option(
    "--by-value", is_flag=True, help="Also find separately stored tensors with identical bytes (kind 'equal')."
)
@click.option("--overlaps", is_flag=True, help="List views of one storage that share elements without being ties.")
@output_options
def tied_command(
    ckpt: str, pattern: str | None, exclude: tuple[str, ...], by_value: bool, overlaps: bool, fmt: str | None
) -> None:
    """Groups of names that are one tensor, with their kind.

    \b
    shared    the same stored bytes viewed the same way (a layer used twice, saved by torch)
    declared  an alias the file records (safetensors save_model metadata, paramctl's HDF5 record)
    equal     separately stored, identical dtype, shape and bytes (--by-value)

    \b
    Example:
      paramctl tied shared.pt
      paramctl tied model.safetensors --by-value --format json
    """
    from paramctl import ties

    table = load(ckpt)
    tensors = selected(table, pattern, exclude)
    if overlaps:
        rows = [{"names": pair, "kind": "overlap"} for pair in ties.overlaps(table, tensors)]
    else:
        found = ties.groups(table, tensors)
        if by_value:
            found += ties.equal_groups(tensors)
        rows = [{"names": g.names, "kind": g.kind} for g in found]
    resolved = output.resolve(fmt)
    if resolved not in ("json", "jsonl"):
        rows = [{"names": " = ".join(r["names"]), "kind": r["kind"]} for r in rows]
    output.emit(rows, ["names", "kind"], resolved, title=ckpt)


@cli.command("tie")
@checkpoint_argument
@click.argument("src")
@click.argument("dsts", metavar="DST...", nargs=-1, required=True)
@write_options
def tie_command(
    ckpt: str, src: str, dsts: tuple[str, ...], output_path: str | None, in_place: bool, to: str | None
) -> None:
    """Make each DST the same tensor as SRC (shape and dtype must match).

    A .pt stores one shared storage; safetensors one copy plus a save_model-style alias (so
    `safetensors.torch.load_model` re-ties); HDF5 copies plus paramctl's record of the tie.

    \b
    Example:
      paramctl tie model.pt embed.weight lm_head.weight -o tied.pt
    """
    from paramctl import ties

    table = load(ckpt)
    ties.tie(table, src, dsts)
    write_checkpoint(table, output_target(ckpt, output_path, in_place), to)


@cli.command("untie")
@checkpoint_argument
@pattern_options
@write_options
def untie_command(
    ckpt: str, pattern: str | None, exclude: tuple[str, ...], output_path: str | None, in_place: bool, to: str | None
) -> None:
    """Store every name of the selected ties as a separate copy.

    \b
    Example:
      paramctl untie model.safetensors -o untied.safetensors
    """
    from paramctl import ties

    table = load(ckpt)
    copied = ties.untie(table, [t.name for t in selected(table, pattern, exclude)])
    if output.stderr_is_terminal():
        output.note(f"untied {copied} name(s)")
    write_checkpoint(table, output_target(ckpt, output_path, in_place), to)
