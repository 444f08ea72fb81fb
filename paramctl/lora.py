"""Folding a peft LoRA adapter into its base checkpoint: W + scale * B @ A, as peft's
`merge_and_unload()` does it.

The adapter is a directory holding `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`). Its keys are `base_model.model.<module>.lora_A.weight` and `...lora_B.weight`;
`<module>.weight` is the base tensor, found by name (the base may be saved with or without the
wrapper's prefix, `transformer.h.0...` or `h.0...`). scale is lora_alpha / r, or lora_alpha / sqrt(r)
with `use_rslora`; r and alpha come from `rank_pattern` / `alpha_pattern` where a key matches the
module's name as peft matches it (`(.*\\.)?KEY$`). With `fan_in_fan_out` (GPT-2's Conv1D stores
weights as (in, out)) the product is transposed. Variants that change the formula (DoRA, LoRA
biases, trainable tokens, modules to save, convolution and embedding adapters, other peft types)
are refused, naming what, rather than merged wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from paramctl.errors import FormatError, UsageError
from paramctl.merge import MERGE_CHUNK, Chunks, ComputedTensor, computed
from paramctl.table import Checkpoint, Tensor

if TYPE_CHECKING:
    import numpy as np

PREFIX = "base_model.model."
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter(adapter_dir: str) -> tuple[dict[str, Any], Checkpoint]:
    """The adapter's config and its tensors."""
    from paramctl.formats import load

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise UsageError("not a peft adapter directory: no adapter_config.json", adapter_dir)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"unreadable adapter_config.json: {e}", adapter_dir) from None
    if not isinstance(config, dict):
        raise FormatError("adapter_config.json is not a JSON object", adapter_dir)
    weights = next(
        (os.path.join(adapter_dir, w) for w in WEIGHTS if os.path.isfile(os.path.join(adapter_dir, w))), None
    )
    if weights is None:
        raise UsageError(f"no adapter weights ({' or '.join(WEIGHTS)})", adapter_dir)
    return config, load(weights)


