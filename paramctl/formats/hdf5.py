"""HDF5 (Keras `.h5` / `.weights.h5`): every numeric dataset is a row named by its path.

Contiguous datasets are read straight from the file at the offset HDF5 reports, so reading
values needs neither h5py nor a copy; chunked (compressed) ones are read through h5py on demand.
Keras stores bf16 as opaque 2-byte data tagged with a dataset attribute `dtype="bfloat16"`; the
other types numpy lacks (float8) are tagged the same way. Everything else in the file (groups,
attributes, string datasets, links) is written back from the source file by `write`.

Rows follow the file, except where Keras lists weights in `layer_names` / `weight_names`
attributes: loading is positional, so those rows come in the listed order.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from itertools import takewhile
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from paramctl.dtypes import ITEMSIZE, from_numpy, itemsize
from paramctl.errors import FormatError, UsageError
from paramctl.forked import in_child
from paramctl.formats import Format, Probe, dropped_entries, register
from paramctl.table import Checkpoint, Storage, Tensor, check_shape, flat_blocks

if TYPE_CHECKING:
    import h5py
    import numpy as np

# dtypes h5py stores as opaque bytes (from ml_dtypes arrays), named by a `dtype` attribute
TAGGED = {name for name in ITEMSIZE if name == "bfloat16" or name.startswith("float8")}
TAGGED_SIZES = {itemsize(name) for name in TAGGED}
TIES_ATTR = "paramctl_ties"
H5PY_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)
DIGITS = re.compile(r"(\d+)")
G = TypeVar("G")  # a group, as h5py's or paramctl's own reader holds it


class FileWindow(io.RawIOBase):
    """Bytes [start, start + size) of a file, read as a file of their own (a stored zip member)."""

    def __init__(self, path: str, start: int, size: int):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - held until close()
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError("seek before the start of the file")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True)
class H5Image:
    """Where an HDF5 file lives: the file at `path`, or its zip member `member` (`size` bytes
    stored at `offset`, or decompressed into `data`). The writer reopens it to copy what is kept."""

    path: str
    member: str | None = None
    offset: int = 0
    size: int | None = None
    data: bytes | None = field(default=None, repr=False)

    @contextmanager
    def open(self) -> Iterator[h5py.File]:
        import h5py

        if self.data is not None:
            fileobj: Any = io.BytesIO(self.data)
        elif self.member is not None:
            fileobj = FileWindow(self.path, self.offset, self.size or 0)
        else:
            fileobj = self.path
        try:
            with h5py.File(fileobj, "r") as f:
                yield f
        finally:
            if not isinstance(fileobj, str):
                fileobj.close()

    @contextmanager
    def reading(self) -> Iterator[h5py.File]:
        """`open`, with h5py's errors about a damaged file turned into FormatError."""
        try:
            with self.open() as f:
                yield f
        except H5PY_ERRORS as e:
            where = f"{self.member} in the archive is not" if self.member else "not"
            raise FormatError(f"{where} a valid HDF5 file: {e}", self.path) from None

    @cached_property  # the truncation check asks for every dataset
    def nbytes(self) -> int:
        return self.size if self.size is not None else os.path.getsize(self.path)


@dataclass(frozen=True)
class HardLinkTo:
    """Another hard link to the object first reached at `path`."""

    path: str


def load(path: str, source: str) -> Checkpoint:
    image = H5Image(path)
    return Checkpoint(source, "hdf5", read_tensors(image), extra=image)


# deadlines for libhdf5 work in a child: ample for the work, bounded for a loop. Reading: plus a
# second per 100 MB. Writing rebuilds every group and attribute (a deep file takes a while on a
# busy machine) and was preceded by a successful read: a longer base, plus a second per 50 MB.
READ_SECONDS = 2.0
WRITE_SECONDS = 15.0


def read_tensors(image: H5Image) -> list[Tensor]:
    """The rows: parsed natively when the file keeps to what h5py and Keras write by default
    (fast, and no libhdf5 to hang), else read by h5py in a child with a deadline."""
    from paramctl.formats import h5native

    try:
        return h5native.read_rows(image)
    except h5native.Unsupported:
        return in_child(read_rows, (image,), READ_SECONDS + image.nbytes / 100e6, image.path, "reading this file")


