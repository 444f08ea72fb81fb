"""Work in a forked child: answers and errors come back, a hang is killed at its deadline."""

from __future__ import annotations

import os
import time

import pytest

from paramctl.errors import FormatError
from paramctl.forked import in_child, streamed


def fail(error: Exception) -> None:
    raise error


def test_in_child_gives_the_answer_or_the_error():
    assert in_child(lambda a, b: {"sum": a + b, "pid": os.getpid()}, (2, 3), 10, "f", "adding")["sum"] == 5
    assert in_child(os.getpid, (), 10, "f", "asking") != os.getpid()
    with pytest.raises(FormatError, match="bad header"):
        in_child(fail, (FormatError("bad header", "f"),), 10, "f", "reading")
    with pytest.raises(OSError, match="gone"):
        in_child(fail, (FileNotFoundError(2, "gone"),), 10, "f", "reading")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        in_child(lambda: 1 / 0, (), 10, "f", "dividing")


def test_a_child_that_hangs_is_killed_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(FormatError, match="did not finish reading this file in 1 s"):
        in_child(time.sleep, (60,), 1.0, "f", "reading this file")
    assert time.monotonic() - start < 30  # not the 60 s the child would have slept


def test_streamed_items_arrive_in_order_and_an_error_where_it_happened():
    with streamed(lambda: (i * i for i in range(1000))) as items:
        assert [next(items) for _ in range(1000)] == [i * i for i in range(1000)]

    def work():
        yield "first"
        raise FormatError("truncated", "f")

    with streamed(work) as items:
        assert next(items) == "first"
        with pytest.raises(FormatError, match="truncated"):
            next(items)


def test_leaving_a_stream_early_kills_its_child():
    pids: list[int] = []

    with streamed(lambda: iter(lambda: os.getpid(), None)) as items:  # endless
        pids.append(next(items))
    with pytest.raises(ChildProcessError):
        os.waitpid(pids[0], os.WNOHANG)  # already reaped: nothing left running
