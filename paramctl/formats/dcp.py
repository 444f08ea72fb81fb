"""torch.distributed.checkpoint directories (FileSystemWriter's layout), read without torch.

A DCP directory holds `.metadata` (a pickle of the `Metadata` dataclass: each flattened name's
size, dtype and chunks, and where each chunk's bytes are) and `__<rank>_<i>.distcp` files, each
a concatenation of complete `torch.save` archives, one per stored item. `.metadata` is read by
a restricted unpickler that admits only the metadata dataclasses, as inert records (never
constructed). Listing reads `.metadata` alone: a chunk's archive is opened when its bytes are
first read, its `data.pkl` read by the `.pt` reader's restricted unpickler, and its `data/0`
read in place inside the `.distcp`. A tensor split into chunks (over ranks) is assembled from
them a block of rows at a time, so memory stays bounded whatever its size. Non-tensor items
(`epoch`, an optimizer's `param_groups`) are `torch.save` pickles of plain objects, read by the
same restricted unpickler when `info` or a conversion asks for them.

Rows are named by the flattened names (`model.0.weight`, `optim.state.0.exp_avg`) that
`dcp_to_torch_save` nests back into dicts and lists; writing a `.pt` rebuilds that nesting, so
the file holds what `dcp_to_torch_save` writes. Writing DCP goes through torch's own `dcp.save`
(one process, no process group), so `dcp.load` reads whatever paramctl writes.

A lone `.distcp` file is never read as a `.pt` (it would show the last archive only): it is
refused, naming the directory to open.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from paramctl.dtypes import ITEMSIZE, itemsize
from paramctl.errors import FormatError, ParamctlError, UnsafeContentError, UsageError
from paramctl.formats import Format, Probe, dropped_entries, register
from paramctl.formats.pytorch import (
    ADMITTED,
    POSITION,
    RestrictedUnpickler,
    TorchDtype,
    check_lengths,
    load_with,
    unpickle,
)
from paramctl.formats.zipfiles import ZIP_ERRORS, member_offset
from paramctl.table import Checkpoint, Storage, Tensor, contiguous_strides, flat_blocks

METADATA = ".metadata"
SHARD_NAME = re.compile(r"__\d+_\d+\.distcp")

# --- .metadata: the admitted globals, each an inert record -----------------------------------------

_MODULE = "torch.distributed.checkpoint.metadata"
RECORDS = frozenset(
    [
        f"{_MODULE}.{c}"
        for c in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
            "MetadataIndex",
            "StorageMeta",
        )
    ]
    + ["torch.distributed.checkpoint.filesystem._StorageInfo"]
    + [f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath", "Path")]
)
# the torch globals of the `.pt` reader's allow-list that .metadata uses (as the same records)
TORCH_GLOBALS = frozenset(["torch.Size", "torch.serialization._get_layout"] + [f"torch.{d}" for d in ITEMSIZE])


class Record:
    """An instance of an admitted metadata class as the pickle describes it, never constructed:
    NEWOBJ's arguments, BUILD's state (a dataclass's fields), REDUCE's arguments (an enum
    member, a path)."""

    global_name = ""

    def __new__(cls, *args: Any) -> Record:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any) -> None:  # REDUCE: the arguments are kept, nothing is called
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default) if isinstance(self.state, dict) else default


@functools.cache
def record_class(name: str) -> type[Record]:
    return type(name.rsplit(".", 1)[1], (Record,), {"global_name": name})


class MetadataUnpickler(RestrictedUnpickler):
    """The `.pt` reader's restricted unpickler narrowed to what `.metadata` holds: the metadata
    dataclasses, torch.Size, dtypes and layouts; any other global is refused, called or not."""

    def __init__(self, file: BinaryIO, path: str):
        super().__init__(file, None, path)

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in RECORDS:
            return record_class(key)
        if key in TORCH_GLOBALS:
            return ADMITTED[key]
        raise UnsafeContentError(f"refuses to load: pickle global {key} is not allowed in a DCP .metadata", self.path)

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError("a persistent id in a DCP .metadata", self.path)


# --- the storage index ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One stored item: a complete torch.save archive at OFFSET (LENGTH bytes) in FILE."""

    file: str
    offset: int
    length: int


@dataclass
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: Item


@dataclass
class Entry:
    """One flattened name of the checkpoint: a tensor (dtype, shape and chunks) or a bytes item."""

    fqn: str
    position: tuple  # the keys dcp_to_torch_save nests it under
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    chunks: list[Chunk] = field(default_factory=list)
    item: Item | None = None  # a bytes item


def read_metadata(directory: str) -> Any:
    path = os.path.join(directory, METADATA)
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)
    check_lengths(stream, path)
    metadata = load_with(MetadataUnpickler(stream, path))
    if not (isinstance(metadata, Record) and metadata.global_name == f"{_MODULE}.Metadata"):
        raise FormatError("not a DCP .metadata: the pickle holds no Metadata", path)
    return metadata


