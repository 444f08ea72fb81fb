"""Changing format: convert."""

from __future__ import annotations

import click

from paramctl.cast import cast_lazily
from paramctl.cli import cli, load, shard_size_option, to_option, write_checkpoint
from paramctl.commands.edit import report_losses


@cli.command("convert")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@to_option
@click.option("--dtype", help="Cast floating tensors to this dtype (e.g. bfloat16).")
@click.option("--dequantize", is_flag=True, help="Write quantized tensors (GGUF q4_k, q8_0, ...) as float32 values.")
@shard_size_option
def convert_command(
    src: str, dst: str, to: str | None, dtype: str | None, dequantize: bool, shard_size: int | None
) -> None:
    """Write SRC in another format (DST's extension, or --to); DST '-' is standard output.

    Ties are kept where the target can hold them; what the target cannot hold (non-tensor
    entries of a .pt in safetensors) is named on stderr.

    \b
    Example:
      paramctl convert model.pt model.safetensors
      paramctl convert model.safetensors - --to pt > model.pt
      paramctl convert model.pt out/ --shard-size 2GB
      paramctl convert model-q4_k.gguf model.safetensors --dequantize
    """
    table = load(src)
    if dequantize:
        table.tensors = [t.dequantized() if hasattr(t, "dequantized") else t for t in table.tensors]
    storages = cast_lazily(table, table.floating(), dtype) if dtype else []  # converted as written
    write_checkpoint(table, dst, to, shard_size)
    report_losses(storages, dtype or "")
