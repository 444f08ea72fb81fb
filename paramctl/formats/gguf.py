"""GGUF (llama.cpp, Ollama): read with llama.cpp's own `gguf` package, imported only here.

Names are the file's tensor names; shapes are in numpy order (GGUF stores `ne`, the reverse).
Float and integer tensors (F32, F16, BF16, F64, I8-I64) are ordinary rows over the file's bytes.
Quantized tensors (Q8_0, Q4_K, IQ*, ...) are rows whose dtype is the GGML type in lower case
(`q4_k`), whose `nbytes` is what the file stores, and whose values are dequantized to float32 by
`gguf.quants.dequantize` a few rows at a time (stats, check, diff, show); a type the package
cannot dequantize is refused when its values are asked for, naming the tensor and the type.
Writing GGUF is not supported: a GGUF source converts to safetensors or .pt (quantized rows with
`--dequantize`, as float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paramctl.errors import FormatError, UsageError
from paramctl.formats import Format, register
from paramctl.table import CHUNK_ELEMENTS, Checkpoint, Storage, Tensor, tensor_from_array

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"GGUF"
# GGML types that are plain numpy arrays, by their GGML name
PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
PLAIN.update({"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"})
ARRAY_SHOWN = 16  # a metadata array longer than this is summarised in `info`


@dataclass(eq=False)
class QuantizedTensor(Tensor):
    """A row stored in GGML blocks: `storage` holds the blocks, values come dequantized."""

    ggml_type: int = 0
    stored_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.stored_nbytes

    @property
    def streams(self) -> bool:
        return False

    def check_bounds(self) -> None:
        if self.stored_nbytes > self.storage.nbytes:
            raise FormatError(f"tensor {self.name!r} runs past the end of the file", self.storage.path)

    def tobytes(self) -> bytes | memoryview:
        raise UsageError(
            f"tensor {self.name!r} is quantized ({self.dtype}): convert with --dequantize to write it as float32",
            self.storage.path,
        )

    def _dequantize(self, first_row: int, rows: int) -> np.ndarray:
        import numpy as np
        from gguf import GGMLQuantizationType, quants

        if self.ggml_type < 0:
            raise UsageError(
                f"tensor {self.name!r}: {self.dtype} blocks of a big-endian GGUF file cannot be dequantized "
                "(the gguf package reads their scales as little-endian)",
                self.storage.path,
            )
        row_bytes = self.stored_nbytes // max(self.n_rows, 1)
        raw = self.storage.read(first_row * row_bytes, rows * row_bytes)
        blocks = np.frombuffer(raw, np.uint8).reshape(rows, row_bytes)
        qtype = GGMLQuantizationType(self.ggml_type)
        try:
            return quants.dequantize(blocks, qtype).reshape(-1)
        except NotImplementedError:
            raise UsageError(
                f"tensor {self.name!r}: the gguf package cannot dequantize {self.dtype} (leave it out with --exclude)",
                self.storage.path,
            ) from None

    @property
    def n_rows(self) -> int:
        return self.numel // self.shape[-1] if self.shape and self.shape[-1] else 0

    def array(self) -> np.ndarray:
        import numpy as np

        if self.numel == 0:
            return np.empty(self.shape, np.float32)
        return self._dequantize(0, self.n_rows).reshape(self.shape)

    def chunks(self, elements: int = CHUNK_ELEMENTS, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Dequantized values from element START to STOP, a few whole rows at a time."""
        stop = self.numel if stop is None else min(stop, self.numel)
        if start >= stop:
            return
        width = self.shape[-1]
        rows_per_chunk = max(1, elements // width)
        row = start // width
        while row * width < stop:
            rows = min(rows_per_chunk, self.n_rows - row)
            values = self._dequantize(row, rows)
            lo = max(start - row * width, 0)
            hi = min(stop - row * width, rows * width)
            yield values[lo:hi]
            row += rows

    def dequantized(self) -> Tensor:
        """The same row as float32 values in memory."""
        return tensor_from_array(self.name, self.array())


def reader_class() -> type:
    """gguf's GGUFReader, except that a long metadata array (a tokenizer's 150,000 tokens) is
    stepped over as one block instead of one numpy view per element: listing a file needs its
    length only, and `info` shows it summarised (ARRAY_SHOWN)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    class Reader(GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
            if raw_type != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            count = self._get(orig_offs + 4, np.uint64)
            if len(raw_itype) != 1 or len(count) != 1:
                raise ValueError("truncated array")
            itype, n = GGUFValueType(int(raw_itype[0])), int(count[0])
            if n <= ARRAY_SHOWN or itype == GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            start = end = orig_offs + 12
            if itype == GGUFValueType.STRING:
                data = memoryview(self.data)  # type: ignore[arg-type]
                for _ in range(n):
                    if end + 8 > len(data):
                        raise ValueError("a string array runs past the end of the file")
                    end += 8 + int.from_bytes(data[end : end + 8], "little")
            else:
                end += n * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
            if end > len(self.data):
                raise ValueError("an array runs past the end of the file")
            block = self.data[start:end]
            return end - orig_offs, [raw_itype, count, block], [2] * n, [GGUFValueType.ARRAY, itype]

    return Reader


def load(path: str, source: str) -> Checkpoint:
    from gguf import GGML_QUANT_SIZES

    from paramctl import remote

    try:
        if remote.is_url(path):
            with header_copy(path) as local:  # gguf's reader maps a local file: the header, fetched
                reader = reader_class()(local)
                infos = list(reader.tensors)
        else:
            reader = reader_class()(path)
            infos = list(reader.tensors)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise FormatError(f"invalid GGUF file: {e}", path) from None
    size = int(reader.data.shape[0])
    big_endian = reader.byte_order == "S"  # the reader found the version number byte-swapped
    tensors: list[Tensor] = []
    for info in infos:
        name = info.name
        shape = tuple(int(n) for n in reversed(info.shape.tolist()))
        ggml_name = info.tensor_type.name
        block, type_size = GGML_QUANT_SIZES[info.tensor_type]
        numel = math.prod(shape)
        if shape and shape[-1] % block:
            raise FormatError(f"tensor {name!r}: a row of {shape[-1]} is not whole {ggml_name} blocks", path)
        stored = numel // block * type_size
        if info.data_offset < 0 or info.data_offset + stored > size:
            raise FormatError(f"tensor {name!r} runs past the end of the file", path)
        storage = Storage(stored, path=path, offset=int(info.data_offset))
        attrs = {"ggml_type": ggml_name}
        if ggml_name in PLAIN:
            if big_endian and type_size > 1:  # the file's values are big-endian: swapped as they are read
                storage.reader = swapped_reader(path, int(info.data_offset), type_size)
            tensors.append(Tensor(name, shape, PLAIN[ggml_name], storage, attrs=attrs))
        elif big_endian:
            # llama.cpp swaps the scales inside the blocks of a big-endian file; gguf's dequantize
            # reads them as little-endian: no value would agree with llama.cpp's, so none is given
            tensors.append(
                QuantizedTensor(
                    name, shape, ggml_name.lower(), storage, attrs=attrs, ggml_type=-1, stored_nbytes=stored
                )
            )
        else:
            tensors.append(
                QuantizedTensor(
                    name,
                    shape,
                    ggml_name.lower(),
                    storage,
                    attrs=attrs,
                    ggml_type=int(info.tensor_type),
                    stored_nbytes=stored,
                )
            )
    return Checkpoint(source, "gguf", tensors, extra=GGUFSource(metadata_of(reader)))


# sizes of GGUF's scalar value types (gguf.md): u8 i8 u16 i16 u32 i32 f32 bool, 10 u64 11 i64 12 f64
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def header_end(read: Callable[[int, int], bytes], size: int) -> int:
    """Where the header of a GGUF file ends (after the tensor infos), stepping over the key-value
    pairs by their lengths alone, for a file read by ranges. Every length is checked against SIZE."""

    def u(pos: int, n: int) -> int:
        raw = read(pos, n)
        if len(raw) != n:
            raise ValueError("the header runs past the end of the file")
        return int.from_bytes(raw, "little")

    def string_end(pos: int) -> int:
        end = pos + 8 + u(pos, 8)
        if end > size:
            raise ValueError("a string runs past the end of the file")
        return end

    def value_end(pos: int, kind: int) -> int:
        if kind in SCALAR_SIZES:
            return pos + SCALAR_SIZES[kind]
        if kind == STRING:
            return string_end(pos)
        if kind != ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = u(pos, 4), u(pos + 4, 8)
        pos += 12
        if item in SCALAR_SIZES:
            return pos + count * SCALAR_SIZES[item]
        if item != STRING:
            raise ValueError("an array of arrays")
        for _ in range(count):
            pos = string_end(pos)
        return pos

    if u(4, 4) & 0xFFFF == 0:
        raise ValueError("a big-endian GGUF file is read locally only")
    tensors, pairs, pos = u(8, 8), u(16, 8), 24
    for _ in range(pairs):
        pos = string_end(pos)
        pos = value_end(pos + 4, u(pos, 4))
        if pos > size:
            raise ValueError("the metadata runs past the end of the file")
    for _ in range(tensors):
        pos = string_end(pos)
        pos += 4 + 8 * u(pos, 4) + 4 + 8
        if pos > size:
            raise ValueError("the tensor infos run past the end of the file")
    return pos


@contextmanager
def header_copy(url: str) -> Iterator[str]:
    """A local sparse file as large as the GGUF at URL holding its header (fetched by ranges; the
    rest is a hole): what gguf's reader maps. Tensor values are still read from the URL."""
    import tempfile

    from paramctl import remote

    size = remote.size(url)
    end = header_end(lambda pos, n: remote.read_range(url, pos, n), size)
    with tempfile.NamedTemporaryFile(prefix="paramctl-gguf-", suffix=".gguf") as f:
        f.write(remote.read_range(url, 0, end))
        f.truncate(size)
        f.flush()
        yield f.name


def swapped_reader(path: str, offset: int, itemsize: int) -> Callable[[int, int], bytes]:
    """A Storage reader of big-endian values of ITEMSIZE bytes at OFFSET in PATH, giving them
    little-endian (each read widened to whole values, then cut to the range asked for)."""

    def read(start: int, length: int) -> bytes:
        import numpy as np

        from paramctl import remote

        lo = start - start % itemsize
        hi = -(-(start + length) // itemsize) * itemsize
        raw = remote.read_range(path, offset + lo, hi - lo)
        if len(raw) != hi - lo:
            raise FormatError(f"truncated: tensor data ends at byte {offset + lo + len(raw)}", path)
        swapped = np.frombuffer(raw, np.uint8).reshape(-1, itemsize)[:, ::-1].tobytes()
        return swapped[start - lo : start - lo + length]

    return read


@dataclass
class GGUFSource:
    metadata: dict[str, Any]  # the key-value metadata, JSON-safe (long arrays summarised)


def metadata_of(reader: Any) -> dict[str, Any]:
    """The key-value metadata in file order, JSON-safe; arrays longer than ARRAY_SHOWN summarised."""
    from gguf import GGUFValueType

    found: dict[str, Any] = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue  # the reader's pseudo-fields: version, tensor_count, kv_count
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > ARRAY_SHOWN:
            kind = field.types[-1].name.lower() if len(field.types) > 1 else "value"
            found[field.name] = f"[{len(field.data)} {kind} values]"
            continue
        try:
            value = field.contents()
        except (ValueError, UnicodeDecodeError) as e:
            value = f"<unreadable: {e}>"
        found[field.name] = value
    return found


def entries(ckpt: Checkpoint) -> dict[str, Any]:
    """The metadata, and the tensor count by GGML type (quantization types by count)."""
    counts: dict[str, int] = {}
    for t in ckpt.tensors:
        if "ggml_type" in t.attrs:
            counts[t.attrs["ggml_type"]] = counts.get(t.attrs["ggml_type"], 0) + 1
    return {**ckpt.extra.metadata, "ggml_types": dict(sorted(counts.items()))}


register(
    Format(
        name="gguf",
        description="GGUF (llama.cpp)",
        load=load,
        extensions=(".gguf",),  # not written: an output named .gguf is refused, not written as another format
        accept=lambda probe: probe.head[:4] == MAGIC,
        entries=entries,
        remote=True,
        priority=30,
    )
)
