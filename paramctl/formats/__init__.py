"""The format registry: every checkpoint format is one module here that registers itself.

Each format module ends with `register(Format(...))`: its name, extensions, how to recognise it
(from a file's first bytes, or a directory's contents), its reader and writer, what a conversion
into it loses and its non-tensor entries. The rest of paramctl asks the registry (`load`,
`save`, `sniff`, `losses`, `output_format`, `non_tensor_entries`, `--to` choices) and never names a
format, as Pillow's image plugins register themselves with `Image.register_open`.

Format modules are found by listing this package: adding a format is adding a module. They are
imported to list a file, so they import nothing heavy at their top level (no torch, h5py or
framework; those are imported inside the functions that need them).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import pkgutil
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from paramctl import remote
from paramctl.atomic import atomic_path
from paramctl.errors import FormatError, ParamctlError, UsageError
from paramctl.table import Checkpoint

HEAD_BYTES = 4096 + 8  # what `accept` sees: enough for HDF5's magic after a 4 KiB user block


@dataclass
class Probe:
    """What a format's `accept` looks at to recognise a file: its path, size and first bytes
    (and, on request, its last bytes and its zip member names)."""

    path: str
    size: int
    head: bytes

    def tail(self, n: int) -> bytes:
        return remote.read_range(self.path, max(0, self.size - n), n)

    @cached_property
    def zip_names(self) -> list[str] | None:
        """The member names of a zip archive (None if the file is not one)."""
        if self.head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
            return None
        from paramctl.formats.zipfiles import zip_members

        _, members = zip_members(self.path)
        return list(members)


@dataclass(frozen=True)
class Format:
    """One checkpoint format, as its module registers it."""

    name: str  # for --to, info and JSON
    description: str  # for messages and the README's format list
    load: Callable[[str, str], Checkpoint]  # (path to read, path as the user named it) -> table
    # writes a checkpoint at PATH: a temporary file beside the target, renamed over it afterwards
    # (or, with `writes_files`, the target itself: the writer makes its several files atomically)
    save: Callable[[Checkpoint, str], None] | None = None
    extensions: tuple[str, ...] = ()  # lower-case suffixes that imply this format for output
    accept: Callable[[Probe], bool] | None = None  # a file is of this format, from its content
    # a directory (or a name that is no file, such as a TensorFlow checkpoint prefix) is a
    # checkpoint of this format: the path to read (itself, or a file in it), else None
    accept_path: Callable[[str], str | None] | None = None
    looks_for: str = ""  # what accept_path looks for in a directory, for the error when nothing is found
    # what writing CKPT in this format loses, one line each (sharded: written as shards)
    losses: Callable[[Checkpoint, bool], list[str]] | None = None
    # CKPT fitted to this format before it is written to TARGET (a Keras layout rewritten), or a
    # UsageError when it cannot be, before anything is written
    prepare: Callable[[Checkpoint, str], Checkpoint] | None = None
    # what a checkpoint read in this format holds besides tensors, JSON-safe, by dotted path
    entries: Callable[[Checkpoint], dict[str, Any]] | None = None
    layout: str = "torch"  # tensor axis order for fans: torch (out, in, *k) or keras (*k, in, out)
    keeps_views: bool = False  # strided views survive a write (else they become contiguous copies)
    writes_files: bool = False
    remote: bool = False  # readable at a URL, by range requests (its reader opens files through paramctl.remote)
    priority: int = 50  # recognisers are asked in this order (lower first): specific before general


FORMATS: dict[str, Format] = {}
_discovered = False


def register(fmt: Format) -> Format:
    """Add FMT to the registry (each format module calls this once, at import)."""
    FORMATS[fmt.name] = fmt
    return fmt


def formats() -> list[Format]:
    """Every registered format, in recognition order."""
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
    return sorted(FORMATS.values(), key=lambda f: (f.priority, f.name))


def get(name: str) -> Format:
    for fmt in formats():
        if fmt.name == name:
            return fmt
    raise UsageError(f"unknown format {name!r}; known: {', '.join(f.name for f in formats())}")


def writable() -> list[str]:
    """Names of the formats paramctl can write (the --to choices)."""
    return [f.name for f in formats() if f.save is not None]


def extensions() -> dict[str, str]:
    """Output extension -> format name."""
    return {ext: f.name for f in formats() for ext in f.extensions}


def sniff(path: str) -> str:
    """The format of the checkpoint at PATH, from its content (or a directory's files)."""
    return _recognise(path)[0].name


def _recognise(path: str) -> tuple[Format, str]:
    """The format of PATH and the path its reader opens (a file inside a directory, perhaps)."""
    if not remote.is_url(path) and not os.path.isfile(path):
        return _recognise_path(path)
    size = remote.size(path)
    head = remote.read_range(path, 0, HEAD_BYTES)
    if not head:
        raise FormatError("empty file", path)
    probe = Probe(path, size, head)
    for fmt in formats():
        if fmt.accept is not None and _accepts(fmt, probe):
            if remote.is_url(path) and not fmt.remote:
                readable = ", ".join(f.name for f in formats() if f.remote)
                raise FormatError(f"{fmt.description} is not read over a URL ({readable} are): download it first", path)
            return fmt, path
    known = ", ".join(f.description for f in formats() if f.accept is not None)
    raise FormatError(f"not a recognised checkpoint ({known})", path)


def _accepts(fmt: Format, probe: Probe) -> bool:
    """FMT's recogniser on PROBE; one that trips over a damaged file (a zip end record claiming
    several disks) says no, and the next format, or the final refusal, speaks."""
    try:
        return bool(fmt.accept(probe))  # type: ignore[misc]
    except ParamctlError:
        raise
    except (OSError, ValueError, EOFError, LookupError, ArithmeticError, zipfile.BadZipFile):
        return False


def _recognise_path(path: str) -> tuple[Format, str]:
    """A directory, or a name that is not a file (a TensorFlow prefix): the first format that
    claims it; a file it points to is recognised in turn."""
    claims = [(fmt, target) for fmt in formats() if fmt.accept_path and (target := fmt.accept_path(path))]
    if not claims:
        if not os.path.exists(path):
            raise FormatError("no such file or directory", path)
        looked_for = "; ".join(f.looks_for or f.description for f in formats() if f.accept_path is not None)
        raise FormatError(f"a directory holding no checkpoint paramctl recognises (looked for: {looked_for})", path)
    fmt, target = claims[0]
    if target != path and os.path.isfile(target):
        return _recognise(target)[0], target
    return fmt, target


def load(path: str) -> Checkpoint:
    """Read the checkpoint at PATH (`-` for standard input) into a table."""
    source = path
    if path == "-":
        path = _spool_stdin()
    try:
        fmt, target = _recognise(path)
        ckpt = fmt.load(target, source)
    except OSError as e:
        raise FormatError(e.strerror or str(e), _shown(source)) from None
    except RecursionError:
        raise FormatError("nests too deeply", _shown(source)) from None
    except ParamctlError as e:
        if e.path == path != source or (e.path == source and _shown(source) != source):
            raise e.about(_shown(source)) from None  # a URL's user:password@ and ?token= never printed
        raise
    ckpt.path = target
    if not ckpt.file_size and (remote.is_url(target) or os.path.isfile(target)):
        ckpt.file_size = remote.size(target)
    ckpt.source = _shown(source)  # what commands print: a URL without credentials
    return ckpt


def _shown(path: str) -> str:
    """PATH as an error names it: a URL without its credentials (remote.redact)."""
    return remote.redact(path) if remote.is_url(path) else path


def _spool_stdin() -> str:
    """Copy standard input to a temporary file (removed at exit): readers want to seek."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("standard input is a terminal; pipe a checkpoint in or name a file")
    fd, tmp = tempfile.mkstemp(prefix="paramctl-stdin-")
    atexit.register(_remove, tmp)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(sys.stdin.buffer, f, 1 << 22)
    return tmp


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def output_format(path: str, ckpt: Checkpoint, to: str | None = None) -> str:
    """The format to write PATH in: --to, else PATH's extension (an index's: `model.safetensors`
    of `model.safetensors.index.json`), else the input's format."""
    if to:
        if to not in writable():
            raise UsageError(f"cannot write format {to!r}; choose one of {', '.join(writable())}")
        return to
    name = path.removesuffix(".index.json").lower()
    if name.endswith(".distcp"):  # a file paramctl itself would then refuse to read alone
        raise UsageError("a .distcp file is one shard of a DCP directory: write the directory (--to dcp)", path)
    if path != "-":
        for ext, fmt in sorted(extensions().items(), key=lambda item: -len(item[0])):
            if name.endswith(ext):
                if fmt not in writable():  # `-o x.gguf` must not become a .pt named x.gguf
                    raise UsageError(
                        f"paramctl cannot write {fmt} (the output's extension {ext}); "
                        f"name another output, or one of {', '.join(writable())} with --to"
                    )
                return fmt
    if ckpt.format == "sharded":
        return ckpt.extra.shard_format
    if ckpt.format not in writable():
        raise UsageError(f"paramctl cannot write {ckpt.format}: name the output format with --to or an extension")
    return ckpt.format


