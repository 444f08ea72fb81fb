"""Checkpoints at URLs (`https://`, `s3://`, any fsspec protocol), read by byte ranges.

Readers open every path through `open_path` and ask `size`/`is_file` here, so a URL reads like a
local file: a `RemoteFile` fetches only the ranges a reader asks for. Small reads fetch at least
READ_AHEAD bytes and keep the last few blocks, so a safetensors header costs one range request
after the size lookup, and a zip's central directory one more. Large reads (streamed tensor
chunks) are fetched exactly. fsspec (and s3fs, aiohttp) are imported only for a URL.

Credentials come from where the backend looks (environment, profiles, ~/.aws); they are never
printed: messages show a URL without its user information and query string. `--cache DIR` (or
PARAMCTL_CACHE) keeps fetched blocks on disk with fsspec's block cache, for repeat reads.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections import OrderedDict
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from paramctl.errors import FormatError

READ_AHEAD = 1 << 20  # a small read fetches this much: a safetensors header in one request
CACHED_BLOCKS = 4
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_files: dict[str, RemoteFile] = {}
_lock = threading.Lock()
cache_dir: str | None = os.environ.get("PARAMCTL_CACHE") or None


def is_url(path: str) -> bool:
    return bool(_URL.match(path)) and not path.startswith("file://")


def redact(url: str) -> str:
    """URL without credentials: no user:password@, no query string (signed URLs carry tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def open_path(path: str) -> BinaryIO:
    """A binary file object on PATH, local or remote, positioned at its start."""
    if not is_url(path):
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    remote = remote_file(path)
    return RemoteReader(remote)  # type: ignore[return-value]


def size(path: str) -> int:
    return remote_file(path).size if is_url(path) else os.path.getsize(path)


def is_file(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    try:
        remote_file(path)
    except FormatError:
        return False
    return True


def read_range(path: str, start: int, length: int) -> bytes:
    """LENGTH bytes of PATH from START (exactly, or fewer at the end of the file)."""
    if not is_url(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(length)
    return remote_file(path).read(start, length)


def remote_file(url: str) -> RemoteFile:
    with _lock:
        found = _files.get(url)
        if found is None:
            found = _files[url] = RemoteFile(url)
        return found


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise FormatError("reading a URL needs fsspec: pip install 'paramctl[remote]'", redact(url)) from None
    protocol = url.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        raise FormatError(f"no fsspec backend for {protocol}:// ({e})", redact(url)) from None
    return fs, url if protocol in ("http", "https") else fs._strip_protocol(url)


def _cached(fs: Any) -> Any:
    """FS behind fsspec's block cache in cache_dir (fetched blocks kept on disk)."""
    import fsspec

    return fsspec.filesystem("blockcache", fs=fs, cache_storage=cache_dir)


class RemoteFile:
    """Byte ranges of one remote file, with a small cache of recent blocks."""

    def __init__(self, url: str):
        self.url = url
        self.shown = redact(url)
        self.fs, self.fs_path = _filesystem(url)
        info = self._call(self.fs.info, self.fs_path)
        if info.get("type") == "directory":
            raise FormatError("a directory: name the checkpoint file or index in it", self.shown)
        # no caching of fsspec's own (the block cache here decides what to keep), except on disk
        # with --cache, where reads go through the blockcache file's cache
        options: dict[str, Any] = {} if cache_dir else {"block_size": READ_AHEAD, "cache_type": "none"}
        if not cache_dir and info.get("size") is not None and "http" in str(self.fs.protocol):
            options["size"] = info["size"]  # known: no second HEAD request
        opener = _cached(self.fs) if cache_dir else self.fs
        self.file = self._call(opener.open, self.fs_path, "rb", **options)
        size = info.get("size") if info.get("size") is not None else getattr(self.file, "size", None)
        if size is None:
            raise FormatError("the server does not say how large the file is (no Content-Length)", self.shown)
        self.size = int(size)
        self.blocks: OrderedDict[int, bytes] = OrderedDict()
        self.fetched = 0  # bytes fetched, for the record
        self.lock = threading.Lock()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:  # fsspec's HTTP backend reports any failed HEAD this way
            cause = getattr(e.__cause__ or e.__context__, "status", None)
            if cause in (401, 403):
                raise FormatError("access denied (403): check your credentials", self.shown) from None
            raise FormatError("not found (404)" if cause in (None, 404) else f"HTTP {cause}", self.shown) from None
        except PermissionError:
            raise FormatError("access denied (403): check your credentials", self.shown) from None
        except Exception as e:  # aiohttp, botocore and asyncio errors have no common base
            raise FormatError(remote_error(e), self.shown) from None

    def read(self, start: int, length: int) -> bytes:
        start, end = max(start, 0), min(start + length, self.size)
        if end <= start:
            return b""
        if end - start >= READ_AHEAD:
            return self._fetch(start, end)
        block = start // READ_AHEAD
        parts = []
        while block * READ_AHEAD < end:
            data = self._block(block)
            lo = max(start - block * READ_AHEAD, 0)
            parts.append(data[lo : end - block * READ_AHEAD])
            block += 1
        return b"".join(parts)

    def _block(self, index: int) -> bytes:
        with self.lock:
            if index in self.blocks:
                self.blocks.move_to_end(index)
                return self.blocks[index]
        data = self._fetch(index * READ_AHEAD, min((index + 1) * READ_AHEAD, self.size))
        with self.lock:
            self.blocks[index] = data
            while len(self.blocks) > CACHED_BLOCKS:
                self.blocks.popitem(last=False)
        return data

    def _fetch(self, start: int, end: int) -> bytes:
        if cache_dir is None and hasattr(self.file, "_fetch_range"):
            data = self._call(self.file._fetch_range, start, end)
        else:
            with self.lock:
                self._call(self.file.seek, start)
                data = self._call(self.file.read, end - start)
        if len(data) != end - start:
            raise FormatError(f"the server sent {len(data)} bytes for a range of {end - start}", self.shown)
        self.fetched += len(data)
        return data


def remote_error(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if "range requests" in text:
        return "the server does not support range requests (HTTP Range): download the file first"
    if status == 403:
        return "access denied (403): check your credentials"
    if status == 404:
        return "not found (404)"
    if "timeout" in type(e).__name__.lower() or "timed out" in text.lower():
        return "timed out"
    if status:
        return f"HTTP {status}: {text}"
    return f"cannot read: {type(e).__name__}: {text}"


class RemoteReader(io.RawIOBase):
    """A seekable read-only file object over a RemoteFile (zipfile and the pickle readers want one)."""

    def __init__(self, remote: RemoteFile):
        self.remote = remote
        self.pos = 0
        self.name = remote.shown

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.remote.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.remote.size - self.pos
        data = self.remote.read(self.pos, n)
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