def root_attributes(ckpt: Checkpoint) -> dict[str, Any]:
    """The file's root attributes (keras_version, backend, model_config, ...), JSON-safe."""
    from paramctl.formats import h5native

    image = ckpt.extra.weights if ckpt.format == "keras" else ckpt.extra
    try:
        found = h5native.root_attributes(image)
    except h5native.Unsupported:
        found = in_child(read_root_attributes, (image,), READ_SECONDS, image.path, "reading the attributes")
    if ckpt.format == "keras" and ckpt.extra.metadata:
        try:
            found.update(json.loads(ckpt.extra.metadata))  # keras_version, date_saved
        except ValueError:
            found["metadata.json"] = ckpt.extra.metadata.decode("utf-8", "replace")
    return found


def read_root_attributes(image: H5Image) -> dict[str, Any]:
    with image.reading() as f:
        return {str(k): plain(checked_attr(f, k)) for k in f.attrs}


def plain(value: Any) -> Any:
    """An HDF5 attribute value as JSON: text decoded, arrays as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):
        if value.size == 0 and empty_lists(value.shape) > MAX_EMPTY_LISTS:
            return empty_array(value.shape)
        return plain(value.tolist())
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# an empty attribute of shape (2**40, 0) is 2**40 empty lists to numpy's tolist: beyond this
# many, it is described instead
MAX_EMPTY_LISTS = 4096
# a dataset not stored contiguously (chunked, compressed, or only a fill value) may claim at most
# this many times the file's bytes: what deflate reaches at best
MAX_EXPANSION = 1032
MAX_CHUNK = 64 << 20  # bytes of one decoded chunk, beyond the file's size (h5py's own aim at most 1 MiB)


def empty_lists(shape: tuple[int, ...]) -> int:
    """How many lists `tolist` makes of an empty array of SHAPE."""
    count = 1
    for n in shape[:-1]:
        if n == 0:
            break
        count *= n
    return count


def empty_array(shape: tuple[int, ...]) -> str:
    return f"empty array of shape {tuple(shape)}"


def read_rows(image: H5Image) -> list[Tensor]:
    import h5py
    from h5py import h5a, h5d, h5g

    rows: dict[str, Tensor] = {}
    with image.reading() as f:
        groups = {"": f["/"]}  # the groups whose attributes may list weights: the root and any with attributes
        for name, item in walk(f["/"]):
            if isinstance(item, HardLinkTo):
                if item.path in rows:
                    first = rows[item.path]  # one dataset under two names: a tie
                    rows[name] = Tensor(name, first.shape, first.dtype, first.storage)
            elif isinstance(item, h5d.DatasetID):
                row = dataset_tensor(item, image, name)
                if row is not None:
                    rows[name] = row
            elif isinstance(item, h5g.GroupID) and h5a.get_num_attrs(item):
                groups[name] = h5py.Group(item)
            elif not isinstance(item, (h5py.SoftLink, h5g.GroupID, h5py.h5t.TypeID)):
                raise FormatError(f"{name!r} is {link_kind(item)}: not followed, so refused", image.path)
        listed = list(listed_weights(groups, attr_list))
        declared = checked_attr(f, TIES_ATTR) if TIES_ATTR in f.attrs else None
    return ordered_rows(rows, listed, declared)


def ordered_rows(rows: dict[str, Tensor], listed: list[str], declared: Any) -> list[Tensor]:
    """ROWS (in file order) with the ties DECLARED in paramctl's root attribute made views again,
    and the rows Keras lists (LISTED) in its order: loading is positional."""
    listed_rows = dict.fromkeys(n for n in listed if n in rows)
    for alias, kept in declared_ties(declared).items():
        a, k = rows.get(alias), rows.get(kept)
        if a is not None and k is not None and (a.shape, a.dtype) == (k.shape, k.dtype):
            rows[alias] = Tensor(alias, k.shape, k.dtype, k.storage, k.offset, k.stride, attrs={"alias_of": kept})
    slots = iter(listed_rows)
    return [rows[next(slots) if name in listed_rows else name] for name in rows]


def declared_ties(raw: Any) -> dict[str, str]:
    """paramctl's record of ties in an HDF5 file ({alias: kept}, JSON in a root attribute).

    Keras refuses links, so a tie is written as copies plus this record; reading it makes the
    alias a view of the kept dataset again."""
    try:
        ties = json.loads(plain(raw)) if raw is not None else {}
    except (TypeError, ValueError):
        return {}
    if not isinstance(ties, dict):
        return {}
    return {str(a): str(k) for a, k in ties.items()}


def walk(root: h5py.Group) -> Iterator[tuple[str, Any]]:
    """Every link below ROOT as (path, item), depth first, a group before its members, in stored order.

    item is an h5py low-level GroupID, DatasetID or TypeID (a committed datatype); a SoftLink or
    ExternalLink, never followed (that could read another file; Keras refuses them too); or a
    HardLinkTo for an object already reached, so that a cycle of hard links ends. Iterative: a
    hostile file may nest deeply.

    Low-level, because h5py's Group and Dataset objects cost several times what HDF5 takes to read
    the structure: each name lookup, type check and property is another round of calls into HDF5.
    """
    import h5py
    from h5py import h5g, h5l, h5o

    first: dict[int, str] = {}  # object address -> the path it was first reached by
    stack = [("", iter(links_of(root.id)), root.id)]
    while stack:
        prefix, links, group = stack[-1]
        link = next(links, None)
        if link is None:
            stack.pop()
            continue
        path = prefix + link.name
        if link.type != h5l.TYPE_HARD:
            yield path, h5py.Group(group).get(link.name, getlink=True)
        elif link.address in first:
            yield path, HardLinkTo(first[link.address])
        else:
            first[link.address] = path
            item = h5o.open(group, link.name.encode())
            yield path, item
            if isinstance(item, h5g.GroupID):
                stack.append((path + "/", iter(links_of(item)), item))


class Link(NamedTuple):
    name: str
    type: int  # h5l.TYPE_HARD, TYPE_SOFT, TYPE_EXTERNAL or a user-defined type
    address: int  # where a hard link leads
    order: int | None  # its creation order, where the group tracks it


def links_of(group: h5py.h5g.GroupID) -> list[Link]:
    """A group's links in creation order where the group tracks it, else in natural order (HDF5
    would give name order, which puts Keras 3's `vars/10` before `vars/2`)."""
    if not group.get_num_objs():  # as h5py does, so that damage in an empty group's storage is no error
        return []
    found: list[tuple[bytes, int, int, int | None]] = []
    # The callback is passed one LinkInfo, overwritten for each link, so it copies the fields out.
    # It only appends: returning anything but None would end the iteration, and h5py turns an
    # exception raised in it into a SystemError.
    group.links.iterate(lambda n, i: found.append((n, i.type, i.u, i.corder if i.corder_valid else None)), info=True)
    links = [Link(name.decode(), kind, address, order) for name, kind, address, order in found]
    if all(link.order is not None for link in links):
        return sorted(links, key=attrgetter("order"))
    return sorted(links, key=lambda link: natural_key(link.name))


