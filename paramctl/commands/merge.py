"""Merging checkpoints: merge (linear, slerp, task arithmetic, TIES, LoRA adapters)."""

from __future__ import annotations

import click

from paramctl import output
from paramctl.cli import cli, load, shard_size_option, to_option, write_checkpoint
from paramctl.errors import UsageError


def parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@cli.command("merge")
@click.argument("models", nargs=-1, required=True, metavar="A B [C...]")
@click.option(
    "--method",
    "-m",
    type=click.Choice(["linear", "slerp", "task-arithmetic", "ties"]),
    default="linear",
    show_default=True,
    help="How to merge.",
)
@click.option("--weights", "-w", callback=parse_weights, metavar="W1,W2,...", help="One weight per model.")
@click.option("--t", "t", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="slerp: 0 is A, 1 is B.")
@click.option("--base", metavar="BASE", help="task-arithmetic, ties: the model the others were fine-tuned from.")
@click.option("--lambda", "lam", type=float, default=1.0, show_default=True, help="Scale of the merged task vector.")
@click.option(
    "--density", type=click.FloatRange(0, 1, min_open=True), default=0.2, show_default=True, help="ties: fraction kept."
)
@click.option("--lora", "lora", metavar="ADAPTER_DIR", help="Fold this peft LoRA adapter into the one model given.")
@click.option("--dtype", help="Write floating tensors in this dtype (default: the first model's).")
@click.option("--allow-missing", is_flag=True, help="Merge the names the models share instead of refusing.")
@click.option("--output", "-o", "output_path", metavar="PATH", help="Where to write ('-': standard output).")
@to_option
@shard_size_option
def merge_command(
    models: tuple[str, ...],
    method: str,
    weights: list[float] | None,
    t: float,
    base: str | None,
    lam: float,
    density: float,
    lora: str | None,
    dtype: str | None,
    allow_missing: bool,
    output_path: str | None,
    to: str | None,
    shard_size: int | None,
) -> None:
    """Merge checkpoints into one, in float32, written in the first model's dtypes and layout.

    \b
    linear           sum w_i M_i / sum w_i (a model soup; equal weights by default)
    slerp            spherical interpolation of two models at --t (Shoemake; lerp when colinear)
    task-arithmetic  BASE + lambda * sum w_i (M_i - BASE)
    ties             TIES-merging: each task vector trimmed to its top --density by magnitude,
                     signs elected by their weighted sum, the agreeing entries averaged
    --lora DIR       W + (alpha / r) B @ A for every module of a peft LoRA adapter

    Names are matched as in `diff`, across formats and dtypes; a name one model lacks, or a
    shape that differs, is an error naming it (--allow-missing merges what they share). Integer
    and bool tensors are the first model's. Ties and metadata are the first model's.

    \b
    Example:
      paramctl merge a.safetensors b.safetensors --weights 0.25,0.75 -o soup.safetensors
      paramctl merge ft1.safetensors ft2.pt --method ties --base base.safetensors --density 0.2 -o out.safetensors
      paramctl merge --lora adapter/ base/model.safetensors -o merged/model.safetensors
    """
    checkpoints = [load(m) for m in models]
    if lora is not None:
        from paramctl.lora import fold

        if len(checkpoints) != 1:
            raise UsageError(f"--lora folds an adapter into one base model, not {len(checkpoints)}")
        if base is not None or weights is not None:
            raise UsageError("--lora takes the base model as its one argument, without --base or --weights")
        merged = fold(lora, checkpoints[0], dtype)
    else:
        from paramctl.merge import merge

        merged = merge(
            checkpoints,
            method,
            weights,
            t=t,
            base=load(base) if base else None,
            lam=lam,
            density=density,
            dtype=dtype,
            allow_missing=allow_missing,
        )
    if output.stderr_is_terminal():
        output.note(f"merging {len(merged)} tensors ({method if lora is None else 'lora'})")
    write_checkpoint(merged, output_path, to, shard_size)


@cli.group("lora")
def lora_group() -> None:
    """LoRA adapters: extract one from a fine-tune (merge --lora folds one into its base).

    \b
    Example:
      paramctl lora extract base/model.safetensors tuned/model.safetensors --rank 16 -o adapter/
    """


@lora_group.command("extract")
@click.argument("base", metavar="BASE")
@click.argument("tuned", metavar="TUNED")
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True, help="Rank of the adapter.")
@click.option("--pattern", "-p", metavar="PATTERN", help="Only the weights whose names match PATTERN (a regex).")
@click.option("--fan-in-fan-out", is_flag=True, help="Weights are stored (in, out), as GPT-2's Conv1D stores them.")
@click.option("--output", "-o", "output_path", required=True, metavar="ADAPTER_DIR", help="Directory to write.")
def lora_extract_command(
    base: str, tuned: str, rank: int, pattern: str | None, fan_in_fan_out: bool, output_path: str
) -> None:
    """Write a peft LoRA adapter approximating TUNED - BASE (truncated SVD of each 2-D weight).

    Every 2-D `*.weight` that differs becomes lora_B @ lora_A, the best rank-R approximation of
    its difference, with lora_alpha = r (scale 1); the adapter loads with
    PeftModel.from_pretrained(base_model, ADAPTER_DIR). Differences LoRA cannot hold (biases,
    norms) are named on stderr and left out.

    \b
    Example:
      paramctl lora extract base/model.safetensors tuned/model.safetensors --rank 16 -o adapter/
      paramctl lora extract base/ tuned/ -r 8 -p 'self_attn' -o adapter/
    """
    from paramctl.lora import extract, write_adapter

    config, tensors, left_out = extract(load(base), load(tuned), rank, pattern, fan_in_fan_out)
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        output.note(f"warning: {len(left_out)} changed tensors are not 2-D weights, left out: {shown}")
    write_adapter(output_path, config, tensors)
    output.note(f"wrote {output_path}: rank {rank} on {len(config['target_modules'])} modules")
