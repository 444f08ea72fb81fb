"""How much memory a checkpoint needs: to hold its weights at each precision, to train it with
Adam, and for the KV cache of a decoder given its `config.json`.

The formulas (P = the model's floating-point parameters, a tie counted once; integer and bool
buffers, B_int bytes, are kept as stored in every figure; optimizer state and trackers in a
training checkpoint are not the model and are left out):
- weights at dtype D: P * size(D) + B_int (int4: P / 2 bytes, packed two to a byte, no scales);
- training with Adam in float32: weights 4P + gradients 4P + two moments 8P = 16P;
- mixed precision (fp16/bf16 weights and gradients, fp32 master copy and moments, as
  torch.amp / DeepSpeed do): 2P + 2P + 4P + 8P = 16P;
  activations are not included: they depend on the batch, the sequence and checkpointing;
- KV cache per token: 2 (K and V) * layers * kv_heads * head_dim * size(D), where kv_heads is
  num_key_value_heads (grouped-query attention) or the number of attention heads, and head_dim
  is config's head_dim or hidden_size / heads; for a context and a batch, times context * batch.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from paramctl.dtypes import FLOATING, ITEMSIZE, itemsize
from paramctl.errors import FormatError, UsageError
from paramctl.table import Checkpoint

PRECISIONS = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}

# what each family calls layers, heads, KV heads, hidden size and head size
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
HIDDEN = ("hidden_size", "n_embd", "d_model", "dim")
HEAD_DIM = ("head_dim", "kv_channels")


def model_counts(ckpt: Checkpoint) -> tuple[int, int, int]:
    """(floating parameters, bytes they take as stored, bytes of the other model tensors), each
    tie group once; optimizer state and trackers left out."""
    from paramctl.check import MODEL, roles

    role = roles(ckpt)
    seen: set[str] = set()
    params = stored = other = 0
    for t in ckpt.tensors:
        key = t.tie or t.name
        if role.get(id(t), MODEL) != MODEL or key in seen:
            continue
        seen.add(key)
        if t.dtype in FLOATING or t.dtype not in ITEMSIZE:  # quantized GGUF blocks hold float weights
            params += t.numel
            stored += t.nbytes
        else:
            other += t.nbytes
    return params, stored, other


def find_config(path: str, config: str | None) -> str | None:
    """CONFIG, or the config.json beside the checkpoint at PATH (in it, for a directory)."""
    if config:
        return config
    if path == "-" or "://" in path:
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    beside = os.path.join(folder, "config.json")
    return beside if os.path.isfile(beside) else None


def read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read the config: {e.strerror or e}", path) from None
    except ValueError as e:
        raise FormatError(f"not a JSON config: {e}", path) from None
    if not isinstance(config, dict):
        raise FormatError("not a JSON object", path)
    return config


def first(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def is_decoder_config(config: dict[str, Any]) -> bool:
    """Whether CONFIG (or its text_config) names a layer and a head count: a KV cache to estimate."""
    if first(config, LAYERS) is None and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    return first(config, LAYERS) is not None and first(config, HEADS) is not None


def kv_shape(config: dict[str, Any], source: str) -> dict[str, int]:
    """layers, kv_heads and head_dim of a decoder's config (or its text_config)."""
    if first(config, LAYERS) is None and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if config.get("kv_lora_rank"):
        raise UsageError("multi-head latent attention (kv_lora_rank) caches a compressed KV: not estimated", source)
    layers, heads = first(config, LAYERS), first(config, HEADS)
    if layers is None or heads is None:
        raise UsageError("the config names no layer or head count (num_hidden_layers, n_layer, ...)", source)
    kv_heads = first(config, KV_HEADS) or heads
    if config.get("multi_query") is True:  # GPT-BigCode, Falcon's older configs
        kv_heads = 1
    head_dim = first(config, HEAD_DIM)
    if head_dim is None:
        hidden = first(config, HIDDEN)
        if hidden is None:
            raise UsageError("the config names neither head_dim nor hidden_size", source)
        head_dim = hidden // heads
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}


def dominant_dtype(ckpt: Checkpoint) -> str:
    """The floating dtype holding most of the parameters (what the model computes in)."""
    totals: dict[str, int] = {}
    for t in ckpt.tensors:
        if t.dtype in FLOATING:
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel
    return max(totals, key=lambda d: totals[d]) if totals else "float32"


def estimate(
    ckpt: Checkpoint,
    config: dict[str, Any] | None = None,
    context: int | None = None,
    batch: int = 1,
    kv_dtype: str | None = None,
    config_path: str = "",
) -> dict[str, Any]:
    """The figures, in bytes, as a JSON-safe record."""
    params, stored, other = model_counts(ckpt)
    dtype = dominant_dtype(ckpt)
    record: dict[str, Any] = {
        "parameters": params,
        "dtype": dtype,
        "weights": {"stored": stored + other}
        | {name: math.ceil(params * size) + other for name, size in PRECISIONS.items()},
        "train_adam_fp32": {"weights": 4 * params, "gradients": 4 * params, "adam_moments": 8 * params},
        "train_adam_mixed": {
            "weights": 2 * params,
            "gradients": 2 * params,
            "master_weights": 4 * params,
            "adam_moments": 8 * params,
        },
    }
    for key in ("train_adam_fp32", "train_adam_mixed"):
        record[key]["total"] = sum(record[key].values()) + other
    if config is not None:
        shape = kv_shape(config, config_path)
        size = itemsize(kv_dtype or dtype)
        per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * size
        context = context or first(config, ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"))
        kv: dict[str, Any] = {**shape, "dtype": kv_dtype or dtype, "bytes_per_token": per_token}
        if context:
            kv |= {"context": context, "batch": batch, "bytes": per_token * context * batch}
        record["kv_cache"] = kv
    return record


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record as (item, bytes) rows for a table."""
    out = [{"item": f"weights as stored ({record['dtype']})", "nbytes": record["weights"]["stored"]}]
    out += [
        {"item": f"weights in {name}", "nbytes": value} for name, value in record["weights"].items() if name != "stored"
    ]
    fp32, mixed = record["train_adam_fp32"], record["train_adam_mixed"]
    out.append({"item": "train, Adam, float32 (weights + grads + 2 moments)", "nbytes": fp32["total"]})
    out.append({"item": "train, Adam, mixed precision (+ fp32 master)", "nbytes": mixed["total"]})
    kv = record.get("kv_cache")
    if kv:
        shape = f"{kv['layers']} layers x {kv['kv_heads']} kv heads x {kv['head_dim']}"
        out.append({"item": f"KV cache per token ({shape}, {kv['dtype']})", "nbytes": kv["bytes_per_token"]})
        if "bytes" in kv:
            out.append({"item": f"KV cache, context {kv['context']} x batch {kv['batch']}", "nbytes": kv["bytes"]})
    return out
