"""Sharded checkpoints: an `*.index.json` whose `weight_map` names the shard holding each tensor.

The same shape serves `model.safetensors.index.json` and `pytorch_model.bin.index.json`; the
checkpoint is the union of its shards, in shard order (by the numbers in their file names).

Writing follows transformers: shards `model-00001-of-00003.safetensors` (or
`pytorch_model-00001-of-00002.bin`) of at most a given size, a tie group kept in one shard, and
an index `{"metadata": {"total_size": ...}, "weight_map": {...}}` with sorted keys. A sharded
checkpoint written back keeps its layout, and only the shards whose rows changed are written:
the others stay as they are (or are copied byte for byte to another directory).

Written into a directory, a checkpoint is what save_pretrained would make of it: the source's
weights name (`diffusion_pytorch_model`, `adapter_model`) for the file or the shards and index,
one file when it fits one shard, the source directory's configs beside it, and an earlier
checkpoint of that name there replaced.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

from paramctl import remote
from paramctl.errors import FormatError, UsageError
from paramctl.formats import Format, Probe, register
from paramctl.table import Checkpoint, Tensor

INDEX_SUFFIX = ".index.json"
SHARD_FORMATS = {"safetensors": ".safetensors", "pt": ".bin"}
# the stems of the weights files save_pretrained writes (transformers, diffusers, peft)
HF_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model", "adapter_model")
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default, "5GB"
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


@dataclass
class Shard:
    """One shard as read: its file (as the index names it), its own table (metadata, and a .bin
    shard's object tree) and the state of each of its rows then, to tell whether it changed."""

    file: str
    ckpt: Checkpoint
    rows: list[tuple] = field(default_factory=list)


@dataclass
class ShardedSource:
    """What a sharded checkpoint's writer needs beyond the table (the Checkpoint's `extra`)."""

    index: str
    shard_format: str
    metadata: dict[str, Any]  # the index's own metadata: total_size, and whatever else it records
    shards: list[Shard]


def row_state(t: Tensor) -> tuple:
    """Equal before and after an edit only if the row is untouched: the same object, name, view,
    storage object and attributes (Tensor and Storage compare by identity)."""
    return (t, t.name, t.dtype, t.shape, t.stride, t.offset, t.storage, dict(t.attrs))


# --- reading -------------------------------------------------------------------------------------


def index_file(path: str) -> str:
    """PATH itself, or the single `*.index.json` in the directory PATH."""
    if not os.path.isdir(path):
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*" + INDEX_SUFFIX)))
    if len(found) != 1:
        what = "no *.index.json" if not found else f"{len(found)} *.index.json files"
        raise FormatError(f"a directory with {what}: name the index file", path)
    return found[0]


def read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The validated weight_map of the index at PATH, and its metadata."""
    try:
        with remote.open_path(path) as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"invalid index JSON: {e}", path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError("not a sharded-checkpoint index: no weight_map of names to shard files", path)
    for shard in set(weight_map.values()):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise FormatError(f"shard {shard!r} lies outside the index's directory", path)
    metadata = index.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def shard_order(file: str) -> tuple[float, str]:
    """Shards in the order of their numbers (`model-00002-of-00003.safetensors`), whatever their
    stems (an edit may mix `model-*` and `edited-*` shards), then by name."""
    numbered = re.search(r"-(\d+)-of-\d+\.\w+$", file)
    return (int(numbered.group(1)) if numbered else math.inf, file)


def load(path: str, source: str) -> Checkpoint:
    from paramctl.formats import load as load_file
    from paramctl.formats import sniff

    index = index_file(path)
    weight_map, index_metadata = read_index(index)
    base = os.path.dirname(index)
    shards: list[Shard] = []
    tensors: list[Tensor] = []
    owner: dict[str, str] = {}
    files = sorted(set(weight_map.values()), key=shard_order)

    def load_shard(file: str) -> Checkpoint:
        shard_path = os.path.join(base, file)
        if not remote.is_file(shard_path):
            raise FormatError(f"shard {file!r} named in the index is missing", index)
        if sniff(shard_path) not in ("safetensors", "pt"):
            raise FormatError(f"shard {file!r} is neither safetensors nor a PyTorch file", index)
        return load_file(shard_path)

    if remote.is_url(index):  # each shard's header is a round trip or two: fetch them side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            loaded = list(pool.map(load_shard, files))
    else:
        loaded = [load_shard(file) for file in files]
    for file, ckpt in zip(files, loaded):
        for t in ckpt.tensors:
            if t.name in owner:
                raise FormatError(f"tensor {t.name!r} is in both {owner[t.name]!r} and {file!r}", index)
            owner[t.name] = file
            tensors.append(t)
        shards.append(Shard(file, ckpt, [row_state(t) for t in ckpt.tensors]))
    for name, file in weight_map.items():
        if owner.get(name) != file:
            raise FormatError(f"the index puts {name!r} in {file!r}, which does not hold it", index)
    first = shards[0].ckpt if shards else None
    shard_format = "pt" if first is None or first.format.startswith("pt") else first.format
    metadata = dict(first.metadata) if first is not None else {}
    extra = ShardedSource(index, shard_format, index_metadata, shards)
    return Checkpoint(source, "sharded", tensors, metadata, extra=extra)


# --- writing -------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes in a size such as `2GB`, `500MB`, `1.5GiB` or `1000000` (decimal units, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in UNITS or float(m.group(1)) * UNITS[unit] < 1:
        raise UsageError(f"invalid size {text!r}: a positive number of bytes, or with a unit such as 2GB or 500MiB")
    return int(float(m.group(1)) * UNITS[unit])


def into_directory(target: str) -> bool:
    """Whether TARGET names a directory to write into (`out/`, or one that exists)."""
    return target.endswith(("/", os.sep)) or os.path.isdir(target)


def weights_name(ckpt: Checkpoint, fmt: str) -> str:
    """The file name CKPT's weights take in a directory when written as FMT: the source's own
    (`diffusion_pytorch_model.safetensors`, `adapter_model.safetensors`; a sharded source's index
    without `.index.json`), with FMT's extension, transformers' `model.safetensors` and
    `pytorch_model.bin` standing for each other (a variant too: `model.fp16.safetensors`,
    `pytorch_model.fp16.bin`); `model` when the source has no name (stdin)."""
    from paramctl.formats import extensions, get

    source = ckpt.extra if isinstance(ckpt.extra, ShardedSource) else None
    read = source.index.removesuffix(INDEX_SUFFIX) if source is not None else ckpt.path
    name = os.path.basename(read) if read and ckpt.source != "-" else "model"
    stem, ext = os.path.splitext(name)
    if ext and extensions().get(ext.lower()) == fmt:
        return name
    base, dot, variant = stem.partition(".")
    if fmt == "pt" and base in HF_STEMS:
        return ("pytorch_model" if base == "model" else base) + dot + variant + ".bin"
    if fmt == "pt":
        return stem + ".pt"
    return ("model" + dot + variant if base == "pytorch_model" else stem) + get(fmt).extensions[0]


def index_path(target: str, fmt: str, ckpt: Checkpoint) -> str:
    """The index to write for TARGET: an `*.index.json` path itself; in a directory, the source's
    weights name for FMT plus `.index.json`; beside a file path, that path plus `.index.json`."""
    if target.endswith(INDEX_SUFFIX):
        return target
    if into_directory(target):
        return os.path.join(target, weights_name(ckpt, fmt) + INDEX_SUFFIX)
    return target + INDEX_SUFFIX


def shard_names(index: str, fmt: str, count: int) -> list[str]:
    """transformers' names: `model.safetensors.index.json` -> `model-00001-of-00003.safetensors`."""
    from paramctl.formats import extensions

    stem = os.path.basename(index)[: -len(INDEX_SUFFIX)]
    root, ext = os.path.splitext(stem)
    if extensions().get(ext.lower()) != fmt:  # `model.index.json`: the format's own extension
        root, ext = stem, SHARD_FORMATS[fmt]
    return [f"{root}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def split(tensors: list[Tensor], max_size: int) -> list[list[Tensor]]:
    """Consecutive runs of TENSORS of at most MAX_SIZE bytes (a larger tensor alone), each tie
    group in the shard of its first name, counted once; the table's order is kept."""
    shards: list[list[Tensor]] = []
    size = 0
    home: dict[str, int] = {}
    for t in tensors:
        if t.tie is not None and t.tie in home:
            shards[home[t.tie]].append(t)
            continue
        if not shards or (size and size + t.nbytes > max_size):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
        if t.tie is not None:
            home[t.tie] = len(shards) - 1
    return shards


def keep_layout(ckpt: Checkpoint, source: ShardedSource) -> list[tuple[Shard, list[Tensor]]]:
    """Each source shard with the rows it holds now: a row stays in the shard it was read from
    (a row replaced by another of its name, as a cast makes, too), a tie group joins the shard of
    its first name, and a new row the shard of the row before it."""
    slot_of = {id(state[0]): i for i, shard in enumerate(source.shards) for state in shard.rows}
    slot_of_name = {state[1]: i for i, shard in enumerate(source.shards) for state in shard.rows}
    groups: list[list[Tensor]] = [[] for _ in source.shards]
    tie_slot: dict[str, int] = {}
    slot = 0
    for t in ckpt.tensors:
        slot = slot_of.get(id(t), slot_of_name.get(t.name, slot))
        if t.tie is not None:
            slot = tie_slot.setdefault(t.tie, slot)
        groups[slot].append(t)
    return [(shard, rows) for shard, rows in zip(source.shards, groups) if rows]


@dataclass
class Planned:
    """One shard of the output: FILE (relative to the index) holds ROWS. SOURCE is the shard they
    were read from, UNCHANGED when its rows are as read; KEEP when that file is the output as is."""

    file: str
    rows: list[Tensor]
    source: Shard | None
    unchanged: bool = False
    keep: bool = False


def plan(ckpt: Checkpoint, index: str, fmt: str, shard_size: int | None) -> list[Planned]:
    """The output's shards: a sharded source keeps its layout (unless SHARD_SIZE re-splits it),
    reusing its unchanged shards in place or in the same directory; else transformers' split."""
    source = ckpt.extra if isinstance(ckpt.extra, ShardedSource) else None
    groups: list[tuple[Shard | None, list[Tensor]]]
    if source is None or shard_size is not None:
        groups = [(None, rows) for rows in split(ckpt.tensors, shard_size or DEFAULT_SHARD_SIZE)]
    else:
        groups = list(keep_layout(ckpt, source))
    planned = [Planned(name, rows, shard) for name, (shard, rows) in zip(shard_names(index, fmt, len(groups)), groups)]
    if source is None:
        return planned
    in_place = os.path.realpath(index) == os.path.realpath(source.index)
    same_dir = os.path.dirname(os.path.realpath(index)) == os.path.dirname(os.path.realpath(source.index))
    if in_place and fmt != source.shard_format:
        raise UsageError(
            f"--in-place keeps the {source.shard_format} shards: write {fmt} shards with -o NEW.index.json"
        )
    for p in planned:
        if p.source is not None:
            p.unchanged = (
                fmt == source.shard_format
                and p.source.rows == [row_state(t) for t in p.rows]
                # a safetensors shard without `format` metadata is rewritten with it (transformers 4)
                and (fmt != "safetensors" or "format" in p.source.ckpt.metadata)
            )
            if in_place or (same_dir and p.unchanged):
                p.file, p.keep = p.source.file, p.unchanged
    inputs = {s.file for s in source.shards}
    for p in planned:
        if same_dir and not in_place and not p.keep and p.file in inputs:
            raise UsageError(
                f"writing {p.file!r} would overwrite a shard of {source.index}: choose another index name "
                "or directory, or use --in-place"
            )
    return planned


def save(ckpt: Checkpoint, target: str, fmt: str, shard_size: int | None = None) -> None:
    """Write CKPT as shards plus an index at (or for) TARGET; only changed shards are written.

    Into a directory, the files keep the source's naming (`diffusion_pytorch_model-00001-of-00002
    .safetensors`); a checkpoint split anew (a source that is not sharded, or --shard-size) that
    fits one shard is one file under the source's name, as save_pretrained writes it; the small
    files of a save_pretrained source directory (config.json, tokenizer files) are copied beside
    the weights (see copy_companions).

    Every file goes to a temporary name first; the shards are renamed into place once all are
    written, then the index. With --in-place, shards the new index no longer names are removed.
    """
    from paramctl.formats import save as save_file

    if target == "-":
        raise UsageError("a sharded checkpoint is several files: name an index path or a directory, not '-'")
    refuse_another_format_in_place(ckpt, target, fmt)
    if not makes_shards(ckpt, target, fmt, shard_size):
        os.makedirs(target, exist_ok=True)
        name = weights_name(ckpt, fmt)
        save_file(ckpt, os.path.join(target, name), fmt)
        remove_previous(target, name, {name})
        copy_companions(ckpt, target)
        return
    if fmt not in SHARD_FORMATS:
        raise UsageError(f"shards are safetensors or .bin files, not {fmt}")
    index = index_path(target, fmt, ckpt)
    written = write_shards(ckpt, index, fmt, shard_size)
    if into_directory(target):
        remove_previous(target, os.path.basename(index).removesuffix(INDEX_SUFFIX), written)
    copy_companions(ckpt, os.path.dirname(os.path.abspath(index)))


def makes_shards(ckpt: Checkpoint, target: str, fmt: str, shard_size: int | None) -> bool:
    """Whether `save` writes CKPT as shards plus an index for TARGET (an index path, a directory,
    or with SHARD_SIZE), or as one file in the directory TARGET: a checkpoint split anew (not
    sharded, or SHARD_SIZE) that fits one shard, or a format that has no shards."""
    if not into_directory(target):
        return True
    resplit = not isinstance(ckpt.extra, ShardedSource) or shard_size is not None
    one_file = fmt not in SHARD_FORMATS or len(split(ckpt.tensors, shard_size or DEFAULT_SHARD_SIZE)) == 1
    return not (resplit and one_file)


def refuse_another_format_in_place(ckpt: Checkpoint, target: str, fmt: str) -> None:
    """Refuse to write FMT into the directory CKPT was read from when it holds CKPT in another
    format: the weights read would stay beside the new ones, and a loader read them first (a
    save_pretrained directory), or the directory would mix two checkpoints (DCP)."""
    from paramctl.formats import get

    same = False
    with contextlib.suppress(OSError):
        same = os.path.isdir(ckpt.source) and os.path.isdir(target) and os.path.samefile(ckpt.source, target)
    read = ckpt.extra.shard_format if isinstance(ckpt.extra, ShardedSource) else ckpt.format
    if not same or read == fmt:
        return
    if ckpt.format in ("sharded", *SHARD_FORMATS):  # a save_pretrained directory
        raise UsageError(
            f"its {read} weights are not replaced in place by {fmt} (a loader would still read them): "
            "write to another directory (-o)",
            target,
        )
    raise UsageError(
        f"a {get(ckpt.format).description} is not replaced in place by {fmt}: write to another path (-o)", target
    )


def remove_previous(directory: str, name: str, written: set[str]) -> None:
    """Remove from DIRECTORY what an earlier checkpoint under the weights name NAME left there and
    WRITTEN does not name: its single file, index and numbered shards, as save_pretrained clears
    stale shards (a loader would read a stale `model.safetensors` before a new index); say which."""
    from paramctl import output

    stem, ext = os.path.splitext(name)
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(ext))
    removed = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        previous = entry.name in (name, name + INDEX_SUFFIX) or shard.fullmatch(entry.name)
        if previous and entry.name not in written and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    if removed:
        output.note(f"removed {', '.join(removed)} from {directory}: the checkpoint written there replaces them")


def write_shards(ckpt: Checkpoint, index: str, fmt: str, shard_size: int | None) -> set[str]:
    """Write the shards and the index; the names of the files they are (relative to the index)."""
    from paramctl.formats import atomic_path

    directory = os.path.dirname(os.path.abspath(index))
    source = ckpt.extra if isinstance(ckpt.extra, ShardedSource) else None
    source_dir = os.path.dirname(source.index) if source is not None else directory
    planned = plan(ckpt, index, fmt, shard_size)
    made_directory = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    weight_map: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as stack:
            index_tmp = stack.enter_context(atomic_path(index))  # entered first: renamed last
            for p in planned:
                if p.keep:
                    written = os.path.join(directory, p.file)
                else:
                    written = stack.enter_context(atomic_path(os.path.join(directory, p.file)))
                    if p.unchanged and p.source is not None:
                        copy_file(os.path.join(source_dir, p.source.file), written)
                    else:
                        write_shard(ckpt, p, fmt, written)
                weight_map.update(dict.fromkeys(stored_names(written, fmt, p.rows), p.file))
            stored = [t for t in ckpt.tensors if t.tie in (None, t.name)]  # a tie group once
            metadata = dict(source.metadata if source is not None else {})
            metadata["total_size"] = sum(t.nbytes for t in stored)
            if "total_parameters" in metadata:  # newer transformers record it too
                metadata["total_parameters"] = sum(t.numel for t in stored)
            with open(index_tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if made_directory:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    if source is not None and os.path.realpath(index) == os.path.realpath(source.index):
        for shard in source.shards:  # in place: what the new index no longer names goes
            if shard.file not in weight_map.values():
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, shard.file))
    return {*weight_map.values(), os.path.basename(index)}


