"""TensorFlow checkpoints (tensor bundle V2): `PREFIX.index` (an SSTable of BundleEntryProtos)
beside `PREFIX.data-0000N-of-0000M` (the tensors' raw bytes), read and written without TensorFlow.

A checkpoint is addressed as its prefix (`ckpt`, `ckpt-3`: a name that is no file), its `.index`
file, its directory (the latest checkpoint as the `checkpoint` state file there names it) or that
state file. Rows are the bundle keys as `tf.train.list_variables` gives them; string tensors
(`_CHECKPOINTABLE_OBJECT_GRAPH`, string variables) are non-tensor entries, written back byte for
byte. Index blocks are checked against their CRCs on reading; a tensor's data CRC when its values
are first read. Partitioned (v1) variables are read whole from their slices and written whole
(TensorFlow reads slices out of a whole tensor). See FORMATS.md part two, section 2.

Written checkpoints keep the object graph of a TensorFlow source, its `checkpoint_key`s following
renames (a removed tensor's attribute is dropped), so Keras `load_weights` and
`tf.train.Checkpoint.restore` still match variables to values.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO

from paramctl.atomic import TEMP_SUFFIX, unnamed_file
from paramctl.atomic import _link_into_place as link_into_place
from paramctl.dtypes import itemsize
from paramctl.errors import FormatError, ParamctlError, UsageError
from paramctl.formats import Format, Probe, dropped_entries, register
from paramctl.formats._sstable import (
    MAGIC,
    TableWriter,
    crc_update,
    encode,
    fields,
    mask,
    read_table,
    read_varint,
    signed64,
    varint,
)
from paramctl.table import Checkpoint, Storage, Tensor, check_shape

DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    8: "complex64",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    18: "complex128",
    19: "float16",
    22: "uint32",
    23: "uint64",
    24: "float8_e5m2",
    25: "float8_e4m3fn",
}
TO_DTYPE = {name: code for code, name in DTYPES.items()}
DT_STRING = 7
OTHER_DTYPES = {11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16", 20: "resource", 21: "variant"}
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
STATE_FILE = "checkpoint"  # the CheckpointState text proto naming the latest checkpoint
HEADER = bytes.fromhex("08011a020801")  # BundleHeaderProto{num_shards: 1, version{producer: 1}}, as TF writes it
PIECE = 16 << 20  # bytes read at a time when checking a tensor's CRC


@dataclass
class Entry:
    """One BundleEntryProto, decoded."""

    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None
    slices: list[list[tuple[int, int]]]  # per slice, per dimension: (start, length; -1 = all)
    raw: bytes  # the proto as stored


@dataclass
class StringEntry:
    """A string tensor, kept as its stored bytes (entry proto and data) to be written back verbatim."""

    key: str
    shape: tuple[int, ...]
    raw: bytes  # the BundleEntryProto
    storage: Storage  # its data bytes (checked against the CRC when read)

    def values(self) -> list[bytes]:
        return decode_strings(self.storage.read(), math.prod(self.shape), self.key, self.storage.path)


@dataclass
class Bundle:
    """What a TF checkpoint holds besides its tensors (Checkpoint.extra of format `tf`)."""

    prefix: str
    strings: list[StringEntry] = field(default_factory=list)
    tensor_keys: set[str] = field(default_factory=set)  # the keys read as rows
    partitioned: list[str] = field(default_factory=list)


# --- reading -----------------------------------------------------------------------------------


def load(path: str, source: str) -> Checkpoint:
    index = resolve_state_file(path) if is_state_file(path) else path
    if not index.endswith(".index"):
        raise FormatError("an SSTable not named PREFIX.index: a TensorFlow index is read beside its data files", path)
    prefix = index[: -len(".index")]
    with open(index, "rb") as f:
        table = f.read()
    try:
        return read_bundle(table, prefix, source)
    except FormatError as e:
        raise (e.about(index) if e.path is None else e) from None


def read_bundle(table: bytes, prefix: str, source: str) -> Checkpoint:
    index = prefix + ".index"
    entries = read_entries(table, index)
    header = entries.pop("", None)
    num_shards = read_header(header, index)
    data_files = [f"{prefix}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    sizes: dict[int, int] = {}
    bundle = Bundle(prefix)
    tensors = []
    for key, entry in entries.items():
        if key.startswith("\x00"):
            continue  # a slice of a partitioned variable: read through its full key
        if entry.dtype == DT_STRING:
            storage = data_storage(entry, data_files, sizes, index, strings=math.prod(entry.shape))
            bundle.strings.append(StringEntry(key, entry.shape, entry.raw, storage))
            continue
        if entry.dtype not in DTYPES:
            kind = OTHER_DTYPES.get(entry.dtype, f"type enum {entry.dtype}")
            raise FormatError(f"tensor {key!r} has dtype {kind}, which paramctl does not read", index)
        dtype = DTYPES[entry.dtype]
        check_shape(key, entry.shape, index)
        nbytes = math.prod(entry.shape) * itemsize(dtype)
        if entry.slices:
            storage = Storage(nbytes, path=index, load=slices_loader(entry, entries, data_files, sizes, index))
            bundle.partitioned.append(key)
        else:
            if entry.size != nbytes:
                raise FormatError(f"tensor {key!r}: entry size {entry.size}, its shape and dtype need {nbytes}", index)
            storage = data_storage(entry, data_files, sizes, index)
        tensors.append(Tensor(key, entry.shape, dtype, storage, attrs={"tf_key": key}))
        bundle.tensor_keys.add(key)
    ckpt = Checkpoint(source, "tf", tensors, extra=bundle)
    ckpt.file_size = len(table) + sum(sizes.values())
    return ckpt


def read_entries(table: bytes, path: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    last = None
    for raw_key, value in read_table(table):
        if last is not None and raw_key <= last:
            raise FormatError(f"index keys out of order at {raw_key!r:.80}", path)
        last = raw_key
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            if not raw_key.startswith(b"\x00"):
                raise FormatError(f"key {raw_key!r:.80} is not UTF-8", path) from None
            key = raw_key.decode("latin-1")  # a slice key: binary, looked up by the same encoding
        entries[key] = decode_entry(key, value, path) if key else Entry("", 0, (), 0, 0, 0, None, [], value)
    return entries


def read_header(header: Entry | None, path: str) -> int:
    if header is None:
        raise FormatError("no bundle header (the empty key): not a tensor bundle", path)
    num_shards, endianness, min_consumer = 0, 0, 0
    for number, wire, value in fields(header.raw):
        if number == 1 and wire == 0:
            num_shards = signed64(value)
        elif number == 2 and wire == 0:
            endianness = value
        elif number == 3 and wire == 2:
            min_consumer = sum(v for n, w, v in fields(value) if n == 2 and w == 0)
    if endianness != 0:
        raise FormatError("a big-endian bundle, which paramctl does not read", path)
    if min_consumer > 1:
        raise FormatError(f"bundle needs a reader of version {min_consumer} (paramctl reads version 1)", path)
    if not 1 <= num_shards <= 100_000:
        raise FormatError(f"bundle header claims {num_shards} data shards", path)
    return num_shards


def decode_entry(key: str, raw: bytes, path: str) -> Entry:
    dtype, shape, shard, offset, size, crc, slices = 0, None, 0, 0, 0, None, []
    try:
        for number, wire, value in fields(raw):
            if number == 1 and wire == 0:
                dtype = value
            elif number == 2 and wire == 2:
                shape = decode_shape(value)
            elif number == 3 and wire == 0:
                shard = signed64(value)
            elif number == 4 and wire == 0:
                offset = signed64(value)
            elif number == 5 and wire == 0:
                size = signed64(value)
            elif number == 6 and wire == 5:
                crc = value
            elif number == 7 and wire == 2:
                slices.append(decode_slice(value))
    except FormatError as e:
        raise FormatError(f"entry {key!r}: {e.message}", path) from None
    if shape is None:
        raise FormatError(f"entry {key!r} has no shape", path)
    if shard < 0 or offset < 0 or size < 0:
        raise FormatError(f"entry {key!r} has a negative shard, offset or size", path)
    if any(len(s) not in (0, len(shape)) for s in slices):
        raise FormatError(f"entry {key!r} has a slice of another rank than its shape", path)
    return Entry(key, dtype, shape, shard, offset, size, crc, slices, raw)


def decode_shape(raw: bytes) -> tuple[int, ...]:
    dims = []
    for number, wire, value in fields(raw):
        if number == 2 and wire == 2:
            size = sum(signed64(v) for n, w, v in fields(value) if n == 1 and w == 0)
            if size < 0:
                raise FormatError("a dimension of unknown size")
            dims.append(size)
        elif number == 3 and wire == 0 and value:
            raise FormatError("a shape of unknown rank")
    return tuple(dims)


def decode_slice(raw: bytes) -> list[tuple[int, int]]:
    extents = []
    for number, wire, value in fields(raw):
        if number == 1 and wire == 2:
            start, length = 0, -1
            for n, w, v in fields(value):
                if n == 1 and w == 0:
                    start = signed64(v)
                elif n == 2 and w == 0:
                    length = signed64(v)
            if start < 0 or length < -1:
                raise FormatError("a slice with a negative start or length")
            extents.append((start, length))
    return extents


def data_storage(
    entry: Entry, data_files: list[str], sizes: dict[int, int], path: str, strings: int | None = None
) -> Storage:
    """The entry's bytes in its data file, checked against the entry's CRC on first read (for
    a string tensor of STRINGS elements, the CRC TF computes over its lengths and bytes)."""
    if entry.shard >= len(data_files):
        raise FormatError(f"tensor {entry.key!r} is in shard {entry.shard} of {len(data_files)}", path)
    file = data_files[entry.shard]
    if entry.shard not in sizes:
        try:
            sizes[entry.shard] = os.path.getsize(file)
        except OSError:
            raise FormatError(f"data file {os.path.basename(file)} is missing", path) from None
    if entry.offset + entry.size > sizes[entry.shard]:
        raise FormatError(f"tensor {entry.key!r} runs past the end of {os.path.basename(file)}", path)
    if entry.crc is None:
        raise FormatError(f"tensor {entry.key!r} has no checksum", path)
    checked = False

    def read(start: int, length: int) -> bytes:
        nonlocal checked
        with open(file, "rb") as f:
            if not checked and strings is not None:
                f.seek(entry.offset)
                if string_crc(f.read(entry.size), strings, entry.key, file) != entry.crc:
                    raise FormatError(f"checksum mismatch in string tensor {entry.key!r}", file)
                checked = True
            if not checked:
                f.seek(entry.offset)
                register, left = 0xFFFFFFFF, entry.size
                while left:
                    piece = f.read(min(PIECE, left))
                    if not piece:
                        raise FormatError(f"truncated: tensor {entry.key!r} ends early", file)
                    register = crc_update(register, piece)
                    left -= len(piece)
                if mask(register ^ 0xFFFFFFFF) != entry.crc:
                    raise FormatError(f"checksum mismatch in tensor {entry.key!r}", file)
                checked = True
            f.seek(entry.offset + start)
            return f.read(length)

    return Storage(entry.size, path=file, offset=entry.offset, reader=read)


def slices_loader(entry: Entry, entries: dict[str, Entry], data_files: list[str], sizes: dict[int, int], path: str):
    """A partitioned variable's values, assembled from its slices (each must be stored, in
    bounds, and together cover the variable exactly once)."""
    dtype = DTYPES[entry.dtype]
    parts = []
    for extents in entry.slices:
        extents = extents or [(0, -1)] * len(entry.shape)
        box = []
        for (start, length), dim in zip(extents, entry.shape):
            stop = dim if length == -1 else start + length
            if stop > dim:
                raise FormatError(f"a slice of {entry.key!r} runs past its shape {list(entry.shape)}", path)
            box.append((start, stop))
        key = slice_key(entry.key, extents)
        part = entries.get(key)
        if part is None:
            raise FormatError(f"a slice of {entry.key!r} ({box}) is not stored", path)
        shape = tuple(stop - start for start, stop in box)
        if part.dtype != entry.dtype or part.shape != shape or part.size != math.prod(shape) * itemsize(dtype):
            raise FormatError(f"a slice of {entry.key!r} ({box}) has another dtype, shape or size", path)
        parts.append((box, shape, data_storage(part, data_files, sizes, path)))
    if sum(math.prod(shape) for _, shape, _ in parts) != math.prod(entry.shape):
        raise FormatError(f"the slices of {entry.key!r} do not cover it exactly", path)

    def assemble() -> bytes:
        import numpy as np

        from paramctl.dtypes import numpy_dtype

        dt = numpy_dtype(dtype)
        out = np.zeros(entry.shape, dt)
        seen = np.zeros(entry.shape, bool)
        for box, shape, storage in parts:
            index = tuple(slice(start, stop) for start, stop in box)
            if seen[index].any():
                raise FormatError(f"the slices of {entry.key!r} overlap", path)
            seen[index] = True
            out[index] = np.frombuffer(storage.read(), dt).reshape(shape)
        return out.tobytes()

    return assemble


def slice_key(name: str, extents: list[tuple[int, int]]) -> str:
    """The key a slice of NAME is stored under (TF's EncodeTensorNameSlice, OrderedCode)."""
    out = bytearray(b"\x00")  # WriteNumIncreasing(0)
    out += name.encode().replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"
    out += _num_increasing(len(extents))
    for start, length in extents:
        out += _signed_num_increasing(start) + _signed_num_increasing(length)
    return out.decode("latin-1")


def _num_increasing(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(raw)]) + raw


