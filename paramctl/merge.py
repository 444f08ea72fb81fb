"""Merging checkpoints: linear (model soups), slerp, task arithmetic and TIES, computed in float32.

Every method follows mergekit's implementation of it:
- linear: sum_i w_i M_i / sum_i w_i (weights equal by default, normalized as mergekit does).
- slerp (Shoemake 1985), two models: normalize both tensors, take the cosine of the angle between
  them, and interpolate on the arc, s0 A + s1 B with s0 = sin((1-t) theta) / sin(theta) and
  s1 = sin(t theta) / sin(theta); a nearly colinear pair (|cos| > 0.9995) is interpolated linearly.
- task arithmetic: base + lambda * sum_i w_i (M_i - base).
- TIES (Yadav et al. 2023): each task vector M_i - base keeps its top DENSITY fraction of entries
  by magnitude; the sign of each entry is elected by the sign of the sum of the weighted trimmed
  vectors; the result is base + lambda * (the weighted mean of the entries that agree with it).

A merged tensor is not held in memory: its storage computes the values when a writer reads it.
linear, task arithmetic and slerp stream chunk by chunk (slerp reads its pair twice: once for
the norms and the dot product, once for the result); TIES needs each tensor whole (a quantile per
task vector), so memory is bounded by the largest tensor times the number of models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paramctl.dtypes import FLOATING, check_name, itemsize, numpy_dtype
from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Storage, Tensor

if TYPE_CHECKING:
    import numpy as np

METHODS = ("linear", "slerp", "task-arithmetic", "ties")
MERGE_CHUNK = 1 << 20  # elements per streamed chunk: 4 MiB in float32
DOT_THRESHOLD = 0.9995  # mergekit's: above it, slerp falls back to lerp
EPS = 1e-8  # mergekit's: a tensor of a smaller norm is not normalized

# elements per chunk -> float32 chunks in C order; a chunk may be overwritten by the next one (the
# buffers are reused), so a consumer writes or copies it before asking for more
Chunks = Callable[[int], Iterator["np.ndarray"]]


@dataclass(eq=False)
class Computed(Storage):
    """Bytes computed from other tensors each time they are read, never kept: a writer that
    streams (safetensors) holds a chunk at a time, one that needs a whole tensor (.pt) gets it."""

    produce: Chunks | None = None
    dtype: str = "float32"

    def read(self, start: int = 0, length: int | None = None) -> bytes | memoryview:
        data = b"".join(chunk.tobytes() for chunk in self.values(MERGE_CHUNK))
        length = len(data) - start if length is None else length
        return memoryview(data)[start : start + length]

    def values(self, elements: int) -> Iterator[np.ndarray]:
        assert self.produce is not None
        dt = numpy_dtype(self.dtype)
        for chunk in self.produce(elements):
            yield chunk.astype(dt, copy=False)


@dataclass(eq=False)
class ComputedTensor(Tensor):
    """A row whose values a Computed storage makes; streamed chunk by chunk."""

    def chunks(self, elements: int = MERGE_CHUNK, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        storage = self.storage
        if start or (stop is not None and stop < self.numel) or not isinstance(storage, Computed):
            yield from super().chunks(elements, start, stop)
            return
        yield from storage.values(elements)


def computed(like: Tensor, dtype: str, produce: Chunks) -> ComputedTensor:
    """A row with LIKE's name, shape and format attributes whose values PRODUCE makes, in DTYPE."""
    storage = Computed(like.numel * itemsize(dtype), produce=produce, dtype=dtype)
    return ComputedTensor(like.name, like.shape, dtype, storage, attrs=dict(like.attrs))


# --- matching names ------------------------------------------------------------------------------


@dataclass
class Row:
    """One name of the output: the first input's tensor and each model's (None where missing)."""

    first: Tensor
    models: list[Tensor | None]
    base: Tensor | None = None
    names: list[str] = field(default_factory=list)  # every name of the first input's tie group