# what a source directory holds that is not copied beside written weights: checkpoints of any kind
NOT_COMPANIONS: tuple[str, ...] = (INDEX_SUFFIX, ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".hdf5")
NOT_COMPANIONS += (".keras", ".msgpack", ".gguf", ".onnx", ".params", ".nd", ".index", ".distcp", ".pkl", ".npz")
NOT_COMPANIONS += (".ot", ".tflite")
COMPANION_LIMIT = 64 << 20  # tokenizer.json of large vocabularies is tens of MB; weights are larger


def copy_companions(ckpt: Checkpoint, directory: str) -> None:
    """Copy the non-weight files of a save_pretrained source directory (config.json,
    generation_config.json, adapter_config.json, tokenizer and scheduler files) into DIRECTORY,
    where it lacks them, so that `from_pretrained(DIRECTORY)` loads the weights written there;
    say which on stderr. Only when the source is a save_pretrained directory or a file named as
    save_pretrained names weights (`model.safetensors`, an index): a lone `~/model.pt`, a DCP or a
    TensorFlow checkpoint directory bring nothing with them.
    Checkpoints, hidden files, sub-directories and files over COMPANION_LIMIT stay behind."""
    from paramctl import output
    from paramctl.formats import atomic_path

    source = ckpt.extra if isinstance(ckpt.extra, ShardedSource) else None
    read = source.index if source is not None else ckpt.path
    if not read or ckpt.source == "-":
        return
    at_url = remote.is_url(read)
    source_dir = os.path.dirname(read) if at_url else os.path.dirname(os.path.abspath(read))
    if not (os.path.isdir(ckpt.source) or os.path.basename(read) in WEIGHTS_FILES):
        return
    if ckpt.format not in ("sharded", *SHARD_FORMATS):  # a DCP or TensorFlow directory: none of this
        return
    if not at_url and os.path.realpath(source_dir) == os.path.realpath(directory):
        return
    copied = []
    for name, path in companions(source_dir, at_url):
        target = os.path.join(directory, name)
        if os.path.lexists(target):
            continue  # what the output directory holds already (an edited config) is kept
        with atomic_path(target) as tmp:
            copy_file(path, tmp)
        copied.append(name)
    if copied:
        shown = ckpt.source if os.path.isdir(ckpt.source) else os.path.dirname(read) or "."
        output.note(f"copied {', '.join(copied)} from {shown} beside the weights")


