"""The structure of an HDF5 file parsed from its bytes, without h5py: the fast path for listing.

Importing h5py takes a fifth of a second, and libhdf5 can loop for ever on a damaged file (so
`hdf5.py` runs it in a child with a deadline). What Keras and h5py write by default is a small
part of the format: a version 0-3 superblock; version 1 or 2 object headers; groups as a symbol
table (a v1 B-tree and a local heap), as link messages, or as links in a fractal heap indexed by
a v2 B-tree (a group tracking creation order past 8 links); datasets with a dataspace, an
integer, float, enum (h5py's bool), string or opaque type, and a contiguous, compact or chunked
layout; attributes holding text (fixed length, or in the global heap) or numbers. This module
reads exactly that, with every address and size checked against the image, every loop bounded
and every checksum verified, and gives the rows `hdf5.read_rows` would give. Anything else
(dense attribute storage, shared messages, compound and other types, newer layouts, anything
damaged) raises Unsupported, and the caller reads the file through h5py instead, which also
gives the authoritative error for a damaged file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

from paramctl.dtypes import itemsize
from paramctl.formats.hdf5 import (
    MAX_EMPTY_LISTS,
    TAGGED,
    TAGGED_SIZES,
    TIES_ATTR,
    H5Image,
    decoded_storage,
    empty_array,
    empty_lists,
    listed_weights,
    natural_key,
    ordered_rows,
)
from paramctl.table import Storage, Tensor, check_shape

SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_OBJECTS = 1 << 20  # object headers, B-tree nodes and messages: a bound on any loop

# message types
DATASPACE, LINK_INFO, DATATYPE, FILL_VALUE, LINK, EXTERNAL, LAYOUT = 0x01, 0x02, 0x03, 0x05, 0x06, 0x07, 0x08
ATTRIBUTE, CONTINUATION, SYMBOL_TABLE, ATTRIBUTE_INFO = 0x0C, 0x10, 0x11, 0x15
NEEDED = {DATASPACE, LINK_INFO, DATATYPE, FILL_VALUE, LINK, EXTERNAL, LAYOUT, ATTRIBUTE, SYMBOL_TABLE, ATTRIBUTE_INFO}
SHARED, DONT_SHARE, MARK_IF_UNKNOWN, WAS_UNKNOWN = 0x02, 0x04, 0x10, 0x20  # message flags
NAME_INDEX = 5  # v2 B-tree records: a group's link names (their hashes and heap IDs)
NOT_TENSORS = {3, 9, 10}  # datatype classes h5py reads as text, objects or subarrays

# (size, exponent location, exponent size, mantissa size, bias) of the IEEE types numpy has
IEEE_FLOATS = {
    (2, 10, 5, 10, 15): "float16",
    (4, 23, 8, 23, 127): "float32",
    (8, 52, 11, 52, 1023): "float64",
}
INTEGERS = {(1, True): "int8", (2, True): "int16", (4, True): "int32", (8, True): "int64"}
INTEGERS |= {(1, False): "uint8", (2, False): "uint16", (4, False): "uint32", (8, False): "uint64"}
STRUCT_CODES = dict(zip([*INTEGERS.values(), *IEEE_FLOATS.values(), "bool"], "bhiqBHIQefd?"))


class Unsupported(Exception):
    """The file needs h5py: it uses a feature this module does not read, or it is damaged."""


def read_rows(image: H5Image) -> list[Tensor]:
    """The rows `hdf5.read_rows(image)` gives, or Unsupported."""
    return parse(image, lambda reader: reader.rows())


def root_attributes(image: H5Image) -> dict[str, Any]:
    """What `hdf5.read_root_attributes(image)` gives (numbers and text), or Unsupported."""
    return parse(image, lambda reader: reader.attribute_values(reader.root))


def parse(image: H5Image, read: Callable[[Reader], Any]) -> Any:
    try:
        with mapped(image) as (data, start, size):
            return read(Reader(data, start, size, image))
    except (OSError, IndexError, ValueError, KeyError, OverflowError, RecursionError, struct.error) as e:
        raise Unsupported(f"{type(e).__name__}: {e}") from None


@contextmanager
def mapped(image: H5Image) -> Iterator[tuple[Any, int, int]]:
    """(bytes, start, size): the image's data, or its file memory-mapped and where it lies in it."""
    if image.data is not None:
        yield image.data, 0, len(image.data)
        return
    with open(image.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = image.size if image.size is not None else size - image.offset
        if length <= 0 or image.offset + length > size:
            raise Unsupported("the image is empty or lies beyond the end of the file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
            yield whole, image.offset, length


@dataclass
class Attribute:
    type: Datatype
    shape: tuple[int, ...] | None  # None: an empty (null) dataspace
    data: int  # where the values start in the image


@dataclass(frozen=True)
class Datatype:
    kind: int  # the HDF5 class: 0 integer, 1 float, 3 string, 5 opaque, 9 variable length, ...
    size: int
    dtype: str | None = None  # paramctl's name, for integers, floats and enums
    big_endian: bool = False
    vlen_string: bool = False


@dataclass
class Object:
    """What paramctl needs from one object header."""

    attributes: dict[str, Attribute]
    shape: tuple[int, ...] | None = None
    type: Datatype | None = None
    layout: tuple[int, int | None, int] | None = None  # (class, address or None, size)
    external: bool = False
    symbol_table: tuple[int, int] | None = None  # (B-tree, local heap): an old-style group
    link_info: bool = False  # a new-style group, whose links are messages
    links: list[tuple[str, int | None, int | None]] = field(default_factory=list)  # (name, address, order)
    dense_links: tuple[int, int] | None = None  # (fractal heap, name index): the links stored densely

    @property
    def is_group(self) -> bool:
        return self.symbol_table is not None or self.link_info


@dataclass(frozen=True)
class FractalHeap:
    """Where a fractal heap's managed objects lie: a doubling table of blocks, its root a direct
    block (no rows) or an indirect block of ROWS rows of WIDTH blocks."""

    offset_size: int  # bytes of an object's offset in a heap ID
    length_size: int  # bytes of its length
    width: int
    start_block: int  # the size of the blocks of rows 0 and 1; each later row doubles it
    direct_rows: int  # rows of direct blocks; deeper rows are indirect blocks (not read here)
    root: int
    rows: int
    checksummed: bool  # direct blocks end their header with a checksum

    def locate(self, reader: Reader, heap_id: bytes) -> int:
        """Where the managed object HEAP_ID names begins in the file."""
        if heap_id[0] & 0xF0:
            raise Unsupported("a huge or tiny heap object")  # only managed objects are read here
        offset = int.from_bytes(heap_id[1 : 1 + self.offset_size], "little")
        length = int.from_bytes(heap_id[1 + self.offset_size : 1 + self.offset_size + self.length_size], "little")
        block, start, size = self.root, 0, self.start_block
        if self.rows:  # find the row and column of the direct block holding OFFSET
            reader.signature(self.root, b"FHIB")
            entries = self.root + 5 + reader.offsets + self.offset_size
            reader.checksum(self.root, entries + self.rows * self.width * reader.offsets)
            row = 0
            while offset >= start + self.width * size:
                start, row = start + self.width * size, row + 1
                size = self.start_block << max(0, row - 1)
                if row >= min(self.rows, self.direct_rows):
                    raise Unsupported("a heap object beyond the direct blocks of the root")
            column = (offset - start) // size
            start += column * size
            block = reader.defined(entries + (row * self.width + column) * reader.offsets)
        reader.signature(block, b"FHDB")
        header = 5 + reader.offsets + self.offset_size + (4 if self.checksummed else 0)
        if self.checksummed and block not in reader.checked:  # over the block, its checksum zeroed
            image = bytearray(reader.raw(block, size))
            stored, image[header - 4 : header] = int.from_bytes(image[header - 4 : header], "little"), bytes(4)
            if lookup3(bytes(image)) != stored:
                raise Unsupported(f"the heap block at {block} fails its checksum")
            reader.checked.add(block)
        if reader.uint(block + 5 + reader.offsets, self.offset_size) != start or not (
            header <= offset - start and offset - start + length <= size
        ):
            raise Unsupported(f"heap object {offset} does not lie in its direct block")
        return block + offset - start


class Reader:
    """Reads the image of SIZE bytes at START in DATA (bytes, or a memory-mapped file: slicing
    either copies, so nothing holds the map open). Positions are in the image."""

    def __init__(self, data: Any, start: int, size: int, image: H5Image):
        self.data, self.start, self.size, self.image = data, start, size, image
        self.budget = MAX_OBJECTS
        self.heaps: dict[int, dict[int, bytes]] = {}
        self.checked: set[int] = set()  # heap blocks whose checksum holds
        self.base, self.root = self.superblock()

    # --- bytes ---------------------------------------------------------------------------------

    def spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise Unsupported("too many objects")

    def raw(self, pos: int, n: int) -> bytes:
        if pos < 0 or n < 0 or pos + n > self.size:
            raise Unsupported(f"{n} bytes at {pos} lie outside the file")
        return self.data[self.start + pos : self.start + pos + n]

    def uint(self, pos: int, n: int) -> int:
        return int.from_bytes(self.raw(pos, n), "little")

    def address(self, pos: int) -> int | None:
        """The address stored at POS, made absolute in the image; None if undefined."""
        raw = self.uint(pos, self.offsets)
        return None if raw == self.undefined else self.base + raw

    def defined(self, pos: int) -> int:
        found = self.address(pos)
        if found is None:
            raise Unsupported(f"undefined address at {pos}")
        return found

    def signature(self, pos: int, expected: bytes) -> None:
        if self.raw(pos, len(expected)) != expected:
            raise Unsupported(f"no {expected!r} at {pos}")

    # --- superblock ----------------------------------------------------------------------------

    def superblock(self) -> tuple[int, int]:
        """(base address, root object header address); the superblock may follow a user block."""
        at = 0
        while self.raw(at, 8) != SIGNATURE:
            at = 512 if at == 0 else at * 2
        version = self.uint(at + 8, 1)
        if version in (0, 1):
            self.offsets, self.lengths = self.uint(at + 13, 1), self.uint(at + 14, 1)
            self.check_sizes()
            if self.uint(at + 20, 4) & ~0x07 or not self.uint(at + 16, 2) or not self.uint(at + 18, 2):
                raise Unsupported("bad superblock flags or B-tree sizes")
            fields = at + (24 if version == 0 else 28)
            base = self.uint(fields, self.offsets)
            if self.uint(fields + self.offsets, self.offsets) != self.undefined:
                raise Unsupported("a superblock extension in a version 0 or 1 superblock")
            # the root group's symbol table entry: link name offset, then its object header
            root = self.uint(fields + 4 * self.offsets + self.offsets, self.offsets)
        elif version in (2, 3):
            self.offsets, self.lengths = self.uint(at + 9, 1), self.uint(at + 10, 1)
            self.check_sizes()
            base = self.uint(at + 12, self.offsets)
            if self.uint(at + 12 + self.offsets, self.offsets) != self.undefined:
                raise Unsupported("a superblock extension (shared messages) is not read here")
            root = self.uint(at + 12 + 3 * self.offsets, self.offsets)
            self.checksum(at, at + 12 + 4 * self.offsets)
        else:
            raise Unsupported(f"superblock version {version}")
        if base != at:
            raise Unsupported(f"base address {base} is not the superblock's {at}")
        return base, base + root

    def check_sizes(self) -> None:
        if self.offsets not in (2, 4, 8) or self.lengths not in (2, 4, 8):
            raise Unsupported("unusual sizes of offsets and lengths")
        # all ones: an undefined address, an unlimited dimension, the end of a free list
        self.undefined, self.unlimited = (1 << (8 * self.offsets)) - 1, (1 << (8 * self.lengths)) - 1

    # --- object headers ------------------------------------------------------------------------

    def messages(self, at: int) -> Iterator[tuple[int, int, int, int]]:
        """(type, flags, data position, size) of each message in the object header at AT."""
        if self.raw(at, 4) == b"OHDR":
            yield from self.messages_v2(at)
            return
        if self.uint(at, 1) != 1:
            raise Unsupported(f"no object header at {at}")
        blocks, seen = [(at + 16, self.uint(at + 8, 4))], {at}
        expected, count = self.uint(at + 2, 2), 0
        while blocks:
            pos, size = blocks.pop(0)
            end = pos + size
            self.raw(pos, size)
            while pos + 8 <= end:
                self.spend()
                kind, length, flags = self.uint(pos, 2), self.uint(pos + 2, 2), self.uint(pos + 4, 1)
                data = pos + 8
                if data + length > end or length % 8:
                    raise Unsupported(f"a message overruns its header block, or is not aligned, at {pos}")
                check_flags(flags)
                count += 1
                if kind == CONTINUATION:
                    blocks.append(self.continuation(data, seen))
                else:
                    yield kind, flags, data, length
                pos = data + length
            if pos != end:
                raise Unsupported(f"a gap in the object header at {at}")
        if count != expected:
            raise Unsupported(f"the object header at {at} holds {count} messages, not {expected}")

    def messages_v2(self, at: int) -> Iterator[tuple[int, int, int, int]]:
        if self.uint(at + 4, 1) != 2:
            raise Unsupported(f"object header version at {at}")
        flags = self.uint(at + 5, 1)
        pos = at + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        order = 2 if flags & 0x04 else 0  # each message carries its creation order
        blocks, seen = [(at, pos + width, pos + width + self.uint(pos, width))], {at}
        while blocks:
            start, pos, end = blocks.pop(0)  # the block from its signature, its messages, its checksum
            self.checksum(start, end)
            while pos + 4 + order <= end:
                self.spend()
                kind, length, mflags = self.uint(pos, 1), self.uint(pos + 1, 2), self.uint(pos + 3, 1)
                data = pos + 4 + order
                if data + length > end:
                    raise Unsupported(f"a message overruns its header block at {pos}")
                check_flags(mflags)
                if kind == CONTINUATION:
                    block, size = self.continuation(data, seen)
                    self.signature(block, b"OCHK")
                    blocks.append((block, block + 4, block + size - 4))
                else:
                    yield kind, mflags, data, length
                pos = data + length

    def checksum(self, start: int, end: int) -> None:
        """Check the lookup3 checksum stored at END of the bytes [START, END), as libhdf5 does."""
        if lookup3(self.raw(start, end - start)) != self.uint(end, 4):
            raise Unsupported(f"metadata at {start} fails its checksum")

    def check_fill_value(self, at: int) -> None:
        if self.uint(at, 1) not in (1, 2, 3):
            raise Unsupported(f"fill value message version at {at}")

    def continuation(self, data: int, seen: set[int]) -> tuple[int, int]:
        block, size = self.defined(data), self.uint(data + self.offsets, self.lengths)
        if block in seen:
            raise Unsupported("a continuation loop")
        seen.add(block)
        return block, size

    def object(self, at: int) -> Object:
        found = Object({})
        order = {}  # attribute name -> creation order, where the header keeps it
        tracked = self.raw(at, 4) == b"OHDR" and self.uint(at + 5, 1) & 0x04
        for kind, flags, data, length in self.messages(at):
            if kind not in NEEDED:
                continue
            if flags & SHARED:
                raise Unsupported(f"a shared message in the object at {at}")
            if kind == DATASPACE:
                found.shape = self.dataspace(data)
            elif kind == DATATYPE:
                found.type = self.datatype(data)
            elif kind == LAYOUT:
                found.layout = self.layout(data)
            elif kind == FILL_VALUE:
                self.check_fill_value(data)
            elif kind == EXTERNAL:
                found.external = True
            elif kind == SYMBOL_TABLE:
                found.symbol_table = (self.defined(data), self.defined(data + self.offsets))
            elif kind == LINK:
                found.links.append(self.link(data))
            elif kind == LINK_INFO:
                found.dense_links = self.link_info(data)
                found.link_info = True
            elif kind == ATTRIBUTE:
                name, attribute = self.attribute(data, length)
                found.attributes[name] = attribute
                order[name] = self.uint(data - 2, 2) if tracked else 0
            elif kind == ATTRIBUTE_INFO:
                self.attribute_info(data)
        # in the order h5py lists them: by creation order where it is tracked, else by name
        found.attributes = dict(sorted(found.attributes.items(), key=lambda a: (order[a[0]], a[0].encode())))
        return found

    # --- messages ------------------------------------------------------------------------------

    def dataspace(self, at: int) -> tuple[int, ...] | None:
        version, rank, flags = self.uint(at, 1), self.uint(at + 1, 1), self.uint(at + 2, 1)
        if version == 1:
            dims = at + 8
        elif version == 2:
            kind = self.uint(at + 3, 1)
            if kind == 2:
                return None  # null: no elements, not even a scalar
            dims = at + 4
        else:
            raise Unsupported(f"dataspace version {version}")
        if rank > 32:
            raise Unsupported(f"dataspace rank {rank}")
        shape = tuple(self.uint(dims + i * self.lengths, self.lengths) for i in range(rank))
        if flags & 1:  # maximum dimensions follow: libhdf5 refuses a file where one is exceeded
            limits = (self.uint(dims + (rank + i) * self.lengths, self.lengths) for i in range(rank))
            if any(n > limit != self.unlimited for n, limit in zip(shape, limits)):
                raise Unsupported("a dimension beyond its maximum")
        return shape

    def datatype(self, at: int) -> Datatype:
        head = self.uint(at, 1)
        kind, bits, size = head & 0x0F, self.uint(at + 1, 3), self.uint(at + 4, 4)
        if not 1 <= head >> 4 <= 4:
            raise Unsupported(f"datatype version {head >> 4}")
        props = at + 8
        if kind == 0:  # integer
            name = INTEGERS.get((size, bool(bits & 0x08)))
            if name is None or self.uint(props, 2) + self.uint(props + 2, 2) > 8 * size:
                raise Unsupported(f"a {size}-byte integer")
            return Datatype(kind, size, name, big_endian=bool(bits & 1))
        if kind == 1:  # float: IEEE only, either byte order
            if bits & 0x40:
                raise Unsupported("VAX float order")
            layout = (size, self.uint(props + 4, 1), self.uint(props + 5, 1), self.uint(props + 7, 1))
            name = IEEE_FLOATS.get((*layout, self.uint(props + 8, 4)))
            ieee = bits >> 8 & 0xFF == 8 * size - 1 and bits >> 4 & 3 == 2  # the sign last; an implied 1
            if name is None or not ieee or self.uint(props + 6, 1) != 0 or self.uint(props, 2) != 0:
                raise Unsupported(f"a non-IEEE {size}-byte float")
            return Datatype(kind, size, name, big_endian=bool(bits & 1))
        if kind == 8:
            return self.enum(head >> 4, bits & 0xFFFF, props)
        if kind == 9:  # a sequence, or a string, of a base type (which libhdf5 checks too)
            self.datatype(props)
            return Datatype(kind, size, vlen_string=bits & 0x0F == 1)
        if kind in (2, 4) and size not in (1, 2, 4, 8):  # time, bitfield
            raise Unsupported(f"a {size}-byte value of datatype class {kind}")
        if kind <= 10 and size <= self.size:  # string, opaque, array; time, bitfield, compound, reference
            return Datatype(kind, size)
        raise Unsupported(f"datatype class {kind}")

    def enum(self, version: int, count: int, props: int) -> Datatype:
        """An enum of integers, which h5py reads as its integer type; or as bool, the enum
        {FALSE: 0, TRUE: 1} that h5py writes numpy's bools as."""
        base = self.datatype(props)
        if base.kind != 0 or base.dtype is None:
            raise Unsupported("an enum of other than integers")
        pos, names = props + 12, []  # after the base type: a fixed-point type is 12 bytes
        for _ in range(count):
            self.spend()
            end = self.raw(pos, min(256, self.size - pos)).find(b"\0")
            if end < 0:
                raise Unsupported("an enum member name without its end")
            names.append(self.raw(pos, end))
            pos += end + 1 if version >= 3 else -(-(end + 1) // 8) * 8  # versions 1, 2 pad to 8 bytes
        raw = self.raw(pos, count * base.size)
        values = [
            int.from_bytes(raw[i : i + base.size], "big" if base.big_endian else "little")
            for i in range(0, len(raw), base.size)
        ]
        boolean = dict(zip(names, values)) == {b"FALSE": 0, b"TRUE": 1}
        return Datatype(8, base.size, "bool" if boolean else base.dtype, big_endian=base.big_endian)

    def layout(self, at: int) -> tuple[int, int | None, int]:
        version = self.uint(at, 1)
        if version in (3, 4):
            kind = self.uint(at + 1, 1)
            if kind > 3:
                raise Unsupported(f"layout class {kind}")
            if kind == 1:
                return kind, self.address(at + 2), self.uint(at + 2 + self.offsets, self.lengths)
            if kind == 0:  # compact: values in the header
                return kind, None, self.uint(at + 2, 2)
            return kind, None, 0  # chunked or virtual
        if version in (1, 2):
            kind = self.uint(at + 2, 1)
            if kind == 1:
                return kind, self.address(at + 8), 0
            return kind, None, 0
        raise Unsupported(f"layout version {version}")

    def link(self, at: int) -> tuple[str, int | None, int | None]:
        """(name, address of a hard link's object or None, creation order or None)."""
        if self.uint(at, 1) != 1:
            raise Unsupported("link message version")
        flags, pos = self.uint(at + 1, 1), at + 2
        kind = 0
        if flags & 0x08:
            kind, pos = self.uint(pos, 1), pos + 1
        order = None
        if flags & 0x04:
            order, pos = self.uint(pos, 8), pos + 8
        if flags & 0x10:
            pos += 1  # the name's character set: h5py gives the bytes either way
        width = 1 << (flags & 3)
        length, pos = self.uint(pos, width), pos + width
        name = self.text(self.raw(pos, length))
        if kind not in (0, 1):  # an external or user-defined link: h5py's reading refuses it
            raise Unsupported(f"link {name!r} of type {kind}")
        return name, self.defined(pos + length) if kind == 0 else None, order

    def link_info(self, at: int) -> tuple[int, int] | None:
        """(fractal heap, v2 B-tree of names) where a group's links are stored densely, else None."""
        heap = at + 2 + (8 if self.uint(at + 1, 1) & 1 else 0)
        if self.address(heap) is None:
            return None
        return self.defined(heap), self.defined(heap + self.offsets)

    def attribute_info(self, at: int) -> None:
        flags = self.uint(at + 1, 1)
        heap = at + 2 + (2 if flags & 1 else 0)
        if self.address(heap) is not None:
            raise Unsupported("dense attribute storage")

    def attribute(self, at: int, length: int) -> tuple[str, Attribute]:
        version = self.uint(at, 1)
        name_size, type_size, space_size = self.uint(at + 2, 2), self.uint(at + 4, 2), self.uint(at + 6, 2)
        if version == 1:
            pad = lambda n: -(-n // 8) * 8  # noqa: E731 - fields are padded to 8 bytes
            pos = at + 8
        elif version in (2, 3):
            pad = lambda n: n  # noqa: E731
            pos = at + 8 + (1 if version == 3 else 0)
        else:
            raise Unsupported(f"attribute version {version}")
        if version >= 2 and self.uint(at + 1, 1) & 0x03:
            raise Unsupported("an attribute with a shared type or dataspace")
        name = self.text(self.raw(pos, name_size)).rstrip("\0")
        pos += pad(name_size)
        datatype = self.datatype(pos)
        pos += pad(type_size)
        shape = self.dataspace(pos)
        pos += pad(space_size)
        if pos + (math.prod(shape) if shape is not None else 0) * datatype.size > at + length:
            raise Unsupported(f"attribute {name!r} overruns its message")
        return name, Attribute(datatype, shape, pos)

    @staticmethod
    def text(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Unsupported("a name that is not UTF-8") from None

    # --- groups --------------------------------------------------------------------------------

    def links(self, group: Object) -> list[tuple[str, int | None]]:
        """A group's links as (name, address or None), in the order `hdf5.links_of` gives."""
        found: list[tuple[str, int | None, int | None]]
        if group.symbol_table is not None:
            found = [(name, address, None) for name, address in self.symbol_table(*group.symbol_table)]
        elif group.dense_links is not None:
            heap = self.fractal_heap(group.dense_links[0])
            names = self.btree_records(group.dense_links[1], NAME_INDEX)
            found = [self.link(heap.locate(self, record[4:])) for record in names]  # (hash, heap ID)
        else:
            found = list(group.links)
        if any(name in ("", ".") or "/" in name for name, _, _ in found):
            raise Unsupported("a link name libhdf5 would refuse or resolve elsewhere")
        found.sort(key=lambda link: link[0].encode())
        if found and all(order is not None for _, _, order in found):
            found.sort(key=lambda link: link[2] or 0)
        else:
            found.sort(key=lambda link: natural_key(link[0]))
        return [(name, address) for name, address, _ in found]

    def symbol_table(self, tree: int, heap: int) -> Iterator[tuple[str, int | None]]:
        self.signature(heap, b"HEAP")
        if self.uint(heap + 4, 1) != 0:
            raise Unsupported(f"local heap version at {heap}")
        heap_size = self.uint(heap + 8, self.lengths)
        heap_data = self.defined(heap + 8 + 2 * self.lengths)
        names = self.raw(heap_data, heap_size)
        self.check_free_list(names, self.uint(heap + 8 + self.lengths, self.lengths))
        entry = 2 * self.offsets + 24
        last = b""  # names are in strictly increasing order: libhdf5 finds them by binary search
        for node in self.leaves(tree, heap_size):
            self.signature(node, b"SNOD")
            if self.uint(node + 4, 1) != 1:
                raise Unsupported(f"symbol table node version at {node}")
            count = self.uint(node + 6, 2)
            for i in range(count):
                pos = node + 8 + i * entry
                start = self.uint(pos, self.offsets)
                end = names.find(b"\0", start) - start if start < heap_size else -1
                if end < 0:
                    raise Unsupported("a link name outside its heap")
                cache = self.uint(pos + 2 * self.offsets, 4)
                if cache > 2:
                    raise Unsupported(f"symbol table entry cache type {cache}")
                address = None if cache == 2 else self.defined(pos + self.offsets)  # 2: a soft link
                name = names[start : start + end]
                if name <= last:
                    raise Unsupported("symbol table names out of order")
                last = name
                yield self.text(name), address

    # --- dense storage: a fractal heap of messages, found through a v2 B-tree -----------------

    def fractal_heap(self, at: int) -> FractalHeap:
        self.signature(at, b"FRHP")
        if self.uint(at + 4, 1) != 0 or self.uint(at + 7, 2):
            raise Unsupported(f"a fractal heap of another version, or filtered, at {at}")
        flags, max_object = self.uint(at + 9, 1), self.uint(at + 10, 4)
        pos = at + 14 + 10 * self.lengths + 2 * self.offsets  # sizes and counts paramctl does not need
        width, start_block = self.uint(pos, 2), self.uint(pos + 2, self.lengths)
        pos += 2 + self.lengths
        max_direct, heap_bits = self.uint(pos, self.lengths), self.uint(pos + self.lengths, 2)
        pos += self.lengths + 4  # and the starting number of rows in the root indirect block
        root, rows = self.address(pos), self.uint(pos + self.offsets, 2)
        self.checksum(at, pos + self.offsets + 2)
        if root is None or not width or not is_power_of_2(start_block) or not is_power_of_2(max_direct):
            raise Unsupported(f"a fractal heap without blocks, or with odd block sizes, at {at}")
        return FractalHeap(
            offset_size=(heap_bits + 7) // 8,
            length_size=(min(max_direct, max_object).bit_length() - 1 + 7) // 8,
            width=width,
            start_block=start_block,
            direct_rows=max_direct.bit_length() - start_block.bit_length() + 2,
            root=root,
            rows=rows,
            checksummed=bool(flags & 2),
        )

    def btree_records(self, at: int, kind: int) -> list[bytes]:
        """Every record of the v2 B-tree at AT, whose records are of type KIND."""
        self.signature(at, b"BTHD")
        if self.uint(at + 4, 1) != 0 or self.uint(at + 5, 1) != kind:
            raise Unsupported(f"a v2 B-tree of another version or type at {at}")
        node_size, size, depth = self.uint(at + 6, 4), self.uint(at + 10, 2), self.uint(at + 12, 2)
        root, root_records = self.address(at + 16), self.uint(at + 16 + self.offsets, 2)
        total = self.uint(at + 18 + self.offsets, self.lengths)
        self.checksum(at, at + 18 + self.offsets + self.lengths)
        if root is None:
            return []
        if not size or depth > 32 or node_size > self.size:
            raise Unsupported(f"a v2 B-tree with odd sizes at {at}")
        # the widths of a child pointer's counts, as libhdf5 derives them from the node size
        leaf_records = (node_size - 10) // size
        count_size = encoded_size(leaf_records)
        most = [leaf_records]  # the most records under a node of each depth
        pointer = [0]  # the size of a pointer to a child from a node of each depth
        for d in range(1, depth + 1):
            pointer.append(self.offsets + count_size + (encoded_size(most[d - 1]) if d > 1 else 0))
            fit = (node_size - 10 - pointer[d]) // (size + pointer[d])
            most.append((fit + 1) * most[d - 1] + fit)
        records: list[bytes] = []
        stack = [(root, depth, root_records)]
        while stack:
            node, d, count = stack.pop()
            self.spend()
            self.signature(node, b"BTIN" if d else b"BTLF")
            if self.uint(node + 4, 1) != 0 or self.uint(node + 5, 1) != kind:
                raise Unsupported(f"a v2 B-tree node of another version or type at {node}")
            end = node + 6 + count * size
            records += [self.raw(node + 6 + i * size, size) for i in range(count)]
            for i in range(count + 1 if d else 0):
                child = end + i * pointer[d]
                stack.append((self.defined(child), d - 1, self.uint(child + self.offsets, count_size)))
            self.checksum(node, end + (count + 1) * pointer[d] if d else end)
            if len(records) > total:
                break
        if len(records) != total:
            raise Unsupported(f"a v2 B-tree holding other than its {total} records at {at}")
        return records

    def check_free_list(self, heap: bytes, block: int) -> None:
        """Each free block of a local heap: (next block, size) within the heap, as libhdf5 checks."""
        seen = set()
        while block not in (1, self.unlimited):  # the two spellings of "none"
            if block in seen or block + 2 * self.lengths > len(heap):
                raise Unsupported("bad heap free list")
            seen.add(block)
            size = int.from_bytes(heap[block + self.lengths : block + 2 * self.lengths], "little")
            if block + size > len(heap):
                raise Unsupported("bad heap free list")
            block = int.from_bytes(heap[block : block + self.lengths], "little")

    def leaves(self, root: int, heap_size: int) -> list[int]:
        """The symbol table nodes a group's v1 B-tree leads to; its keys are offsets of names in
        the group's local heap (of HEAP_SIZE bytes)."""
        found, stack, seen = [], [root], set()
        while stack:
            node = stack.pop()
            if node in seen:
                raise Unsupported("a B-tree loop")
            seen.add(node)
            self.spend()
            self.signature(node, b"TREE")
            if self.uint(node + 4, 1) != 0:
                raise Unsupported("not a group B-tree")
            level, entries = self.uint(node + 5, 1), self.uint(node + 6, 2)
            first = node + 8 + 2 * self.offsets
            step = self.lengths + self.offsets
            children = [self.defined(first + self.lengths + i * step) for i in range(entries)]
            if any(self.uint(first + i * step, self.lengths) >= heap_size for i in range(entries + 1)):
                raise Unsupported("a B-tree key outside the group's heap")
            if level == 0:
                found += children
            else:
                stack += reversed(children)
        return found

    # --- values --------------------------------------------------------------------------------

    def strings(self, attribute: Attribute) -> list[str] | str | None:
        """A string attribute's value: a list for an array, a str for a scalar; None for any other."""
        kind, shape = attribute.type, attribute.shape
        if shape is None or (kind.kind != 3 and not kind.vlen_string):
            return None
        count = math.prod(shape)
        if count * max(kind.size, 1) > self.size:
            raise Unsupported("an attribute larger than the file")
        values = [self.string(kind, attribute.data + i * kind.size) for i in range(count)]
        return values if shape else values[0]

    def attribute_values(self, at: int) -> dict[str, Any]:
        """The attributes of the object at AT as h5py and `hdf5.plain` give them: text, numbers,
        nested lists for arrays."""
        return {name: self.value(attribute) for name, attribute in self.object(at).attributes.items()}

    def value(self, attribute: Attribute) -> Any:
        shape, kind = attribute.shape, attribute.type
        if shape is None:
            raise Unsupported("an empty attribute")  # h5py gives an Empty object
        if math.prod(shape) == 0 and empty_lists(shape) > MAX_EMPTY_LISTS:
            return empty_array(shape)  # as hdf5.plain: not 2**40 empty lists
        text = self.strings(attribute)
        if text is not None:
            flat = text if isinstance(text, list) else [text]
        elif kind.dtype is not None:
            count = math.prod(shape)
            raw = self.raw(attribute.data, count * kind.size)
            flat = list(struct.unpack(f"{'>' if kind.big_endian else '<'}{count}{STRUCT_CODES[kind.dtype]}", raw))
        else:
            raise Unsupported(f"an attribute of datatype class {kind.kind}")
        return nested(flat, shape) if shape else flat[0]

    def string(self, kind: Datatype, at: int) -> str:
        if kind.kind == 3:
            raw = self.raw(at, kind.size).rstrip(b"\0")
        else:  # length, then the global heap collection and the object's index in it
            raw = self.heap_object(self.defined(at + 4), self.uint(at + 4 + self.offsets, 4))
            if len(raw) != self.uint(at, 4):
                raise Unsupported("a global heap object of another size than its reference says")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Unsupported("a string attribute that is not UTF-8") from None

    def heap_object(self, collection: int, index: int) -> bytes:
        if collection not in self.heaps:
            self.heaps[collection] = self.global_heap(collection)
        try:
            return self.heaps[collection][index]
        except KeyError:
            raise Unsupported(f"no object {index} in the global heap at {collection}") from None

    def global_heap(self, at: int) -> dict[int, bytes]:
        self.signature(at, b"GCOL")
        end = at + self.uint(at + 8, self.lengths)
        self.raw(at, end - at)
        header = -(-(8 + self.lengths) // 8) * 8  # the collection's header and each object's, 8-aligned
        objects, pos = {}, at + header
        while pos + header <= end:
            self.spend()
            index, size = self.uint(pos, 2), self.uint(pos + 8, self.lengths)
            if index == 0:  # free space: the rest of the collection
                break
            data = pos + header
            objects[index] = self.raw(data, size)
            pos = data + -(-size // 8) * 8
        return objects

    # --- rows ----------------------------------------------------------------------------------

    def rows(self) -> list[Tensor]:
        """As `hdf5.read_rows`: every numeric dataset, hard links as ties, in Keras's listed order."""
        rows: dict[str, Tensor] = {}
        root = self.object(self.root)
        groups = {"": root}
        first: dict[int, str] = {}  # object address -> the path it was first reached by (as h5py's walk)
        stack = [("", iter(self.links(root)))]
        while stack:
            prefix, links = stack[-1]
            link = next(links, None)
            if link is None:
                stack.pop()
                continue
            name, address = link
            path = prefix + name
            if address is None:
                continue  # a soft or external link: never followed
            if address in first:
                if first[address] in rows:
                    same = rows[first[address]]
                    rows[path] = Tensor(path, same.shape, same.dtype, same.storage)
                continue
            first[address] = path
            self.spend()
            found = self.object(address)
            if found.is_group:
                if found.attributes:
                    groups[path] = found
                stack.append((path + "/", iter(self.links(found))))
            elif found.layout is not None:
                row = self.dataset_tensor(found, path)
                if row is not None:
                    rows[path] = row
            elif found.type is None:
                raise Unsupported(f"object {path!r} is neither a group, a dataset nor a datatype")
        ties = root.attributes.get(TIES_ATTR)
        return ordered_rows(rows, list(listed_weights(groups, self.attr_list)), self.strings(ties) if ties else None)

    def dataset_tensor(self, ds: Object, name: str) -> Tensor | None:
        """As `hdf5.dataset_tensor`."""
        assert ds.layout is not None
        if ds.type is None:
            raise Unsupported(f"dataset {name!r} has no datatype")
        kind, address, size = ds.layout
        offset = address if kind == 1 else None
        if ds.external or kind == 3:  # values in other files, which h5py would read: it says how
            raise Unsupported(f"dataset {name!r} has external storage or is virtual")
        if ds.shape is None:
            return None
        dtype = self.tensor_dtype(ds)
        if dtype is None:
            return None
        check_shape(name, ds.shape, self.image.path)
        nbytes = math.prod(ds.shape) * itemsize(dtype)
        image = self.image
        if offset is None or ds.type.big_endian:  # h5py decodes chunks, fill values, byte order
            storage = decoded_storage(image, name, nbytes, stored=offset is not None)
        elif offset + nbytes > self.size or size not in (0, nbytes):
            raise Unsupported(f"dataset {name!r} lies beyond the end of the file")  # h5py says how
        elif image.data is not None:  # a decompressed .keras member: the values are in memory already
            storage = Storage(nbytes, path=image.path, buffer=memoryview(image.data)[offset : offset + nbytes])
        else:
            storage = Storage(nbytes, path=image.path, offset=image.offset + offset)
        return Tensor(name, ds.shape, dtype, storage)

    def tensor_dtype(self, ds: Object) -> str | None:
        kind = ds.type
        assert kind is not None
        if kind.kind in NOT_TENSORS:
            return None
        if kind.dtype is None and kind.kind != 5:
            raise Unsupported(f"datatype class {kind.kind}")  # complex (compound), time, bitfield, reference
        if kind.kind == 5:  # opaque: a tensor only when tagged with a dtype of its size
            tag = ds.attributes.get("dtype") if kind.size in TAGGED_SIZES else None
            value = self.strings(tag) if tag is not None else None
            return value if isinstance(value, str) and value in TAGGED and itemsize(value) == kind.size else None
        return kind.dtype

    def attr_list(self, group: Object, name: str) -> list[str]:
        """As `hdf5.attr_list`: NAME, or NAME0, NAME1, ... when Keras split a large list."""
        attrs = group.attributes
        split = (f"{name}{i}" for i in range(len(attrs)))
        keys = [name] if name in attrs else takewhile(attrs.__contains__, split)
        values: list[str] = []
        for key in keys:
            attribute = attrs[key]
            value = self.strings(attribute)
            if value is None and attribute.shape and math.prod(attribute.shape):
                raise Unsupported(f"attribute {key!r} is not text")  # h5py would list its numbers
            if isinstance(value, list):
                values += value
        return values


def check_flags(flags: int) -> None:
    """libhdf5 refuses these combinations of message flags."""
    if (flags & SHARED and flags & DONT_SHARE) or (flags & WAS_UNKNOWN and not flags & MARK_IF_UNKNOWN):
        raise Unsupported(f"bad message flags {flags:#x}")


M32 = 0xFFFFFFFF


def lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 `hashlittle` with seed 0: the checksum of HDF5's newer metadata.
    Unrolled and inlined: it runs over every object header of a newer file."""
    a = b = c = (0xDEADBEEF + len(data)) & M32
    if not data:
        return c
    padded = data + bytes(-len(data) % 12)  # the tail, zero-padded, adds what its bytes add
    words = struct.unpack(f"<{len(padded) // 4}I", padded)
    last = (len(data) - 1) // 12 * 3  # the last block is finalized, every other one mixed
    for i in range(0, last, 3):
        a = (a + words[i]) & M32
        b = (b + words[i + 1]) & M32
        c = (c + words[i + 2]) & M32
        a = ((a - c) & M32) ^ ((c << 4 | c >> 28) & M32)
        c = (c + b) & M32
        b = ((b - a) & M32) ^ ((a << 6 | a >> 26) & M32)
        a = (a + c) & M32
        c = ((c - b) & M32) ^ ((b << 8 | b >> 24) & M32)
        b = (b + a) & M32
        a = ((a - c) & M32) ^ ((c << 16 | c >> 16) & M32)
        c = (c + b) & M32
        b = ((b - a) & M32) ^ ((a << 19 | a >> 13) & M32)
        a = (a + c) & M32
        c = ((c - b) & M32) ^ ((b << 4 | b >> 28) & M32)
        b = (b + a) & M32
    a = (a + words[last]) & M32
    b = (b + words[last + 1]) & M32
    c = (c + words[last + 2]) & M32
    c = ((c ^ b) - ((b << 14 | b >> 18) & M32)) & M32
    a = ((a ^ c) - ((c << 11 | c >> 21) & M32)) & M32
    b = ((b ^ a) - ((a << 25 | a >> 7) & M32)) & M32
    c = ((c ^ b) - ((b << 16 | b >> 16) & M32)) & M32
    a = ((a ^ c) - ((c << 4 | c >> 28) & M32)) & M32
    b = ((b ^ a) - ((a << 14 | a >> 18) & M32)) & M32
    return ((c ^ b) - ((b << 24 | b >> 8) & M32)) & M32


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def encoded_size(n: int) -> int:
    """Bytes libhdf5 gives a count of at most N (in v2 B-tree nodes)."""
    return (n.bit_length() - 1) // 8 + 1 if n else 1


def nested(flat: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """FLAT (C order) as nested lists of SHAPE, as numpy's `tolist` gives them."""
    if len(shape) <= 1:
        return flat
    step = math.prod(shape[1:])
    return [nested(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
