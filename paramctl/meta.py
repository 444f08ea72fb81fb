"""Metadata: what a checkpoint says about itself besides its tensors, shown and edited.

Shown: a safetensors file's `__metadata__` (as the header holds it, declared tie aliases
included), a `.pt`'s non-tensor entries (epoch, hyper-parameters, ...) by dotted path, an HDF5
file's root attributes (keras_version, backend, ...).

Edited: safetensors `__metadata__` by rewriting the header only (the data bytes are copied as
they are, so every tensor stays bit-identical), and HDF5 root attributes (a copy of the file,
edited by h5py in a child process with a deadline, as every libhdf5 call on a foreign file is).
Values are text: safetensors metadata maps strings to strings, and an HDF5 attribute set here is
a UTF-8 string.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from typing import Any

from paramctl.errors import UsageError

EDIT_SECONDS = 15.0  # a deadline for libhdf5 copying attributes, plus a second per 50 MB


def show(path: str) -> dict[str, Any]:
    """The metadata of the checkpoint at PATH, JSON-safe."""
    from paramctl.formats import load, non_tensor_entries

    ckpt = load(path)
    if ckpt.format == "safetensors" and path != "-":
        from paramctl.formats.safetensors import read_header

        header, _ = read_header(ckpt.path)  # the file a save_pretrained directory stands for
        return dict(header.get("__metadata__", {}))
    found: dict[str, Any] = dict(ckpt.metadata)
    found.update(non_tensor_entries(ckpt))
    return found


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """`k=v` strings as a dict (the value may hold `=`; an empty value is allowed)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--set takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def edit(path: str, target: str, set_: dict[str, str], unset: Sequence[str]) -> str:
    """Write PATH with SET_ keys set and UNSET keys removed to TARGET (atomically; TARGET may be
    PATH itself). Returns the format edited. A key to unset that is not there is an error."""
    from paramctl.formats import load

    fmt = load(path).format
    if fmt == "safetensors":
        edit_safetensors(path, target, set_, unset)
    elif fmt == "hdf5":
        edit_hdf5(path, target, set_, unset)
    else:
        raise UsageError(f"meta edits safetensors metadata and HDF5 root attributes; this is a {fmt} checkpoint", path)
    return fmt


def edited(current: dict[str, Any], set_: dict[str, str], unset: Sequence[str], path: str) -> dict[str, Any]:
    missing = [k for k in unset if k not in current and k not in set_]
    if missing:
        raise UsageError(f"no metadata key {', '.join(map(repr, missing))} to unset", path)
    out = {k: v for k, v in current.items() if k not in unset}
    out.update(set_)
    return out


def edit_safetensors(path: str, target: str, set_: dict[str, str], unset: Sequence[str]) -> None:
    from paramctl.formats import atomic_path
    from paramctl.formats.safetensors import read_header

    header, start = read_header(path)
    metadata = edited(header.pop("__metadata__", {}), set_, unset, path)
    clash = sorted(set(set_) & set(header))
    if clash:
        raise UsageError(f"{clash[0]!r} is a tensor name: a metadata key of that name would declare a tie", path)
    new = ({"__metadata__": metadata} if metadata else {}) | header
    raw = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer stays 8-byte aligned, as safetensors writes it
    with atomic_path(target) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        src.seek(start)
        shutil.copyfileobj(src, dst, 1 << 22)


def edit_hdf5(path: str, target: str, set_: dict[str, str], unset: Sequence[str]) -> None:
    from paramctl.forked import in_child
    from paramctl.formats import atomic_path

    limit = EDIT_SECONDS + os.path.getsize(path) / 50e6
    # libhdf5 wants a file with a real name (it resolves the path it opens; the atomic writer's
    # unnamed file has none): edit a named scratch copy, then write that into place
    fd, scratch = tempfile.mkstemp(suffix=".h5", prefix=".paramctl-meta-")
    os.close(fd)
    try:
        shutil.copyfile(path, scratch)
        in_child(set_attributes, (scratch, set_, list(unset), path), limit, path, "editing the attributes")
        with atomic_path(target) as tmp:
            shutil.copyfile(scratch, tmp)
    finally:
        os.unlink(scratch)


def set_attributes(file: str, set_: dict[str, str], unset: list[str], path: str) -> None:
    import h5py

    with h5py.File(file, "r+") as f:
        edited(dict.fromkeys(f.attrs), set_, unset, path)  # raises for a missing key
        for key in unset:
            if key in f.attrs:
                del f.attrs[key]
        for key, value in set_.items():
            f.attrs[key] = value
