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
import zlib
from dataclasses import dataclass, field
from typing import IO

from paramctl.atomic import unnamed_temp
from paramctl.errors import FormatError, UsageError
from paramctl.formats import Format, dropped_entries, hdf5, register
from paramctl.formats.zipfiles import ZIP_ERRORS, member_storage, read_member, zip_members
from paramctl.table import Checkpoint

WEIGHTS = "model.weights.h5"
ZIP64_LIMIT = (1 << 31) - 1  # zipfile's own threshold for a member it is told the size of


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
            if info.compress_type == zipfile.ZIP_STORED:
                weights = hdf5.H5Image(path, WEIGHTS, member_storage(zf, info, path).offset, info.file_size)
            else:  # an HDF5 file is read at random: decompressed whole (at most 1032 times its size)
                weights = hdf5.H5Image(path, WEIGHTS, data=read_member(zf, info, path))
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
    for info in archive.members:
        if not safe_member_name(info.filename):
            what = f"refuses to copy archive member {info.filename!r}: a path outside the archive"
            raise UsageError(what, archive.path)
    # the new weights file is built first, in an unnamed scratch file that vanishes with the process
    with unnamed_temp(tempfile.gettempdir()) as weights:
        hdf5.write(ckpt, weights, archive.weights)
        try:
            copy_members(archive, weights, path)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:  # damage reading never met
            raise FormatError(f"invalid zip archive: {e}", archive.path) from None


def copy_members(archive: KerasArchive, weights: str, path: str) -> None:
    """Write the archive at PATH: ARCHIVE's members as they were, WEIGHTS as model.weights.h5."""
    with zipfile.ZipFile(archive.path) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in archive.members:
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr = info.external_attr
            data: IO[bytes]
            if info.filename == WEIGHTS:  # stored, as Keras writes it: read in place
                copy.file_size = os.path.getsize(weights)
                data = open(weights, "rb")  # noqa: SIM115 - closed below
            else:  # compressed as it was: a deflated asset is not stored expanded
                copy.file_size, copy.compress_type = info.file_size, info.compress_type
                data = zin.open(info)
            with data, zout.open(copy, "w", force_zip64=copy.file_size > ZIP64_LIMIT) as out:
                shutil.copyfileobj(data, out, 1 << 22)


def safe_member_name(name: str) -> bool:
    """Whether a member name stays inside the directory it is extracted to (no zip slip)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


register(
    Format(
        name="keras",
        description="Keras archive (.keras)",
        load=load,
        save=save,
        extensions=(".keras",),
        accept=lambda probe: probe.zip_names is not None and WEIGHTS in probe.zip_names,
        losses=lambda ckpt, sharded: [] if ckpt.format in ("keras", "hdf5") else dropped_entries(ckpt, "keras"),
        entries=hdf5.root_attributes,
        layout="keras",
        priority=20,
    )
)
