"""MXNet NDArray files: what `nd.save`, `npx.save`, Gluon's `save_parameters` and `export` write.

    u64 0x112 | u64 reserved | u64 N | N array records | u64 K | K x (u64 length, name bytes)

K is 0 (a list: rows are named `0`, `1`, ...) or N. An array record (MXNet `NDArray::Save`):

    u32 magic | i32 storage type | shape | i32 dev_type | i32 dev_id | i32 type flag | data (C order)

with shape = i32 ndim + ndim x i64. The magic says how to read the shape: V2 (0xF993FAC9, what
`nd.save` writes) treats ndim 0 as an empty handle with nothing after it, V3 (0xF993FACA, written
under numpy shape semantics, `npx.set_np()`) gives ndim 0 to scalars and -1 to the empty handle.
Older files: V1 (0xF993FAC8) has no storage type; before it, the first u32 *is* ndim and the
dimensions are u32. Both legacy layouts read ndim 0 as a scalar, as MXNet 1.9.1 does.

Agree or refuse (what MXNet 1.9.1 does with the same bytes): a record nd.load cannot return (an
empty handle, a 0-d V2 array, a type flag it calls "Unknown type enum", a negative size) is
refused, as are sparse arrays (row_sparse, csr; paramctl reads dense ones) and duplicate names
(nd.load keeps the last silently). Every count and shape is checked against the bytes left in
the file before anything is allocated. The reserved word, the device and bytes after the names
are not checked, as MXNet does not check them.

Writing: V2 records (what `nd.save` writes outside numpy mode), or V3 for all records when the
source was written under numpy shape semantics or a tensor is 0-d (V2 cannot hold a scalar);
V3 files load only under numpy shape semantics (`npx.set_np()`: `npx.load`, `load_parameters`),
V2 files only outside them (`nd.load`), except that `load_parameters` under `npx.set_np()` falls
back to V2. Names are kept as given; a list file whose names are still `0..N-1`
is written back as a list. Gluon keeps shared parameters as equal copies, and so does the writer.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass

from paramctl.dtypes import itemsize
from paramctl.errors import FormatError, UsageError
from paramctl.formats import Format, Probe, dropped_entries, layout, register
from paramctl.table import INT64_MAX, Checkpoint, Storage, Tensor, check_shape

FILE_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
VERSIONS = {V1_MAGIC: "V1", V2_MAGIC: "V2", V3_MAGIC: "V3"}
# mshadow type flags MXNet 1.9.1 loads; bfloat16 comes back from nd.load as raw `<u2` bits
TYPE_FLAGS = {
    0: "float32",
    1: "float64",
    2: "float16",
    3: "uint8",
    4: "int32",
    5: "int8",
    6: "int64",
    7: "bool",
    12: "bfloat16",
}
TO_TYPE_FLAG = {dtype: flag for flag, dtype in TYPE_FLAGS.items()}
SPARSE = {1: "row_sparse", 2: "csr"}  # storage type -> its name; the number of aux arrays follows
AUX_ARRAYS = {0: 0, 1: 1, 2: 2}
CPU = (1, 0)  # (dev_type, dev_id) of cpu(0)
CONTEXT = "mxnet_context"  # Tensor.attrs key: a record's (dev_type, dev_id) when not cpu(0)
MIN_RECORD = 17  # the smallest record nd.load returns: a pre-V1 0-d bool (ndim, device, type flag, 1 byte)


@dataclass
class MxnetFile:
    """Checkpoint.extra of a file read here: how it was saved, so a rewrite saves it the same way."""

    is_list: bool  # saved without names (nd.save of a list): rows are named 0..N-1
    np_shape: bool  # some record is V3 (saved under numpy shape semantics)


HEADER, U32, U64, I32 = struct.Struct("<QQQ"), struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<i")
I32X2, I32X3 = struct.Struct("<ii"), struct.Struct("<iii")


class _Cursor:
    """A position in the mapped file; every read is checked against its size first. Messages
    are put together only on error: a file may hold many thousand records."""

    def __init__(self, buf: mmap.mmap | bytes, path: str):
        self.buf, self.size, self.path, self.pos = buf, len(buf), path, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def truncated(self, n: int, label: str, what: str) -> FormatError:
        where = f"{label}'s {what}" if label else what
        return FormatError(f"truncated: {where} needs {n} bytes at byte {self.pos}, {self.left} left", self.path)

    def unpack(self, fmt: struct.Struct, label: str, what: str) -> tuple:
        if fmt.size > self.size - self.pos:
            raise self.truncated(fmt.size, label, what)
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def take(self, n: int, label: str, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.truncated(n, label, what)
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])


@dataclass
class _Record:
    shape: tuple[int, ...]
    dtype: str
    offset: int  # of the data in the file
    version: str
    context: tuple[int, int]
    sparse: str | None = None  # row_sparse / csr: refused once its name is known


def _shape(cur: _Cursor, ndim: int, wide: bool, label: str) -> tuple[int, ...]:
    """NDIM dimensions (i64 each, or u32 in the pre-V1 layout), none of them negative."""
    size = 8 if wide else 4
    if ndim * size > cur.left:
        raise FormatError(f"{label} claims {ndim} dimensions, more than the {cur.left} bytes left hold", cur.path)
    shape = struct.unpack_from(f"<{ndim}{'q' if wide else 'I'}", cur.buf, cur.pos)
    cur.pos += ndim * size
    if any(n < 0 for n in shape):
        unknown = " (an unknown size, which nd.load cannot return)" if -1 in shape else ""
        raise FormatError(f"{label} has a negative size in its shape {list(shape)}{unknown}", cur.path)
    return shape


def _wide_shape(cur: _Cursor, label: str) -> tuple[int, ...] | None:
    """An i32 ndim and i64 dimensions (V1 onwards); None for ndim -1."""
    (ndim,) = cur.unpack(I32, label, "ndim")
    return _checked_ndim(cur, ndim, label)


def _checked_ndim(cur: _Cursor, ndim: int, label: str) -> tuple[int, ...] | None:
    if ndim == -1:
        return None
    if ndim < 0:
        raise FormatError(f"{label} has ndim {ndim}", cur.path)
    return _shape(cur, ndim, True, label)


def _data(cur: _Cursor, shape: tuple[int, ...], flag: int, label: str) -> tuple[str, int]:
    """The dtype of type FLAG and the offset of SHAPE's data, which is skipped."""
    dtype = TYPE_FLAGS.get(flag)
    if dtype is None:
        raise FormatError(f"{label} has type flag {flag}, which MXNet 1.9.1 refuses ('Unknown type enum')", cur.path)
    nbytes = math.prod(shape) * itemsize(dtype)
    if nbytes > cur.left or not nbytes:
        check_shape(label, shape, cur.path)
        if math.prod(max(n, 1) for n in shape) * itemsize(dtype) > INT64_MAX:  # numpy cannot hold it even empty
            raise FormatError(f"{label} has a shape too large to index, {list(shape)}", cur.path)
        if nbytes > cur.left:
            raise cur.truncated(nbytes, label, f"data ({list(shape)} {dtype})")
    offset = cur.pos
    cur.pos += nbytes
    return dtype, offset


