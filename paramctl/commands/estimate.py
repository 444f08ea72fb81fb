"""Memory estimates: estimate."""

from __future__ import annotations

import click

from paramctl import output
from paramctl.cli import checkpoint_argument, cli, load, output_options


@cli.command("estimate")
@checkpoint_argument
@click.option("--config", "config_path", metavar="FILE", help="The model's config.json (default: the one beside CKPT).")
@click.option("--context", type=click.IntRange(min=1), metavar="N", help="Tokens per sequence for the KV cache.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences for the KV cache.")
@click.option("--kv-dtype", metavar="D", help="dtype of the KV cache (default: the weights' dtype).")
@output_options
def estimate_command(
    ckpt: str, config_path: str | None, context: int | None, batch: int, kv_dtype: str | None, fmt: str | None
) -> None:
    """Memory to serve or train CKPT: weights at each precision, Adam training state, KV cache.

    \b
    weights at D        P * size(D) (+ integer buffers as stored); int4 is P / 2
    train, Adam, fp32   4P weights + 4P grads + 8P moments = 16P
    train, mixed        2P weights + 2P grads + 4P fp32 master + 8P moments = 16P
    KV cache per token  2 * layers * kv_heads * head_dim * size(dtype)
    KV cache            per token * context * batch (context: --context, else the config's maximum)

    P counts the model's floating-point parameters once per tie (optimizer state in a training
    checkpoint is left out). Activations are not included. The KV cache needs a config.json
    beside CKPT, or --config.

    \b
    Example:
      paramctl estimate model/model.safetensors --context 4096 --batch 8
      paramctl estimate model.safetensors --config config.json --format json
    """
    from paramctl.dtypes import check_name
    from paramctl.estimate import estimate, find_config, is_decoder_config, read_config, rows

    if kv_dtype:
        check_name(kv_dtype)
    table = load(ckpt)
    found = find_config(ckpt, config_path)
    config = read_config(found) if found else None
    if config is not None and not config_path and not context and not is_decoder_config(config):
        output.note(f"no KV cache: {found} describes no attention layers (a diffusers or vision config)")
        config = None
    record = estimate(table, config, context, batch, kv_dtype, found or "")
    if found and output.stderr_is_terminal():
        output.note(f"KV cache from {found}")
    resolved = output.resolve(fmt)
    if resolved in ("json", "jsonl"):
        output.emit_record(record, resolved)
        return
    title = f"{ckpt}: {record['parameters']:,} parameters"
    output.emit(rows(record), ["item", "nbytes"], resolved, title=title)
