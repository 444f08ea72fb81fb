"""Changing format: convert."""

from __future__ import annotations

import click

from paramctl.cli import cli, load, shard_size_option, to_option, write_checkpoint


@cli.command("convert")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@to_option
@click.option("--dtype", help="Cast floating tensors to this dtype (e.g. bfloat16).")
@shard_size_option
def convert_command(src: str, dst: str, to: str | None, dtype: str | None, shard_size: int | None) -> None:
    """Write SRC in another format (DST's extension, or --to); DST '-' is standard output.

    Ties are kept where the target can hold them; what the target cannot hold (non-tensor
    entries of a .pt in safetensors) is named on stderr.

    \b
    Example:
      paramctl convert model.pt model.safetensors
      paramctl convert model.safetensors - --to pt > model.pt
      paramctl convert model.pt out/ --shard-size 2GB
    """
    table = load(src)
    if dtype:
        table.cast(table.floating(), dtype)
    write_checkpoint(table, dst, to, shard_size)