def layout(ckpt: Checkpoint) -> str:
    """The axis order of CKPT's tensors, for fans: `torch` (out, in, *k) or `keras` (*k, in, out)."""
    fmt = ckpt.extra.shard_format if ckpt.format == "sharded" else ckpt.format
    return FORMATS[fmt].layout if fmt in FORMATS else "torch"


def non_tensor_entries(ckpt: Checkpoint) -> dict[str, Any]:
    """What the checkpoint holds besides tensors, JSON-safe, as its format reports it: a `.pt`'s
    other entries (epoch, hyper-parameters, optimizer settings), an HDF5 file's root attributes."""
    formats()
    fmt = FORMATS.get(ckpt.format)
    return fmt.entries(ckpt) if fmt is not None and fmt.entries is not None else {}


def dropped_entries(ckpt: Checkpoint, what: str) -> list[str]:
    """The loss line for writing CKPT as WHAT (`safetensors`, `sharded pt`) that holds tensors only."""
    entries = list(non_tensor_entries(ckpt))
    if not entries:
        return []
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return [f"{what} holds tensors only: dropping {len(entries)} non-tensor entries ({shown})"]


def losses(ckpt: Checkpoint, fmt: str, sharded: bool = False) -> list[str]:
    """What writing CKPT as FMT (in SHARDED form) cannot keep, one line each (for warnings on stderr)."""
    target = get(fmt)
    lost = target.losses(ckpt, sharded) if target.losses is not None else []
    if not target.keeps_views and any(t.stride is not None and not t.is_contiguous for t in ckpt.tensors):
        lost.append(f"{fmt} stores views as contiguous copies")
    return lost


