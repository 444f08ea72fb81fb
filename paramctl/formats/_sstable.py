"""The pieces of a TensorFlow tensor bundle below the bundle itself: CRC32C, protobuf wire format
and the SSTable (LevelDB table) that `PREFIX.index` is.

See FORMATS.md part two, section 2. Everything read is bounds-checked and any violation is a
FormatError; callers add the file name. CRC32C is table-driven pure Python for small inputs
(index blocks) and, for tensor data, numpy over many lanes at once (see `crc_update`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from paramctl.errors import FormatError

MAGIC = 0xDB4775248B80FB57  # the SSTable footer's last 8 bytes, little-endian
FOOTER = 48
BLOCK_TRAILER = 5  # type byte + masked crc32c
BLOCK_SIZE = 262144  # TF cuts data blocks at this many bytes (table options block_size)
RESTART_INTERVAL = 16
KEY_EXPANSION = 16  # the prefix-compressed keys of a table may expand to at most this many times its size

# --- CRC32C (Castagnoli), reflected, as TF/LevelDB compute it ---------------------------------

POLY = 0x82F63B78
MASK_DELTA = 0xA282EAD8


def _byte_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _byte_table()
NUMPY_THRESHOLD = 1 << 16  # below this, the byte loop beats numpy's set-up


def crc_update(register: int, data: bytes | bytearray | memoryview) -> int:
    """The raw CRC32C register after feeding DATA (start from 0xFFFFFFFF; finish with ^ 0xFFFFFFFF)."""
    if len(data) >= NUMPY_THRESHOLD:
        return _update_lanes(register, memoryview(data).cast("B"))
    table = TABLE
    for b in bytes(data):
        register = table[(register ^ b) & 0xFF] ^ (register >> 8)
    return register


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return crc_update(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB's masked CRC (stored so that a CRC of data holding CRCs is not degenerate)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


def _update_lanes(register: int, data: memoryview) -> int:
    """crc_update over many equal lanes at once with numpy (4 bytes per step, slicing-by-4), the
    lanes' registers then folded together with "advance over N zero bytes" operators: CRC is
    linear, so crc(A + B) = advance_len(B)(crc(A)) ^ crc0(B)."""
    import numpy as np

    n = len(data)
    lanes = 1 << min(16, max(0, (n // 64).bit_length() - 1))
    width = (n // lanes) & ~3  # bytes per lane, a multiple of 4
    body = lanes * width
    t0, t1, t2, t3 = _slicing_tables()
    take = np.take  # faster than fancy indexing
    words = np.frombuffer(data, "<u4", count=body // 4).reshape(lanes, width // 4).T.copy()
    regs = np.zeros(lanes, np.uint32)
    for column in words:
        regs ^= column
        regs = (
            take(t3, regs & 0xFF) ^ take(t2, (regs >> 8) & 0xFF) ^ take(t1, (regs >> 16) & 0xFF) ^ take(t0, regs >> 24)
        )
    step = width
    while len(regs) > 1:  # fold neighbours: left advanced over the right lane's bytes
        regs = _advance_array(regs[0::2], step) ^ regs[1::2]
        step *= 2
    folded = _advance(register, body) ^ int(regs[0])
    return crc_update(folded, data[body:])


@cache
def _slicing_tables() -> tuple[Any, Any, Any, Any]:
    import numpy as np

    t = [np.array(TABLE, np.uint32)]
    for _ in range(3):
        prev = t[-1]
        t.append((prev >> 8) ^ t[0][prev & 0xFF])
    return t[0], t[1], t[2], t[3]


def _apply(operator: tuple[int, ...], value: int) -> int:
    out, bit = 0, 0
    while value:
        if value & 1:
            out ^= operator[bit]
        value >>= 1
        bit += 1
    return out


_ONE_ZERO = tuple(TABLE[(1 << bit) & 0xFF] ^ ((1 << bit) >> 8) for bit in range(32))


@cache
def _zeros_operator(count: int) -> tuple[int, ...]:
    """The linear map on the 32-bit register that feeding COUNT zero bytes performs, as the
    images of the 32 unit vectors (by halving: log(count) compositions, each cached)."""
    if count <= 1:
        return _ONE_ZERO if count else tuple(1 << bit for bit in range(32))
    half = _zeros_operator(count // 2)
    op = tuple(_apply(half, v) for v in half)
    return tuple(_apply(_ONE_ZERO, v) for v in op) if count & 1 else op


def _advance(register: int, count: int) -> int:
    return _apply(_zeros_operator(count), register)


@cache
def _advance_tables(count: int) -> Any:
    import numpy as np

    op = _zeros_operator(count)
    return np.array([[_apply(op, i << (8 * k)) for i in range(256)] for k in range(4)], np.uint32)


def _advance_array(regs: Any, count: int) -> Any:
    t = _advance_tables(count)
    return t[0][regs & 0xFF] ^ t[1][(regs >> 8) & 0xFF] ^ t[2][(regs >> 16) & 0xFF] ^ t[3][regs >> 24]


# --- protobuf wire format ------------------------------------------------------------------


def read_varint(buf: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """The varint at POS and the position after it."""
    end = len(buf) if end is None else end
    result = shift = 0
    while True:
        if pos >= end:
            raise FormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise FormatError("varint longer than 10 bytes")


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


Field = tuple[int, int, Any]  # (number, wire type, value: int for varint/fixed, bytes for length-delimited)


def fields(buf: bytes | memoryview) -> list[Field]:
    """The fields of a protobuf message, in order (unknown fields included)."""
    out: list[Field] = []
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        value: Any
        if number == 0:
            raise FormatError("protobuf field number 0")
        if wire == 0:
            value, pos = read_varint(buf, pos, end)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise FormatError("truncated protobuf fixed-width field")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire == 2:
            size, pos = read_varint(buf, pos, end)
            if pos + size > end:
                raise FormatError("protobuf field runs past its message")
            value = bytes(buf[pos : pos + size])
            pos += size
        else:
            raise FormatError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def encode(message: list[Field]) -> bytes:
    """The wire bytes of FIELDS (the inverse of `fields`)."""
    out = bytearray()
    for number, wire, value in message:
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(value)
        elif wire == 1:
            out += value.to_bytes(8, "little")
        elif wire == 5:
            out += value.to_bytes(4, "little")
        else:
            out += varint(len(value)) + value
    return bytes(out)


def signed64(value: int) -> int:
    """A varint read as int64 (negative numbers are 10-byte two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


# --- SSTable -------------------------------------------------------------------------------


def read_table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) entries of an SSTable held in DATA, in order, every block's CRC checked."""
    if len(data) < FOOTER or int.from_bytes(data[-8:], "little") != MAGIC:
        raise FormatError("not an SSTable: no table magic at its end")
    footer = data[-FOOTER:]
    _, pos = _handle(footer, 0)
    index_handle, _ = _handle(footer, pos)
    limit = len(data) - FOOTER
    budget = KEY_EXPANSION * len(data) + (1 << 20)  # shared prefixes let keys outgrow the file
    for _, handle in _block_entries(_block(data, index_handle, limit, "index")):
        inner, end = _handle(handle, 0)
        if end != len(handle):
            raise FormatError("index entry is not a block handle")
        for key, value in _block_entries(_block(data, inner, limit, "data")):
            budget -= len(key)
            if budget < 0:
                raise FormatError(f"keys add up to more than {KEY_EXPANSION} times the table's size; refused")
            yield key, value


