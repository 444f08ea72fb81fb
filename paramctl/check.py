"""`check` rules: what a CI gate asks of a checkpoint, each failure named with its rule."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from paramctl.dtypes import FLOATING, check_name
from paramctl.errors import UsageError
from paramctl.stats import summaries
from paramctl.table import Checkpoint, Tensor, compile_pattern

Failure = dict[str, Any]

# What a tensor is in a training checkpoint: the model's own tensors (parameters and buffers), the
# optimizer's state, or a tracker (Lightning's `callbacks.ModelCheckpoint{...}.kth_value`, which is
# legitimately inf, and its `loops` counters) that is neither.
MODEL, OPTIMIZER, TRACKER = "model", "optimizer", "tracker"
# the roots of a Lightning checkpoint that hold the model and the optimizer; every other root
# (callbacks, loops, lr_schedulers, hyper_parameters) holds trackers
LIGHTNING_ROOTS = {"state_dict": MODEL, "optimizer_states": OPTIMIZER}
OPTIMIZER_PREFIXES = ("optimizer_weights/", "optimizer/")  # Keras: tf-keras 2 full files, Keras 3


def roles(ckpt: Checkpoint) -> dict[int, str]:
    """The role of each of CKPT's tensors, by id: MODEL, OPTIMIZER or TRACKER.

    In a `.pt`, from where the tensor sits in the saved object: a Lightning checkpoint (a dict of
    `state_dict`, `pytorch-lightning_version` / `callbacks`, ...) by its root key; elsewhere, a
    tensor inside an optimizer's `state_dict()` (a dict of `state` and `param_groups`) is optimizer
    state. In Keras HDF5, the optimizer's groups. Everything else is the model's."""
    if ckpt.format == "sharded":
        found: dict[int, str] = {}
        for shard in ckpt.extra.shards:
            found.update(roles(shard.ckpt))
        return {id(t): found.get(id(t), MODEL) for t in ckpt.tensors}
    root = ckpt.extra if ckpt.format in ("pt", "pt-legacy") else None
    if not isinstance(root, dict):
        return {id(t): OPTIMIZER if t.name.startswith(OPTIMIZER_PREFIXES) else MODEL for t in ckpt.tensors}
    from paramctl.formats.pytorch import POSITION

    lightning = "state_dict" in root and ("pytorch-lightning_version" in root or "callbacks" in root)
    optimizers = set() if lightning else set(optimizer_paths(root))
    found = {}
    for t in ckpt.tensors:
        position = t.attrs.get(POSITION)
        if not isinstance(position, tuple) or not position:
            found[id(t)] = MODEL
        elif lightning:
            found[id(t)] = LIGHTNING_ROOTS.get(position[0], TRACKER)
        else:
            inside = any(position[:n] in optimizers for n in range(len(position)))
            found[id(t)] = OPTIMIZER if inside else MODEL
    return found


def optimizer_paths(root: dict) -> Iterable[tuple]:
    """The key paths of ROOT's optimizer state dicts (`{"state": ..., "param_groups": ...}`)."""
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        keys, node = stack.pop()
        if isinstance(node, dict):
            if "state" in node and "param_groups" in node:
                yield keys
                continue
            stack.extend(((*keys, k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend(((*keys, i), v) for i, v in enumerate(node))


def in_scope(ckpt: Checkpoint, tensors: Sequence[Tensor]) -> list[Tensor]:
    """TENSORS without CKPT's trackers: what `check` looks at unless --all."""
    role = roles(ckpt)
    return [t for t in tensors if role.get(id(t), MODEL) != TRACKER]


def check(
    tensors: Sequence[Tensor],
    max_abs: float | None = None,
    dtype: str | None = None,
    no_all_zero: bool = False,
    expected: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[Sequence[Tensor]], Iterable[Tensor]] = iter,
) -> list[Failure]:
    """Every rule TENSORS break: no NaN/Inf always; the others when asked for."""
    if dtype is not None:
        check_name(dtype)
    failures: list[Failure] = []

    def fail(name: str, rule: str, detail: str) -> None:
        failures.append({"name": name, "rule": rule, "detail": detail})

    seen = set()
    for t, s in zip(progress(tensors), summaries(tensors)):
        seen.add(t.name)
        if s.nans:
            fail(t.name, "nan", f"{s.nans} NaN of {t.numel}")
        if s.infs:
            fail(t.name, "inf", f"{s.infs} Inf of {t.numel}")
        absmax = s.row()["absmax"]
        if max_abs is not None and absmax is not None and absmax > max_abs:
            fail(t.name, "max-abs", f"|value| reaches {absmax:.6g} > {max_abs:g}")
        if dtype is not None and t.dtype in FLOATING and t.dtype != dtype:
            fail(t.name, "dtype", f"{t.dtype}, expected {dtype}")
        if no_all_zero and t.numel and s.zeros == t.numel:
            fail(t.name, "all-zero", f"all {t.numel} values are zero")
        if expected is not None:
            want = expected.get(t.name)
            if want is None:
                fail(t.name, "extra", "not in the expected list")
                continue
            if list(t.shape) != list(want["shape"]):
                fail(t.name, "shape", f"{list(t.shape)}, expected {list(want['shape'])}")
            if t.dtype != want["dtype"]:
                fail(t.name, "dtype", f"{t.dtype}, expected {want['dtype']}")
    for name in expected or {}:
        if name not in seen:
            fail(name, "missing", "expected but not in the checkpoint")
    return failures


def read_expectations(path: str, pattern: str | None, exclude: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes from a `paramctl ls --format json` file, filtered like the tensors."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        expected = {r["name"]: {"shape": list(r["shape"]), "dtype": r["dtype"]} for r in rows}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"not a `paramctl ls --format json` list: {e}", path) from None
    keep = compile_pattern(pattern) if pattern else None
    drops = [compile_pattern(p) for p in exclude]
    return {
        name: want
        for name, want in expected.items()
        if (keep is None or keep.search(name)) and not any(d.search(name) for d in drops)
    }
