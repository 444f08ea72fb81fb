"""Streamed tensor statistics: one pass per chunk, accumulated in float64, memory bounded.

mean, std (population), min, max, absmax and norm are over the finite values, so one NaN does
not hide what the rest of the tensor looks like; NaNs and infinities are counted apart. Chunk
results are merged with Chan's parallel formula, so the answer does not depend on chunk size.
Complex tensors are summarised by their magnitudes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramctl.forked import streamed
from paramctl.table import CHUNK_ELEMENTS, Tensor

HIST_BINS = 16


@dataclass
class Summary:
    """Running statistics of one tensor's values."""

    count: int = 0  # finite values
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    zeros: int = 0
    nans: int = 0
    infs: int = 0
    hist: list[int] = field(default_factory=list)

    def add(self, chunk: np.ndarray) -> None:
        """Fold CHUNK in, a cache-sized block at a time, so every reduction reads a block from
        cache, not RAM."""
        self.merge(blocks_summary(chunk))

    def merge(self, other: Summary) -> None:
        total = self.count + other.count
        if other.count:
            delta = other.mean - self.mean
            self.mean += delta * other.count / total
            self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        self.sumsq += other.sumsq
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.zeros += other.zeros
        self.nans += other.nans
        self.infs += other.infs

    def add_histogram_of(self, tensor: Tensor, chunk: int = CHUNK_ELEMENTS) -> None:
        """A second pass over TENSOR, binning its finite values over [min, max] of this summary."""
        if self.count:
            for part in tensor.chunks(chunk):
                self.add_to_histogram(part)

    def add_to_histogram(self, chunk: np.ndarray) -> None:
        values = widen(chunk)
        values = values[np.isfinite(values)]
        counts, _ = np.histogram(values, bins=HIST_BINS, range=self.hist_range())
        self.hist = (np.asarray(self.hist or [0] * HIST_BINS) + counts).tolist()

    def hist_range(self) -> tuple[float, float]:
        if self.count == 0:
            return (0.0, 1.0)
        if self.min == self.max:
            return (self.min - 0.5, self.max + 0.5)
        return (self.min, self.max)

    def row(self) -> dict[str, Any]:
        has = self.count > 0
        return {
            "mean": self.mean if has else None,
            "std": math.sqrt(self.m2 / self.count) if has else None,
            "min": self.min if has else None,
            "max": self.max if has else None,
            "absmax": max(abs(self.min), abs(self.max)) if has else None,
            "norm": math.sqrt(self.sumsq),
            "zeros": self.zeros,
            "nans": self.nans,
            "infs": self.infs,
        }


BLOCK = 1 << 16  # elements: 512 KiB as float64, resident in L2 while it is reduced


def blocks_summary(values: np.ndarray) -> Summary:
    summary = Summary()
    scratch = (np.empty(BLOCK), np.empty(BLOCK))  # reused: a fresh 512 KiB array per block costs page faults
    for start in range(0, values.size, BLOCK):
        summary.merge(block_summary(values[start : start + BLOCK], scratch))
    return summary


def block_summary(block: np.ndarray, scratch: tuple[np.ndarray, np.ndarray] | None = None) -> Summary:
    n = block.size
    if scratch is None or block.dtype.kind == "c":
        values, deviations = widen(block), None
    else:
        values, deviations = scratch[0][:n], scratch[1][:n]
        np.copyto(values, block, casting="unsafe")
    # comparisons are exact in the stored dtype and cheaper there for float32/float64
    native = block if block.dtype.kind == "f" and block.dtype.itemsize >= 4 else values
    summary = Summary()
    total = float(values.sum())
    # a finite float64 sum of narrower values means every value is finite: no separate pass
    if not math.isfinite(total) and block.dtype.kind not in "iub":
        finite = np.isfinite(values)
        nan = int(np.isnan(values).sum())
        summary.nans = nan
        summary.infs = int(values.size - finite.sum()) - nan
        native = values = values[finite]
        n, deviations, total = values.size, None, float(values.sum())
    if n:
        mean = total / n
        deviations = np.subtract(values, mean, out=deviations)
        summary.count, summary.mean = n, mean
        summary.m2 = float(np.dot(deviations, deviations))
        summary.sumsq = float(np.dot(values, values))
        summary.min, summary.max = float(native.min()), float(native.max())
        summary.zeros = int(np.count_nonzero(native == 0))
    return summary


def widen(chunk: np.ndarray) -> np.ndarray:
    """CHUNK as float64 (magnitudes for complex)."""
    if chunk.dtype.kind == "c":
        return np.abs(chunk).astype(np.float64)
    return chunk.astype(np.float64, copy=False)


def summarize(
    tensor: Tensor, hist: bool = False, chunk: int = CHUNK_ELEMENTS, start: int = 0, stop: int | None = None
) -> Summary:
    """Statistics of TENSOR's elements START to STOP (all by default), read chunk by chunk; with
    HIST, a second pass bins the finite values."""
    summary = Summary()
    for part in tensor.chunks(chunk, start, stop):
        summary.add(part)
    if hist:
        summary.add_histogram_of(tensor, chunk)
    return summary


PARALLEL_BYTES = 64 << 20  # less to read than this, and a helper process costs more than it saves


def summaries(tensors: Sequence[Tensor]) -> Iterator[Summary]:
    """The Summary of each of TENSORS, in order, using both cores where there is much to read.

    A forked helper process summarises the second half of every large tensor read from its file
    while this process does the first half; the halves merge with Chan's formula. Threads did not
    help (the per-block numpy calls are too short to shed the GIL); processes share only the page
    cache. The split depends on the tensors alone, so every run gives the same numbers.

    Only where numpy's BLAS runs one thread per process (the CLI sees to it): a forked child's
    BLAS threads and this process's would otherwise spin against each other on the same cores."""
    splits = [split_point(t) for t in tensors]
    helped = sum((t.numel - at) * t.nbytes // max(t.numel, 1) for t, at in zip(tensors, splits))
    if helped < PARALLEL_BYTES or not hasattr(os, "fork") or os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        yield from (summarize(t) for t in tensors)
        return
    with streamed(lambda: (summarize(t, start=at) for t, at in zip(tensors, splits) if at < t.numel)) as halves:
        for t, at in zip(tensors, splits):
            summary = summarize(t, stop=at)
            if at < t.numel:
                summary.merge(next(halves))
            yield summary


def split_point(t: Tensor) -> int:
    """Where the helper's half of T begins: a block boundary mid-way, or its end if T is small or
    is not read straight from a file."""
    if not t.streams or t.numel < 4 * BLOCK:
        return t.numel
    return t.numel // 2 // BLOCK * BLOCK


def stats_rows(
    tensors: Sequence[Tensor], hist: bool = False, progress: Callable[[Sequence[Tensor]], Iterable[Tensor]] = iter
) -> Iterator[dict[str, Any]]:
    for t, summary in zip(progress(tensors), summaries(tensors)):
        if hist:
            summary.add_histogram_of(t)
        row = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel, **summary.row()}
        if hist:
            low, high = summary.hist_range()
            row["hist"] = {"edges": np.linspace(low, high, HIST_BINS + 1).tolist(), "counts": summary.hist}
        yield row


SPARKS = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """One character per bin; an empty bin is a blank, any non-empty bin shows at least ▁."""
    top = max(counts, default=0)
    if not top:
        return ""
    return "".join(SPARKS[0] if c == 0 else SPARKS[max(1, round(c / top * (len(SPARKS) - 1)))] for c in counts)
