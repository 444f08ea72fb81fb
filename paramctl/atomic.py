"""Atomic writes that leave nothing behind, even when the writer is killed.

On Linux the output is written into an unnamed file (`O_TMPFILE`) in the target's directory and
linked into place only once it is complete and flushed: a writer killed midway (SIGKILL, power
loss) leaves no file for anyone to clean up, since an unnamed file vanishes with its last
descriptor. Writers still get a path, `/proc/self/fd/N`, which `open`, `torch.save` and h5py all
write through (a forked child inherits the descriptor, so the path holds there too). Elsewhere,
or where the file system has no `O_TMPFILE`, the output goes to a named temporary file beside the
target, renamed over it at the end and removed on any error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from paramctl.errors import ParamctlError

TEMP_SUFFIX = ".paramctl-tmp"


@contextlib.contextmanager
def atomic_path(target: str) -> Iterator[str]:
    """A path to write TARGET's new contents to; once the block ends without error, TARGET is
    replaced by them in one step (for `-`, they are copied to standard output). On any error,
    TARGET is left as it was and nothing is left behind."""
    directory = tempfile.gettempdir() if target == "-" else os.path.dirname(os.path.abspath(target))
    try:
        fd = unnamed_file(directory)
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    if fd is None:
        with _named_temp(target, directory) as tmp:
            yield tmp
        return
    try:
        yield f"/proc/self/fd/{fd}"
        if target == "-":
            _copy_to_stdout(fd)
        else:
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~_umask())
            try:
                _link_into_place(fd, directory, target)
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                _copy_into_place(fd, target, directory)
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def unnamed_temp(directory: str) -> Iterator[str]:
    """A scratch file in DIRECTORY, as a path, gone when the block ends (or the process dies):
    for a writer that builds a part of its output first (a `.keras` archive's weights file)."""
    fd = unnamed_file(directory)
    if fd is None:
        fd, path = tempfile.mkstemp(suffix=TEMP_SUFFIX, dir=directory)
        os.close(fd)
        try:
            yield path
        finally:
            _remove(path)
        return
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def unnamed_file(directory: str) -> int | None:
    """A descriptor on a new unnamed file in DIRECTORY, or None where the system cannot make one
    that paramctl can later link (not Linux, or a file system without O_TMPFILE)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        if e.errno in _NO_TMPFILE:
            return None
        raise


# EOPNOTSUPP: the file system has no O_TMPFILE; EISDIR: the kernel predates it (O_TMPFILE
# includes O_DIRECTORY); EINVAL: a flag combination it does not take
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}


def _link_into_place(fd: int, directory: str, target: str) -> None:
    """Give the unnamed file FD the name TARGET, replacing what is there.

    linkat cannot replace an existing name, so the file is linked under a fresh temporary name
    first and renamed over TARGET at once: only a kill between those two calls can leave that
    name behind. (linkat with AT_EMPTY_PATH on the descriptor itself needs CAP_DAC_READ_SEARCH;
    linking its /proc path with AT_SYMLINK_FOLLOW does not.)"""
    name = os.path.basename(target)
    here = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attempt in range(100):
            tmp = os.path.join(directory, f".{name}.{os.getpid()}.{attempt}{TEMP_SUFFIX}")
            try:  # a directory descriptor makes os.link call linkat, which follows the /proc link
                os.link(f"/proc/self/fd/{fd}", tmp, src_dir_fd=here, follow_symlinks=True)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(f"no free temporary name beside {target}")
    finally:
        os.close(here)
    try:
        os.replace(tmp, target)
    except OSError:
        _remove(tmp)
        raise


# a file system that makes unnamed files but will not link them (or /proc is not what it seems)
_NO_LINK = {errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOENT}


def _copy_into_place(fd: int, target: str, directory: str) -> None:
    """The fallback of `_link_into_place`: the unnamed file's bytes copied to a named temporary
    file, renamed over TARGET."""
    with _named_temp(target, directory) as tmp, open(tmp, "wb") as out, open(fd, "rb", closefd=False) as f:
        f.seek(0)
        shutil.copyfileobj(f, out, 1 << 22)


@contextlib.contextmanager
def _named_temp(target: str, directory: str) -> Iterator[str]:
    """The fallback: a named temporary file beside TARGET, renamed over it at the end."""
    name = "stdout" if target == "-" else os.path.basename(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=directory)
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    os.close(fd)
    try:
        yield tmp
        if target == "-":
            with open(tmp, "rb") as f:
                _copy_to_stdout(f.fileno())
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    finally:
        _remove(tmp)


def _copy_to_stdout(fd: int) -> None:
    with open(fd, "rb", closefd=False) as f:
        f.seek(0)
        shutil.copyfileobj(f, sys.stdout.buffer, 1 << 22)
    sys.stdout.buffer.flush()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
