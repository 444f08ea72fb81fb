"""Sharded checkpoints: an `*.index.json` whose `weight_map` names the shard holding each tensor.

The same shape serves `model.safetensors.index.json` and `pytorch_model.bin.index.json`; the
checkpoint is the union of its shards, in shard order.
"""

from __future__ import annotations

import glob
import json
import os

from paramctl.errors import FormatError
from paramctl.table import Checkpoint, Tensor


def index_file(path: str) -> str:
    """PATH itself, or the single `*.index.json` in the directory PATH."""
    if not os.path.isdir(path):
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*.index.json")))
    if len(found) != 1:
        what = "no *.index.json" if not found else f"{len(found)} *.index.json files"
        raise FormatError(f"a directory with {what}: name the index file", path)
    return found[0]


def read_index(path: str) -> dict[str, str]:
    """The validated weight_map of the index at PATH."""
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"invalid index JSON: {e}", path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError("not a sharded-checkpoint index: no weight_map of names to shard files", path)
    for shard in set(weight_map.values()):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise FormatError(f"shard {shard!r} lies outside the index's directory", path)
    return weight_map


def load(path: str, source: str) -> Checkpoint:
    from paramctl.formats import load as load_file

    index = index_file(path)
    weight_map = read_index(index)
    base = os.path.dirname(index)
    shards = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = os.path.join(base, shard)
        if not os.path.isfile(shard_path):
            raise FormatError(f"shard {shard!r} named in the index is missing", index)
        shards[shard] = load_file(shard_path)
    tensors: list[Tensor] = []
    owner: dict[str, str] = {}
    for shard, ckpt in shards.items():
        for t in ckpt.tensors:
            if t.name in owner:
                raise FormatError(f"tensor {t.name!r} is in both {owner[t.name]!r} and {shard!r}", index)
            owner[t.name] = shard
            tensors.append(t)
    for name, shard in weight_map.items():
        if owner.get(name) != shard:
            raise FormatError(f"the index puts {name!r} in {shard!r}, which does not hold it", index)
    first = next(iter(shards.values()), None)
    shard_format = "pt" if first is None or first.format.startswith("pt") else first.format
    metadata = dict(first.metadata) if first is not None else {}
    return Checkpoint(source, "sharded", tensors, metadata, extra={"index": index, "shard_format": shard_format})