def match(
    models: Sequence[Checkpoint], base: Checkpoint | None = None, allow_missing: bool = False
) -> tuple[list[Row], list[Tensor]]:
    """The rows to merge (floating tensors of the first model, a tie group once) and the rows
    copied from the first model as they are (integer and bool tensors).

    A name missing from any input, or of another shape, is an error naming it, unless
    ALLOW_MISSING: then a missing name is merged over the inputs that hold it (a task vector of 0
    for task arithmetic and TIES), and a name only later inputs hold is left out."""
    first = models[0]
    inputs = list(models) + ([base] if base is not None else [])
    lookups = [{t.name: t for t in ckpt.tensors} for ckpt in inputs]
    problems: list[str] = []
    for ckpt, names in zip(inputs[1:], lookups[1:]):
        missing = [t.name for t in first.tensors if t.name not in names]
        extra = [n for n in names if n not in lookups[0]]
        for which, (lacking, holding) in ((missing, (ckpt, first)), (extra, (first, ckpt))):
            if which:
                shown = ", ".join(which[:5]) + (f" and {len(which) - 5} more" if len(which) > 5 else "")
                problems.append(f"{lacking.source} lacks {len(which)} tensors of {holding.source} ({shown})")
    if problems and not allow_missing:
        raise UsageError("names differ: " + "; ".join(problems) + " (--allow-missing merges the names they share)")
    rows: dict[tuple, Row] = {}
    copied: list[Tensor] = []
    for t in first.tensors:
        others = [names.get(t.name) for names in lookups]
        for ckpt, other in zip(inputs, others):
            if other is not None and other.shape != t.shape:
                raise UsageError(
                    f"tensor {t.name!r} is {list(other.shape)} in {ckpt.source} but {list(t.shape)} in {first.source}"
                )
        if t.dtype not in FLOATING or t.dtype.startswith("complex"):
            copied.append(t)
            continue
        key = t.view_key()
        if key in rows:
            rows[key].names.append(t.name)
            continue
        model_tensors = others[: len(models)]
        rows[key] = Row(t, model_tensors, others[len(models)] if base is not None else None, [t.name])
    return list(rows.values()), copied


def merged_checkpoint(
    first: Checkpoint, rows: list[Row], copied: list[Tensor], make: Callable[[Row], Chunks], dtype: str | None
) -> Checkpoint:
    """The first input's table, in its order, with each row's tensor computed by MAKE(row) and cast
    to DTYPE (default: the first input's dtype of that tensor); ties and metadata kept."""
    by_name: dict[str, Tensor] = {t.name: t for t in copied}
    for row in rows:
        out_dtype = dtype or row.first.dtype
        made = computed(row.first, out_dtype, make(row))
        for name in row.names:  # the names of a tie view one storage: still one tensor
            t = first[name]
            by_name[name] = ComputedTensor(name, t.shape, out_dtype, made.storage, attrs=dict(t.attrs))
    tensors = [by_name[t.name] for t in first.tensors]
    return Checkpoint(first.source, first.format, tensors, dict(first.metadata), first.extra)


# --- methods -------------------------------------------------------------------------------------


def float_chunks(t: Tensor, elements: int) -> Iterator[np.ndarray]:
    import numpy as np

    for chunk in t.chunks(elements):
        yield chunk.astype(np.float32)


def zeros_like(t: Tensor, elements: int) -> Iterator[np.ndarray]:
    import numpy as np

    for start in range(0, t.numel, elements):
        yield np.zeros(min(elements, t.numel - start), np.float32)


def linear(row: Row, weights: Sequence[float]) -> Chunks:
    import numpy as np

    present = [(t, w) for t, w in zip(row.models, weights) if t is not None]
    total = sum(w for _, w in present)
    if abs(total) < 1e-8:
        raise UsageError(f"the weights of the models holding {row.first.name!r} sum to 0")
    scales = [np.float32(w / total) for _, w in present]

    def produce(elements: int) -> Iterator[np.ndarray]:
        out = tmp = None
        for parts in zip(*(t.chunks(elements) for t, _ in present)):
            if out is None or out.size != parts[0].size:
                out, tmp = np.empty(parts[0].size, np.float32), np.empty(parts[0].size, np.float32)
            np.multiply(parts[0], scales[0], out=out, dtype=np.float32)
            for part, scale in zip(parts[1:], scales[1:]):
                out += np.multiply(part, scale, out=tmp, dtype=np.float32)
            yield out

    return produce


def task_arithmetic(row: Row, weights: Sequence[float], lam: float) -> Chunks:
    import numpy as np

    assert row.base is not None
    base = row.base
    present = [(t, np.float32(lam * w)) for t, w in zip(row.models, weights) if t is not None]

    def produce(elements: int) -> Iterator[np.ndarray]:
        for parts in zip(base.chunks(elements), *(t.chunks(elements) for t, _ in present)):
            b = parts[0].astype(np.float32)
            out = b.copy()
            for part, scale in zip(parts[1:], present):
                out += scale[1] * (part.astype(np.float32) - b)
            yield out

    return produce


def slerp(row: Row, t: float) -> Chunks:
    import numpy as np

    a, b = row.models
    if a is None or b is None:  # --allow-missing: the one that holds it
        only = a or b
        assert only is not None
        return lambda elements: float_chunks(only, elements)
    s0, s1 = slerp_factors(a, b, t)

    def produce(elements: int) -> Iterator[np.ndarray]:
        for x, y in zip(a.chunks(elements), b.chunks(elements)):
            out = np.multiply(x, np.float32(s0), dtype=np.float32)
            out += np.multiply(y, np.float32(s1), dtype=np.float32)
            yield out

    return produce