def _signed_num_increasing(value: int) -> bytes:
    x = ~value if value < 0 else value
    length = (x.bit_length() + 1 + 6) // 7 or 1  # a length of N bytes holds 7N - 1 value bits
    raw = bytearray((value & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))
    header = (0xFF << (8 - min(length, 8))) & 0xFF  # N leading one bits (the sign flips them)
    raw[0] ^= header
    if length > 8:
        raw[1] ^= (0xFF << (16 - length)) & 0xFF
    return bytes(raw)


def split_strings(raw: bytes | memoryview, count: int, key: str, path: str | None) -> tuple[list[int], int]:
    """A DT_STRING tensor's COUNT element lengths (varints, then a u32 CRC of them) and where
    its bytes start."""
    pos, lengths = 0, []
    for _ in range(count):
        n, pos = read_varint(raw, pos)
        lengths.append(n)
    if pos + 4 + sum(lengths) != len(raw):
        raise FormatError(f"string tensor {key!r} does not hold the bytes its lengths claim", path)
    return lengths, pos + 4


def decode_strings(raw: bytes | memoryview, count: int, key: str, path: str | None) -> list[bytes]:
    lengths, pos = split_strings(raw, count, key, path)
    out = []
    for n in lengths:
        out.append(bytes(raw[pos : pos + n]))
        pos += n
    return out


