"""Zip archives (torch.save's format and .keras): members read in place when stored uncompressed."""

from __future__ import annotations

import functools
import struct
import zipfile
from typing import BinaryIO

from paramctl import remote
from paramctl.errors import FormatError
from paramctl.remote import open_path
from paramctl.table import Storage

ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError)


def member_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """File offset of a stored member's bytes (after its local header)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    if f.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise zipfile.BadZipFile(f"member {info.filename}: the local header names another file")
    return info.header_offset + 30 + name_len + extra_len


def zip_members(path: str) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """The archive and its members by name. Two members of one name are refused: readers
    disagree on which one counts (torch's reads the first, Python's zipfile the last)."""
    try:
        zf = zipfile.ZipFile(open_path(path))
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.filename in members:
                zf.close()
                raise FormatError(f"the archive holds two members named {info.filename!r}: ambiguous", path)
            members[info.filename] = info
        return zf, members
    except ZIP_ERRORS as e:
        raise FormatError(f"invalid zip archive: {e}", path) from None


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """A member's bytes, refused when the sizes its header claims exceed the archive (zipfile
    would allocate them first)."""
    archive = remote.size(path)
    if info.compress_size > archive or info.file_size > max(archive, 1) * 1032:  # deflate tops out near 1032:1
        raise FormatError(f"zip member {info.filename} claims {info.file_size} bytes", path)
    try:
        return zf.read(info)
    except ZIP_ERRORS as e:
        raise FormatError(f"invalid zip member {info.filename}: {e}", path) from None


def member_storage(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> Storage:
    """A storage over a zip member: a file region when stored, else decompressed on first read."""
    if info.compress_type == zipfile.ZIP_STORED:
        with open_path(path) as f:
            offset = member_offset(f, info)
        return Storage(info.file_size, path=path, offset=offset)
    return Storage(info.file_size, path=path, load=functools.partial(read_member, zf, info, path))
