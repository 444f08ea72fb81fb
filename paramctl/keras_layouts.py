"""Keras layouts: a table written into another Keras file kind is rewritten into that kind's layout,
or refused before anything is written.

Three layouts share HDF5:
- legacy (tf-keras 2 `save_weights('x.h5')`, and `model.save('x.h5')` under `model_weights/`):
  root attribute `layer_names`, each layer group's `weight_names`, loaded by position: the n-th
  layer with weights gets the n-th listed layer's weights, in `trainable + non_trainable` order.
- Keras 3 (`x.weights.h5`, and `model.weights.h5` inside `x.keras`): `layers/<snake class>[_n]/vars/<i>`
  (a recurrent layer's under `.../cell/vars/<i>`), found by path; `<i>` counts `trainable +
  non_trainable` variables too.

Where the mapping between them is certain, the table is renamed into the target's layout:
- Keras 3 -> legacy `.h5`: each layer's one `vars` group becomes one legacy layer, in model order.
  The order is the config's (a `.keras` archive's config.json) or, without one, certain only
  when every layer has the same class (`dense`, `dense_1`, ...: the suffixes count up in order).
- legacy full model (`model_config` present) -> Keras 3 `.weights.h5`: the config names each
  layer's class, hence its Keras 3 path; only for layer classes whose variables Keras 3 stores in
  the legacy order (WEIGHTED_CLASSES).
Anything else (a legacy `save_weights` file, which has no architecture, into `.weights.h5`; a
layer class outside the list; a layer with several variable groups) is refused: a file that
Keras's loader refuses, or loads into the wrong variables, is worse than none.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import tempfile
from typing import Any

from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Tensor

LEGACY, KERAS3 = "legacy", "keras3"
# layer classes whose variables are their own, in the order both layouts list them (trainable,
# then non-trainable): kernel, bias; gamma, beta, moving mean and variance; embeddings
WEIGHTED_CLASSES = {
    "Dense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "BatchNormalization",
    "LayerNormalization",
    "Embedding",
}
RECURRENT_CLASSES = {"GRU", "LSTM", "SimpleRNN"}  # Keras 3 keeps their variables under `cell`
VARS = re.compile(r"^(layers/[^/]+)/(?:([^/]+)/)?vars/(\d+)$")


def target_layout(path: str) -> str | None:
    """The layout Keras expects in a file at PATH: Keras 3 for `.weights.h5` and `.keras`, legacy
    for another `.h5` (which Keras 3 and tf-keras 2 load by position); None for standard output."""
    lower = path.lower()
    if lower.endswith((".weights.h5", ".keras")):
        return KERAS3
    if lower.endswith((".h5", ".hdf5")):
        return LEGACY
    return None


def source_layout(ckpt: Checkpoint, attributes: dict[str, Any]) -> str | None:
    """CKPT's Keras layout (ATTRIBUTES: its HDF5 root attributes), or None if it has none."""
    if "layer_names" in attributes or any(t.name.startswith("model_weights/") for t in ckpt.tensors):
        return LEGACY
    if ckpt.tensors and all(re.search(r"(^|/)vars/\d+$", t.name) for t in ckpt.tensors):
        return KERAS3
    return None


def fit_layout(ckpt: Checkpoint, target: str, fmt: str) -> Checkpoint:
    """CKPT rewritten into the Keras layout TARGET needs, or CKPT itself when it needs none;
    UsageError (before anything is written) when the mapping is not certain."""
    from paramctl.formats import non_tensor_entries

    if fmt not in ("hdf5", "keras") or ckpt.format not in ("hdf5", "keras"):
        return ckpt
    wanted = target_layout(target) if fmt == "hdf5" else KERAS3
    attributes = non_tensor_entries(ckpt)
    have = source_layout(ckpt, attributes)
    if wanted is None or have is None or wanted == have:
        return ckpt
    if fmt == "keras":
        return ckpt  # the .keras writer refuses anything but a .keras source itself
    if have == KERAS3:
        return keras3_to_legacy(ckpt, attributes)
    return legacy_to_keras3(ckpt, attributes)


def refuse(ckpt: Checkpoint, why: str, target: str) -> UsageError:
    return UsageError(f"cannot write this {ckpt.format} file's Keras layout as {target}: {why}", ckpt.source)


