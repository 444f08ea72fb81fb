"""The command line: parse, call the library, hand rows to `output`. Errors become exit codes here."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
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
        except click.UsageError as e:  # a command line click cannot parse: one line too
            where = " ".join(["paramctl", *(e.ctx.command_path.split()[1:] if e.ctx is not None else [])])
            output.error(f"{e.format_message()} (see '{where} --help')")
            ctx.exit(e.exit_code)
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
@click.option(
    "--cache",
    metavar="DIR",
    envvar="PARAMCTL_CACHE",
    help="Keep blocks fetched from URLs in DIR for repeat reads (also PARAMCTL_CACHE).",
)
@click.version_option(package_name="paramctl")
def cli(debug: bool, cache: str | None) -> None:
    """Inspect and edit saved model checkpoints: PyTorch, safetensors, Keras HDF5, MXNet,
    TensorFlow, DCP, GGUF, TorchScript; local files or URLs (https://, s3://, any fsspec URL).

    \b
    Examples:
      paramctl ls model.pt '.*weight'
      paramctl tree model.safetensors --depth 2
      paramctl convert model.pt model.safetensors
    """
    if cache:
        from paramctl import remote

        remote.cache_dir = cache
    # numpy's floating-point warnings (inf - inf in a sum over an all-Inf tensor) are not the
    # user's business: paramctl counts NaN and Inf itself and reports them as data
    warnings.filterwarnings("ignore", r"(invalid value|overflow|divide by zero|underflow) encountered", RuntimeWarning)


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


class WritableFormat(click.Choice):
    """--to's choices, asked of the format registry only when --to is parsed or help is shown:
    building the command line must not import every format module."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        from paramctl.formats import writable

        return tuple(writable())

    @choices.setter
    def choices(self, value: Any) -> None:
        pass


def to_option(fn: Callable) -> Callable:
    return click.option("--to", type=WritableFormat(), help="Output format (default: from the extension).")(fn)


def write_options(fn: Callable) -> Callable:
    """-o/--output, --in-place and --to, for every command that writes a checkpoint."""
    fn = to_option(fn)
    fn = click.option("--in-place", is_flag=True, help="Replace CKPT itself (atomically).")(fn)
    return click.option(
        "--output",
        "-o",
        "output_path",
        metavar="PATH",
        help="Where to write ('-': standard output, the default when it is not a terminal).",
    )(fn)


def shard_size_option(fn: Callable) -> Callable:
    """--shard-size, for commands that can write a sharded checkpoint (as does an -o *.index.json)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        from paramctl.formats.sharded import parse_size

        try:
            return None if value is None else parse_size(value)
        except UsageError as e:
            raise click.BadParameter(e.message) from None

    return click.option(
        "--shard-size",
        metavar="SIZE",
        callback=parse,
        help="Write numbered shards of at most SIZE (2GB, 500MB, 1GiB) plus an *.index.json, as transformers does.",
    )(fn)


def keep_optimizer_option(fn: Callable) -> Callable:
    """--keep-optimizer, for edits that otherwise adjust the optimizer state of what they change."""
    return click.option(
        "--keep-optimizer",
        is_flag=True,
        help="Leave optimizer state as it is (by default an edited parameter's moments and step are reset, "
        "a removed one's state removed).",
    )(fn)


def write_checkpoint(
    ckpt: Checkpoint, target: str | None, to: str | None = None, shard_size: int | None = None
) -> None:
    """Save CKPT to TARGET (None: standard output if it is not a terminal), warning on stderr
    about anything the output format cannot hold. SHARD_SIZE (bytes) writes shards plus an index."""
    from paramctl.formats import losses, output_format, prepare, save, writes_as_shards

    if target is None:
        if output.stdout_is_terminal():
            raise UsageError("name the output: -o PATH, or --in-place (or redirect standard output)")
        target = "-"
    refuse_terminal(target)
    fmt = output_format(target, ckpt, to)
    ckpt = prepare(ckpt, target, fmt)
    for loss in losses(ckpt, fmt, writes_as_shards(ckpt, target, fmt, shard_size)):
        output.note(f"warning: {loss}")
    save(ckpt, target, fmt, shard_size)


def output_target(ckpt: str, output_path: str | None, in_place: bool) -> str | None:
    """The path -o/--in-place name (None: standard output, decided by write_checkpoint)."""
    if in_place and output_path:
        raise UsageError("use either -o PATH or --in-place, not both")
    if in_place:
        if ckpt == "-":
            raise UsageError("--in-place needs a file, not standard input")
        return ckpt
    return output_path


def load(path: str) -> Checkpoint:
    from paramctl.formats import load as load_checkpoint

    try:
        return load_checkpoint(path)
    except ParamctlError as e:
        # `cat x.pt | paramctl reinit 'fc\.weight' ...` takes the pattern for CKPT
        if stdin_has_data() and path != "-" and "no such file" in e.message and not os.path.lexists(path):
            raise type(e)(f"{e.message} (to read standard input, name it '-')", e.path) from None
        raise


def stdin_has_data() -> bool:
    """Whether standard input is a pipe or a file (not a terminal, nor /dev/null as in CI)."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # closed, or not a real file (a test's stream)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def selected(ckpt: Checkpoint, pattern: str | None, exclude: tuple[str, ...]) -> list[Tensor]:
    """The tensors PATTERN selects and no EXCLUDE does; a selection of nothing is an error (a
    gate must never pass, or an edit write an unchanged copy, because it looked at nothing)."""
    rows = ckpt.select(pattern, exclude)
    if not rows and (pattern or exclude):
        raise no_match(ckpt.source, pattern, exclude, matched=bool(ckpt.select(pattern)))
    return rows


def no_match(where: str, pattern: str | None, exclude: tuple[str, ...], matched: bool = False) -> UsageError:
    """The error for a selection of nothing in WHERE, naming PATTERN once, as typed (MATCHED:
    PATTERN alone selects something, and the --exclude patterns leave none of it)."""
    if pattern and not matched:
        return UsageError(f"no tensor matches {output.quoted(pattern)}", where)
    excluded = ", ".join(output.quoted(x) for x in exclude)
    what = f"every tensor matching {output.quoted(pattern)}" if pattern else "every tensor"
    return UsageError(f"{what} is left out by --exclude {excluded}", where)


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


def with_progress(tensors: Sequence[Tensor]) -> Iterator[Tensor]:
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


def refuse_terminal(dst: str) -> None:
    if dst == "-" and output.stdout_is_terminal():
        raise UsageError("refusing to write a binary checkpoint to a terminal: redirect it, or name a file")


def main() -> None:
    # paramctl spreads streamed work over the cores itself (stats forks a helper process); BLAS
    # threads on top of that would compete for the same cores, spinning. Set before numpy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    cli(prog_name="paramctl")


# registering the commands: each module decorates its functions with @cli.command
from paramctl.commands import convert, diff, edit, estimate, formats, inspect, merge, meta, reinit, stats, ties  # noqa: E402, F401