# what a save_pretrained directory at a URL is asked for (its files cannot be listed)
REMOTE_COMPANIONS = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "scheduler_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


def companions(source_dir: str, at_url: bool) -> list[tuple[str, str]]:
    """(name, path) of the non-weight files beside a save_pretrained checkpoint: every small plain
    file of a local directory; the usual names that exist, at a URL."""
    if at_url:
        found = [(name, f"{source_dir}/{name}") for name in REMOTE_COMPANIONS]
        return [(n, p) for n, p in found if remote.is_file(p) and remote.size(p) <= COMPANION_LIMIT]
    chosen = []
    for entry in sorted(os.scandir(source_dir), key=lambda e: e.name):
        name = entry.name
        if name.startswith(".") or name.lower().endswith(NOT_COMPANIONS) or re.search(r"-\d+-of-\d+\.", name):
            continue
        if entry.is_file() and entry.stat().st_size <= COMPANION_LIMIT:
            chosen.append((name, entry.path))
    return chosen


def copy_file(source: str, target: str) -> None:
    """SOURCE's bytes into TARGET: a local copy, or a URL's read by ranges a few MiB at a time."""
    if not remote.is_url(source):
        shutil.copyfile(source, target)
        return
    with remote.open_path(source) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 << 20)


def write_shard(ckpt: Checkpoint, p: Planned, fmt: str, path: str) -> None:
    from paramctl.formats import get

    if fmt == "safetensors":
        metadata = dict(p.source.ckpt.metadata if p.source is not None else ckpt.metadata)
        shard = Checkpoint(ckpt.source, "safetensors", p.rows, metadata)
    elif p.source is not None and p.source.ckpt.format.startswith("pt"):
        # a .bin shard keeps its own object; a row read from another shard is placed by its name
        from paramctl.formats.pytorch import POSITION

        own = {id(state[0]) for state in p.source.rows}
        rows = [t if id(t) in own else replace(t, attrs={**t.attrs, POSITION: None}) for t in p.rows]
        shard = Checkpoint(ckpt.source, p.source.ckpt.format, rows, extra=p.source.ckpt.extra)
    else:
        shard = Checkpoint(ckpt.source, "pt", p.rows)
    writer = get(fmt).save
    assert writer is not None  # fmt is one of SHARD_FORMATS
    writer(shard, path)