# --- Keras 3 -> legacy -------------------------------------------------------------------------


def keras3_to_legacy(ckpt: Checkpoint, attributes: dict[str, Any]) -> Checkpoint:
    groups: dict[str, list[Tensor]] = {}  # layer path -> its variables, in index order
    subgroups: dict[str, set[str | None]] = {}
    dropped = []
    for t in ckpt.tensors:
        m = VARS.match(t.name)
        if m is None and t.name.startswith("optimizer/"):
            dropped.append(t.name)  # the legacy layout has no place for a Keras 3 optimizer's
            continue
        if m is None:  # a nested model's layers, the model's own variables: no certain legacy place
            raise refuse(ckpt, f"{t.name} is not a variable of a top-level layer", "a legacy .h5")
        layer, sub, _ = m.groups()
        groups.setdefault(layer, []).append(t)
        subgroups.setdefault(layer, set()).add(sub)
    target = "a legacy .h5 (layer_names / weight_names)"
    for layer, subs in subgroups.items():
        if len(subs) > 1:
            raise refuse(ckpt, f"{layer} keeps variables in several groups, whose legacy order is not certain", target)
    for layer, rows in groups.items():
        indices = [int(VARS.match(t.name).group(3)) for t in rows]  # type: ignore[union-attr]
        if sorted(indices) != list(range(len(rows))):
            raise refuse(ckpt, f"{layer}'s variables are not numbered 0..{len(rows) - 1}", target)
        rows.sort(key=lambda t: int(VARS.match(t.name).group(3)))  # type: ignore[union-attr]
    order = model_order(ckpt, list(groups))
    if order is None:
        raise refuse(
            ckpt,
            "without the model's config (a .keras archive has one) the order of layers of different "
            "classes is not certain; convert the .keras archive instead",
            target,
        )
    layer_names = [layer.split("/", 1)[1] for layer in order]
    tensors = []
    layout: dict[str, Any] = {"attrs": {"layer_names": layer_names, "backend": "tensorflow"}, "groups": {}}
    layout["attrs"]["keras_version"] = keras_version(ckpt, attributes)
    for layer, name in zip(order, layer_names):
        weight_names = [f"vars/{i}" for i in range(len(groups[layer]))]
        layout["groups"][name] = {"weight_names": weight_names}
        for t, weight in zip(groups[layer], weight_names):
            tensors.append(renamed(t, f"{name}/{weight}"))
    notes = [f"left out {len(dropped)} optimizer tensor(s): the legacy layout is the model's only"] if dropped else []
    return skeleton_checkpoint(ckpt, tensors, layout, notes)


def model_order(ckpt: Checkpoint, layers: list[str]) -> list[str] | None:
    """LAYERS (`layers/<name>` paths) in model order, or None if it is not certain."""
    config = getattr(ckpt.extra, "config", None)
    if config:
        try:
            paths = keras3_paths(json.loads(config))
        except (ValueError, KeyError, TypeError):
            return None
        if paths is not None:
            ordered = [p for p in paths.values() if p in layers]
            return ordered if sorted(ordered) == sorted(layers) else None
    bases = {re.sub(r"_\d+$", "", layer) for layer in layers}
    if len(bases) > 1:
        return None
    return sorted(layers, key=lambda layer: int(m.group(1)) if (m := re.search(r"_(\d+)$", layer)) else 0)


def keras3_paths(config: dict[str, Any]) -> dict[str, str] | None:
    """Layer name -> its Keras 3 path (`layers/dense_1`) for a Sequential or functional model
    CONFIG (`model_config` or config.json), in model order; None for other models."""
    if not isinstance(config, dict) or config.get("class_name") not in ("Sequential", "Functional", "Model"):
        return None
    layers = config["config"]["layers"]
    used: dict[str, int] = {}
    paths = {}
    for layer in layers:
        snake = to_snake_case(layer["class_name"])
        if snake in used:
            used[snake] += 1
            unique = f"{snake}_{used[snake]}"
        else:
            used[snake] = 0
            unique = snake
        paths[layer["config"]["name"]] = f"layers/{unique}"
    return paths