def _ints(value: Any, what: str, path: str) -> tuple[int, ...]:
    if not (isinstance(value, (tuple, list)) and all(type(n) is int and n >= 0 for n in value)):
        raise FormatError(f"{what} is not a list of counts: {value!r:.80}", path)
    return tuple(value)


def _is(node: Any, cls: str) -> bool:
    return isinstance(node, Record) and node.global_name.endswith("." + cls)


def entries_of(directory: str, metadata: Any) -> list[Entry]:
    """The checkpoint's names in `.metadata`'s order, each with the items holding its bytes."""
    path = os.path.join(directory, METADATA)
    described = metadata.field("state_dict_metadata")
    planner = metadata.field("planner_data") or {}
    stored = metadata.field("storage_data")
    if not isinstance(described, dict) or not isinstance(stored, dict) or not isinstance(planner, dict):
        raise FormatError("a Metadata without its state_dict_metadata and storage_data", path)
    sizes: dict[str, int] = {}
    where: dict[tuple, Item] = {}
    for index, info in stored.items():
        if not (_is(index, "MetadataIndex") and _is(info, "_StorageInfo")):
            raise FormatError("a storage_data entry that is not MetadataIndex -> _StorageInfo", path)
        fqn, offset = index.field("fqn"), index.field("offset")
        key = (fqn, None if offset is None else _ints(offset, f"the offset of {fqn!r}", path))
        where[key] = _item(directory, info, sizes, path)
    entries = []
    for fqn, described_as in described.items():
        if not isinstance(fqn, str):
            raise FormatError(f"a name that is not text: {fqn!r:.80}", path)
        position = planner.get(fqn, (fqn,))
        if not (isinstance(position, tuple) and position and all(_key_ok(k, len(described)) for k in position)):
            raise FormatError(f"invalid planner path for {fqn!r}: {position!r:.80}", path)
        if _is(described_as, "BytesStorageMetadata"):
            if (fqn, None) not in where:
                raise FormatError(f"no stored item for {fqn!r}", path)
            entries.append(Entry(fqn, position, item=where[fqn, None]))
        elif _is(described_as, "TensorStorageMetadata"):
            entries.append(_tensor_entry(fqn, position, described_as, where, path))
        else:
            raise FormatError(f"{fqn!r} is described by neither tensor nor bytes metadata", path)
    return entries


def _key_ok(key: Any, names: int) -> bool:
    """A planner path's key: text, or a list index no larger than the names could fill."""
    return type(key) is str or (type(key) is int and 0 <= key < names)


