"""Editing names and dtypes: rename, rm, cast."""

from __future__ import annotations

import re
from dataclasses import dataclass

import click

from paramctl import output
from paramctl.cast import CastStorage
from paramctl.cli import (
    checkpoint_argument,
    cli,
    keep_optimizer_option,
    load,
    output_options,
    output_target,
    pattern_options,
    selected,
    shard_size_option,
    write_checkpoint,
    write_options,
)
from paramctl.dtypes import FLOATING, check_name, numpy_dtype
from paramctl.errors import UsageError
from paramctl.table import Checkpoint

dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")


@dataclass
class Substitution:
    """A sed-style `s/REGEX/REPLACEMENT/FLAGS` with Python's regular expressions."""

    text: str
    pattern: re.Pattern[str]
    replacement: str
    count: int  # 1: the first match, as sed does; 0: every match (flag g)

    def apply(self, name: str) -> str:
        try:
            return self.pattern.sub(self.replacement, name, count=self.count)
        except (re.error, IndexError) as e:
            raise UsageError(f"invalid replacement in '{self.text}': {e}") from None


def parse_substitution(text: str) -> Substitution:
    """`s/REGEX/REPL/` with any delimiter (`s|a/b|c|`); a backslash before the delimiter makes it
    literal; flags `g` (every match, not just the first) and `i` (ignore case)."""
    usage = f"expected s/REGEX/REPLACEMENT/ (flags g, i), got '{text}'"
    if len(text) < 2 or text[0] != "s" or text[1].isalnum() or text[1] in "\\ \n":
        raise UsageError(usage)
    delimiter = text[1]
    parts: list[str] = []
    current, i = "", 2
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 2] == delimiter:
            # literal in the replacement; escaped in the regex, where it may be special (`|`)
            current += re.escape(delimiter) if not parts else delimiter
            i += 2
        elif text[i] == "\\":
            current += text[i : i + 2]
            i += 2
        elif text[i] == delimiter:
            parts.append(current)
            current, i = "", i + 1
        else:
            current += text[i]
            i += 1
    parts.append(current)
    if len(parts) != 3 or set(parts[2]) - set("gi"):
        raise UsageError(usage)
    regex, replacement, flags = parts
    try:
        pattern = re.compile(regex, re.IGNORECASE if "i" in flags else 0)
    except re.error as e:
        raise UsageError(f"invalid pattern '{regex}' in '{text}': {e}") from None
    return Substitution(text, pattern, replacement, 0 if "g" in flags else 1)


def new_names(ckpt: Checkpoint, substitutions: list[Substitution]) -> dict[str, str]:
    """old -> new for every name the substitutions change, each applied in turn, as sed -e does.

    A substitution whose REGEX matches no name (as it comes to it) is an error naming it."""
    renames = {}
    used = [False] * len(substitutions)
    for t in ckpt.tensors:
        name = t.name
        for i, s in enumerate(substitutions):
            used[i] = used[i] or s.pattern.search(name) is not None
            name = s.apply(name)
        if name != t.name:
            renames[t.name] = name
    for s, hit in zip(substitutions, used):
        if not hit:
            raise UsageError(
                f"no tensor matches {output.quoted(s.pattern.pattern)} (of {output.quoted(s.text)})", ckpt.source
            )
    return renames


def warn_keras(ckpt: Checkpoint, target: str | None, to: str | None) -> None:
    """Keras finds weights by their paths (and legacy files by layer_names/weight_names lists)."""
    from paramctl.formats import output_format

    if ckpt.format in ("hdf5", "keras") and output_format(target or "-", ckpt, to) in ("hdf5", "keras"):
        output.note("warning: Keras loads weights by their paths: the model that wrote this file will not load it")


@cli.command("rename")
@checkpoint_argument
@click.argument("expression", metavar="s/REGEX/REPL/", required=False)
@click.option("-e", "expressions", multiple=True, metavar="s/REGEX/REPL/", help="Another substitution (repeatable).")
@dry_run_option
@output_options
@write_options
@shard_size_option
def rename_command(
    ckpt: str,
    expression: str | None,
    expressions: tuple[str, ...],
    dry_run: bool,
    fmt: str | None,
    output_path: str | None,
    in_place: bool,
    to: str | None,
    shard_size: int | None,
) -> None:
    """Rename tensors with sed-style substitutions on their names (Python regular expressions).

    Each name goes through every substitution in turn; a rename that would give two tensors one
    name is an error naming both, as is a REGEX that matches no name, and nothing is written.
    The replacement refers to groups as \\1 or \\g<name>. Flags: g (every match, not just the
    first), i (ignore case). Ties stay ties; in a .pt the tensor keeps its place in the saved
    object under its new key.

    \b
    Example:
      paramctl rename ddp.pt 's/^module\\.//' -o model.pt
      paramctl rename model.safetensors 's/^(encoder|decoder)\\.layer\\./\\1.layers./' --dry-run
    """
    texts = ([expression] if expression else []) + list(expressions)
    if not texts:
        raise UsageError("give a substitution: paramctl rename CKPT 's/REGEX/REPLACEMENT/' [-e ...]")
    substitutions = [parse_substitution(t) for t in texts]
    table = load(ckpt)
    renames = new_names(table, substitutions)
    table.rename(renames)  # refuses merges before anything is printed or written
    if dry_run:
        rows = [{"old": old, "new": new} for old, new in renames.items()]
        output.emit(rows, ["old", "new"], fmt, title=f"{ckpt}: {len(rows)} renamed")
        return
    target = output_target(ckpt, output_path, in_place)
    if renames:
        warn_keras(table, target, to)
    write_checkpoint(table, target, to, shard_size)