def to_snake_case(name: str) -> str:
    """As keras.src.utils.naming.to_snake_case, which names Keras 3's layer paths."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_version(ckpt: Checkpoint, attributes: dict[str, Any]) -> str:
    """The Keras version that wrote CKPT (never '1', for which tf-keras transposes conv kernels)."""
    version = attributes.get("keras_version")
    return str(version) if version and not str(version).startswith("1") else "3.0.0"


# --- legacy -> Keras 3 -------------------------------------------------------------------------


def legacy_to_keras3(ckpt: Checkpoint, attributes: dict[str, Any]) -> Checkpoint:
    target = "Keras 3 .weights.h5 (layers/<name>/vars/<i>)"
    raw = attributes.get("model_config")
    if not raw:
        raise refuse(
            ckpt,
            "a legacy weights file does not say which class each layer is, which names its Keras 3 path; "
            "convert the file of model.save('x.h5'), or load_weights it in Keras and save_weights again",
            target,
        )
    try:
        config = json.loads(raw) if isinstance(raw, str) else raw
        paths = keras3_paths(config)
        classes = {layer["config"]["name"]: layer["class_name"] for layer in config["config"]["layers"]}
    except (ValueError, KeyError, TypeError):
        paths = None
    if paths is None:
        raise refuse(ckpt, "its model_config is not a Sequential or functional model", target)
    prefix = "model_weights/" if any(t.name.startswith("model_weights/") for t in ckpt.tensors) else ""
    tensors, dropped = [], []
    by_layer: dict[str, list[Tensor]] = {}
    for t in ckpt.tensors:
        if not t.name.startswith(prefix) or (prefix == "" and t.name.startswith("optimizer_weights/")):
            dropped.append(t.name)
            continue
        layer = t.name[len(prefix) :].split("/", 1)[0]
        by_layer.setdefault(layer, []).append(t)
    for layer, rows in by_layer.items():
        cls = classes.get(layer)
        if layer not in paths or cls is None:
            raise refuse(ckpt, f"layer {layer!r} is not in its model_config", target)
        if cls in RECURRENT_CLASSES:
            base = f"{paths[layer]}/cell/vars"
        elif cls in WEIGHTED_CLASSES:
            base = f"{paths[layer]}/vars"
        else:
            raise refuse(ckpt, f"layer {layer!r} is a {cls}, whose Keras 3 variables paramctl does not map", target)
        tensors += [renamed(t, f"{base}/{i}") for i, t in enumerate(rows)]
    notes = [f"left out {len(dropped)} optimizer tensor(s): Keras 3 lays the optimizer out anew"] if dropped else []
    return skeleton_checkpoint(ckpt, tensors, {"attrs": {}, "groups": {}}, notes)


# --- the rewritten table -----------------------------------------------------------------------


def renamed(t: Tensor, name: str) -> Tensor:
    return Tensor(name, t.shape, t.dtype, t.storage, t.offset, t.stride, attrs=dict(t.attrs))


def skeleton_checkpoint(
    ckpt: Checkpoint, tensors: list[Tensor], layout: dict[str, Any], notes: list[str]
) -> Checkpoint:
    """A table of TENSORS whose HDF5 file (the writer's template) holds LAYOUT's root and group
    attributes: a small file of groups and placeholder datasets, removed at exit."""
    import h5py
    import numpy as np

    from paramctl import output
    from paramctl.formats.hdf5 import H5Image

    for note in notes:
        output.note(f"warning: {note}")
    fd, path = tempfile.mkstemp(prefix="paramctl-layout-", suffix=".h5")
    os.close(fd)
    atexit.register(_remove, path)
    strings = h5py.string_dtype()
    with h5py.File(path, "w", track_order=True) as f:
        # as Keras writes them: text as a string, name lists as fixed-length bytes
        for group, attrs in [("/", layout["attrs"]), *layout["groups"].items()]:
            g = f.require_group(group)
            for key, value in attrs.items():
                if isinstance(value, str):
                    g.attrs.create(key, value, dtype=strings)
                else:
                    g.attrs.create(key, np.array([v.encode() for v in value], dtype="S"))
        for t in tensors:
            parent = f.require_group(os.path.dirname(t.name)) if "/" in t.name else f
            parent.create_dataset(os.path.basename(t.name), shape=(), dtype="f4")
    return Checkpoint(ckpt.source, "hdf5", tensors, extra=H5Image(path))


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