def natural_key(name: str) -> list[str | int]:
    return [int(s) if i % 2 else s for i, s in enumerate(DIGITS.split(name))]


def tracks_order(group: h5py.Group) -> bool:
    return bool(group.id.get_create_plist().get_link_creation_order())


def link_kind(item: Any) -> str:
    import h5py

    if isinstance(item, h5py.ExternalLink):
        return f"an external link to {item.filename}:{item.path}"
    return "a link of a kind h5py does not resolve here"


def dataset_tensor(ds: h5py.h5d.DatasetID, image: H5Image, name: str) -> Tensor | None:
    """Dataset NAME of IMAGE as a row, or None if it holds no tensor."""
    if stored_elsewhere(ds):  # h5py would read another file; what is here is not the values
        raise FormatError(f"dataset {name!r} {STORED_ELSEWHERE}", image.path)
    shape, offset = ds.shape, file_offset(ds)  # h5py makes each anew at every call
    dtype = tensor_dtype(ds, shape, offset)
    if dtype is None:
        return None
    check_shape(name, shape, image.path)
    nbytes = math.prod(shape) * itemsize(dtype)
    if offset is None or image.data is not None or ds.dtype.byteorder == ">":
        storage = decoded_storage(image, name, nbytes, stored=offset is not None)
    elif offset + nbytes > image.nbytes:
        raise FormatError(f"truncated: dataset {name!r} ends at byte {offset + nbytes} of {image.nbytes}", image.path)
    else:
        storage = Storage(nbytes, path=image.path, offset=image.offset + offset)
    return Tensor(name, shape, dtype, storage)


