"""safetensors: an 8-byte header length, a JSON header, then one data buffer.

The header is validated the way the reference (Rust) loader does before any offset is trusted.
A tie is stored as one copy plus a `{dropped: kept}` entry in `__metadata__`, as
`safetensors.torch.save_model` records it; on reading, such an entry becomes a row of its own.
The copy kept is the one transformers keeps (see ties.stored_name), and a file written carries
`{"format": "pt"}` unless its source's metadata names another format, as transformers writes it.
"""

from __future__ import annotations

import json
import struct

from paramctl import remote
from paramctl.dtypes import SAFETENSORS, TO_SAFETENSORS, itemsize
from paramctl.errors import FormatError, UsageError
from paramctl.formats import Format, Probe, dropped_entries, register
from paramctl.remote import open_path
from paramctl.table import Checkpoint, Storage, Tensor, check_shape

MAX_HEADER = 100_000_000


def read_header(path: str) -> tuple[dict, int]:
    """The parsed, validated header of the file at PATH and the file offset of its data buffer."""
    size = remote.size(path)
    with open_path(path) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FormatError("not a safetensors file: shorter than its 8-byte header length", path)
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER:
            raise FormatError(f"safetensors header of {n} bytes exceeds the {MAX_HEADER}-byte limit", path)
        if 8 + n > size:
            raise FormatError(f"truncated: header of {n} bytes but the file has {size}", path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: also an integer of over 4300 digits
        raise FormatError(f"invalid safetensors header: {e}", path) from None
    except RecursionError:
        raise FormatError("invalid safetensors header: nests too deeply", path) from None
    if not isinstance(header, dict):
        raise FormatError("invalid safetensors header: not a JSON object", path)
    validate(header, size - 8 - n, path)
    return header, 8 + n


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different: which of two entries a reader keeps is not
    something to guess."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {duplicate!r:.100} appears twice")
    return found


def validate(header: dict, buffer_size: int, path: str) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("invalid safetensors header: __metadata__ must map strings to strings", path)
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
            raise FormatError(f"invalid safetensors entry for {name!r}: {entry!r:.200}", path)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS:
            raise FormatError(f"tensor {name!r} has unsupported dtype {dtype!r}", path)
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise FormatError(f"tensor {name!r} has an invalid shape {shape!r:.200}", path)
        check_shape(name, tuple(shape), path)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise FormatError(f"tensor {name!r} has invalid data_offsets {offsets!r:.200}", path)
        numel = 1
        for n in shape:
            numel *= n
        if offsets[1] - offsets[0] != numel * itemsize(SAFETENSORS[dtype]):
            raise FormatError(
                f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                f"its shape and dtype need {numel * itemsize(SAFETENSORS[dtype])}",
                path,
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            kind = "overlaps the previous tensor" if begin < end else f"leaves a hole at byte {end}"
            raise FormatError(f"tensor {name!r} {kind}", path)
        end = stop
    if end != buffer_size:
        raise FormatError(
            f"data buffer is {buffer_size} bytes but the header describes {end} (truncated or trailing bytes)", path
        )


def load(path: str, source: str) -> Checkpoint:
    header, start = read_header(path)
    metadata = dict(header.pop("__metadata__", {}))
    tensors = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        storage = Storage(end - begin, path=path, offset=start + begin)
        tensors.append(Tensor(name, tuple(entry["shape"]), SAFETENSORS[entry["dtype"]], storage))
    return Checkpoint(source, "safetensors", with_declared_aliases(tensors, metadata), metadata)


def with_declared_aliases(tensors: list[Tensor], metadata: dict[str, str]) -> list[Tensor]:
    """Turn `{dropped: kept}` metadata entries into rows that share the kept tensor's bytes.

    The entries leave METADATA: the writer records the ties it finds again.
    """
    by_name = {t.name: t for t in tensors}
    aliases: dict[str, list[Tensor]] = {}
    for dropped, kept in list(metadata.items()):
        if dropped not in by_name and kept in by_name:
            k = by_name[kept]
            alias = Tensor(dropped, k.shape, k.dtype, k.storage, k.offset, k.stride, attrs={"alias_of": kept})
            aliases.setdefault(kept, []).append(alias)
            del metadata[dropped]
    return [row for t in tensors for row in (t, *aliases.get(t.name, []))]


def save(ckpt: Checkpoint, path: str) -> None:
    import numpy as np

    for t in ckpt.tensors:
        if t.dtype not in TO_SAFETENSORS:
            raise UsageError(f"safetensors cannot store {t.name!r}: dtype {t.dtype}")
    from paramctl.ties import stored_name

    metadata = dict(ckpt.metadata)
    metadata.setdefault("format", "pt")  # as transformers writes it: 4.x refuses a file without it
    dropped = set()
    for group in ckpt.tie_groups():
        kept = stored_name(ckpt, group)
        for name in group:
            if name != kept:
                metadata[name] = kept  # {dropped: kept}, as safetensors.torch.save_model records it
                dropped.add(name)
    stored = [t for t in ckpt.tensors if t.name not in dropped]
    header: dict = {"__metadata__": metadata}
    end = 0
    for t in stored:
        header[t.name] = {
            "dtype": TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [end, end + t.nbytes],
        }
        end += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in stored:  # chunk by chunk: a large tensor is never held whole in memory
            for chunk in t.chunks():
                f.write(chunk.view(np.uint8).data)


def _accept(probe: Probe) -> bool:
    head = probe.head
    if len(head) < 9 or head[8:9] != b"{":
        return False
    # a header length beyond the file, in a file that starts like JSON: an index, not safetensors
    return int.from_bytes(head[:8], "little") <= probe.size - 8 or not head.lstrip().startswith(b"{")


register(
    Format(
        name="safetensors",
        description="safetensors",
        load=load,
        save=save,
        extensions=(".safetensors",),
        accept=_accept,
        losses=lambda ckpt, sharded: dropped_entries(ckpt, "safetensors"),
        remote=True,
        priority=40,  # before the legacy .pt's test: a header length may start with 0x80
    )
)
