"""Recognising a checkpoint by its content, and dispatching to the reader or writer of its format.

Formats: `pt` (torch zip), `pt-legacy` (pre-1.6 torch pickle), `safetensors`, `hdf5` (Keras
`.h5` / `.weights.h5`), `keras` (a `.keras` archive), `sharded` (an `*.index.json` over shards).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from paramctl.errors import FormatError, ParamctlError, UsageError
from paramctl.table import Checkpoint

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
PICKLE_PROTO = 0x80

EXTENSIONS = {
    ".pt": "pt",
    ".pth": "pt",
    ".bin": "pt",
    ".ckpt": "pt",
    ".safetensors": "safetensors",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".keras": "keras",
}
WRITABLE = ("pt", "safetensors", "hdf5", "keras")


def sniff(path: str) -> str:
    """The format of the file at PATH, from its first bytes."""
    if os.path.isdir(path):
        return "sharded"
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _sniff_zip(path)
        for offset in (0, 512, 1024, 2048, 4096):  # HDF5 allows a user block of 512 * 2^n bytes
            f.seek(offset)
            if f.read(8) == HDF5_MAGIC:
                return "hdf5"
    if not head:
        raise FormatError("empty file", path)
    looks_safetensors = len(head) >= 9 and head[8:9] == b"{"
    if looks_safetensors and int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8:
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "sharded"  # an index JSON
    if looks_safetensors:
        return "safetensors"  # whose header length is invalid: let the reader say so
    if head[0] == PICKLE_PROTO:
        return "pt-legacy"
    raise FormatError("not a recognised checkpoint (PyTorch, safetensors, HDF5 or .keras)", path)


def _sniff_zip(path: str) -> str:
    from paramctl.formats.zipfiles import zip_members

    _, members = zip_members(path)
    if "model.weights.h5" in members:
        return "keras"
    if any(n.endswith("/data.pkl") and n.count("/") == 1 for n in members):
        return "pt"
    raise FormatError("a zip archive that is neither a PyTorch checkpoint nor a .keras model", path)


def load(path: str) -> Checkpoint:
    """Read the checkpoint at PATH (`-` for standard input) into a table."""
    source = path
    if path == "-":
        path = _spool_stdin()
    elif not os.path.exists(path):
        raise FormatError("no such file or directory", path)
    try:
        ckpt = _reader(sniff(path))(path, source)
    except OSError as e:
        raise FormatError(e.strerror or str(e), source) from None
    except RecursionError:
        raise FormatError("nests too deeply", source) from None
    except ParamctlError as e:
        if e.path == path != source:
            raise e.about(source) from None
        raise
    if not ckpt.file_size and os.path.isfile(path):
        ckpt.file_size = os.path.getsize(path)
    return ckpt


def _reader(fmt: str):
    if fmt == "pt":
        from paramctl.formats.pytorch import load_zip

        return load_zip
    if fmt == "pt-legacy":
        from paramctl.formats.pytorch import load_legacy

        return load_legacy
    if fmt == "safetensors":
        from paramctl.formats import safetensors

        return safetensors.load
    if fmt == "hdf5":
        from paramctl.formats import hdf5

        return hdf5.load
    if fmt == "keras":
        from paramctl.formats import keras

        return keras.load
    from paramctl.formats import sharded

    return sharded.load


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
        if to not in WRITABLE:
            raise UsageError(f"cannot write format {to!r}; choose one of {', '.join(WRITABLE)}")
        return to
    ext = os.path.splitext(path.removesuffix(".index.json"))[1].lower()
    if ext in EXTENSIONS and path != "-":
        return EXTENSIONS[ext]
    if ckpt.format == "pt-legacy":
        return "pt"
    if ckpt.format == "sharded":
        return ckpt.extra.shard_format
    return ckpt.format


def non_tensor_entries(ckpt: Checkpoint) -> dict[str, Any]:
    """What the file holds besides tensors, JSON-safe: a `.pt`'s other entries (epoch,
    hyper-parameters, optimizer settings) by dotted path; an HDF5 file's root attributes."""
    if ckpt.format in ("pt", "pt-legacy"):
        from paramctl.formats import pytorch

        return pytorch.non_tensor_entries(ckpt)
    if ckpt.format in ("hdf5", "keras"):
        from paramctl.formats import hdf5

        return hdf5.root_attributes(ckpt)
    return {}


def losses(ckpt: Checkpoint, fmt: str, sharded: bool = False) -> list[str]:
    """What writing CKPT as FMT (in SHARDED form) cannot keep, one line each (for warnings on stderr)."""
    lost = []
    if (fmt != "pt" or sharded) and ckpt.format in ("pt", "pt-legacy"):
        entries = list(non_tensor_entries(ckpt))
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            what = f"sharded {fmt}" if sharded else fmt
            lost.append(f"{what} holds tensors only: dropping {len(entries)} non-tensor entries ({shown})")
    if fmt in ("pt", "safetensors") and ckpt.format in ("hdf5", "keras"):
        lost.append(f"{fmt} keeps the tensors only, not the HDF5 attributes (keras_version, layer and weight names)")
    if fmt == "hdf5" and ckpt.format == "keras":
        lost.append("writing the archive's model.weights.h5 only, without its config.json and metadata.json")
    if fmt != "pt" and any(t.stride is not None and not t.is_contiguous for t in ckpt.tensors):
        lost.append(f"{fmt} stores views as contiguous copies")
    return lost


def writes_shards(path: str, shard_size: int | None = None) -> bool:
    """Whether writing PATH makes a sharded checkpoint: an `*.index.json`, a directory (`out/`), or a shard size."""
    return shard_size is not None or path.endswith((".index.json", "/", os.sep)) or os.path.isdir(path)


def save(ckpt: Checkpoint, path: str, fmt: str | None = None, shard_size: int | None = None) -> None:
    """Write CKPT to PATH (`-`: standard output) atomically, in FMT or the format PATH implies.

    An `*.index.json` path, a directory or a SHARD_SIZE in bytes writes numbered shards plus an
    index, as transformers does (see formats.sharded)."""
    fmt = fmt or output_format(path, ckpt)
    if writes_shards(path, shard_size):
        from paramctl.formats import sharded

        sharded.save(ckpt, path, fmt, shard_size)
        return
    writer = _writer(fmt)
    with atomic_path(path) as tmp:
        writer(ckpt, tmp)


def _writer(fmt: str):
    if fmt == "pt":
        from paramctl.formats.pytorch import save

        return save
    if fmt == "safetensors":
        from paramctl.formats import safetensors

        return safetensors.save
    if fmt == "hdf5":
        from paramctl.formats import hdf5

        return hdf5.save
    if fmt == "keras":
        from paramctl.formats import keras

        return keras.save
    raise UsageError(f"cannot write format {fmt!r}; choose one of {', '.join(WRITABLE)}")


@contextlib.contextmanager
def atomic_path(target: str) -> Iterator[str]:
    """A temporary path beside TARGET, renamed over it once the writer has finished.

    On any error the temporary file is removed and TARGET is left as it was. For `-`, the file
    is written in the temporary directory and then copied to standard output.
    """
    directory = tempfile.gettempdir() if target == "-" else os.path.dirname(os.path.abspath(target))
    name = "stdout" if target == "-" else os.path.basename(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".paramctl-tmp", dir=directory)
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    os.close(fd)
    try:
        yield tmp
        if target == "-":
            with open(tmp, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer, 1 << 22)
            sys.stdout.buffer.flush()
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, target)
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    finally:
        _remove(tmp)