def string_crc(raw: bytes, count: int, key: str, path: str | None) -> int:
    """The masked CRC TF stores for a string tensor: over its lengths as u32s, the 4 bytes
    after them, and the string bytes."""
    lengths, pos = split_strings(raw, count, key, path)
    register = crc_update(0xFFFFFFFF, b"".join((n & 0xFFFFFFFF).to_bytes(4, "little") for n in lengths))
    register = crc_update(register, raw[pos - 4 :])
    return mask(register ^ 0xFFFFFFFF)


# --- checkpoint state file and directories --------------------------------------------------


def is_state_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(b"model_checkpoint_path:")) == b"model_checkpoint_path:"


def resolve_state_file(path: str) -> str:
    """The `.index` of the checkpoint the state file at PATH names as the latest."""
    with open(path, "rb") as f:
        text = f.read(1 << 20).decode("utf-8", "replace")
    match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
    if not match:
        raise FormatError("checkpoint state file names no model_checkpoint_path", path)
    name = match.group(1).encode("latin-1", "backslashreplace").decode("unicode_escape")
    prefix = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(prefix + ".index"):
        raise FormatError(f"names the latest checkpoint {name!r}, but {name}.index is missing", path)
    return prefix + ".index"


def _accept_path(path: str) -> str | None:
    """A directory holding a `checkpoint` state file (its latest checkpoint), a SavedModel's
    directory or its `variables/` (the `variables` bundle), or a directory of one bundle (what
    `Checkpoint.write` leaves: no state file); a prefix whose `.index` exists."""
    if os.path.isdir(path):
        for candidate in (STATE_FILE, "variables/variables.index", "variables.index"):
            if os.path.isfile(os.path.join(path, candidate)):
                return os.path.join(path, candidate)
        indexes = [name for name in os.listdir(path) if name.endswith(".index")]
        return os.path.join(path, indexes[0]) if len(indexes) == 1 else None
    if not os.path.exists(path) and os.path.isfile(path + ".index"):
        return path + ".index"
    return None


