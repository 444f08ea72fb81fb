"""`.keras` archives: a zip of `metadata.json`, `config.json`, `model.weights.h5` and `assets/`.

The rows are those of `model.weights.h5`. Keras stores members uncompressed, so the weights file
is read in place through a window on the archive and tensor offsets point into the archive
itself; a compressed member is decompressed into memory instead. Writing keeps every other
member byte for byte and rebuilds `model.weights.h5` from the table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import IO

from paramctl.errors import FormatError, UsageError
from paramctl.formats import hdf5
from paramctl.formats.zipfiles import ZIP_ERRORS, member_storage, read_member, zip_members
from paramctl.table import Checkpoint

WEIGHTS = "model.weights.h5"


@dataclass
class KerasArchive:
    """What a `.keras` archive holds besides the tensors; the writer copies it from `path`."""

    path: str
    members: list[zipfile.ZipInfo]  # in archive order
    weights: hdf5.H5Image
    config: bytes | None = field(repr=False)  # config.json: the model, which names each layer's class
    metadata: bytes | None = field(repr=False)  # metadata.json: the Keras version and save date


def load(path: str, source: str) -> Checkpoint:
    zf, members = zip_members(path)
    with zf:
        if WEIGHTS not in members:
            raise FormatError(f"not a .keras archive: no {WEIGHTS}", path)
        info = members[WEIGHTS]
        try:
            storage = member_storage(zf, info, path)
            if storage.load is None:
                weights = hdf5.H5Image(path, WEIGHTS, storage.offset, info.file_size)
            else:
                weights = hdf5.H5Image(path, WEIGHTS, data=bytes(storage.read()))
            config, metadata = (
                read_member(zf, members[n], path) if n in members else None for n in ("config.json", "metadata.json")
            )
        except ZIP_ERRORS as e:
            raise FormatError(f"invalid zip archive: {e}", path) from None
    if weights.data is None and weights.offset + info.file_size > os.path.getsize(path):
        raise FormatError(f"truncated: {WEIGHTS} ends beyond the end of the archive", path)
    archive = KerasArchive(path, zf.infolist(), weights, config, metadata)
    return Checkpoint(source, "keras", hdf5.read_tensors(weights), extra=archive)


def save(ckpt: Checkpoint, path: str) -> None:
    archive = ckpt.extra
    if not isinstance(archive, KerasArchive):
        raise UsageError(
            f"a .keras archive needs the model's config.json, and this {ckpt.format} checkpoint has none; "
            "write .weights.h5 (for Keras 3 `model.load_weights`) or .h5 instead"
        )
    fd, weights = tempfile.mkstemp(suffix=".weights.h5", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        hdf5.write(ckpt, weights, archive.weights)
        with zipfile.ZipFile(archive.path) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
            for info in archive.members:
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.external_attr = info.external_attr
                data: IO[bytes]
                if info.filename == WEIGHTS:
                    copy.file_size = os.path.getsize(weights)
                    data = open(weights, "rb")  # noqa: SIM115 - closed below
                else:
                    copy.file_size = info.file_size
                    data = zin.open(info)
                with data, zout.open(copy, "w") as out:
                    shutil.copyfileobj(data, out, 1 << 22)
    finally:
        os.unlink(weights)