def tensor_dtype(ds: h5py.h5d.DatasetID, shape: tuple[int, ...] | None, offset: int | None) -> str | None:
    """The dtype of a dataset's values, or None for content that is not a tensor (strings,
    records, opaque data without a tag, external or virtual storage, an empty dataspace).

    SHAPE and OFFSET are the dataset's `ds.shape` (None for an empty dataspace) and `file_offset`."""
    import h5py

    if shape is None or (offset is None and stored_elsewhere(ds)):
        return None
    dt = ds.dtype
    if dt.kind == "V" and dt.names is None and dt.subdtype is None:  # opaque: read the tag only if it can fit
        dataset = h5py.Dataset(ds)
        tag = checked_attr(dataset, "dtype") if dt.itemsize in TAGGED_SIZES and "dtype" in dataset.attrs else None
        tag = tag.decode("utf-8", "replace") if isinstance(tag, bytes) else tag
        return tag if isinstance(tag, str) and tag in TAGGED and itemsize(tag) == dt.itemsize else None
    return numeric_dtype(dt)


@lru_cache  # the datasets of a checkpoint share a few dtypes, and numpy is slow to name one
def numeric_dtype(dt: np.dtype) -> str | None:
    """paramctl's name for a numeric numpy dtype of either byte order, or None."""
    if dt.kind not in "biufc":
        return None
    try:
        return from_numpy(dt.newbyteorder("<"))
    except UsageError:  # float128 and other types paramctl does not name
        return None


def file_offset(ds: h5py.h5d.DatasetID) -> int | None:
    """Where a dataset's values start in the file, or None unless they lie there contiguous (they
    are chunked, compact, not yet written, or stored elsewhere)."""
    from h5py import h5d

    offset = ds.get_offset()
    # for storage not yet allocated, HDF5 reports the size of the file's user block minus one
    if offset is not None and ds.get_space_status() != h5d.SPACE_STATUS_ALLOCATED:
        return None
    return offset


def stored_elsewhere(ds: h5py.h5d.DatasetID) -> bool:
    """Whether a dataset's values are in other files: external storage, or a virtual dataset."""
    from h5py import h5d

    dcpl = ds.get_create_plist()
    return dcpl.get_layout() == h5d.VIRTUAL or dcpl.get_external_count() > 0


STORED_ELSEWHERE = "keeps its values outside this file (external storage or a virtual dataset): not followed"


def decoded_storage(image: H5Image, name: str, nbytes: int, stored: bool) -> Storage:
    """The storage of dataset NAME (NBYTES once decoded) read through h5py a range at a time:
    chunked, compressed, only a fill value, or in another byte order. Unless its bytes are
    STORED whole in the file, it may claim at most MAX_EXPANSION times the file's size."""
    if not stored and nbytes > MAX_EXPANSION * image.nbytes + (1 << 20):
        raise FormatError(
            f"dataset {name!r} claims {nbytes} bytes, more than {MAX_EXPANSION} times the file's {image.nbytes} "
            "(what compression can reach); refused",
            image.path,
        )
    return Storage(nbytes, path=image.path, reader=functools.partial(read_dataset, image, name))


