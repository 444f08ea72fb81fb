"""Changing values: reinit (named and custom initializers) and set (direct edits)."""

from __future__ import annotations

import click

from paramctl import output
from paramctl.cli import (
    cli,
    keep_optimizer_option,
    load,
    output_target,
    pattern_options,
    selected,
    write_checkpoint,
    write_options,
)
from paramctl.errors import UsageError
from paramctl.init import LAYOUTS, Resize, Step, known_initializers
from paramctl.table import Checkpoint, Tensor


@cli.command("reinit", epilog=f"Initializers: {known_initializers()}.")
@click.argument("ckpt", metavar="[CKPT]", required=False, default="-")
@pattern_options
@click.option(
    "--init",
    "spec",
    required=True,
    metavar="SPEC",
    help="A name or a call with literal arguments ('xavier', 'normal(std=0.01)'), or a custom "
    "initializer FILE.py:FUNC or MODULE:FUNC.",
)
@click.option("--seed", type=int, metavar="N", help="Draw each tensor from a generator seeded by (N, its name).")
@click.option("--layout", type=click.Choice(LAYOUTS), help="Whose fans: torch (out, in, *k) or keras (*k, in, out).")
@click.option("--shape", "new_shape", metavar="N,M,...", help="Give each selected tensor this new shape.")
@click.option(
    "--out", "out_size", type=click.IntRange(min=0), metavar="N", help="Set the output size of the selected layer(s)."
)
@click.option(
    "--in", "in_size", type=click.IntRange(min=0), metavar="N", help="Set the input size of the selected layer(s)."
)
@click.option("--keep", is_flag=True, help="With a new shape: keep the old values where the shapes overlap.")
@click.option("--dry-run", is_flag=True, help="Print the plan only; write nothing.")
@keep_optimizer_option
@write_options
def reinit_command(
    ckpt: str,
    pattern: str | None,
    exclude: tuple[str, ...],
    spec: str,
    seed: int | None,
    layout: str | None,
    new_shape: str | None,
    out_size: int | None,
    in_size: int | None,
    keep: bool,
    dry_run: bool,
    keep_optimizer: bool,
    output_path: str | None,
    in_place: bool,
    to: str | None,
) -> None:
    """Re-initialize parameters with a named or custom initializer.

    CKPT defaults to standard input when it is not a terminal, and the result goes to standard
    output when it is not one; use '-' for CKPT to pipe a checkpoint in with a PATTERN.

    Without PATTERN, weights get SPEC; biases, betas and running means get 0; norm scales and
    running variances get 1; integer tensors and optimizer state are kept. With PATTERN, every
    selected tensor gets SPEC, and one it cannot take is an error. Fans follow the file's
    framework (PyTorch for .pt and safetensors, Keras for HDF5); a tied tensor is re-initialized
    once and stays tied. The plan goes to standard error.

    In a training checkpoint, a re-initialized parameter's optimizer state is reset as a new
    parameter's would be (moments 0, step 0), unless --keep-optimizer.

    A custom initializer is called as FUNC(tensor, name=, generator=, fan_in=, fan_out=) and
    fills the float32 tensor in place or returns one of the same shape.

    New shapes: --shape gives each selected tensor SHAPE; --out N (--in N) sets the output
    (input) size of the selected layer, so that its weight, bias and norm vectors change
    together: PyTorch (out, in, *k), Keras (*k, in, out), an embedding's rows are its output.
    Values are drawn with the fans of the new shape (what SPEC cannot take gets its role's
    default: biases 0, norm scales 1); --keep keeps the old values where the shapes overlap, and
    the rows a vocabulary gains (an embedding or lm_head) come from the old rows' mean and
    covariance, as transformers' resize_token_embeddings draws them. Ties resize together.

    \b
    Example:
      paramctl reinit mlp.pt --init xavier --seed 0 -o fresh.pt
      paramctl reinit mlp.pt '^2\\.weight$' --init 'constant(42)' --in-place
      cat mlp.pt | paramctl reinit --init 'normal(std=0.01)' > fresh.pt
      paramctl reinit mlp.pt --init examples/strange_init.py:strange --dry-run
      paramctl reinit bert.safetensors '^classifier\\.' --out 7 --init 'normal(std=0.02)' -o bert7.safetensors
      paramctl reinit gpt2.safetensors 'wte' --out 50262 --keep --init 'normal(std=0.02)' -o grown.safetensors
    """
    import secrets

    from paramctl.init import default_layout, parse_spec, plan, reinitialize

    initializer = parse_spec(spec)
    target = None if dry_run else output_target(ckpt, output_path, in_place)
    table = load(ckpt)
    tensors = selected(table, pattern, exclude)
    if not tensors:
        raise UsageError("no tensors", table.source)
    layout = layout or default_layout(table)
    random_seed = seed is None
    if seed is None:
        seed = secrets.randbits(32)
    from paramctl import optimizer

    states = [] if keep_optimizer else optimizer.find(table)  # mapped while the shapes are the old ones
    resizes = new_shapes(table, tensors, layout, new_shape, out_size, in_size, keep)
    steps = plan(table, initializer, tensors, layout, by_pattern=pattern is not None and not resizes)
    changing = [s for s in steps if s.init is not None]
    heading = f"{table.source}: re-initializing {len(changing)} of {len(steps)} tensors, layout {layout}, seed {seed}"
    output.note(heading + (f" (random: --seed {seed} repeats it)" if random_seed else ""))
    for line in plan_lines(table, steps):
        output.note("  " + line)
    if not changing:
        raise UsageError("nothing selected can be re-initialized", table.source)
    resized = {id(r.tensor) for r in resizes}
    undrawn = [s.tensor.name for s in steps if s.init is None and id(s.tensor) in resized]
    if undrawn:
        raise UsageError(f"{initializer.label} cannot fill the new shape of {', '.join(undrawn)}", table.source)
    if dry_run:
        return
    reinitialize(table, steps, seed)
    if keep:
        from paramctl.init import keep_old_values

        for line in keep_old_values(table, resizes, seed):
            output.note(line)
    for line in optimizer.reset(table, states, [s.tensor for s in changing]):
        output.note(line)
    write_checkpoint(table, target, to)


