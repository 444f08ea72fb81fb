"""Checkpoints at URLs (`https://`, `s3://`, any fsspec protocol), read by byte ranges.

Readers open every path through `open_path` and ask `size`/`is_file` here, so a URL reads like a
local file: a `RemoteFile` fetches only the ranges a reader asks for. A small read fetches at
least READ_AHEAD bytes (backwards from the end of the file near its end, where a zip keeps its
directory) and keeps what it fetched; a read that runs past what is kept fetches only the rest;
large reads (streamed tensor chunks) are fetched exactly and not kept. A safetensors header thus
costs one request (two past READ_AHEAD bytes).

http(s) URLs are read with the standard library's http.client (a range request answers the
file's size too: no HEAD; redirects followed; a server that ignores Range is refused); other
protocols go through fsspec (s3fs for s3://), imported only then. Credentials come from where
each backend looks (the URL's user information for HTTP Basic, HF_TOKEN for huggingface.co, the
environment and profiles for S3); messages show a URL without user information or query string.
`--cache DIR` (or PARAMCTL_CACHE) keeps every fetched range on disk for repeat reads.
"""

from __future__ import annotations

import io
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

from paramctl.errors import FormatError

READ_AHEAD = 64 << 10  # a small read fetches at least this much
KEPT_SPANS = 8
TIMEOUT = 60.0  # seconds without an answer before a request fails
MAX_REDIRECTS = 5
NO_RANGES = "the server does not support range requests (HTTP Range): download the file first"
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
    return RemoteReader(remote_file(path))  # type: ignore[return-value]


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


