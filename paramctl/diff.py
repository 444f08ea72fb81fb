"""Comparing two checkpoints name by name: structure first, then bytes, then values, streamed.

Each name gets a status: `only-a` / `only-b` (one side lacks it), `shape`, `dtype`, `values`
(the values differ beyond the tolerance) or `same`. Without a tolerance, `same` means bit for
bit. Tensors of one shape and dtype are first compared as bytes, chunk by chunk, and only a
pair whose bytes differ is read again for arithmetic: max_abs = max |a - b|, rel_l2 =
‖a - b‖ / ‖b‖ and cosine = a·b / (‖a‖ ‖b‖), in float64 over the positions where both values
are finite (a NaN or an infinity on one side only makes the status `values`, as stats counts
them apart). Tensors stream in chunks, two at a time, so memory does not grow with the
checkpoints; a pair of the same shape but another dtype still gets the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramctl.stats import BLOCK
from paramctl.table import CHUNK_ELEMENTS, Checkpoint, Tensor

STATUSES = ("same", "values", "shape", "dtype", "only-a", "only-b")
COLUMNS = ["name", "status", "max_abs", "rel_l2", "cosine"]


@dataclass(frozen=True)
class Tolerance:
    """`same` when |a - b| <= atol + rtol * |b| everywhere (NaN matching NaN), as numpy.isclose."""

    atol: float = 0.0
    rtol: float = 0.0


@dataclass
class Sums:
    """Running sums over the positions of a pair where both values are finite."""

    max_abs: float = 0.0
    dd: float = 0.0  # ‖a - b‖²
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0  # Re a·b̄
    outside: int = 0  # positions beyond the tolerance, non-finite mismatches included

    def merge(self, other: Sums) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.dd += other.dd
        self.aa += other.aa
        self.bb += other.bb
        self.ab += other.ab
        self.outside += other.outside

    def metrics(self) -> dict[str, float | None]:
        """max_abs, rel_l2, cosine. With a zero norm, equal tensors get rel_l2 0 and cosine 1,
        and unequal ones None (undefined), which JSON writes as null."""
        equal = self.dd == 0
        rel = math.sqrt(self.dd) / math.sqrt(self.bb) if self.bb else (0.0 if equal else None)
        if self.aa and self.bb:
            cosine: float | None = max(-1.0, min(1.0, self.ab / (math.sqrt(self.aa) * math.sqrt(self.bb))))
        else:
            cosine = 1.0 if equal else None
        return {"max_abs": self.max_abs, "rel_l2": rel, "cosine": cosine}


IDENTICAL = {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
UNDEFINED = {"max_abs": None, "rel_l2": None, "cosine": None}


def pairs(a: Checkpoint, b: Checkpoint, pattern: str | None = None, exclude: Iterable[str] = ()) -> list[tuple]:
    """(name, tensor of A or None, tensor of B or None): A's names in A's order, then B's own."""
    left, right = a.select(pattern, exclude), b.select(pattern, exclude)
    in_b = {t.name: t for t in right}
    in_a = {t.name for t in left}
    return [(t.name, t, in_b.get(t.name)) for t in left] + [(t.name, None, t) for t in right if t.name not in in_a]


def diff_rows(
    a: Checkpoint,
    b: Checkpoint,
    pattern: str | None = None,
    exclude: Iterable[str] = (),
    tolerance: Tolerance | None = None,
) -> Iterator[dict[str, Any]]:
    """One row per name in A or B: name, status, max_abs, rel_l2, cosine, and a human `detail`
    (the two shapes or dtypes). The names of a tie are compared once."""
    done: dict[tuple, dict[str, Any]] = {}
    for name, ta, tb in pairs(a, b, pattern, exclude):
        if ta is None or tb is None:
            side = ta or tb
            assert side is not None
            detail = f"{side.dtype} {list(side.shape)}"
            yield {"name": name, "status": "only-a" if tb is None else "only-b", **UNDEFINED, "detail": detail}
            continue
        key = (ta.view_key(), tb.view_key())
        if key not in done:
            done[key] = compare(ta, tb, tolerance)
        yield {"name": name, **done[key]}