def new_shapes(
    table: Checkpoint,
    tensors: list[Tensor],
    layout: str,
    shape: str | None,
    out: int | None,
    in_: int | None,
    keep: bool,
) -> list[Resize]:
    """Give the selected tensors their new shapes (zeroed, to be drawn), said on stderr."""
    from paramctl.init import apply_resizes, parse_shape, plan_resizes

    if shape is not None and (out is not None or in_ is not None):
        raise UsageError("use either --shape or --out/--in")
    if shape is None and out is None and in_ is None:
        if keep:
            raise UsageError("--keep keeps old values under a new shape: give --shape, --out or --in")
        return []
    if len(tensors) == len(table.tensors):
        raise UsageError("a new shape for every tensor: select the layer with PATTERN", table.source)
    resizes = plan_resizes(table, tensors, layout, parse_shape(shape) if shape else None, out, in_)
    for r in resizes:
        tied = [t.name for t in table if t is not r.tensor and t.tie is not None and t.tie == r.tensor.tie]
        also = f" (with {', '.join(tied)})" if tied else ""
        old, new = output.shape_text(r.old_shape), output.shape_text(r.new_shape)
        output.note(f"{r.tensor.name}{also}: {old} -> {new}" + (", old values kept where they overlap" if keep else ""))
    if table.format == "keras":
        output.note(
            f"warning: {table.source}: the archive's config.json keeps the old layer sizes, so load_model refuses "
            "a .keras written from this; write .weights.h5 and load_weights into the model built with the new sizes"
        )
    apply_resizes(table, resizes, keep)
    return resizes