def _accept(probe: Probe) -> bool:
    if probe.head.startswith(b"model_checkpoint_path:"):
        return True
    return probe.size >= 48 and int.from_bytes(probe.tail(8), "little") == MAGIC


def entries(ckpt: Checkpoint) -> dict:
    """The string tensors: the object graph summarised, other strings' values (as text)."""
    bundle = ckpt.extra if isinstance(ckpt.extra, Bundle) else None
    out: dict = {}
    for s in bundle.strings if bundle else []:
        if s.key == OBJECT_GRAPH and s.shape == ():
            graph = s.values()[0]
            nodes = sum(1 for number, _, _ in fields(graph) if number == 1)
            out[s.key] = {"object_graph": {"nodes": nodes, "bytes": len(graph)}}
        else:
            values = [v.decode("utf-8", "backslashreplace") for v in s.values()[:20]]
            out[s.key] = {"dtype": "string", "shape": list(s.shape), "values": values}
    if bundle and bundle.partitioned:
        out["partitioned"] = list(bundle.partitioned)
    return out


# --- writing ---------------------------------------------------------------------------------


def output_prefix(ckpt: Checkpoint, path: str) -> tuple[str, bool]:
    """The prefix to write for PATH, and whether a `checkpoint` state file names it (a directory)."""
    if path == "-":
        raise UsageError("a TensorFlow checkpoint is several files: name a prefix (-o out/ckpt), not '-'")
    if path.endswith(".index"):
        return path[: -len(".index")], False
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        bundle = ckpt.extra if isinstance(ckpt.extra, Bundle) else None
        if bundle is not None and saved_model_of(bundle.prefix):
            return os.path.join(path, "variables", "variables"), False
        name = os.path.basename(bundle.prefix) if bundle else "ckpt"
        return os.path.join(path, name), True
    return path, False