def refuse_variants(config: dict[str, Any], adapter_dir: str) -> None:
    """Raise UsageError for any adapter whose merge is not W + scale * B @ A."""
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UsageError(f"a {kind} adapter: only plain LoRA adapters can be folded", adapter_dir)
    refused = {
        "use_dora": "DoRA (use_dora) rescales the merged weight by a learned magnitude",
        "lora_bias": "a LoRA bias (lora_bias)",
        "modules_to_save": "modules_to_save (whole trained copies of modules)",
        "trainable_token_indices": "trainable tokens",
        "layer_replication": "layer replication",
        "target_parameters": "LoRA on parameters (target_parameters)",
        "use_qalora": "QA-LoRA",
        "alora_invocation_tokens": "activated LoRA",
    }
    for key, what in refused.items():
        if config.get(key):
            raise UsageError(f"{what} is not supported: only plain LoRA adapters can be folded", adapter_dir)
    if config.get("bias", "none") != "none":
        raise UsageError(f"bias={config['bias']!r} adapters train biases too: not supported", adapter_dir)
    if config.get("lora_alpha") is None or config.get("r") is None:
        raise FormatError("adapter_config.json lacks r or lora_alpha", adapter_dir)


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """peft's get_pattern_key: the first key K of PATTERNS with `(.*\\.)?K$` matching MODULE."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def base_name(module: str, names: set[str], adapter_dir: str) -> str:
    """The base tensor `<module>.weight`, allowing for a prefix on either side (a base saved
    from the bare model, `h.0.attn.c_attn.weight`, or from a wrapper with one more level)."""
    want = module + ".weight"
    if want in names:
        return want
    found = sorted(n for n in names if n.endswith("." + want) or want.endswith("." + n))
    if len(found) != 1:
        what = "no tensor" if not found else f"{len(found)} tensors ({', '.join(found[:3])})"
        raise UsageError(f"{what} in the base for the adapted module {module!r}", adapter_dir)
    return found[0]


def fold(adapter_dir: str, base: Checkpoint, dtype: str | None = None) -> Checkpoint:
    """BASE with the adapter in ADAPTER_DIR folded into its weights; the rest is BASE's, as it was."""
    config, adapter = read_adapter(adapter_dir)
    refuse_variants(config, adapter_dir)
    pairs: dict[str, dict[str, Tensor]] = {}
    for t in adapter.tensors:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", t.name)
        if not m:
            raise UsageError(f"adapter tensor {t.name!r} is not a LoRA A or B matrix: not supported", adapter_dir)
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    names = {t.name for t in base.tensors}
    replaced: dict[tuple, Tensor] = {}  # by view: a folded weight changes every name of its tie, as in peft
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise FormatError(f"module {module!r} has {', '.join(ab)} but not both lora_A and lora_B", adapter_dir)
        a, b = ab["lora_A"], ab["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise UsageError(f"module {module!r}: convolution LoRA is not supported", adapter_dir)
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise FormatError(f"module {module!r}: lora_A is {list(a.shape)} but lora_B {list(b.shape)}", adapter_dir)
        r = pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        if r != rank:
            raise FormatError(f"module {module!r}: rank {rank} in the weights but r={r} in the config", adapter_dir)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        target = base[base_name(module, names, adapter_dir)]
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        product = (b.shape[0], a.shape[1])
        expected = product[::-1] if fan_in_fan_out else product
        if target.shape != expected:
            raise UsageError(
                f"module {module!r}: B @ A is {list(product)}{' transposed' if fan_in_fan_out else ''}"
                f" but {target.name!r} is {list(target.shape)}",
                adapter_dir,
            )
        if target.view_key() in replaced:
            raise FormatError(f"two adapted modules share the weight {target.name!r}", adapter_dir)
        made = computed(target, dtype or target.dtype, folded(target, a, b, scale, fan_in_fan_out))
        replaced[target.view_key()] = made
    tensors: list[Tensor] = []
    for t in base.tensors:
        if t.view_key() in replaced:
            new = replaced[t.view_key()]
            tensors.append(ComputedTensor(t.name, t.shape, new.dtype, new.storage, attrs=dict(t.attrs)))
        else:
            tensors.append(t)
    return Checkpoint(base.source, base.format, tensors, dict(base.metadata), base.extra)


def folded(w: Tensor, a: Tensor, b: Tensor, scale: float, transpose: bool) -> Chunks:
    """W + SCALE * (B @ A) (transposed with TRANSPOSE), in float32, a block of rows at a time."""
    import numpy as np

    def produce(elements: int) -> Iterator[np.ndarray]:
        a32 = a.array().astype(np.float32)
        b32 = b.array().astype(np.float32) * np.float32(scale)
        left, right = (a32.T, b32.T) if transpose else (b32, a32)  # delta = left @ right
        cols = w.shape[1]
        rows_per = max(1, min(w.shape[0], MERGE_CHUNK // max(cols, 1)))
        start = 0
        for chunk in w.chunks(rows_per * cols):
            n = chunk.size // cols
            out = chunk.reshape(n, cols).astype(np.float32)
            out += left[start : start + n] @ right
            start += n
            yield out.reshape(-1)

    return produce


# --- extracting an adapter: the truncated SVD of a fine-tune's differences ----------------------


def extract(
    base: Checkpoint, tuned: Checkpoint, rank: int, pattern: str | None = None, fan_in_fan_out: bool = False
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """A LoRA adapter approximating TUNED - BASE: (adapter_config, peft-named tensors, names of the
    differing tensors it cannot hold). Each 2-D `*.weight` that PATTERN selects (all by default)
    and that differs becomes B @ A, the best rank-RANK approximation of its difference (the
    truncated SVD, singular values split evenly between B and A), with lora_alpha = r (scale 1).
    FAN_IN_FAN_OUT: the weights are stored (in, out), as GPT-2's Conv1D stores them."""
    import numpy as np

    from paramctl.table import compile_pattern

    if rank < 1:
        raise UsageError(f"--rank must be at least 1, not {rank}")
    keep = compile_pattern(pattern) if pattern else None
    in_base = {t.name: t for t in base.tensors}
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    left_out: list[str] = []
    done: set[tuple] = set()
    for t in tuned.tensors:
        b = in_base.get(t.name)
        if b is None or b.shape != t.shape or (keep and not keep.search(t.name)) or t.view_key() in done:
            continue
        done.add(t.view_key())
        delta = t.array().astype(np.float32) - b.array().astype(np.float32)
        if not np.any(delta):
            continue
        if len(t.shape) != 2 or not t.name.endswith(".weight"):
            left_out.append(t.name)
            continue
        matrix = delta.T if fan_in_fan_out else delta  # (out, in), as B @ A is
        u, s, vh = np.linalg.svd(matrix, full_matrices=False)
        r = min(rank, s.size)
        root = np.sqrt(s[:r])
        module = t.name.removesuffix(".weight")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(root[:, None] * vh[:r])
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(u[:, :r] * root[None, :])
        targets.append(module)
    if not targets:
        raise UsageError("no 2-D weight differs between the two checkpoints: nothing to extract", tuned.source)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "task_type": None,
    }
    return config, tensors, left_out


def write_adapter(directory: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """ADAPTER_DIR with adapter_config.json and adapter_model.safetensors, each written atomically."""
    from paramctl.formats import atomic_path, save
    from paramctl.table import tensor_from_array

    os.makedirs(directory, exist_ok=True)
    table = Checkpoint(directory, "safetensors", [tensor_from_array(k, v) for k, v in tensors.items()])
    save(table, os.path.join(directory, "adapter_model.safetensors"), "safetensors")
    with atomic_path(os.path.join(directory, "adapter_config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