def compare(a: Tensor, b: Tensor, tolerance: Tolerance | None = None, chunk: int = CHUNK_ELEMENTS) -> dict[str, Any]:
    """status, max_abs, rel_l2, cosine and detail for one pair of tensors, read CHUNK elements at a time."""
    if a.shape != b.shape:
        return {"status": "shape", **UNDEFINED, "detail": f"{list(a.shape)} -> {list(b.shape)}"}
    if a.dtype != b.dtype:
        return {"status": "dtype", **accumulate(a, b, None, chunk).metrics(), "detail": f"{a.dtype} -> {b.dtype}"}
    if same_bytes(a, b, chunk):
        return {"status": "same", **IDENTICAL, "detail": ""}
    sums = accumulate(a, b, tolerance, chunk)
    same = tolerance is not None and sums.outside == 0
    return {"status": "same" if same else "values", **sums.metrics(), "detail": ""}


def same_bytes(a: Tensor, b: Tensor, chunk: int = CHUNK_ELEMENTS) -> bool:
    """Whether A and B (same dtype and shape) hold the same bytes; stops at the first block that differs."""
    for x, y in zip(a.chunks(chunk), b.chunks(chunk)):
        left, right = bits(x), bits(y)
        if not all(np.array_equal(left[i : i + BLOCK], right[i : i + BLOCK]) for i in range(0, left.size, BLOCK)):
            return False
    return True


def accumulate(a: Tensor, b: Tensor, tolerance: Tolerance | None, chunk: int = CHUNK_ELEMENTS) -> Sums:
    """The sums of a pair of one shape, read in chunks side by side."""
    sums = Sums()
    for x, y in zip(a.chunks(chunk), b.chunks(chunk)):
        sums.merge(blocks_sums(x, y, tolerance))
    return sums


def blocks_sums(x: np.ndarray, y: np.ndarray, tolerance: Tolerance | None) -> Sums:
    """Sums over X and Y a cache-sized block at a time, so each reduction reads from cache."""
    sums = Sums()
    for start in range(0, x.size, BLOCK):
        sums.merge(block_sums(x[start : start + BLOCK], y[start : start + BLOCK], tolerance))
    return sums


def block_sums(x: np.ndarray, y: np.ndarray, tolerance: Tolerance | None) -> Sums:
    if x.dtype == y.dtype and np.array_equal(bits(x), bits(y)):
        values = widen(y, y.dtype.kind == "c")
        norm = float(np.vdot(values, values).real)  # an unchanged block adds to the norms only
        if not math.isfinite(norm):
            values = values[np.isfinite(values)]
            norm = float(np.vdot(values, values).real)
        return Sums(aa=norm, bb=norm, ab=norm)
    is_complex = "c" in (x.dtype.kind, y.dtype.kind)
    a, b = widen(x, is_complex), widen(y, is_complex)
    sums = pair_sums(a, b, tolerance)
    if math.isfinite(sums.dd + sums.aa + sums.bb):
        return sums
    # a NaN or an infinity somewhere: the sums are over the positions finite on both sides
    both = np.isfinite(a) & np.isfinite(b)
    agree = (a == b) | (np.isnan(a) & np.isnan(b))
    sums = pair_sums(a[both], b[both], tolerance)
    sums.outside += int(np.count_nonzero(~both & ~agree))
    return sums


def pair_sums(a: np.ndarray, b: np.ndarray, tolerance: Tolerance | None) -> Sums:
    if not a.size:
        return Sums()
    d = a - b
    gap = np.abs(d)
    sums = Sums(
        max_abs=float(gap.max()),
        dd=float(np.vdot(d, d).real),
        aa=float(np.vdot(a, a).real),
        bb=float(np.vdot(b, b).real),
        ab=float(np.vdot(b, a).real),
    )
    if tolerance is not None:
        sums.outside = int(np.count_nonzero(gap > tolerance.atol + tolerance.rtol * np.abs(b)))
    return sums


def bits(values: np.ndarray) -> np.ndarray:
    """VALUES as unsigned integers of their size, to compare bit patterns (NaN payloads, -0.0)."""
    size = values.dtype.itemsize
    return values.view(f"u{size}") if size in (1, 2, 4, 8) else values.view(np.uint8)


def widen(values: np.ndarray, is_complex: bool) -> np.ndarray:
    return values.astype(np.complex128 if is_complex else np.float64, copy=False)