def saved_model_of(prefix: str) -> str | None:
    """The SavedModel directory whose variables PREFIX is (`DIR/variables/variables`), if it is one."""
    variables = os.path.dirname(os.path.abspath(prefix))
    if os.path.basename(prefix) == "variables" and os.path.basename(variables) == "variables":
        return os.path.dirname(variables)
    return None


def copy_saved_model(source: str, target: str) -> None:
    """The rest of a SavedModel (saved_model.pb, assets, ...) beside variables written into TARGET."""
    if os.path.realpath(source) == os.path.realpath(target):
        return
    for name in os.listdir(source):
        there = os.path.join(target, name)
        if name == "variables" or os.path.lexists(there):
            continue
        here = os.path.join(source, name)
        if os.path.islink(here):
            continue
        if os.path.isdir(here):
            shutil.copytree(here, there, symlinks=True)
        else:
            shutil.copy2(here, there)


def save(ckpt: Checkpoint, path: str) -> None:
    prefix, into_directory = output_prefix(ckpt, path)
    bundle = ckpt.extra if ckpt.format == "tf" and isinstance(ckpt.extra, Bundle) else None
    for t in ckpt.tensors:
        if t.dtype not in TO_DTYPE:
            raise UsageError(f"a TensorFlow checkpoint cannot hold {t.name!r}: dtype {t.dtype}")
    strings = {s.key: s for s in bundle.strings} if bundle else {}
    clash = [t.name for t in ckpt.tensors if t.name in strings]
    if clash:
        raise UsageError(f"tensor {clash[0]!r} would replace the string entry of that name")
    graph = strings.get(OBJECT_GRAPH)
    graph_raw = updated_graph(ckpt, bundle, graph) if graph is not None and bundle is not None else None
    items: list[tuple[bytes, Tensor | StringEntry]] = [(t.name.encode(), t) for t in ckpt.tensors]
    items += [(s.key.encode(), s) for s in strings.values()]
    items.sort(key=lambda item: item[0])
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    outputs = [Pending(f"{prefix}.data-00000-of-00001"), Pending(prefix + ".index")]
    try:
        table = TableWriter()
        table.add(b"", HEADER)
        offset = 0
        with outputs[0].open() as out:
            for key, item in items:
                if isinstance(item, StringEntry):  # verbatim (checked against its CRC as it is read)
                    if item is graph and graph_raw is not None:
                        data = encode_strings([graph_raw])
                    else:
                        data = bytes(item.storage.read())
                    out.write(data)
                    crc = string_crc(data, math.prod(item.shape), item.key, path)
                    table.add(key, entry_proto(DT_STRING, item.shape, offset, len(data), crc))
                    offset += len(data)
                    continue
                register = 0xFFFFFFFF
                for chunk in item.chunks():
                    raw = chunk.view("uint8").data
                    out.write(raw)
                    register = crc_update(register, raw)
                size = item.nbytes
                table.add(key, entry_proto(TO_DTYPE[item.dtype], item.shape, offset, size, mask(register ^ 0xFFFFFFFF)))
                offset += size
        with outputs[1].open() as out:
            out.write(table.finish())
        if into_directory:
            outputs.append(Pending(os.path.join(directory, STATE_FILE)))
            with outputs[2].open() as out:
                out.write(state_file(directory, prefix).encode())
        for output in outputs:  # data first, index last: an index never names missing data
            output.commit()
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", path) from None
    finally:
        for output in outputs:
            output.close()
    if bundle is not None and os.path.realpath(bundle.prefix) == os.path.realpath(prefix):
        _remove_stale_shards(prefix)
    source_model = saved_model_of(bundle.prefix) if bundle is not None else None
    if source_model and prefix == os.path.join(path, "variables", "variables"):
        try:
            copy_saved_model(source_model, path)
        except OSError as e:
            raise ParamctlError(f"cannot copy the SavedModel's other files: {e.strerror or e}", path) from None