def read_dataset(image: H5Image, name: str, start: int, length: int) -> bytes:
    """Bytes START to START + LENGTH of dataset NAME's values in C order and little-endian,
    decoded by h5py (chunks, filters, fill values) a block of whole rows at a time."""
    import numpy as np

    with image.reading() as f:
        ds = f[name]
        size = ds.dtype.itemsize
        if ds.chunks and math.prod(ds.chunks) * size > MAX_CHUNK + image.nbytes:  # decoded whole by libhdf5
            raise FormatError(f"dataset {name!r} has chunks of {math.prod(ds.chunks) * size} bytes", image.path)
        if start % size or length % size:
            raise FormatError(f"a read of dataset {name!r} that splits its elements", image.path)
        blocks = flat_blocks(start // size, (start + length) // size, ds.shape)
        parts = [np.asarray(ds[index]).reshape(-1) for index in blocks]
    values = np.concatenate(parts) if parts else np.empty(0, ds.dtype)
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def listed_weights(groups: dict[str, G], attr_list: Callable[[G, str], list[str]]) -> Iterator[str]:
    """Dataset paths in the order Keras lists them: each group's `layer_names` (the layer groups'
    `weight_names` in turn), then its own `weight_names` (optimizer_weights, top_level_model_weights).

    ATTR_LIST(group, name) reads a list Keras saved as attribute NAME of a group of GROUPS."""
    for path, group in groups.items():
        for layer in attr_list(group, "layer_names"):
            layer_path = join(path, layer)
            if layer_path in groups:
                yield from (join(layer_path, w) for w in attr_list(groups[layer_path], "weight_names"))
        yield from (join(path, w) for w in attr_list(group, "weight_names"))


def attr_list(group: h5py.Group, name: str) -> list[str]:
    """A list of strings Keras saved as attribute NAME, or split over NAME0, NAME1, ... when large."""
    import numpy as np

    # bounded by the number of attributes: a damaged attribute table can answer "yes" to every name
    split = (f"{name}{i}" for i in range(len(group.attrs)))
    keys = [name] if name in group.attrs else takewhile(group.attrs.__contains__, split)
    values = []
    for key in keys:
        value = checked_attr(group, key)
        if isinstance(value, np.ndarray):
            values += [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.ravel()]
    return values


def checked_attr(obj: h5py.HLObject, key: str) -> Any:
    """Attribute KEY, refused when its header claims more elements than the file has bytes
    (a damaged header would otherwise have HDF5 read or allocate without end)."""
    count = math.prod(obj.attrs.get_id(key).shape or ())
    if count > obj.file.id.get_filesize():
        raise FormatError(f"attribute {key!r} of {obj.name!r} claims {count} elements", obj.file.filename)
    return obj.attrs[key]


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# --- writing -----------------------------------------------------------------------------------


def save(ckpt: Checkpoint, path: str) -> None:
    from paramctl.formats.keras import KerasArchive

    image = ckpt.extra.weights if isinstance(ckpt.extra, KerasArchive) else ckpt.extra
    write(ckpt, path, image if isinstance(image, H5Image) else None)


def write(ckpt: Checkpoint, path: str, image: H5Image | None) -> None:
    """write_file, in a child with a deadline (as reading: libhdf5 may loop on a damaged source)."""
    size = sum(t.nbytes for t in ckpt.tensors) + (image.nbytes if image is not None else 0)
    in_child(write_file, (ckpt, path, image), WRITE_SECONDS + size / 50e6, path, "writing this file")


def write_file(ckpt: Checkpoint, path: str, image: H5Image | None) -> None:
    """Write CKPT's tensors as an HDF5 file at PATH.

    With IMAGE (the HDF5 file the table was read from), the file is rebuilt from it: its groups,
    attributes, links and non-tensor datasets as they were, each tensor dataset from its row,
    the datasets of removed rows dropped. Rows the source lacks, or every row without IMAGE, are
    created at their names, in table order (groups track creation order so that it is kept).
    """
    import h5py

    rows = {t.name: t for t in ckpt.tensors}
    written: set[str] = set()
    with ExitStack() as stack:
        src = stack.enter_context(image.open()) if image is not None else None
        # libhdf5 resolves a path to its real name, which an unnamed file (paramctl.atomic) lacks
        out: Any = stack.enter_context(open(path, "w+b")) if path.startswith("/proc/self/fd/") else path
        dst = stack.enter_context(h5py.File(out, "w", track_order=tracks_order(src["/"]) if src else True))
        if src is not None:
            try:
                written = copy_structure(src, dst, rows)
            except (RuntimeError, KeyError, ValueError, TypeError) as e:  # h5py on damage paramctl read past
                assert image is not None
                raise FormatError(f"cannot copy the file's structure: {str(e).splitlines()[0]}", image.path) from None
        for t in ckpt.tensors:
            if t.name not in written:
                write_tensor(dst, t, None)
        # a tie the output already holds as one dataset under two hard links needs no record
        ties = {n: group[0] for group in ckpt.tie_groups() for n in group[1:] if dst[n] != dst[group[0]]}
        if ties:
            dst.attrs[TIES_ATTR] = json.dumps(ties)
        elif TIES_ATTR in dst.attrs:
            del dst.attrs[TIES_ATTR]


def copy_structure(src: h5py.File, dst: h5py.File, rows: dict[str, Tensor]) -> set[str]:
    """Rebuild SRC in DST with the tensors of ROWS; return the names of the rows written."""
    import h5py
    from h5py import h5d, h5g

    written = set()
    copy_attrs(src["/"], dst["/"])
    for name, item in walk(src["/"]):
        if isinstance(item, h5g.GroupID):
            group = h5py.Group(item)
            copy_attrs(group, dst.create_group(name, track_order=tracks_order(group)))
        elif name in rows:
            dataset = src[name] if isinstance(item, (h5d.DatasetID, HardLinkTo)) else None
            write_tensor(dst, rows[name], dataset if isinstance(dataset, h5py.Dataset) else None)
            written.add(name)
        elif isinstance(item, HardLinkTo):
            if item.path in dst and item.path not in written:  # else a tensor, whose name here is gone
                dst[name] = dst[item.path]
        elif isinstance(item, h5py.SoftLink):  # within the file
            dst[name] = item
        elif not isinstance(item, (h5d.DatasetID, h5py.h5t.TypeID)) or (
            isinstance(item, h5d.DatasetID) and stored_elsewhere(item)
        ):  # reading refuses these: never carried into an output whose reader would follow them
            raise UsageError(f"refuses to copy {name!r}: it points outside the file")
        elif isinstance(item, h5d.DatasetID) and tensor_dtype(item, item.shape, file_offset(item)) is not None:
            continue  # a tensor whose row is gone
        else:
            src.copy(name, dst, name=name)  # a non-tensor dataset or a committed datatype
    return written


def copy_attrs(src: h5py.HLObject, dst: h5py.HLObject, skip: tuple[str, ...] = ()) -> None:
    for name in src.attrs:
        if name not in skip:
            dst.attrs.create(name, src.attrs[name], dtype=src.attrs.get_id(name).dtype)


def write_tensor(dst: h5py.File, t: Tensor, source: h5py.Dataset | None) -> None:
    """Write row T at its name; SOURCE is the dataset it was read from, whose attributes and
    chunking and compression are kept."""
    import h5py

    parent = dst["/"]
    *groups, leaf = t.name.split("/")
    if not leaf or "" in groups or "." in (*groups, leaf):
        raise UsageError(f"cannot write {t.name!r} to HDF5: a name is a path of non-empty parts split on '/'")
    for part in groups:
        if part not in parent:
            parent.create_group(part, track_order=tracks_order(parent))
        parent = parent[part]
        if not isinstance(parent, h5py.Group):
            raise UsageError(f"cannot write {t.name!r} to HDF5: {parent.name[1:]!r} is a dataset, not a group")
    if leaf in parent:
        raise UsageError(f"cannot write {t.name!r} to HDF5: the name is taken by a group or link")
    layout = {}  # scale-offset is left out: it is lossy, and these are new values
    if source is not None and source.chunks is not None and source.shape == t.shape:
        layout = dict(
            chunks=source.chunks,
            maxshape=source.maxshape,
            compression=source.compression,
            compression_opts=source.compression_opts,
            shuffle=source.shuffle,
            fletcher32=source.fletcher32,
        )
    ds = parent.create_dataset(leaf, data=t.array(), **layout)
    if source is not None:
        # a source `dtype` tag described the source's opaque type, not necessarily this one
        copy_attrs(source, ds, skip=("dtype",) if source.dtype.kind == "V" else ())
    if t.dtype in TAGGED:
        ds.attrs["dtype"] = t.dtype


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _accept(probe: Probe) -> bool:
    # HDF5 allows a user block of 512 * 2^n bytes before the superblock
    return any(probe.head[offset : offset + 8] == HDF5_MAGIC for offset in (0, 512, 1024, 2048, 4096))


def _losses(ckpt: Checkpoint, sharded: bool) -> list[str]:
    if ckpt.format == "keras":
        return ["writing the archive's model.weights.h5 only, without its config.json and metadata.json"]
    return [] if ckpt.format == "hdf5" else dropped_entries(ckpt, "hdf5")


def _fit_layout(ckpt: Checkpoint, target: str) -> Checkpoint:
    """Keras finds weights by their paths: a table from another Keras layout is rewritten into
    the one TARGET's loader expects, or refused (see keras_layouts)."""
    from paramctl.keras_layouts import fit_layout

    return fit_layout(ckpt, target, "hdf5")


register(
    Format(
        name="hdf5",
        description="Keras HDF5 (.h5, .weights.h5)",
        load=load,
        save=save,
        extensions=(".h5", ".hdf5"),
        accept=_accept,
        losses=_losses,
        entries=root_attributes,
        prepare=_fit_layout,
        layout="keras",
    )
)
