"""The checkpoint table: ordered named tensors with lazy handles on their bytes.

A `Storage` is a run of raw bytes (a region of a file, or memory). A `Tensor` is a view on
one: dtype, element offset, shape and strides, as torch describes tensors. Two names that view
the same storage the same way are one tensor (a tie); disjoint views of one storage (the q, k, v
slices of a fused matrix) are not.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paramctl.dtypes import FLOATING, check_name, itemsize, numpy_dtype
from paramctl.errors import FormatError, UsageError

if TYPE_CHECKING:
    import numpy as np


CHUNK_ELEMENTS = 1 << 22  # 4 Mi elements: 32 MiB once widened to float64
# chunks are mapped read-only with their pages populated up front (Linux): one call instead of a
# fault per page
MAP_ARGS: dict[str, int] = (
    {"flags": mmap.MAP_SHARED | mmap.MAP_POPULATE, "prot": mmap.PROT_READ}
    if hasattr(mmap, "MAP_POPULATE")
    else {"access": mmap.ACCESS_READ}
)


@dataclass(eq=False)
class Storage:
    """Raw bytes: `nbytes` at `offset` in the file `path`, or held in `buffer`, or made by `load`
    (all at once), or by `reader` (a range at a time: an HDF5 dataset decoded by h5py)."""

    nbytes: int
    path: str | None = None
    offset: int = 0
    buffer: bytes | bytearray | memoryview | None = None
    load: Callable[[], bytes] | None = None
    reader: Callable[[int, int], bytes] | None = None  # (start, length) -> those bytes

    def read(self, start: int = 0, length: int | None = None) -> bytes | memoryview:
        if length is None:
            length = self.nbytes - start
        if start < 0 or length < 0 or start + length > self.nbytes:
            raise FormatError(f"read of bytes [{start}, {start + length}) beyond a storage of {self.nbytes}", self.path)
        if self.buffer is None and self.reader is not None:
            data = self.reader(start, length)
            if len(data) != length:
                raise FormatError(f"read {len(data)} bytes of the {length} asked for", self.path)
            return data
        if self.buffer is None and self.load is not None:
            self.buffer = self.load()
        if self.buffer is not None:
            return memoryview(self.buffer)[start : start + length]
        assert self.path is not None
        from paramctl import remote

        data = remote.read_range(self.path, self.offset + start, length)
        if len(data) != length:
            raise FormatError(f"truncated: tensor data ends at byte {self.offset + start + len(data)}", self.path)
        return data


INT64_MAX = (1 << 63) - 1
# a view may repeat its storage's elements (stride 0, overlapping strides) at most this many times
EXPANSION = 16


def check_shape(name: str, shape: tuple[int, ...], path: str | None) -> None:
    """FormatError unless SHAPE is one frameworks can hold: each size, and the product of the
    non-zero ones, within 64-bit integers (a zero-size `[0, 2**62, 2**62]` included)."""
    count = 1
    for n in shape:
        if type(n) is not int or not 0 <= n <= INT64_MAX:
            raise FormatError(f"tensor {name!r} has a size that is not a 64-bit count", path)
        count *= max(n, 1)
        if count > INT64_MAX:
            raise FormatError(f"tensor {name!r} has sizes whose product exceeds 64 bits", path)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(eq=False)
class Tensor:
    """One row of the table. `offset` and `stride` count elements, as torch does."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: Storage
    offset: int = 0
    stride: tuple[int, ...] | None = None  # None: contiguous
    tie: str | None = None  # the first name of this tensor's tie group, if tied
    attrs: dict[str, Any] = field(default_factory=dict)  # format-specific (requires_grad, HDF5 attributes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def strides(self) -> tuple[int, ...]:
        return self.stride if self.stride is not None else contiguous_strides(self.shape)

    @property
    def is_contiguous(self) -> bool:
        real = [(n, s) for n, s in zip(self.shape, self.strides) if n != 1]
        return all(s == c for (n, s), c in zip(real, contiguous_strides(tuple(n for n, _ in real))))

    def extent(self) -> int:
        """Elements of storage this view spans, from `offset`."""
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))

    def check_bounds(self) -> None:
        """Raise FormatError unless the view lies inside its storage, its sizes fit the 64-bit
        integers frameworks index with, and it claims at most EXPANSION times its storage's
        elements (stride 0 or overlapping strides repeat elements: reading one must not cost
        what the file only claims)."""
        check_shape(self.name, self.shape, self.storage.path)
        if any(n < 0 for n in self.shape) or any(s < 0 for s in self.strides) or self.offset < 0:
            raise FormatError(f"tensor {self.name!r} has a negative size, stride or offset", self.storage.path)
        if any(s > INT64_MAX for s in (*self.strides, self.offset)):
            raise FormatError(f"tensor {self.name!r} has a stride or offset beyond 64 bits", self.storage.path)
        stored = self.storage.nbytes // itemsize(self.dtype)
        if self.numel > EXPANSION * max(stored, 1):
            raise FormatError(
                f"tensor {self.name!r} views {self.numel} elements over a storage of {stored} "
                f"(more than {EXPANSION} times: stride 0 or overlapping strides); refused",
                self.storage.path,
            )
        if (self.offset + self.extent()) * itemsize(self.dtype) > self.storage.nbytes and self.numel:
            raise FormatError(
                f"tensor {self.name!r} needs {(self.offset + self.extent()) * itemsize(self.dtype)} bytes "
                f"but its storage holds {self.storage.nbytes}",
                self.storage.path,
            )

    def tobytes(self) -> bytes | memoryview:
        """The tensor's bytes in C order, bit for bit as stored."""
        if self.numel == 0:  # an empty view may sit past the end of its storage, as torch allows
            return b""
        if self.is_contiguous:
            size = itemsize(self.dtype)
            return self.storage.read(self.offset * size, self.numel * size)
        return self.array().tobytes()

    def array(self) -> np.ndarray:
        """A numpy array of the values (read-only when it views the file's bytes)."""
        import numpy as np

        dt = numpy_dtype(self.dtype)
        if self.numel == 0:
            return np.empty(self.shape, dt)
        size = dt.itemsize
        raw = self.storage.read(self.offset * size, self.extent() * size)
        if self.is_contiguous:
            return np.frombuffer(raw, dt).reshape(self.shape)
        # stride on raw bytes: numpy's array interface does not know every ml_dtypes type (float8_e5m2)
        flat = np.frombuffer(raw, np.dtype(f"V{size}"))
        view = np.lib.stride_tricks.as_strided(flat, self.shape, [s * size for s in self.strides], writeable=False)
        return np.array(view, order="C").view(dt)

    @property
    def streams(self) -> bool:
        """Whether `chunks` reads the values straight from the file, in bounded memory."""
        from paramctl.remote import is_url

        storage = self.storage
        return (
            self.is_contiguous
            and storage.path is not None
            and not is_url(storage.path)
            and storage.buffer is None
            and not storage.load
            and not storage.reader
        )

    def chunks(self, elements: int = CHUNK_ELEMENTS, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """The values in C order from element START to STOP (all by default) as flat arrays of
        at most ELEMENTS, for streaming reductions.

        A contiguous tensor in a file is mapped a chunk at a time, so its bytes are read straight
        from the page cache (no copy) and memory stays bounded whatever its size: a chunk is
        unmapped once the caller drops it.
        """
        import numpy as np

        stop = self.numel if stop is None else min(stop, self.numel)
        if start >= stop:
            return
        dt = numpy_dtype(self.dtype)
        if not self.streams:
            yield from self._chunks_read(elements, start, stop)
            return
        self.check_bounds()
        storage, size = self.storage, dt.itemsize
        assert storage.path is not None  # it streams
        with open(storage.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < storage.offset + (self.offset + stop) * size:
                raise FormatError(f"truncated: tensor {self.name!r} ends early", storage.path)
            for first in range(start, stop, elements):
                count = min(elements, stop - first)
                pos = storage.offset + (self.offset + first) * size
                base = pos - pos % mmap.ALLOCATIONGRANULARITY
                window = mmap.mmap(f.fileno(), pos - base + count * size, offset=base, **MAP_ARGS)
                yield np.frombuffer(window, dt, count, pos - base)

    def _chunks_read(self, elements: int, start: int, stop: int) -> Iterator[np.ndarray]:
        """`chunks` for a tensor not mapped from its file: a contiguous one is read a range at a
        time; a strided view reads the span of storage it covers once (no more than the storage)
        and gathers each chunk's elements from it, a block of whole rows at a time, so memory
        is the storage plus a chunk whatever the view claims."""
        import numpy as np

        dt = numpy_dtype(self.dtype)
        size = dt.itemsize
        if self.is_contiguous:
            for first in range(start, stop, elements):
                count = min(elements, stop - first)
                yield np.frombuffer(self.storage.read((self.offset + first) * size, count * size), dt)
            return
        self.check_bounds()
        raw = self.storage.read(self.offset * size, self.extent() * size)
        flat = np.frombuffer(raw, np.dtype(f"V{size}"))
        view = np.lib.stride_tricks.as_strided(flat, self.shape, [s * size for s in self.strides], writeable=False)
        for first in range(start, stop, elements):
            blocks = flat_blocks(first, min(first + elements, stop), self.shape)
            parts = [np.array(view[index]).reshape(-1) for index in blocks]
            yield (parts[0] if len(parts) == 1 else np.concatenate(parts)).view(dt)

    def view_key(self) -> tuple:
        """Equal for two names that are the same stored tensor."""
        shape_strides = tuple((n, s) for n, s in zip(self.shape, self.strides) if n != 1)
        return (id(self.storage), self.offset, self.dtype, self.shape, shape_strides)


def flat_blocks(first: int, stop: int, shape: tuple[int, ...]) -> Iterator[tuple]:
    """Index tuples (ints and slices) selecting, in C order, the elements FIRST to STOP of an
    array of SHAPE: at most two partial blocks per dimension around one block of whole rows."""
    if first >= stop:
        return
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    whole = (slice(None),) * (len(shape) - 1)
    row, last = divmod(first, inner)
    end_row, end_rest = divmod(stop, inner)
    if row == end_row:  # within one row
        for rest in flat_blocks(last, end_rest, shape[1:]):
            yield (row, *rest)
        return
    if last:  # the end of the first row
        for rest in flat_blocks(last, inner, shape[1:]):
            yield (row, *rest)
        row += 1
    if end_row > row:
        yield (slice(row, end_row), *whole)
    if end_rest:  # the start of the last row
        for rest in flat_blocks(0, end_rest, shape[1:]):
            yield (end_row, *rest)


def tensor_from_array(name: str, array: np.ndarray, **attrs: Any) -> Tensor:
    """A tensor holding a copy of ARRAY in memory."""
    import numpy as np

    from paramctl.dtypes import from_numpy

    data = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    dtype = from_numpy(data.dtype)
    raw = data.tobytes()
    return Tensor(name, tuple(data.shape), dtype, Storage(len(raw), buffer=raw), attrs=attrs)


@dataclass
class Checkpoint:
    """A checkpoint as one ordered table of tensors plus whatever else the file carries.

    `metadata` is a string map (safetensors `__metadata__`); `extra` is format-specific content
    that the writer of the same format puts back (the pickled object tree of a `.pt`, the source
    HDF5 file whose attributes and layout are kept, the `.keras` archive members).
    """

    source: str
    format: str
    tensors: list[Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    extra: Any = None
    file_size: int = 0
    path: str = ""  # what was read: SOURCE itself, or the weights file a directory holds

    def __post_init__(self) -> None:
        self.link_ties()

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise UsageError(f"no tensor named {name!r}", self.source)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def link_ties(self) -> None:
        """Set each tensor's `tie` to the first name of the group of names viewing the same bytes."""
        first: dict[tuple, str] = {}
        counts: dict[tuple, int] = {}
        for t in self.tensors:
            key = t.view_key()
            first.setdefault(key, t.name)
            counts[key] = counts.get(key, 0) + 1
        for t in self.tensors:
            key = t.view_key()
            t.tie = first[key] if counts[key] > 1 and t.numel else None

    def tie_groups(self) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for t in self.tensors:
            if t.tie is not None:
                groups.setdefault(t.tie, []).append(t.name)
        return list(groups.values())

    def assign(self, tensor: Tensor, values: np.ndarray) -> None:
        """Write VALUES (broadcast to TENSOR's shape, cast to its dtype) into TENSOR.

        The storage is copied into memory once and the view updated in place, so every name
        viewing that storage sees the change: a tie stays one tensor, and the other slices of a
        fused matrix keep their values.
        """
        import numpy as np

        storage = tensor.storage
        buffer = storage.buffer
        if not isinstance(buffer, bytearray):
            buffer = bytearray(storage.read())
            writable = Storage(storage.nbytes, buffer=buffer)
            for t in self.tensors:
                if t.storage is storage:
                    t.storage = writable
        if tensor.numel == 0:
            return
        dt = numpy_dtype(tensor.dtype)
        size = dt.itemsize
        flat = np.frombuffer(buffer, np.dtype(f"V{size}"), count=tensor.extent(), offset=tensor.offset * size)
        view = np.lib.stride_tricks.as_strided(flat, tensor.shape, [s * size for s in tensor.strides])
        view[...] = np.broadcast_to(np.asarray(values).astype(dt), tensor.shape).view(f"V{size}")

    def floating(self) -> list[Tensor]:
        return [t for t in self.tensors if t.dtype in FLOATING]

    def cast(self, tensors: list[Tensor], dtype: str) -> None:
        """Convert TENSORS to DTYPE in memory; a tie group gets one new storage, so it stays tied."""
        check_name(dtype)
        done: dict[tuple, Tensor] = {}
        for t in tensors:
            if t.dtype == dtype:
                continue
            key = t.view_key()
            if key not in done:
                done[key] = tensor_from_array(t.name, t.array().astype(numpy_dtype(dtype)))
            new = done[key]
            t.dtype, t.storage, t.offset, t.stride = new.dtype, new.storage, 0, None

    def rename(self, new_names: dict[str, str]) -> None:
        """Rename rows (old name -> new name); the others keep theirs, and ties stay ties.

        A rename that would leave two rows with one name is refused, naming both.
        """
        final = {t.name: new_names.get(t.name, t.name) for t in self.tensors}
        owner: dict[str, str] = {}
        for old, new in final.items():
            if not new:
                raise UsageError(f"renaming {old!r} would leave it without a name", self.source)
            if new in owner:
                raise UsageError(f"renaming would merge {owner[new]!r} and {old!r} into {new!r}", self.source)
            owner[new] = old
        for t in self.tensors:
            t.name = final[t.name]
            if t.attrs.get("alias_of") in final:
                t.attrs["alias_of"] = final[t.attrs["alias_of"]]
        self.link_ties()

    def remove(self, tensors: Iterable[Tensor]) -> None:
        """Drop TENSORS from the table; the other names of their tie groups stay."""
        gone = {id(t) for t in tensors}
        self.tensors = [t for t in self.tensors if id(t) not in gone]
        self.link_ties()

    def select(self, pattern: str | None = None, exclude: Iterable[str] = ()) -> list[Tensor]:
        """Tensors whose names match PATTERN (regex, search semantics) and none of EXCLUDE."""
        keep = compile_pattern(pattern) if pattern else None
        drops = [compile_pattern(p) for p in exclude]
        return [
            t
            for t in self.tensors
            if (keep is None or keep.search(t.name)) and not any(d.search(t.name) for d in drops)
        ]


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"invalid pattern '{pattern}': {e}") from None