class Pending:
    """One output file, written whole before any is put in place: an unnamed file linked into
    place at `commit` where the system has them (a killed write leaves nothing behind), else a
    named temporary file beside the target, renamed over it."""

    def __init__(self, target: str):
        self.target = target
        self.directory = os.path.dirname(os.path.abspath(target))
        self.tmp: str | None = None
        fd = unnamed_file(self.directory)
        if fd is None:
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(target)}.", suffix=TEMP_SUFFIX, dir=self.directory
            )
        self.fd: int | None = fd

    def open(self) -> BinaryIO:
        assert self.fd is not None
        return open(self.fd, "wb", closefd=False)  # noqa: SIM115 - the caller closes it

    def commit(self) -> None:
        assert self.fd is not None
        os.fsync(self.fd)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self.fd, 0o666 & ~umask)
        if self.tmp is None:
            link_into_place(self.fd, self.directory, self.target)
        else:
            os.replace(self.tmp, self.target)
            self.tmp = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def state_file(directory: str, prefix: str) -> str:
    """A `checkpoint` state file naming PREFIX as the latest: an existing one keeps its list
    (PREFIX added to it), as tf.train.Checkpoint.save updates it."""
    name = os.path.basename(prefix)
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    lines = []
    with (
        contextlib.suppress(OSError),
        open(os.path.join(directory, STATE_FILE), encoding="utf-8", errors="replace") as f,
    ):
        lines = [line.rstrip("\n") for line in f if not line.startswith("model_checkpoint_path:")]
    listed = f"all_model_checkpoint_paths: {quoted}"
    if listed not in lines:
        lines = [line for line in lines if not line.startswith("all_model_checkpoint_timestamps:")]
        at = max((i + 1 for i, line in enumerate(lines) if line.startswith("all_model_checkpoint_paths:")), default=0)
        lines.insert(at, listed)
    return "\n".join([f"model_checkpoint_path: {quoted}", *lines]) + "\n"