def slerp_factors(a: Tensor, b: Tensor, t: float) -> tuple[float, float]:
    """(s0, s1) with slerp(A, B) = s0 A + s1 B, from one streamed pass for the norms and the dot."""
    import numpy as np

    aa = bb = ab = 0.0
    for x, y in zip(a.chunks(MERGE_CHUNK), b.chunks(MERGE_CHUNK)):
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        aa += float(np.dot(x32, x32))
        bb += float(np.dot(y32, y32))
        ab += float(np.dot(x32, y32))
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


def ties(row: Row, weights: Sequence[float], density: float, lam: float) -> Chunks:
    """TIES-merging of one tensor, as mergekit's generalized task arithmetic (`ties`, sign
    consensus by sum, normalized) computes it."""
    import numpy as np

    assert row.base is not None
    base_tensor = row.base

    def produce(elements: int) -> Iterator[np.ndarray]:
        base = base_tensor.array().reshape(-1).astype(np.float32)
        weighted = []
        present_weights = []
        for t, w in zip(row.models, weights):
            if t is None:
                continue
            delta = t.array().reshape(-1).astype(np.float32) - base
            delta = trim(delta, density)
            delta *= np.float32(w)
            weighted.append(delta)
            present_weights.append(np.float32(w))
        mixed = np.zeros_like(base)
        divisor = np.zeros_like(base)
        if weighted:
            elected = np.where(sum(weighted) >= 0, np.float32(1), np.float32(-1))
            for delta, weight in zip(weighted, present_weights):
                agree = np.sign(delta) == elected
                mixed += np.where(agree, delta, np.float32(0))
                divisor += np.where(agree, weight, np.float32(0))
        divisor[divisor == 0] = 1
        out = base + np.float32(lam) * (mixed / divisor)
        for start in range(0, out.size, elements):
            yield out[start : start + elements]

    return produce


def trim(delta: np.ndarray, density: float) -> np.ndarray:
    """DELTA with all but its int(DENSITY * size) largest-magnitude entries zeroed (at least one);
    among equal magnitudes at the threshold, the first ones in order are kept."""
    import numpy as np

    if density >= 1 or not delta.size:
        return delta
    k = max(1, int(density * delta.size))
    magnitude = np.abs(delta)
    threshold = np.partition(magnitude, delta.size - k)[delta.size - k]
    keep = magnitude > threshold
    at = np.flatnonzero(magnitude == threshold)[: k - int(np.count_nonzero(keep))]
    keep[at] = True
    return np.where(keep, delta, np.float32(0))


# --- the entry point -----------------------------------------------------------------------------


def merge(
    models: Sequence[Checkpoint],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    t: float = 0.5,
    base: Checkpoint | None = None,
    lam: float = 1.0,
    density: float = 0.2,
    dtype: str | None = None,
    allow_missing: bool = False,
) -> Checkpoint:
    """MODELS merged by METHOD into a table laid out as the first model (ties, metadata, format);
    the values are computed when the table is written."""
    if method not in METHODS:
        raise UsageError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if dtype is not None:
        check_name(dtype)
        if dtype not in FLOATING:
            raise UsageError(f"--dtype must be a floating dtype, not {dtype}")
    needs_base = method in ("task-arithmetic", "ties")
    if needs_base and base is None:
        raise UsageError(f"--method {method} needs --base BASE (the model the others were fine-tuned from)")
    if not needs_base and base is not None:
        raise UsageError(f"--base is for task-arithmetic and ties, not {method}")
    if len(models) < (1 if needs_base else 2):
        raise UsageError(f"--method {method} needs at least {1 if needs_base else 2} models")
    if method == "slerp" and len(models) != 2:
        raise UsageError(f"slerp merges exactly two models, not {len(models)}")
    if weights is None:
        weights = [1.0] * len(models)
    if len(weights) != len(models):
        raise UsageError(f"{len(weights)} weights for {len(models)} models")
    if method == "slerp" and not 0 <= t <= 1:
        raise UsageError(f"--t must lie in [0, 1], not {t}")
    if method == "ties" and not 0 < density <= 1:
        raise UsageError(f"--density must lie in (0, 1], not {density}")
    rows, copied = match(models, base, allow_missing)
    makers: dict[str, Callable[[Row], Chunks]] = {
        "linear": lambda row: linear(row, weights),
        "slerp": lambda row: slerp(row, t),
        "task-arithmetic": lambda row: task_arithmetic(row, weights, lam),
        "ties": lambda row: ties(row, weights, density, lam),
    }

    def make(row: Row) -> Chunks:
        if needs_base and row.base is None:  # --allow-missing, and the base lacks it: kept as it is
            return lambda elements: float_chunks(row.first, elements)
        return makers[method](row)

    return merged_checkpoint(models[0], rows, copied, make, dtype)