def _handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return (offset, size), pos


def _block(data: bytes, handle: tuple[int, int], limit: int, what: str) -> memoryview:
    offset, size = handle
    if offset + size + BLOCK_TRAILER > limit:
        raise FormatError(f"{what} block at {offset} (+{size}) runs past the table")
    contents = memoryview(data)[offset : offset + size + 1]
    kind = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
    if mask(crc32c(contents)) != stored:
        raise FormatError(f"{what} block at byte {offset}: checksum mismatch")
    if kind == 1:
        raise FormatError(f"{what} block at byte {offset} is snappy-compressed, which paramctl does not read")
    if kind != 0:
        raise FormatError(f"{what} block at byte {offset} has unknown compression type {kind}")
    return contents[:size]


def _block_entries(block: memoryview) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise FormatError("block shorter than its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    if restarts * 4 + 4 > len(block):
        raise FormatError("block restart array runs past the block")
    end = len(block) - 4 - 4 * restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = read_varint(block, pos, end)
        unshared, pos = read_varint(block, pos, end)
        size, pos = read_varint(block, pos, end)
        if shared > len(key) or pos + unshared + size > end:
            raise FormatError("block entry runs past its block")
        key = key[:shared] + bytes(block[pos : pos + unshared])
        pos += unshared
        yield key, bytes(block[pos : pos + size])
        pos += size


class TableWriter:
    """Builds an SSTable in memory, as TF's table builder does without compression: data blocks
    cut at BLOCK_SIZE, keys prefix-compressed with a restart every RESTART_INTERVAL entries, an
    empty metaindex, an index naming each data block by its last key, the footer."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.index: list[tuple[bytes, bytes]] = []
        self.block: list[tuple[bytes, bytes]] = []
        self.block_bytes = 0

    def add(self, key: bytes, value: bytes) -> None:
        self.block.append((key, value))
        self.block_bytes += len(key) + len(value) + 6
        if self.block_bytes >= BLOCK_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self.block:
            handle = self._write_block(self.block, RESTART_INTERVAL)
            self.index.append((self.block[-1][0], handle))
            self.block, self.block_bytes = [], 0

    def _write_block(self, entries: list[tuple[bytes, bytes]], interval: int) -> bytes:
        body, restarts, last = bytearray(), [], b""
        for i, (key, value) in enumerate(entries):
            shared = 0
            if i % interval == 0:
                restarts.append(len(body))
            else:
                while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                    shared += 1
            body += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
            last = key
        restarts = restarts or [0]
        for r in restarts:
            body += r.to_bytes(4, "little")
        body += len(restarts).to_bytes(4, "little")
        offset = len(self.out)
        self.out += body + b"\x00" + mask(crc32c(bytes(body) + b"\x00")).to_bytes(4, "little")
        return varint(offset) + varint(len(body))

    def finish(self) -> bytes:
        self._flush()
        metaindex = self._write_block([], RESTART_INTERVAL)
        index = self._write_block(self.index, 1)
        footer = metaindex + index
        self.out += footer + b"\x00" * (40 - len(footer)) + MAGIC.to_bytes(8, "little")
        return bytes(self.out)