def _item(directory: str, info: Record, sizes: dict[str, int], path: str) -> Item:
    relative, offset, length = (info.field(k) for k in ("relative_path", "offset", "length"))
    if info.field("transform_descriptors"):
        transforms = info.field("transform_descriptors")
        raise FormatError(f"items stored through transforms {transforms!r:.80} (compression): not supported", path)
    if not (isinstance(relative, str) and os.path.basename(relative) == relative and relative not in ("", ".", "..")):
        raise FormatError(f"a storage file outside the checkpoint directory: {relative!r:.80}", path)
    if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
        raise FormatError(f"an item of {relative} without an offset and length", path)
    file = os.path.join(directory, relative)
    if file not in sizes:
        try:
            sizes[file] = os.path.getsize(file)
        except OSError:
            raise FormatError(f"{relative} is missing (named by .metadata)", directory) from None
    if offset + length > sizes[file]:
        raise FormatError(f"truncated: an item at bytes [{offset}, {offset + length}) of {sizes[file]}", file)
    return Item(file, offset, length)


def _tensor_entry(fqn: str, position: tuple, meta: Record, where: dict[tuple, Item], path: str) -> Entry:
    properties = meta.field("properties")
    state = properties.state if _is(properties, "TensorProperties") else None
    dtype = state[0] if isinstance(state, tuple) and state else properties.field("dtype") if properties else None
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"tensor {fqn!r} without a dtype", path)
    shape = _ints(meta.field("size"), f"the size of {fqn!r}", path)
    chunks = []
    for chunk in meta.field("chunks") or ():
        if not _is(chunk, "ChunkStorageMetadata"):
            raise FormatError(f"tensor {fqn!r} has a chunk that is not ChunkStorageMetadata", path)
        offsets = _ints(chunk.field("offsets"), f"a chunk offset of {fqn!r}", path)
        sizes = _ints(chunk.field("sizes"), f"a chunk size of {fqn!r}", path)
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise FormatError(f"a chunk of {fqn!r} has another rank than the tensor", path)
        if any(o + n > s for o, n, s in zip(offsets, sizes, shape)):
            raise FormatError(f"a chunk of {fqn!r} at {list(offsets)} lies outside its size {list(shape)}", path)
        if (fqn, offsets) not in where:
            raise FormatError(f"no stored item for the chunk of {fqn!r} at {list(offsets)}", path)
        chunks.append(Chunk(offsets, sizes, where[fqn, offsets]))
    _check_tiling(fqn, shape, chunks, path)
    return Entry(fqn, position, dtype.name, shape, chunks)


MAX_PAIRWISE = 1024  # chunks off a grid compared pair by pair for overlaps; more are refused


def _check_tiling(fqn: str, shape: tuple[int, ...], chunks: list[Chunk], path: str) -> None:
    """The chunks cover the tensor exactly once: a gap would be values nobody read, an overlap
    two stored values for one element."""
    total: int = math.prod(shape)
    covered: int = sum(math.prod(c.sizes) for c in chunks)
    if covered != total or (total and not chunks):
        raise FormatError(f"the chunks of {fqn!r} hold {covered} of its {total} elements", path)
    real = [c for c in chunks if math.prod(c.sizes)]
    if on_a_grid(shape, real):
        return
    if len(real) > MAX_PAIRWISE:
        raise FormatError(f"{fqn!r} has {len(real)} chunks that do not form a grid; refused", path)
    for i, a in enumerate(real):
        for b in real[i + 1 :]:
            spans = zip(a.offsets, a.sizes, b.offsets, b.sizes)
            if all(max(oa, ob) < min(oa + na, ob + nb) for oa, na, ob, nb in spans):
                raise FormatError(f"two chunks of {fqn!r} overlap (at {list(a.offsets)} and {list(b.offsets)})", path)