def stored_names(path: str, fmt: str, rows: list[Tensor]) -> list[str]:
    """The names a shard's loader returns: a safetensors header's keys (a tie's other names are
    declared aliases, which `load_file` leaves out); every name for a .bin shard."""
    if fmt == "safetensors":
        from paramctl.formats.safetensors import read_header

        header, _ = read_header(path)
        return [name for name in header if name != "__metadata__"]
    return [t.name for t in rows]


# --- registration --------------------------------------------------------------------------------

# The weights files of a save_pretrained directory, in the order their libraries look for them
# (transformers, diffusers, peft: safetensors before .bin, a single file before an index).
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "adapter_model.bin",
)


def weights_in(directory: str) -> str | None:
    """The checkpoint file a directory stands for: the first of WEIGHTS_FILES it holds (saying
    on stderr which, when it holds several), else its single `*.index.json`."""
    from paramctl import output

    found = [name for name in WEIGHTS_FILES if os.path.isfile(os.path.join(directory, name))]
    if not found:
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), "*" + INDEX_SUFFIX)))
        if len(found) > 1:
            raise FormatError(f"a directory with {len(found)} *.index.json files: name the one to read", directory)
    if not found:
        return None
    if len(found) > 1:
        output.note(f"{directory}: reading {found[0]} (also here: {', '.join(found[1:])})")
    return os.path.join(directory, found[0])


def _accept_path(path: str) -> str | None:
    return weights_in(path) if os.path.isdir(path) else None


def _accept(probe: Probe) -> bool:
    return probe.head.lstrip()[:1] == b"{"  # an index's JSON (safetensors is recognised first)


register(
    Format(
        name="sharded",
        description="sharded set (*.index.json) or save_pretrained directory",
        looks_for=f"*.index.json, {', '.join(n for n in WEIGHTS_FILES if not n.endswith(INDEX_SUFFIX))}",
        load=load,
        accept=_accept,
        accept_path=_accept_path,
        keeps_views=False,
        remote=True,
        priority=60,
    )
)