def prepare(ckpt: Checkpoint, target: str, fmt: str) -> Checkpoint:
    """CKPT ready to be written as FMT at TARGET: refused (UsageError, nothing written) when it
    holds rows no writer stores (quantized GGUF blocks), else fitted by the format's `prepare`."""
    from paramctl.dtypes import ITEMSIZE

    quantized = [t for t in ckpt.tensors if t.dtype not in ITEMSIZE]
    if quantized:
        shown = ", ".join(f"{t.name!r} ({t.dtype})" for t in quantized[:3]) + (" ..." if len(quantized) > 3 else "")
        raise UsageError(
            f"{len(quantized)} quantized tensors ({shown}): paramctl writes them only as float32, "
            "with `paramctl convert --dequantize`"
        )
    fitting = get(fmt).prepare
    return fitting(ckpt, target) if fitting is not None else ckpt


def writes_as_shards(ckpt: Checkpoint, path: str, fmt: str, shard_size: int | None = None) -> bool:
    """Whether writing CKPT to PATH makes shards plus an index (not one file in a directory)."""
    from paramctl.formats.sharded import makes_shards

    return writes_shards(path, shard_size) and makes_shards(ckpt, path, fmt, shard_size)


def writes_shards(path: str, shard_size: int | None = None) -> bool:
    """Whether writing PATH makes a sharded checkpoint: an `*.index.json`, a directory (`out/`), or a shard size."""
    return shard_size is not None or path.endswith((".index.json", "/", os.sep)) or os.path.isdir(path)


def refuse_overwriting_read_only(ckpt: Checkpoint, path: str, fmt: str) -> None:
    """Refuse to replace in place, with another format, a checkpoint read in a format paramctl
    does not write (a TorchScript archive named `.pt`: its code would be lost) or one made of
    several files (a DCP or TensorFlow directory: the new file would sit beside the old ones,
    which are still what the directory is read as)."""
    source = FORMATS.get(ckpt.format)
    writes_itself = ckpt.format == "sharded"  # a sharded set is written back as shards (see save)
    if source is None or fmt == ckpt.format or writes_itself or path == "-" or not ckpt.path:
        return
    if source.save is not None and not source.writes_files:
        return
    same = False
    with contextlib.suppress(OSError):
        same = os.path.exists(path) and os.path.samefile(path, ckpt.path)
    if same and source.save is None:
        raise UsageError(f"{source.description} is read-only in paramctl: convert to .pt or safetensors", path)
    if same:
        raise UsageError(f"a {source.description} is not replaced in place by {fmt}: write to another path (-o)", path)


def save(ckpt: Checkpoint, path: str, fmt: str | None = None, shard_size: int | None = None) -> None:
    """Write CKPT to PATH (`-`: standard output) atomically, in FMT or the format PATH implies.

    An `*.index.json` path, a directory or a SHARD_SIZE in bytes writes numbered shards plus an
    index, as transformers does (see formats.sharded). A missing parent directory is created."""
    if remote.is_url(path):  # else `-o http://host/x.pt` makes a local directory `http:`
        raise UsageError("paramctl writes local files only: write it here, then upload it", remote.redact(path))
    fmt = fmt or output_format(path, ckpt)
    target = get(fmt)
    if target.save is None:
        raise UsageError(f"cannot write format {fmt!r}; choose one of {', '.join(writable())}")
    refuse_overwriting_read_only(ckpt, path, fmt)
    made = [] if path == "-" else _make_parents(path)
    try:
        if target.writes_files and shard_size is None:  # its own files, a directory included (a TF checkpoint)
            target.save(ckpt, path)
        elif writes_shards(path, shard_size):
            from paramctl.formats import sharded

            sharded.save(ckpt, path, fmt, shard_size)
        else:
            with atomic_path(path) as tmp:
                target.save(ckpt, tmp)
    except BaseException:
        for directory in reversed(made):  # a failed write leaves nothing, not even the directories it made
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _make_parents(path: str) -> list[str]:
    """Create the missing directories above PATH; the ones made, outermost first."""
    made = []
    parent = os.path.dirname(os.path.abspath(path.rstrip("/" + os.sep) or path))
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        for directory in reversed(made):
            os.mkdir(directory)
    except OSError as e:
        raise ParamctlError(f"cannot write: cannot create its directory: {e.strerror or e}", path) from None
    return made[::-1]
