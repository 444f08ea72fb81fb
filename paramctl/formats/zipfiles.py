"""Zip archives (torch.save's format and .keras): members read in place when stored uncompressed."""

from __future__ import annotations

import os
import struct
import zipfile
from typing import IO, BinaryIO

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
        f = open_path(path)
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
        if end and (end[zipfile._ECD_DISK_NUMBER] or end[zipfile._ECD_DISK_START]):  # type: ignore[attr-defined]
            f.close()  # torch's reader refuses an archive spanning disks; zipfile reads it
            raise FormatError("a zip archive that claims to span several disks", path)
        zf = zipfile.ZipFile(f)
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.filename in members:
                zf.close()
                raise FormatError(f"the archive holds two members named {info.filename!r}: ambiguous", path)
            if info.external_attr & 0x10 and not info.filename.endswith("/"):  # MS-DOS directory bit
                zf.close()  # torch's reader takes such a member for an empty directory, zipfile for a file
                raise FormatError(f"zip member {info.filename!r} is marked as a directory: ambiguous", path)
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
    """A storage over a zip member: a file region when stored, else decompressed a range at a
    time as it is read (never whole: a deflated member may claim 1032 times its size)."""
    if info.compress_type == zipfile.ZIP_STORED:
        with open_path(path) as f:
            offset = member_offset(f, info)
        return Storage(info.file_size, path=path, offset=offset)
    archive = remote.size(path)
    if info.compress_size > archive or info.file_size > max(archive, 1) * 1032:
        raise FormatError(f"zip member {info.filename} claims {info.file_size} bytes", path)
    return Storage(info.file_size, path=path, reader=MemberReader(path, info))


class MemberReader:
    """Ranges of a compressed member, decompressed as they are asked for: reading on from where
    the last read ended costs only the new bytes (a pass over a tensor, chunk by chunk); a read
    behind it starts over. The archive is opened anew in each process, as a forked helper (stats)
    must not share the parent's file offset."""

    def __init__(self, path: str, info: zipfile.ZipInfo):
        self.path, self.info = path, info
        self.stream: IO[bytes] | None = None
        self.pos, self.pid = 0, 0

    def __call__(self, start: int, length: int) -> bytes:
        try:
            if self.stream is None or start < self.pos or self.pid != os.getpid():
                self.stream = zipfile.ZipFile(open_path(self.path)).open(self.info)  # noqa: SIM115 - kept open
                self.pos, self.pid = 0, os.getpid()
            while self.pos < start:
                skipped = len(self.stream.read(min(start - self.pos, 1 << 22)))
                if not skipped:
                    break
                self.pos += skipped
            data = self.stream.read(length)
        except ZIP_ERRORS as e:
            self.stream = None
            raise FormatError(f"invalid zip member {self.info.filename}: {e}", self.path) from None
        self.pos += len(data)
        return data

    def __getstate__(self) -> dict:  # a stream does not cross processes; it is reopened there
        return {**self.__dict__, "stream": None, "pid": 0}