def _remove_stale_shards(prefix: str) -> None:
    """After writing over a checkpoint of several shards, the shards the new index no longer names."""
    directory, name = os.path.split(os.path.abspath(prefix))
    pattern = re.compile(re.escape(name) + r"\.data-\d{5}-of-(\d{5})$")
    for file in os.listdir(directory):
        match = pattern.match(file)
        if match and match.group(1) != "00001":
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, file))


def entry_proto(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    """A BundleEntryProto as TF writes it (zero fields left out, the shape always written)."""
    dims = b"".join(encode([(2, 2, encode([(1, 0, n)] if n else []))]) for n in shape)
    message: list = [(1, 0, dtype), (2, 2, dims)]
    message += [(4, 0, offset)] if offset else []
    message += [(5, 0, size)] if size else []
    return encode([*message, (6, 5, crc)])


def encode_strings(values: list[bytes]) -> bytes:
    lengths = b"".join(varint(len(v)) for v in values)
    words = b"".join(len(v).to_bytes(4, "little") for v in values)
    checksum = mask(crc_update(0xFFFFFFFF, words) ^ 0xFFFFFFFF)
    return lengths + checksum.to_bytes(4, "little") + b"".join(values)


def updated_graph(ckpt: Checkpoint, bundle: Bundle, graph: StringEntry) -> bytes | None:
    """The object graph with each variable's `checkpoint_key` following a rename, and the
    attributes of removed tensors dropped (None: nothing changed, the stored bytes are kept)."""
    current = {}  # key read -> key written; a tensor made anew (merge) keeps the key of its name
    for t in ckpt.tensors:
        key = t.attrs.get("tf_key") or (t.name if t.name in bundle.tensor_keys else None)
        if key is not None:
            current[key.encode()] = t.name.encode()
    if all(old == new for old, new in current.items()) and len(current) == len(bundle.tensor_keys):
        return None
    if graph.shape != ():
        raise FormatError(f"{OBJECT_GRAPH} is not a scalar string", graph.storage.path)
    removed = {key.encode() for key in bundle.tensor_keys} - set(current)
    try:
        (raw,) = graph.values()
        nodes = []
        for number, wire, value in fields(raw):
            if number == 1 and wire == 2:
                node = []
                for n, w, v in fields(value):
                    if n == 2 and w == 2:  # SerializedTensor {name, full_name, checkpoint_key}
                        attribute = fields(v)
                        key = next((x for k, t, x in attribute if k == 3 and t == 2), None)
                        if key in removed:
                            continue
                        if key in current:
                            v = encode([(k, t, current[key] if k == 3 and t == 2 else x) for k, t, x in attribute])
                    node.append((n, w, v))
                value = encode(node)
            nodes.append((number, wire, value))
    except FormatError as e:
        raise FormatError(f"{OBJECT_GRAPH}: {e.message}", graph.storage.path) from None
    return encode(nodes)


def _losses(ckpt: Checkpoint, sharded: bool) -> list[str]:
    lost = []
    if ckpt.format != "tf":
        lost += dropped_entries(ckpt, "a TensorFlow checkpoint")
        lost.append(
            "no object graph: tf.train.load_checkpoint reads the output, "
            "Keras load_weights and tf.train.Checkpoint.restore need one"
        )
    else:
        bundle = ckpt.extra
        if bundle.partitioned:
            lost.append(
                f"{len(bundle.partitioned)} partitioned variables are written whole (TensorFlow reads slices of them)"
            )
    ties = ckpt.tie_groups()
    if ties:
        lost.append(f"a TensorFlow checkpoint stores {len(ties)} tied groups as copies")
    return lost


register(
    Format(
        name="tf",
        description="TensorFlow checkpoint (PREFIX.index + data, or its directory)",
        load=load,
        save=save,
        extensions=(".index",),
        accept=_accept,
        accept_path=_accept_path,
        losses=_losses,
        entries=entries,
        layout="keras",
        writes_files=True,
        priority=45,
    )
)
