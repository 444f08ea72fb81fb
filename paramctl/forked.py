"""Work in a forked child process: one answer within a deadline (libhdf5 can loop for ever on a
damaged file while holding the GIL, so only another process can stop it), or a stream of answers
read back in order (a second core for `stats`). The child sends each answer, or its error,
pickled through a pipe and leaves without running any of the parent's clean-up.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from paramctl.errors import FormatError, ParamctlError


def in_child(fn: Callable[..., Any], args: tuple, limit: float, path: str, doing: str) -> Any:
    """FN(*ARGS) run in a forked child that is killed after LIMIT seconds: its result, or its error."""
    if not hasattr(os, "fork"):
        return fn(*args)
    pid, pipe = start(lambda out: pickle.dump(outcome(fn, *args), out))
    data = bytearray()
    deadline = time.monotonic() + limit
    with pipe:
        while chunk := read_until(pipe, deadline):
            data += chunk
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if not data:
        raise FormatError(f"the HDF5 library did not finish {doing} in {limit:.0f} s", path)
    return answer(pickle.loads(bytes(data)))  # our own child's answer


@contextmanager
def streamed(work: Callable[[], Iterable[Any]]) -> Iterator[Iterator[Any]]:
    """The items of WORK(), computed in a forked child and read back in order as they come; the
    child's error is raised where its next item would be. The child is killed when this is left."""

    def send(out: BinaryIO) -> None:
        try:
            for item in work():
                pickle.dump(("ok", item), out)
                out.flush()
        except Exception as e:  # noqa: BLE001 - sent on, to be raised in the parent
            pickle.dump(outcome(raise_again, e), out)

    pid, pipe = start(send)

    def items() -> Iterator[Any]:
        while True:
            try:
                yield answer(pickle.load(pipe))  # our own child's answer
            except EOFError:
                raise RuntimeError("a helper process ended early") from None

    try:
        yield items()
    finally:
        pipe.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def start(send: Callable[[BinaryIO], None]) -> tuple[int, BinaryIO]:
    """Fork a child that runs SEND on the write end of a pipe, then leaves: (its pid, the read end)."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(readable)
            with os.fdopen(writable, "wb") as out:
                send(out)
        finally:
            os._exit(0)
    os.close(writable)
    return pid, os.fdopen(readable, "rb", buffering=0)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """FN(*ARGS) as something that pickles: its result, or its error."""
    try:
        return ("ok", fn(*args))
    except ParamctlError as e:
        return ("error", e)
    except OSError as e:
        return ("oserror", (e.errno, e.strerror or str(e)))
    except Exception as e:  # noqa: BLE001 - a bug, reported as one in the parent
        return ("bug", f"{type(e).__name__}: {e}")


def answer(sent: tuple[str, Any]) -> Any:
    """The result `outcome` sent, or its error raised here."""
    kind, value = sent
    if kind == "ok":
        return value
    if kind == "error":
        raise value
    if kind == "oserror":
        raise OSError(*value)
    raise RuntimeError(value)


def raise_again(error: Exception) -> None:
    raise error


def read_until(pipe: BinaryIO, deadline: float) -> bytes:
    ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
    return pipe.read(1 << 20) if ready else b""