def on_a_grid(shape: tuple[int, ...], chunks: list[Chunk]) -> bool:
    """Whether CHUNKS are the distinct cells of one grid (the cuts along each axis are the
    chunks' edges, each chunk spans one cell): then, holding as many elements as the tensor,
    they cover it exactly once. Sharding over ranks lays chunks out this way."""
    cuts = [
        sorted({0, n} | {c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
        for d, n in enumerate(shape)
    ]
    following = [{a: b for a, b in zip(axis, axis[1:])} for axis in cuts]
    if any(following[d].get(o) != o + n for c in chunks for d, (o, n) in enumerate(zip(c.offsets, c.sizes))):
        return False
    return len({c.offsets for c in chunks}) == len(chunks) == math.prod(len(axis) - 1 for axis in cuts)


# --- an item: a torch.save archive inside a .distcp -----------------------------------------------


class Window(io.RawIOBase):
    """The LENGTH bytes at OFFSET of an open file, as a file of their own (for zipfile)."""

    def __init__(self, f: BinaryIO, offset: int, length: int):
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.length - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


def read_item(item: Item) -> Any:
    """The object one stored item holds, through the `.pt` reader's restricted unpickler; its
    storages are regions of the `.distcp` file (nothing is read from them here)."""
    path = item.file
    with open(path, "rb") as f:
        window = Window(f, item.offset, item.length)
        try:
            zf = zipfile.ZipFile(window)  # type: ignore[arg-type]
            members = {i.filename: i for i in zf.infolist()}
            pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise FormatError(f"the item at byte {item.offset} is not a torch.save archive", path)
            top = pickles[0][: -len("data.pkl")]
            storages = {}
            for name, info in members.items():
                if not name.startswith(top + "data/"):
                    continue
                start = member_offset(window, info)  # type: ignore[arg-type]
                if info.compress_type != zipfile.ZIP_STORED or start + info.file_size > item.length:
                    raise FormatError(f"the item at byte {item.offset} holds {name} compressed or past its end", path)
                storages[name[len(top) + 5 :]] = Storage(info.file_size, path=path, offset=item.offset + start)
            byteorder = members.get(top + "byteorder")
            if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
                raise FormatError("big-endian items are not supported", path)
            info = members[pickles[0]]
            if info.file_size > max(item.length, 1) * 1032:
                raise FormatError(f"an item's data.pkl claims {info.file_size} bytes", path)
            data = zf.read(info)
        except ZIP_ERRORS as e:
            raise FormatError(f"the item at byte {item.offset} is not a valid archive: {e}", path) from None
    return unpickle(data, storages, path)


def chunk_tensor(entry: Entry, chunk: Chunk) -> Tensor:
    """The tensor a chunk's item holds, checked against what `.metadata` says of it."""
    obj = read_item(chunk.item)
    path = chunk.item.file
    if not isinstance(obj, Tensor):
        raise FormatError(f"the item of {entry.fqn!r} at byte {chunk.item.offset} holds no tensor", path)
    if obj.shape != chunk.sizes or obj.dtype != entry.dtype:
        raise FormatError(
            f"the item of {entry.fqn!r} holds {obj.dtype} {list(obj.shape)}, .metadata says "
            f"{entry.dtype} {list(chunk.sizes)}",
            path,
        )
    obj.name = entry.fqn
    obj.check_bounds()
    return obj


class Assembly:
    """The bytes of one tensor in C order, from its chunks, read a range at a time: a chunk's
    archive is opened on first use. A range of a tensor split into several chunks is cut into
    boxes that are contiguous in C order (`flat_blocks`: single indices, then one range, then
    whole axes); each box meets a chunk in a region that is contiguous in the chunk too, read
    as one run. Memory is the range asked for, whatever the tensor's size or the chunks' shape."""

    def __init__(self, entry: Entry):
        self.entry = entry
        self.size = itemsize(entry.dtype or "uint8")
        self.tensors: dict[int, Tensor] = {}

    def chunk(self, i: int) -> Tensor:
        if i not in self.tensors:
            self.tensors[i] = chunk_tensor(self.entry, self.entry.chunks[i])
        return self.tensors[i]

    def flat(self, i: int, start: int, stop: int) -> Any:
        """Elements START to STOP of chunk I in C order, as a numpy array of raw items."""
        import numpy as np

        raw = np.dtype(f"V{self.size}")
        t = self.chunk(i)
        if t.is_contiguous:
            return np.frombuffer(t.storage.read((t.offset + start) * self.size, (stop - start) * self.size), raw)
        parts = [c.view(raw) for c in t.chunks(start=start, stop=stop)]
        return np.concatenate(parts) if parts else np.empty(0, raw)

    def read(self, start: int, length: int) -> bytes:
        first, stop = start // self.size, -(-(start + length) // self.size)
        skip = start - first * self.size
        if len(self.entry.chunks) == 1:
            return self.flat(0, first, stop).tobytes()[skip : skip + length]
        import numpy as np

        shape = self.entry.shape
        out = np.empty(stop - first, np.dtype(f"V{self.size}"))
        at = 0
        for index in flat_blocks(first, stop, shape):
            box = [
                (i, i + 1) if isinstance(i, int) else (i.start or 0, shape[d] if i.stop is None else i.stop)
                for d, i in enumerate(index)
            ]
            sizes = [hi - lo for lo, hi in box]
            block = out[at : at + math.prod(sizes)].reshape(sizes)
            at += block.size
            for n, c in enumerate(self.entry.chunks):
                meet = [(max(lo, o), min(hi, o + k)) for (lo, hi), o, k in zip(box, c.offsets, c.sizes)]
                if any(lo >= hi for lo, hi in meet):
                    continue
                local = [lo - o for (lo, _), o in zip(meet, c.offsets)]
                begin = sum(i * s for i, s in zip(local, contiguous_strides(c.sizes)))
                extent = [hi - lo for lo, hi in meet]
                values = self.flat(n, begin, begin + math.prod(extent)).reshape(extent)
                block[tuple(slice(lo - b, hi - b) for (lo, hi), (b, _) in zip(meet, box))] = values
        return out.tobytes()[skip : skip + length]


class ItemStorage(Storage):
    """The bytes of a tensor stored whole in one item: where they lie in the `.distcp` is known
    once the item's `data.pkl` is read, which happens when the place (`offset`) or the way to
    read them (`reader`) is first asked for, not when the checkpoint is listed. A contiguous
    tensor is then a plain region of the file, mapped and streamed as any other; a strided one
    (a saved `.t()`) is read through its chunk's view."""

    def __init__(self, nbytes: int, path: str, assembly: Assembly):
        super().__init__(nbytes, path=path)
        self.assembly = assembly
        self.place: tuple[int, Any] | None = None

    def where(self) -> tuple[int, Any]:
        if self.place is None:
            t = self.assembly.chunk(0)
            if t.is_contiguous and t.storage.path == self.path and t.storage.reader is None:
                self.place = (t.storage.offset + t.offset * self.assembly.size, None)
            else:
                self.place = (0, self.assembly.read)
        return self.place

    @property  # type: ignore[override]
    def offset(self) -> int:
        return self.where()[0]

    @offset.setter
    def offset(self, value: int) -> None:
        pass  # Storage's __init__ sets the default; the place is the item's

    @property  # type: ignore[override]
    def reader(self) -> Any:
        return self.where()[1]

    @reader.setter
    def reader(self, value: Any) -> None:
        pass


# --- the checkpoint ------------------------------------------------------------------------------


@dataclass
class DcpSource:
    """A DCP checkpoint's `extra`: its directory and names, and (read on demand) its bytes items
    and the object `dcp_to_torch_save` would write."""

    directory: str
    entries: list[Entry]
    rows: dict[str, Tensor]

    @functools.cached_property
    def objects(self) -> dict[str, Any]:
        """The non-tensor items, by flattened name."""
        found = {}
        for e in self.entries:
            if e.item is not None:
                obj = read_item(e.item)
                if _holds_tensor(obj):
                    raise FormatError(f"the bytes item {e.fqn!r} holds a tensor, which would not be a row", e.item.file)
                found[e.fqn] = obj
        return found

    @functools.cached_property
    def pt_object(self) -> dict:
        """The nested state dict `dcp_to_torch_save` writes: each name put back at its planner
        path (dicts for text keys, lists for integer ones)."""
        root: dict = {}
        for e in self.entries:
            value = self.rows[e.fqn] if e.item is None else self.objects[e.fqn]
            try:
                set_element(root, e.position, value)
            except (TypeError, IndexError, KeyError, AttributeError):
                where = os.path.join(self.directory, METADATA)
                raise FormatError(f"the planner path of {e.fqn!r} runs into another name's", where) from None
        return root


def _holds_tensor(node: Any) -> bool:
    if isinstance(node, Tensor):
        return True
    if isinstance(node, dict):
        return any(_holds_tensor(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_tensor(v) for v in node)
    return False


def set_element(root: dict, position: tuple, value: Any) -> None:
    """Put VALUE at POSITION in ROOT, as torch's `_traverse.set_element` does, except that a
    place already taken (two names nesting into one, which torch would overwrite) is a KeyError."""
    node: Any = root
    for key, following in zip(position, position[1:]):
        empty: Any = {} if type(following) is str else []
        if isinstance(node, dict):
            node = node.setdefault(key, empty)
        else:
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = empty
            node = node[key]
    key = position[-1]
    if isinstance(node, list):
        node.extend([None] * (key + 1 - len(node)))
        if node[key] is not None:
            raise KeyError(key)
    elif key in node:
        raise KeyError(key)
    node[key] = value


def load_directory(directory: str, source: str) -> Checkpoint:
    metadata = read_metadata(directory)
    entries = entries_of(directory, metadata)
    tensors = []
    for e in entries:
        if e.item is not None:
            continue
        assert e.dtype is not None
        nbytes = math.prod(e.shape) * itemsize(e.dtype)
        first = e.chunks[0].item.file if e.chunks else os.path.join(directory, METADATA)
        assembly = Assembly(e)
        if len(e.chunks) == 1:
            storage: Storage = ItemStorage(nbytes, first, assembly)
        else:
            storage = Storage(nbytes, path=first, reader=assembly.read)
        tensors.append(Tensor(e.fqn, e.shape, e.dtype, storage, attrs={POSITION: e.position}))
    files = {os.path.join(directory, METADATA)} | {c.item.file for e in entries for c in e.chunks}
    files |= {e.item.file for e in entries if e.item is not None}
    extra = DcpSource(directory, entries, {t.name: t for t in tensors})
    return Checkpoint(source, "dcp", tensors, extra=extra, file_size=sum(os.path.getsize(f) for f in files))


def load(path: str, source: str) -> Checkpoint:
    """A DCP directory, its `.metadata` named directly, or (refused) one of its `.distcp` files."""
    if os.path.isdir(path):
        return load_directory(path, source)
    directory = os.path.dirname(path) or "."
    if os.path.basename(path) == METADATA:
        return load_directory(directory, source)
    beside = os.path.isfile(os.path.join(directory, METADATA))
    hint = f"open its directory: paramctl ls {directory}" if beside else "open the directory with it and its .metadata"
    raise FormatError(
        f"one shard of a torch.distributed.checkpoint (concatenated torch.save archives, one per item): {hint}",
        source,
    )


def concatenated_zips(probe: Probe) -> bool:
    """Whether the file is zip archives laid end to end (a .distcp): a local header at byte 0,
    and a last archive whose central directory says it starts later."""
    if probe.head[:4] != b"PK\x03\x04":
        return False
    try:
        with open(probe.path, "rb") as f:
            end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):  # a damaged end record: not ours to say
        return False
    if not end:
        return False
    start = end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE] - end[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    return start > 0


def _accept(probe: Probe) -> bool:
    name = os.path.basename(probe.path)
    if name == METADATA:
        return probe.head[:1] == b"\x80"
    if name.endswith(".distcp"):
        return True
    beside = os.path.isfile(os.path.join(os.path.dirname(probe.path), METADATA))
    return (beside and SHARD_NAME.fullmatch(name) is not None) or concatenated_zips(probe)


def _accept_path(path: str) -> str | None:
    return path if os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA)) else None


