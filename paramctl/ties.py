"""Ties: names that are one tensor, found three ways, and made or undone on request.

- `shared`: the names view the same bytes the same way (same storage, offset, shape, strides
  and dtype), as torch.save records a tensor used twice.
- `declared`: the file records an alias: safetensors `save_model` metadata `{dropped: kept}`,
  or paramctl's `paramctl_ties` record in HDF5 (which holds copies: Keras refuses links).
- `equal` (by value): separately stored tensors with the same dtype, shape and bytes.

Views of one storage that are not the same view are not ties; those that share bytes are
overlaps, reported apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Storage, Tensor

COMPARE_CHUNK = 1 << 20  # elements per tensor held at once while comparing candidates
FINGERPRINT_BYTES = 1 << 16


@dataclass
class TieGroup:
    names: list[str]
    kind: str  # shared | declared | equal


def groups(ckpt: Checkpoint, tensors: Iterable[Tensor] | None = None) -> list[TieGroup]:
    """The shared and declared ties among TENSORS (default: all)."""
    wanted = None if tensors is None else {t.name for t in tensors}
    found = []
    for names in ckpt.tie_groups():
        if wanted is not None and not wanted.intersection(names):
            continue
        declared = any("alias_of" in ckpt[n].attrs for n in names)
        found.append(TieGroup(names, "declared" if declared else "shared"))
    return found


def equal_groups(tensors: list[Tensor]) -> list[TieGroup]:
    """Separately stored tensors with identical dtype, shape and bytes.

    Candidates must first agree on dtype and shape, then on a fingerprint of their first and
    last bytes; only those are read whole, all members of a candidate class side by side,
    chunk by chunk, so each byte is read once and memory stays bounded.
    """
    views: dict[tuple, Tensor] = {}
    for t in tensors:
        if t.numel:
            views.setdefault(t.view_key(), t)  # one representative per stored tensor
    by_layout: dict[tuple, list[Tensor]] = {}
    for t in views.values():
        by_layout.setdefault((t.dtype, t.shape), []).append(t)
    result: list[TieGroup] = []
    for candidates in by_layout.values():
        if len(candidates) < 2:
            continue
        by_print: dict[bytes, list[Tensor]] = {}
        for t in candidates:
            by_print.setdefault(fingerprint(t), []).append(t)
        for similar in by_print.values():
            if len(similar) > 1:
                result.extend(TieGroup([t.name for t in cls], "equal") for cls in identical_classes(similar))
    return result


def fingerprint(t: Tensor) -> bytes:
    size = t.nbytes
    if not t.is_contiguous or size <= 2 * FINGERPRINT_BYTES:
        return hashlib.blake2b(t.tobytes(), digest_size=16).digest()
    head = t.storage.read(t.offset * (size // t.numel), FINGERPRINT_BYTES)
    tail = t.storage.read(t.offset * (size // t.numel) + size - FINGERPRINT_BYTES, FINGERPRINT_BYTES)
    return hashlib.blake2b(bytes(head) + bytes(tail), digest_size=16).digest()


def identical_classes(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Partition TENSORS (same dtype and shape) into classes of identical bytes, 2+ members each."""
    readers = [t.chunks(COMPARE_CHUNK) for t in tensors]
    classes = [list(range(len(tensors)))]
    for parts in zip(*readers):
        raw = [np.ascontiguousarray(p).view(np.uint8) for p in parts]
        refined = []
        for members in classes:
            while len(members) > 1:
                first = raw[members[0]]
                same = [m for m in members if np.array_equal(raw[m], first)]
                if len(same) > 1:
                    refined.append(same)
                members = [m for m in members if m not in same]
        classes = refined
        if not classes:
            break
    return [[tensors[i] for i in members] for members in classes]


def overlaps(ckpt: Checkpoint, tensors: list[Tensor]) -> list[list[str]]:
    """Pairs of different views of one storage that share at least one element."""
    by_storage: dict[int, list[Tensor]] = {}
    seen = set()
    for t in tensors:
        if t.numel and t.view_key() not in seen:
            seen.add(t.view_key())
            by_storage.setdefault(id(t.storage), []).append(t)
    pairs = []
    for views in by_storage.values():
        for a, b in combinations(views, 2):
            if share_elements(a, b):
                pairs.append([a.name, b.name])
    return pairs


def share_elements(a: Tensor, b: Tensor) -> bool:
    size_a, size_b = a.nbytes // a.numel, b.nbytes // b.numel
    start_a, end_a = a.offset * size_a, (a.offset + a.extent()) * size_a
    start_b, end_b = b.offset * size_b, (b.offset + b.extent()) * size_b
    if end_a <= start_b or end_b <= start_a:
        return False
    if a.is_contiguous and b.is_contiguous:
        return True
    return bool(np.intersect1d(byte_offsets(a), byte_offsets(b)).size)


def byte_offsets(t: Tensor) -> np.ndarray:
    """Every byte of storage T's elements occupy (for exact overlap tests of strided views)."""
    size = t.nbytes // t.numel
    offsets = np.full(1, t.offset * size, dtype=np.int64)
    for n, s in zip(t.shape, t.strides):
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * s * size).ravel()
    return (offsets[:, None] + np.arange(size, dtype=np.int64)).ravel()


def stored_name(ckpt: Checkpoint, group: list[str]) -> str:
    """The name under which a format that keeps one copy of a tie group (safetensors) stores it:
    the name the group's aliases point to (the kept name of a file read, SRC of `tie`), else the
    group's first name in the table's order, which is the source's own (module order for a state
    dict: `transformer.wte.weight` before `lm_head.weight`), as transformers keeps it."""
    members = set(group)
    return next((n for n in group if ckpt[n].attrs.get("alias_of") not in members), group[0])


def tie(ckpt: Checkpoint, src: str, dsts: Iterable[str]) -> None:
    """Make every name in DSTS the same tensor as SRC (their bytes become SRC's); the group's
    other names become aliases of SRC, so a one-copy format stores SRC."""
    source, dsts = ckpt[src], list(dsts)
    for name in dsts:
        t = ckpt[name]
        if (t.shape, t.dtype) != (source.shape, source.dtype):
            raise UsageError(
                f"cannot tie {name!r} ({list(t.shape)} {t.dtype}) to {src!r} ({list(source.shape)} {source.dtype}):"
                " shape and dtype must match",
                ckpt.source,
            )
    for name in dsts:
        t = ckpt[name]
        t.storage, t.offset, t.stride = source.storage, source.offset, source.stride
    ckpt.link_ties()
    source.attrs.pop("alias_of", None)
    for t in ckpt.tensors:
        if t is not source and t.tie is not None and t.tie == source.tie:
            t.attrs["alias_of"] = src


def untie(ckpt: Checkpoint, names: Iterable[str]) -> int:
    """Give every tied name in NAMES but the first of its group a copy of its own; how many."""
    wanted = set(names)
    copied = 0
    for group in ckpt.tie_groups():
        for name in group[1:]:
            if name in wanted or group[0] in wanted:
                t = ckpt[name]
                raw = bytes(t.tobytes())
                t.storage, t.offset, t.stride = Storage(len(raw), buffer=raw), 0, None
                t.attrs.pop("alias_of", None)
                copied += 1
    ckpt.link_ties()
    return copied