class RemoteFile:
    """Byte ranges of one remote file; the spans fetched by small reads are kept."""

    def __init__(self, url: str):
        self.url = url
        self.shown = redact(url)
        self.backend = HTTPBackend(url) if url.split("://", 1)[0].lower() in ("http", "https") else FsspecBackend(url)
        self.spans: list[tuple[int, bytes]] = []  # (start, bytes), most recently used last
        self.lock = threading.Lock()
        self.fetched = 0
        first = self._first_range()
        if first:
            self.spans.append((0, first))

    def read(self, start: int, length: int) -> bytes:
        start, end = max(start, 0), min(start + length, self.size)
        if end <= start:
            return b""
        with self.lock:
            for i, (at, data) in enumerate(self.spans):
                if at <= start and end <= at + len(data):
                    self.spans.append(self.spans.pop(i))
                    return data[start - at : end - at]
            extends = next(((at, data) for at, data in self.spans if at <= start < at + len(data)), None)
        if end - start >= READ_AHEAD:
            if extends is None:
                return self.fetch(start, end)
            at, data = extends  # the kept part, then only the rest
            return data[start - at :] + self.fetch(at + len(data), end)
        if extends is not None:  # grow the span that holds the start
            at, data = extends
            more = self.fetch(at + len(data), min(max(end, at + len(data) + READ_AHEAD), self.size))
            span = (at, data + more)
        else:
            first = start if start + READ_AHEAD <= self.size else max(0, self.size - READ_AHEAD)
            span = (first, self.fetch(first, max(end, min(first + READ_AHEAD, self.size))))
        with self.lock:
            self.spans = [s for s in self.spans if s[0] != span[0]][-(KEPT_SPANS - 1) :] + [span]
        return span[1][start - span[0] : end - span[0]]

    def fetch(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        cached = self._cache_path(start, end)
        if cached is not None and os.path.isfile(cached):
            with open(cached, "rb") as f:
                return f.read()
        data = self.backend.fetch(start, end)
        if len(data) != end - start:
            raise FormatError(f"the server sent {len(data)} bytes for a range of {end - start}", self.shown)
        self.fetched += len(data)
        if cached is not None:
            _store(cached, data)
        return data

    def _first_range(self) -> bytes:
        """The first READ_AHEAD bytes, learning the file's size (kept in the cache as `first`:
        8 bytes of size, then the bytes)."""
        cached = os.path.join(cache_dir, self._cache_key(), "first") if cache_dir else None
        if cached is not None and os.path.isfile(cached):
            with open(cached, "rb") as f:
                self.size = int.from_bytes(f.read(8), "little")
                return f.read()
        first = self.backend.first_range(READ_AHEAD)
        self.size = self.backend.size
        self.fetched += len(first)
        if cached is not None:
            _store(cached, self.size.to_bytes(8, "little") + first)
        return first

    def _cache_key(self) -> str:
        import hashlib

        return hashlib.sha256(redact(self.url).encode()).hexdigest()[:32]

    def _cache_path(self, start: int, end: int) -> str | None:
        return os.path.join(cache_dir, self._cache_key(), f"{self.size}-{start}-{end}") if cache_dir else None


def _store(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class HTTPBackend:
    """Range requests with http.client: a connection per thread, redirects followed."""

    def __init__(self, url: str):
        self.url = url
        self.shown = redact(url)
        self.size = 0
        self.local = threading.local()

    def first_range(self, length: int) -> bytes:
        """The first LENGTH bytes (fewer for a smaller file), and the file's size."""
        status, headers, body = self._get(0, length)
        total = re.fullmatch(r"bytes \d+-\d+/(\d+)", headers.get("content-range", ""))
        if status == 206 and total:
            self.size = int(total.group(1))
            return body[:length]
        if status == 200 and len(body) <= length:  # the whole file answered a range covering it
            self.size = len(body)
            return body
        if status == 416:  # an empty file has no first byte to ask for
            self.size = 0
            return b""
        raise FormatError(
            "the server does not support range requests (HTTP Range): download the file first", self.shown
        )

    def fetch(self, start: int, end: int) -> bytes:
        status, _, body = self._get(start, end - start)
        if status != 206:
            raise FormatError(
                "the server does not support range requests (HTTP Range): download the file first", self.shown
            )
        return body

    def _get(self, start: int, length: int) -> tuple[int, dict[str, str], bytes]:
        url = self.url
        origin = urlsplit(url)
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
            if parts.hostname == origin.hostname:  # credentials never follow a redirect elsewhere
                headers.update(auth_headers(origin))
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            key = (parts.scheme.lower(), parts.hostname or "", parts.port)
            try:
                status, reason, answer, body = self._exchange(key, target, headers, length + 1)
            except (OSError, ValueError) as e:
                self._drop(key)
                reason = "timed out" if isinstance(e, TimeoutError) else f"cannot read: {e}"
                raise FormatError(reason, self.shown) from None
            if status in (301, 302, 303, 307, 308) and "location" in answer:
                url = urljoin(url, answer["location"])
                continue
            if status in (401, 403):
                raise FormatError(f"access denied ({status}): check your credentials", self.shown)
            if status == 404:
                raise FormatError("not found (404)", self.shown)
            if status not in (200, 206, 416):
                raise FormatError(f"HTTP {status} {reason}", self.shown)
            return status, answer, body
        raise FormatError(f"more than {MAX_REDIRECTS} redirects", self.shown)

    def _exchange(
        self, key: tuple[str, str, int | None], target: str, headers: dict[str, str], most: int
    ) -> tuple[int, str, dict[str, str], bytes]:
        """One GET on this thread's connection to KEY (made, or made again when the server closed
        it): the status, reason, headers and at most MOST bytes of the body. HTTP/1.1 by hand over
        a socket: http.client's import (the email package) costs more than a listing's work."""
        scheme, host, port = key
        for attempt in (0, 1):
            reused = key in self._connections()
            conn = self._connection(key)
            lines = [f"GET {target} HTTP/1.1", f"Host: {host}" + (f":{port}" if port else "")]
            lines += [f"{k}: {v}" for k, v in headers.items()] + ["User-Agent: paramctl", "Connection: keep-alive"]
            try:
                conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                status, reason, answer = read_head(conn.file)
            except (OSError, ValueError):
                self._drop(key)
                if reused and attempt == 0:
                    continue  # a kept-alive connection the server had closed: once more, afresh
                raise
            body, whole = read_body(conn.file, answer, most)
            if not whole or answer.get("connection", "").lower() == "close":
                self._drop(key)
            return status, reason, answer, body
        raise OSError("no answer")

    def _connections(self) -> dict[tuple, Connection]:
        return self.local.__dict__.setdefault("connections", {})

    def _connection(self, key: tuple[str, str, int | None]) -> Connection:
        connections = self._connections()
        if key not in connections:
            import socket

            scheme, host, port = key
            sock = socket.create_connection((host, port or (443 if scheme == "https" else 80)), timeout=TIMEOUT)
            if scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            connections[key] = Connection(sock, sock.makefile("rb"))
        return connections[key]

    def _drop(self, key: tuple[str, str, int | None]) -> None:
        connection = self._connections().pop(key, None)
        if connection is not None:
            connection.file.close()
            connection.sock.close()


@dataclass
class Connection:
    sock: Any
    file: Any  # buffered reader on the socket


MAX_HEADER_LINES = 200


def read_head(f: Any) -> tuple[int, str, dict[str, str]]:
    """The status line and headers of an HTTP/1.x response (header names lower-cased)."""
    line = f.readline(1 << 16)
    if not line:
        raise OSError("the server closed the connection")
    version, _, rest = line.decode("latin-1").strip().partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.isdigit():
        raise ValueError(f"not an HTTP answer: {line[:60]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = f.readline(1 << 16)
        if line in (b"\r\n", b"\n", b""):
            return int(code), reason, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many header lines")


def read_body(f: Any, headers: dict[str, str], most: int) -> tuple[bytes, bool]:
    """At most MOST bytes of the body, and whether all of it was read (the connection is reusable)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while total < most:
            size = int(f.readline(1 << 10).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                f.readline(1 << 10)
                return b"".join(parts), True
            parts.append(f.read(size))
            f.readline(1 << 10)
            total += size
        return b"".join(parts)[:most], False
    if "content-length" in headers:
        length = int(headers["content-length"])
        body = f.read(min(length, most))
        return body, len(body) == length
    return f.read(most), False  # until the server closes: never reused


def auth_headers(parts: Any) -> dict[str, str]:
    """HTTP Basic from the URL's user information; a Hugging Face token for huggingface.co."""
    if parts.username is not None:
        pair = f"{parts.username}:{parts.password or ''}".encode()
        import base64

        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    token = os.environ.get("HF_TOKEN")
    if token and (parts.hostname or "").endswith(("huggingface.co", "hf.co")):
        return {"Authorization": f"Bearer {token}"}
    return {}


class FsspecBackend:
    """Any other protocol, through fsspec (s3fs for s3://): a size lookup, then ranges."""

    def __init__(self, url: str):
        self.shown = redact(url)
        try:
            import fsspec
        except ImportError:
            raise FormatError("reading this URL needs fsspec: pip install 'paramctl[remote]'", self.shown) from None
        protocol = url.split("://", 1)[0]
        try:
            self.fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as e:
            raise FormatError(f"no fsspec backend for {protocol}:// ({e})", self.shown) from None
        self.path = self.fs._strip_protocol(url)
        info = self._call(self.fs.info, self.path)
        if info.get("type") == "directory":
            raise FormatError("a directory: name the checkpoint file or index in it", self.shown)
        if info.get("size") is None:
            raise FormatError("the store does not say how large the file is", self.shown)
        self.size = int(info["size"])

    def first_range(self, length: int) -> bytes:
        return self.fetch(0, min(length, self.size))

    def fetch(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._call(self.fs.cat_file, self.path, start=start, end=end)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise FormatError("not found", self.shown) from None
        except PermissionError:
            raise FormatError("access denied: check your credentials", self.shown) from None
        except Exception as e:  # botocore and asyncio errors have no common base
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "timeout" in type(e).__name__.lower():
                text = "timed out"
            raise FormatError(f"cannot read: {text}", self.shown) from None


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