@cli.command("rm")
@checkpoint_argument
@click.argument("pattern")
@click.option("--exclude", "-x", multiple=True, metavar="PATTERN", help="Keep names matching PATTERN (repeatable).")
@dry_run_option
@keep_optimizer_option
@output_options
@write_options
@shard_size_option
def rm_command(
    ckpt: str,
    pattern: str,
    exclude: tuple[str, ...],
    dry_run: bool,
    keep_optimizer: bool,
    fmt: str | None,
    output_path: str | None,
    in_place: bool,
    to: str | None,
    shard_size: int | None,
) -> None:
    """Remove the tensors whose names match PATTERN (a regular expression, searched as grep does).

    A PATTERN that matches nothing is an error, and nothing is written. Removing one name of a tie
    leaves the others; in a .pt the entry leaves the saved object. A removed parameter's optimizer
    state goes with it (its index leaves param_groups, later ones are renumbered) unless
    --keep-optimizer.

    \b
    Example:
      paramctl rm model.ckpt '^optimizer_states\\.' -o weights.ckpt
      paramctl rm model.safetensors 'lm_head' --dry-run
    """
    table = load(ckpt)
    gone = selected(table, pattern, exclude)
    if dry_run:
        rows = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in gone]
        output.emit(rows, ["name", "shape", "dtype"], fmt, title=f"{ckpt}: {len(rows)} removed")
        return
    from paramctl import optimizer

    states = [] if keep_optimizer else optimizer.find(table)
    table.remove(gone)
    for line in optimizer.drop(table, states, gone):
        output.note(line)
    if output.stderr_is_terminal():
        output.note(f"removed {len(gone)} of {len(gone) + len(table)} tensors")
    target = output_target(ckpt, output_path, in_place)
    warn_keras(table, target, to)
    write_checkpoint(table, target, to, shard_size)


@cli.command("cast")
@checkpoint_argument
@pattern_options
@click.option("--dtype", "dtype", required=True, metavar="D", help="The new dtype (float16, bfloat16, float32, ...).")
@click.option("--all", "all_dtypes", is_flag=True, help="Cast integer, bool and complex tensors too.")
@dry_run_option
@output_options
@write_options
@shard_size_option
def cast_command(
    ckpt: str,
    pattern: str | None,
    exclude: tuple[str, ...],
    dtype: str,
    all_dtypes: bool,
    dry_run: bool,
    fmt: str | None,
    output_path: str | None,
    in_place: bool,
    to: str | None,
    shard_size: int | None,
) -> None:
    """Cast the real floating tensors (all of them with --all) to another dtype.

    A cast that loses range is named on stderr with a count: finite values beyond the new
    dtype's range (they become inf, or NaN in float8_e4m3fn), non-zero values that become 0, and
    for integer dtypes, values outside the range or not finite. Ties stay ties.

    \b
    Example:
      paramctl cast model.safetensors --dtype bfloat16 -o model.bf16.safetensors
      paramctl cast model.pt 'weight$' --dtype float16 --dry-run
    """
    from paramctl.cast import cast_lazily, measure

    check_name(dtype)
    target = None if dry_run else output_target(ckpt, output_path, in_place)
    table = load(ckpt)
    chosen = selected(table, pattern, exclude)
    tensors = [t for t in chosen if all_dtypes or (t.dtype in FLOATING and not t.dtype.startswith("complex"))]
    if pattern and len(tensors) < len(chosen):
        output.note(f"leaving {len(chosen) - len(tensors)} non-floating tensor(s) as they are (cast them with --all)")
    if pattern and not tensors:
        raise UsageError(f"{output.quoted(pattern)} selects no floating tensor to cast (cast others with --all)", ckpt)
    before = {t.name: t.dtype for t in tensors}
    # one pass per tensor: converted as the writer reads it, its losses counted on the way
    storages = cast_lazily(table, tensors, dtype)
    if dry_run:
        measure(storages)
    else:
        write_checkpoint(table, target, to, shard_size)
    losses = {s.source.name: s.losses() for s in storages if s.source is not None}  # a tie under its first name
    if dry_run:
        rows = []
        for t in tensors:
            if before[t.name] != dtype:
                beyond, to_zero = losses.get(t.name, (0, 0))
                rows.append({"name": t.name, "from": before[t.name], "to": dtype, "beyond": beyond, "to_zero": to_zero})
        output.emit(rows, ["name", "from", "to", "beyond", "to_zero"], fmt, title=f"{ckpt}: cast to {dtype}")
        return
    report_losses(storages, dtype)


def report_losses(storages: list[CastStorage], dtype: str) -> None:
    """Warn about what the cast to DTYPE of STORAGES lost, counted as they were written; a tie
    under its first name."""
    for s in storages:
        beyond, to_zero = s.losses()
        name = s.source.name if s.source is not None else "?"
        if beyond:
            output.note(f"warning: {name}: {beyond} value(s) beyond the range of {dtype} ({range_text(dtype)})")
        if to_zero:
            output.note(f"warning: {name}: {to_zero} non-zero value(s) become 0 in {dtype}")


def range_text(dtype: str) -> str:
    import ml_dtypes
    import numpy as np

    target = numpy_dtype(dtype)
    info = np.iinfo(target) if target.kind in "iu" else ml_dtypes.finfo(target)
    return f"{info.min:g} to {info.max:g}"