def _record(cur: _Cursor, label: str) -> _Record:
    (magic,) = cur.unpack(U32, label, "magic")
    version = VERSIONS.get(magic, "pre-V1")
    if version in ("V1", "pre-V1"):
        # MXNet's LegacyLoad: no storage type; ndim 0 is a scalar with its one value
        if version == "pre-V1" and magic * 4 > cur.left:
            raise FormatError(f"{label} starts with {magic:#x}: no NDArray magic, nor a pre-V1 ndim", cur.path)
        shape = _wide_shape(cur, label) if version == "V1" else _shape(cur, magic, False, label)
        if shape is None:
            raise FormatError(f"{label} is an empty NDArray handle (ndim -1), which nd.load cannot return", cur.path)
        dev_type, dev_id, flag = cur.unpack(I32X3, label, "device and type flag")
        dtype, offset = _data(cur, shape, flag, label)
        return _Record(shape, dtype, offset, version, (dev_type, dev_id))
    (stype,) = cur.unpack(I32, label, "storage type")
    if stype not in AUX_ARRAYS:
        raise FormatError(f"{label} has storage type {stype}, which MXNet refuses ('Unknown storage type')", cur.path)
    if stype and version == "V3":
        raise FormatError(f"{label} is a sparse V3 record, which MXNet refuses in numpy shape semantics", cur.path)
    stored = _wide_shape(cur, label) if stype else None
    if stype and stored is None:
        raise FormatError(f"{label} is {SPARSE[stype]} (sparse) with an unknown storage shape", cur.path)
    shape = _wide_shape(cur, label)
    if shape is None or (version == "V2" and not shape):
        # nothing follows such a record, and nd.load fails on what it returns
        what = "ndim -1" if shape is None else "V2 ndim 0, as MXNet 1.x writes a 0-d array outside numpy mode"
        raise FormatError(f"{label} is an empty NDArray handle ({what}), which nd.load cannot return", cur.path)
    dev_type, dev_id, flag = cur.unpack(I32X3, label, "device and type flag")
    if not stype:
        dtype, offset = _data(cur, shape, flag, label)
        return _Record(shape, dtype, offset, version, (dev_type, dev_id))
    # sparse: read past it (storage shape's values, then each aux array) to learn its name
    aux = [(cur.unpack(I32, label, "aux type")[0], _wide_shape(cur, label)) for _ in range(AUX_ARRAYS[stype])]
    if any(s is None for _, s in aux):
        raise FormatError(f"{label} is {SPARSE[stype]} (sparse) with an unknown aux shape", cur.path)
    dtype, offset = _data(cur, stored or (), flag, label)
    for aux_flag, aux_shape in aux:
        _data(cur, aux_shape or (), aux_flag, f"{label}'s aux array")
    return _Record(shape, dtype, offset, version, (dev_type, dev_id), sparse=SPARSE[stype])


