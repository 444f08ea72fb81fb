"""Casting tensors to another dtype lazily: each chunk is converted when a writer reads it.

`cast_lazily` replaces rows with `CastTensor`s whose values are their source's, converted chunk by
chunk as they are read, so a writer that streams (safetensors) casts a 1 GB file in one pass and
bounded memory; a writer that wants a tensor whole (torch, h5py) gets it whole, converted once.
What the cast loses (values beyond the new dtype's range, non-zero values that become 0) is
counted during that same pass, so it is known once the output is written (or `measure`d).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from paramctl.dtypes import check_name, itemsize, numpy_dtype
from paramctl.table import CHUNK_ELEMENTS, Checkpoint, Storage, Tensor

if TYPE_CHECKING:
    import numpy as np

# floating dtypes laid out as IEEE 754 (a sign bit, then exponent and mantissa; +-0; inf and NaN
# above the largest finite magnitude): their non-finite and zero values are found from the bits
IEEE_LIKE = {"float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"}
# elements converted at a time: the source window, its conversion and the loss masks of one chunk
# stay a few MiB (a quarter of the chunks `stats` reads), for a peak RSS far under 100 MiB
CAST_CHUNK = 1 << 20


@dataclass(eq=False)
class CastStorage(Storage):
    """The values of SOURCE converted to DTYPE, contiguous: made on demand, counted as made."""

    source: Tensor | None = None
    dtype: str = "float32"
    # what each conversion lost, keyed by its range of elements: (beyond the range, non-zero -> 0)
    counted: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    def converted(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """The converted values from element START to STOP, a chunk at a time."""
        assert self.source is not None
        first = start
        for chunk in self.source.chunks(CAST_CHUNK, start, stop):
            out, beyond, to_zero = convert(chunk, self.dtype)
            self.counted[(first, first + chunk.size)] = (beyond, to_zero)
            first += chunk.size
            yield out

    def read(self, start: int = 0, length: int | None = None) -> bytes | memoryview:
        size = itemsize(self.dtype)
        if length is None:
            length = self.nbytes - start
        if start % size or length % size or start < 0 or start + length > self.nbytes:
            return super().read(start, length)  # which raises FormatError for a read out of bounds
        if length == 0:
            return b""
        out = bytearray()
        for chunk in self.converted(start // size, (start + length) // size):
            out += chunk.tobytes()
        return memoryview(out)

    def losses(self) -> tuple[int, int]:
        return sum(b for b, _ in self.counted.values()), sum(z for _, z in self.counted.values())


@dataclass(eq=False)
class CastTensor(Tensor):
    """A row whose values are another row's, converted as they are read."""

    def chunks(self, elements: int = CHUNK_ELEMENTS, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        assert isinstance(self.storage, CastStorage)
        if elements != CHUNK_ELEMENTS:
            yield from super().chunks(elements, start, stop)
            return
        yield from self.storage.converted(start, stop)

    @property
    def streams(self) -> bool:
        return False


def cast_lazily(ckpt: Checkpoint, tensors: Sequence[Tensor], dtype: str) -> list[CastStorage]:
    """Make TENSORS of CKPT DTYPE (those of another dtype), converted when read; a tie group gets
    one new storage, so it stays tied. Returns the new storages, whose `losses` are counted as
    they are read."""
    check_name(dtype)
    chosen = {id(t) for t in tensors if t.dtype != dtype}
    made: dict[tuple, CastStorage] = {}
    for i, t in enumerate(ckpt.tensors):
        if id(t) not in chosen:
            continue
        key = t.view_key()
        if key not in made:
            made[key] = CastStorage(t.numel * itemsize(dtype), source=t, dtype=dtype)
        ckpt.tensors[i] = CastTensor(t.name, t.shape, dtype, made[key], attrs=dict(t.attrs))
    ckpt.link_ties()
    return list(made.values())


def measure(storages: Sequence[CastStorage]) -> None:
    """Convert every storage once without keeping the values: what `--dry-run` reports."""
    for storage in storages:
        for _ in storage.converted():
            pass


def convert(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, int, int]:
    """CHUNK as DTYPE, and how many of its values DTYPE cannot hold: (beyond its range, non-zero
    becoming zero).

    For a floating DTYPE, finite values that become inf or NaN, and non-zero values that become 0;
    for an integer DTYPE, values outside its range, or NaN or inf; bool holds anything. The
    counts cost a pass over the output's bits, and over the input only where the output has
    non-finite values or zeros."""
    import numpy as np

    target = numpy_dtype(dtype)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflows are counted here; complex -> real is what --all asked
        if target.kind == "b":
            return chunk.astype(target), 0, 0
        source = chunk.real if chunk.dtype.kind == "c" and target.kind != "c" else chunk
        out = source.astype(target)
        if target.kind in "iu":
            values = source.astype(np.float64)
            info = np.iinfo(target)
            return out, int(np.count_nonzero(~((values >= info.min) & (values <= info.max)))), 0
        if dtype not in IEEE_LIKE or source.dtype.kind == "c":
            wide = np.complex128 if target.kind == "c" else np.float64
            values, cast = source.astype(wide), out.astype(wide)
            beyond = int(np.count_nonzero(np.isfinite(values) & ~np.isfinite(cast)))
            return out, beyond, int(np.count_nonzero((values != 0) & (cast == 0)))
        magnitude, largest = magnitude_bits(out)
        beyond = to_zero = 0
        if out.size and magnitude.max() > largest:  # reductions first: masks only where needed
            beyond = int(np.count_nonzero((magnitude > largest) & finite(source)))
        if out.size and magnitude.min() == 0:
            to_zero = int(np.count_nonzero((magnitude == 0) & (source != 0)))
    return out, beyond, to_zero


def magnitude_bits(values: np.ndarray) -> tuple[np.ndarray, int]:
    """The bits of VALUES (an IEEE-like float array) without the sign, as unsigned integers, and
    those of the largest finite value: a value is inf or NaN iff its bits are above that."""
    unsigned, sign_off, largest = bit_layout(values.dtype)
    magnitude = values.view(unsigned)
    return magnitude & sign_off, largest


@lru_cache
def bit_layout(dtype: np.dtype) -> tuple[np.dtype, Any, int]:
    """For an IEEE-like float DTYPE: the unsigned integer type of its size, the mask that clears
    the sign bit, and the bits of its largest finite value (finfo is slow to build: once each)."""
    import ml_dtypes
    import numpy as np

    unsigned = np.dtype(f"u{dtype.itemsize}")
    largest = np.array(ml_dtypes.finfo(dtype).max, dtype).view(unsigned)
    return unsigned, unsigned.type((1 << (8 * dtype.itemsize - 1)) - 1), int(largest)


def finite(values: np.ndarray) -> np.ndarray:
    import numpy as np

    if values.dtype.kind in "iub":
        return np.ones(values.shape, bool)
    if values.dtype.kind == "f" and values.dtype.type in (np.float16, np.float32, np.float64):
        return np.isfinite(values)
    if values.dtype.name in IEEE_LIKE:
        magnitude, largest = magnitude_bits(values)
        return magnitude <= largest
    return np.isfinite(values.astype(np.float64))