def plan_lines(table: Checkpoint, steps: list[Step]) -> list[str]:
    """The plan as aligned columns: tensor, shape, role, initializer, fans."""
    rows = [["tensor", "shape", "role", "init", "fan_in", "fan_out"]]
    for step in steps:
        t = step.tensor
        tied = [u.name for u in table if u.tie is not None and u.tie == t.tie and u is not t]
        fans = step.target.fans if step.init is not None else None
        rows.append(
            [
                t.name + (f" (= {', '.join(tied)})" if tied else ""),
                output.shape_text(t.shape),
                step.target.role,
                step.init.label if step.init is not None else f"keep ({step.why})",
                str(fans[0]) if fans else "-",
                str(fans[1]) if fans else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@cli.command("set", context_settings={"ignore_unknown_options": True})  # VALUE may be negative: -1
@click.argument("ckpt", metavar="CKPT")
@click.argument("where", metavar="NAME[INDEX] | PATTERN")
@click.argument("value", required=False)
@click.option("--expr", "-e", metavar="EXPR", help="Set each selected tensor to EXPR, an expression in x (its values).")
@click.option(
    "--exclude", "-x", multiple=True, metavar="PATTERN", help="With --expr: leave out names matching PATTERN."
)
@keep_optimizer_option
@write_options
def set_command(
    ckpt: str,
    where: str,
    value: str | None,
    expr: str | None,
    exclude: tuple[str, ...],
    keep_optimizer: bool,
    output_path: str | None,
    in_place: bool,
    to: str | None,
) -> None:
    """Set values directly: one tensor, or the part INDEX selects, to VALUE; or every tensor
    PATTERN selects to an expression of its values x.

    INDEX is numpy indexing with integers, slices and '...'. VALUE is a number or a nested
    list, broadcast over the selection. EXPR uses x, numbers, pi, e, nan, inf, + - * / // % **,
    comparisons, 'a if c else b' and abs sign sqrt exp log log2 log10 log1p expm1 sin cos tan
    tanh floor ceil round trunc isnan isinf isfinite minimum maximum clip where; it is parsed,
    never run as Python. Values are computed in float64 (integers: int64) and cast back to the
    tensor's dtype; integer tensors only take integers. A tied tensor changes under every name.
    An edited parameter's optimizer state is reset (moments 0, step 0) unless --keep-optimizer.

    \b
    Example:
      paramctl set mlp.pt '0.weight[0, 0]' 42 -o edited.pt
      paramctl set mlp.pt '0.bias[:3]' '[1, 2, 3]' -o edited.pt
      paramctl set mlp.pt '^0\\.weight$' --expr 'x + 1' -o edited.pt
      paramctl set mlp.pt weight --expr 'where(abs(x) < 0.01, 0, x)' --in-place
    """
    from paramctl.expressions import Edit, Expression, edited_values, find_edit

    if (value is None) == (expr is None):
        raise UsageError("give either VALUE or --expr EXPR")
    expression = Expression(expr, allow_x=True) if expr is not None else Expression(value or "", allow_x=False)
    target = output_target(ckpt, output_path, in_place)
    table = load(ckpt)
    edit = find_edit(table, where)
    if edit is not None:
        edits = [edit]
    elif expr is None:
        hint = "NAME[INDEX] names one tensor; a PATTERN needs --expr"
        raise UsageError(f"no tensor named {output.quoted(where)} ({hint})", table.source)
    else:
        edits = [Edit(t, ()) for t in once_per_tie(selected(table, where, exclude))]
    results = [(e, *edited_values(e, expression)) for e in edits]  # all checked before any is changed
    from paramctl import optimizer

    states = [] if keep_optimizer else optimizer.find(table)
    for e, values, count, broken in results:
        table.assign(e.tensor, values)
        output.note(f"{e.label}: {count} value{'s' if count != 1 else ''} set to {expression.text}")
        if broken:
            output.note(f"warning: {e.label}: {broken} value(s) became NaN or infinite in {e.tensor.dtype}")
    for line in optimizer.reset(table, states, [e.tensor for e in edits]):
        output.note(line)
    write_checkpoint(table, target, to)


def once_per_tie(tensors: list[Tensor]) -> list[Tensor]:
    """TENSORS with each tied tensor once: an edit to one name is an edit to all of them."""
    seen = set()
    unique = []
    for t in tensors:
        if t.view_key() not in seen:
            seen.add(t.view_key())
            unique.append(t)
    return unique