def _names(cur: _Cursor, count: int) -> list[str] | None:
    """The K names after the records (None for K = 0, a list file)."""
    (k,) = cur.unpack(U64, "", "the name count")
    if k == 0:
        return None
    if k != count:
        raise FormatError(f"{k} names for {count} arrays (nd.load: 'Invalid NDArray file format')", cur.path)
    names = []
    for i in range(k):
        (n,) = cur.unpack(U64, f"name {i}", "length")
        raw = cur.take(n, "", f"name {i}")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise FormatError(f"name {i} is not UTF-8 ({raw[:40]!r}), which nd.load cannot decode", cur.path) from None
    return names


def read_records(path: str) -> tuple[list[_Record], list[str] | None]:
    """The array records of the file at PATH and their names (None: a list file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        cur = _Cursor(buf, path)
        magic, _reserved, count = cur.unpack(HEADER, "", "the header")
        if magic != FILE_MAGIC:
            raise FormatError("not an MXNet NDArray file (no 0x112 magic)", path)
        if count * MIN_RECORD > cur.left - 8:
            raise FormatError(f"claims {count} arrays, more than a file of {size} bytes can hold", path)
        records = [_record(cur, f"array #{i}") for i in range(count)]
        names = _names(cur, count)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
    shown = names or [str(i) for i in range(count)]
    for name, rec in zip(shown, records):
        if rec.sparse:
            raise FormatError(
                f"array {name!r} is {rec.sparse} (sparse); paramctl reads dense arrays only "
                "(in MXNet: x.tostype('default') before saving)",
                path,
            )
    if names is not None and len(set(names)) != len(names):
        twice = sorted(n for n, k in Counter(names).items() if k > 1)
        raise FormatError(f"names {twice[:5]} appear more than once (nd.load would keep only the last)", path)
    return records, names


def load(path: str, source: str) -> Checkpoint:
    records, names = read_records(path)
    tensors = []
    for i, rec in enumerate(records):
        storage = Storage(math.prod(rec.shape) * itemsize(rec.dtype), path=path, offset=rec.offset)
        attrs = {CONTEXT: rec.context} if rec.context != CPU else {}
        tensors.append(Tensor(names[i] if names else str(i), rec.shape, rec.dtype, storage, attrs=attrs))
    extra = MxnetFile(is_list=names is None, np_shape=any(r.version == "V3" for r in records))
    return Checkpoint(source, "mxnet", tensors, extra=extra)


def _source_file(ckpt: Checkpoint) -> MxnetFile | None:
    return ckpt.extra if ckpt.format == "mxnet" and isinstance(ckpt.extra, MxnetFile) else None


def writes_np_shape(ckpt: Checkpoint) -> bool:
    """Whether CKPT is written as V3 records: its source was, or a 0-d tensor needs them."""
    source = _source_file(ckpt)
    return (source is not None and source.np_shape) or any(not t.shape for t in ckpt.tensors)


def save(ckpt: Checkpoint, path: str) -> None:
    import numpy as np

    for t in ckpt.tensors:
        if t.dtype not in TO_TYPE_FLAG:
            raise UsageError(
                f"MXNet cannot store {t.name!r}: dtype {t.dtype} (MXNet 1.9.1 loads "
                f"{', '.join(TO_TYPE_FLAG)}); cast it first (paramctl cast ... --dtype)"
            )
    source = _source_file(ckpt)
    names = [t.name for t in ckpt.tensors]
    try:
        encoded = [name.encode("utf-8") for name in names]
    except UnicodeEncodeError as e:
        raise UsageError(f"MXNet cannot store a name that is not UTF-8: {e.object!r}") from None
    as_list = source is not None and source.is_list and names == [str(i) for i in range(len(names))]
    magic = V3_MAGIC if writes_np_shape(ckpt) else V2_MAGIC
    with open(path, "wb") as f:
        f.write(struct.pack("<QQQ", FILE_MAGIC, 0, len(ckpt.tensors)))
        for t in ckpt.tensors:
            dev_type, dev_id = t.attrs.get(CONTEXT, CPU)
            f.write(struct.pack("<Iii", magic, 0, len(t.shape)))
            f.write(struct.pack(f"<{len(t.shape)}q", *t.shape))
            f.write(struct.pack("<iii", dev_type, dev_id, TO_TYPE_FLAG[t.dtype]))
            for chunk in t.chunks():  # a chunk at a time: a large tensor is never held whole
                f.write(np.ascontiguousarray(chunk).view(np.uint8).data)
        f.write(struct.pack("<Q", 0 if as_list else len(names)))
        if not as_list:
            for raw in encoded:
                f.write(struct.pack("<Q", len(raw)) + raw)


def _losses(ckpt: Checkpoint, sharded: bool) -> list[str]:
    lost = [] if ckpt.format == "mxnet" else dropped_entries(ckpt, "mxnet")
    groups = ckpt.tie_groups()
    if groups:
        shown = "; ".join(" = ".join(g) for g in groups[:3]) + (f"; {len(groups) - 3} more" if len(groups) > 3 else "")
        lost.append(f"mxnet stores tied tensors as equal copies, as Gluon does ({shown})")
    if layout(ckpt) == "keras":
        lost.append(
            "the tensors keep Keras's axis order, (*k, in, out); Gluon's Dense and Conv layers hold "
            "(out, in, *k): transpose the kernels before load_parameters"
        )
    scalars = [t.name for t in ckpt.tensors if not t.shape]
    source = _source_file(ckpt)
    if scalars and not (source is not None and source.np_shape):
        lost.append(
            f"0-d tensors ({', '.join(scalars[:5])}) need numpy shape semantics: written as V3 records, "
            "which load only under numpy shape semantics (npx.set_np(): npx.load, load_parameters)"
        )
    return lost


def _accept(probe: Probe) -> bool:
    return len(probe.head) >= 8 and int.from_bytes(probe.head[:8], "little") == FILE_MAGIC


register(
    Format(
        name="mxnet",
        description="MXNet NDArray (.params, .nd)",
        load=load,
        save=save,
        extensions=(".params", ".nd"),
        accept=_accept,
        losses=_losses,
        layout="torch",
    )
)