def non_tensor_entries(ckpt: Checkpoint) -> dict[str, Any]:
    from paramctl.formats.pytorch import non_tensor_entries as walk

    return walk(Checkpoint(ckpt.source, "pt", [], extra=ckpt.extra.objects))


# --- writing: torch's own dcp.save, into a new directory swapped into place -----------------------


def save(ckpt: Checkpoint, target: str) -> None:
    """Write CKPT as a DCP directory at TARGET with `torch.distributed.checkpoint.save` (one
    process, no process group): a DCP source keeps its nesting and non-tensor items, so
    `dcp.load` with the training script's state dict finds every name; other sources are their
    tensors under their names. The directory is written beside TARGET and swapped into place
    once complete; files in an existing TARGET other than DCP's own are kept."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from paramctl.dtypes import torch_dtype
    from paramctl.formats.pytorch import _to_torch_objects, arrange

    if target == "-":
        raise UsageError("a DCP checkpoint is a directory: name one with -o DIR --to dcp")
    existing = os.path.isdir(target)
    if os.path.exists(target) and not existing:
        raise UsageError("a DCP checkpoint is a directory, and a file of that name exists", target)
    if existing and os.listdir(target) and not os.path.isfile(os.path.join(target, METADATA)):
        raise UsageError("a directory that is not a DCP checkpoint: name a new or empty one", target)
    made: dict[int, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}

    def convert(t: Tensor) -> torch.Tensor:
        if t.tie is not None and t.tie in tied:
            return tied[t.tie]
        if id(t) not in made:
            empty = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
            raw = bytearray(t.tobytes()) if t.numel else b""
            made[id(t)] = torch.frombuffer(raw, dtype=empty.dtype).reshape(t.shape) if raw else empty
        if t.tie is not None:
            tied[t.tie] = made[id(t)]
        return made[id(t)]

    tree = ckpt.extra.pt_object if ckpt.format == "dcp" else None
    state = (
        _to_torch_objects(arrange(tree, ckpt.tensors), convert)
        if tree is not None
        else {t.name: convert(t) for t in ckpt.tensors}
    )
    directory = os.path.dirname(os.path.abspath(target))
    name = os.path.basename(os.path.abspath(target))
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".paramctl-tmp", dir=directory)
    old = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... a single process"
            dcp.save(state, checkpoint_id=tmp)
        if existing:
            for kept in os.listdir(target):
                if kept != METADATA and not kept.endswith(".distcp"):
                    os.replace(os.path.join(target, kept), os.path.join(tmp, kept))
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".paramctl-old", dir=directory)
            os.replace(target, os.path.join(old, name))
        os.replace(tmp, target)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise FormatError(f"cannot write a non-tensor entry into DCP: {e}", target) from None
    except OSError as e:
        raise ParamctlError(f"cannot write: {e.strerror or e}", target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _losses(ckpt: Checkpoint, sharded: bool) -> list[str]:
    lost = [] if ckpt.format == "dcp" else dropped_entries(ckpt, "dcp")
    groups = ckpt.tie_groups()
    if groups:
        lost.append(f"dcp stores each name of a tie group as its own copy ({len(groups)} groups)")
    return lost


register(
    Format(
        name="dcp",
        description="torch.distributed.checkpoint directory (.metadata + .distcp)",
        load=load,
        save=save,
        accept=_accept,
        accept_path=_accept_path,
        losses=_losses,
        entries=non_tensor_entries,
        writes_files=True,
        priority=10,
    )
)
