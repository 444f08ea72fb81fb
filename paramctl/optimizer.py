"""Optimizer state by parameter name, and edits that keep it consistent with the parameters.

A PyTorch optimizer's `state_dict()` keys its state by parameter index: `state[i]` holds
`exp_avg`, `exp_avg_sq` and `step` (Adam) for the i-th parameter the optimizer was given, and
`param_groups[g]["params"]` lists the indices of each group. The indices follow the order the
model's `named_parameters()` gave them (a tie once, buffers left out) when the optimizer was
built from `model.parameters()`: that order is taken from the state dict beside it (Lightning's
`state_dict`, or the `model` entry of a plain checkpoint), without the tensors that are buffers
by name (`running_mean`, `running_var`, `num_batches_tracked`) or by dtype (integers).

A mapping is accepted only when it is the one way to lay the optimizer's parameters along the
model's in order with every moment shaped as its parameter (`exp_avg.shape == param.shape`);
anything else (two groups whose parameters interleave over layers of equal shapes, a model
entry that cannot be found) is reported as unmapped with the reason, never guessed.

Keras 3 files keep an optimizer's variables as `optimizer/vars/N`: the iteration count, the
learning rate (unless it is a schedule), then each slot (Adam: momentum, velocity) of each
trainable variable in the model's order, which the archive's config.json gives.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from paramctl.dtypes import FLOATING
from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Storage, Tensor

POSITION = "position"  # the .pt reader's Tensor.attrs key (formats.pytorch.POSITION)
BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")
MODEL_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "network", "module")
MOMENTS = ("exp_avg", "momentum_buffer", "momentum", "m", "square_avg", "sum")  # the first moment, by optimizer
SECOND_MOMENTS = ("exp_avg_sq", "velocity", "v")
KERAS_OPTIMIZER = re.compile(r"optimizer/vars/(?P<index>\d+)")
KERAS_VAR = re.compile(r"(?P<layer>.+)/vars/(?P<index>\d+)")
# TensorFlow checkpoints (FORMATS.md part two): legacy optimizers name a slot's variable in its key;
# Keras 2.11+ optimizers keep `optimizer/_variables/N`, each trainable variable's slots in turn
VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
TF_SLOT = re.compile(r"(?P<param>.+)/\.OPTIMIZER_SLOT/(?P<optimizer>.+)/(?P<slot>[^/]+)" + re.escape(VALUE))
TF_VARIABLE = re.compile(r"(?P<optimizer>.*optimizer)/_variables/(?P<index>\d+)" + re.escape(VALUE))
TF_LAYER_VAR = re.compile(r"layer_with_weights-(?P<layer>\d+)/(?P<path>.+)" + re.escape(VALUE))
# the order Keras layers create their trainable variables in, by the variable's name
TF_CREATION_ORDER = {"kernel": 0, "embeddings": 0, "gamma": 0, "depthwise_kernel": 0, "pointwise_kernel": 1}
TF_CREATION_ORDER.update({"recurrent_kernel": 1, "beta": 2, "bias": 2})
TF_NOT_TRAINABLE = ("moving_mean", "moving_variance")


@dataclass
class Slot:
    """One parameter's state in an optimizer."""

    index: int  # the optimizer's parameter index (torch) or trainable-variable position (Keras)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # state name (exp_avg, velocity...) -> row
    param: Tensor | None = None  # the parameter's row, when mapped
    name: str | None = None  # the parameter's name as the model calls it (named_parameters)
    group: int | None = None  # its param_groups entry (torch)
    step: float | None = None  # a step count kept as a number, not a tensor (torch < 1.12)
    key: Any = None  # torch: its key in the state dict (the index, or FSDP's parameter name)

    def moment(self, names: tuple[str, ...]) -> Tensor | None:
        return next((self.tensors[n] for n in names if n in self.tensors), None)


@dataclass
class OptimizerState:
    """An optimizer's state in a checkpoint, slot by slot, with how it maps to the parameters."""

    label: str  # where it sits: `optimizer`, `optimizer_states.0`, `optimizer/vars`
    kind: str  # "torch" or "keras"
    slots: list[Slot]
    why: str = ""  # why the slots are not mapped to parameters ("" when they are)
    groups: list[dict] = field(default_factory=list)  # torch param_groups (lr, betas, eps, ...)
    shared: dict[str, Tensor] = field(default_factory=dict)  # Keras: iterations, learning_rate
    position: tuple = ()  # torch: the keys of the optimizer's dict in the saved object

    @property
    def mapped(self) -> bool:
        return not self.why

    def by_param(self) -> dict[int, Slot]:
        """Slots by the id of their parameter's row (mapped slots only)."""
        return {id(s.param): s for s in self.slots if s.param is not None} if self.mapped else {}


def find(ckpt: Checkpoint) -> list[OptimizerState]:
    """Every optimizer state in CKPT (PyTorch state dicts anywhere in a .pt; Keras 3 `optimizer/vars`)."""
    if ckpt.format == "pt" and isinstance(ckpt.extra, dict):
        return torch_states(ckpt)
    if any(KERAS_OPTIMIZER.fullmatch(t.name) for t in ckpt.tensors):
        return [keras_state(ckpt)]
    if any(TF_SLOT.fullmatch(t.name) for t in ckpt.tensors):
        return [tf_slot_state(ckpt)]
    if any(TF_VARIABLE.fullmatch(t.name) for t in ckpt.tensors):
        return [tf_variables_state(ckpt)]
    return []


# --- PyTorch -------------------------------------------------------------------------------------


def torch_states(ckpt: Checkpoint) -> list[OptimizerState]:
    from paramctl.check import optimizer_paths

    root = ckpt.extra
    rows = {t.attrs[POSITION]: t for t in ckpt.tensors if isinstance(t.attrs.get(POSITION), tuple)}
    found = []
    for path in optimizer_paths(root):
        node = lookup(root, path)
        label = ".".join(map(str, path)) or "the object"
        state, groups = node.get("state"), node.get("param_groups")
        if not isinstance(state, dict) or not isinstance(groups, list):
            continue
        params: list[Any] = [g.get("params") if isinstance(g, dict) else None for g in groups]
        if not all(isinstance(p, list) for p in params):
            continue
        by_name = all(type(i) is str for p in params for i in p)  # FSDP's full_optim_state_dict: keyed by name
        if not by_name and not all(type(i) is int for p in params for i in p):
            continue
        slots = []
        for g, indices in enumerate(params):
            for position, i in enumerate(indices):
                entry = state.get(i)
                tensors = {}
                if isinstance(entry, dict):
                    tensors = {str(k): rows[(*path, "state", i, k)] for k in entry if (*path, "state", i, k) in rows}
                slot = Slot(position if by_name else i, tensors, group=g, name=i if by_name else None, key=i)
                if isinstance(entry, dict) and type(entry.get("step")) in (int, float):  # torch < 1.12: a number
                    slot.step = entry["step"]
                slots.append(slot)
        opt = OptimizerState(label, "torch", slots, groups=[g for g in groups if isinstance(g, dict)], position=path)
        opt.why = map_by_name(root, path, opt, rows) if by_name else map_torch(ckpt, root, path, opt, rows)
        found.append(opt)
    return found


def map_by_name(root: dict, path: tuple, opt: OptimizerState, rows: dict[tuple, Tensor]) -> str:
    """State keyed by parameter name: each slot's parameter is the model's tensor of that name,
    where the model's state dict is beside it (shapes checked)."""
    entry = model_entry(root, path)
    for slot in opt.slots:
        param = rows.get((*entry, slot.name)) if entry is not None else None
        shape = moment_shape(slot)
        if param is not None and shape is not None and shape != param.shape:
            return f"the state of {slot.name} is shaped {list(shape)}, its parameter {list(param.shape)}"
        slot.param = param
    return ""


def lookup(root: Any, keys: tuple) -> Any:
    for k in keys:
        root = root[k]
    return root


def model_entry(root: dict, path: tuple) -> tuple | None:
    """The keys of the state dict that holds the parameters the optimizer at PATH was built on,
    looked for in the nearest dict holding the optimizer (Lightning's `optimizer_states` list sits
    beside `state_dict`): its one entry holding tensors directly (the conventional names
    first), else that dict itself when its own entries are tensors."""
    for depth in range(len(path) - 1, -1, -1):
        parent_keys = path[:depth]
        parent = lookup(root, parent_keys)
        if not isinstance(parent, dict):
            continue
        candidates = [
            k
            for k, v in parent.items()
            if k != path[depth] and isinstance(v, dict) and any(isinstance(x, Tensor) for x in v.values())
        ]
        named = [k for name in MODEL_KEYS for k in candidates if k == name]
        if named:
            return (*parent_keys, named[0])
        if len(candidates) == 1:
            return (*parent_keys, candidates[0])
        if not candidates and any(isinstance(v, Tensor) for v in parent.values()):
            return parent_keys
        return None
    return None


def map_torch(ckpt: Checkpoint, root: dict, path: tuple, opt: OptimizerState, rows: dict[tuple, Tensor]) -> str:
    """Give each slot of OPT its parameter; return why that cannot be done for certain ("" if done)."""
    entry = model_entry(root, path)
    if entry is None:
        return "no model state dict found beside it"
    seen_ties: set[str] = set()
    candidates: list[tuple[str, Tensor]] = []
    for key, value in lookup(root, entry).items():
        t = rows.get((*entry, key))
        if t is None or not isinstance(value, Tensor) or is_buffer(str(key), t):
            continue
        if t.tie is not None:
            if t.tie in seen_ties:
                continue
            seen_ties.add(t.tie)
        candidates.append((str(key), t))
    shapes = [moment_shape(s) for s in opt.slots]
    where = align(shapes, [t.shape for _, t in candidates])
    if where is None and len(opt.groups) > 1:
        where = align_groups(opt, shapes, [t.shape for _, t in candidates])
    if where is None:
        known = sum(s is not None for s in shapes)
        return (
            f"{len(opt.slots)} parameters ({known} with state) do not lay out one way only along the "
            f"{len(candidates)} tensors of {'.'.join(map(str, entry)) or 'the model'} by shape"
        )
    for slot, j in zip(opt.slots, where):
        slot.name, slot.param = candidates[j]
    return ""


def is_buffer(key: str, t: Tensor) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in BUFFER_LEAVES or not t.dtype.startswith(("float", "bfloat", "complex"))


def moment_shape(slot: Slot) -> tuple[int, ...] | None:
    """The shape of SLOT's parameter as its state says (a moment has the parameter's shape); None
    when it has no state yet."""
    for name, t in slot.tensors.items():
        if name != "step" and t.shape:
            return t.shape
    return None


def align(shapes: list[tuple | None], params: list[tuple]) -> list[int] | None:
    """The one increasing choice of PARAMS positions whose shapes are SHAPES (None: any), or None
    when there is none or more than one."""
    n, m = len(shapes), len(params)
    if n > m:
        return None
    if n == m and all(s is None or s == p for s, p in zip(shapes, params)):
        return list(range(n))
    # ways[i][j]: ways to lay the first i shapes along the first j params, counted up to 2
    ways = [[1] * (m + 1)] + [[0] * (m + 1) for _ in range(n)]
    for i in range(1, n + 1):
        row, prev, shape = ways[i], ways[i - 1], shapes[i - 1]
        for j in range(i, m + 1):
            fits = shape is None or shape == params[j - 1]
            row[j] = min(2, row[j - 1] + (prev[j - 1] if fits else 0))
    if ways[n][m] != 1:
        return None
    chosen, j = [], m
    for i in range(n, 0, -1):
        while ways[i][j - 1] == 1:
            j -= 1
        chosen.append(j - 1)
        j -= 1
    return chosen[::-1]


def align_groups(opt: OptimizerState, shapes: list[tuple | None], params: list[tuple]) -> list[int] | None:
    """Each param group laid out on its own (groups split by a rule such as 'no weight decay on
    biases'): accepted when each has one layout and together they use each parameter once."""
    where: list[int] = []
    start = 0
    for g in range(len(opt.groups)):
        count = sum(1 for s in opt.slots if s.group == g)
        placed = align(shapes[start : start + count], params)
        if placed is None:
            return None
        where += placed
        start += count
    return where if len(set(where)) == len(where) else None


# --- Keras 3 ---------------------------------------------------------------------------------------


def keras_state(ckpt: Checkpoint) -> OptimizerState:
    """`optimizer/vars/N` of a Keras 3 file, mapped to the trainable variables in the model's order."""
    from paramctl.init import Roles, keras_layer_configs

    variables = sorted(
        ((int(m["index"]), t) for t in ckpt.tensors if (m := KERAS_OPTIMIZER.fullmatch(t.name))), key=lambda x: x[0]
    )
    values = [t for _, t in variables]
    opt = OptimizerState("optimizer/vars", "keras", [])
    head = 0
    while head < len(values) and not values[head].shape and head < 2:
        head += 1
    opt.shared = dict(zip(("iterations", "learning_rate"), values[:head]))
    layers = list(keras_layer_configs(getattr(ckpt.extra, "config", None)))
    if not layers:
        opt.why = "no config.json: the model's layer order is unknown"
        return opt
    roles = Roles(ckpt, "keras")
    trainable: list[Tensor] = []
    for layer in layers:
        own = sorted(
            ((int(m["index"]), t) for t in ckpt.tensors if (m := KERAS_VAR.fullmatch(t.name)) and m["layer"] == layer),
            key=lambda x: x[0],
        )
        trainable += [t for _, t in own if roles.role(t) not in ("mean", "var", "integer")]
    return assign_slots(opt, trainable, values[head:], ("momentum", "velocity"))


def assign_slots(
    opt: OptimizerState, params: list[Tensor], values: list[Tensor], pair: tuple[str, str]
) -> OptimizerState:
    """OPT with VALUES (Keras optimizer variables: per parameter in order, each of its slots in
    turn) given to PARAMS, when their count and every shape fit; else OPT saying why not."""
    if not params or len(values) % len(params):
        opt.why = f"{len(values)} optimizer variables for {len(params)} trainable variables"
        return opt
    per = len(values) // len(params)
    names = {1: ("momentum",), 2: pair}.get(per) or tuple(f"slot{k}" for k in range(per))
    for i, param in enumerate(params):
        tensors = dict(zip(names, values[i * per : (i + 1) * per]))
        if any(t.shape != param.shape for t in tensors.values()):
            opt.why = f"optimizer variables do not match the trainable variables' shapes (at {param.name})"
            opt.slots = []
            return opt
        opt.slots.append(Slot(i, tensors, param, param.name))
    return opt


# --- TensorFlow checkpoints -----------------------------------------------------------------------


def tf_shared(ckpt: Checkpoint, prefix: str) -> dict[str, Tensor]:
    names: dict[str, tuple[str, ...]] = {
        "iterations": ("_iterations", "iter"),
        "learning_rate": ("_learning_rate", "learning_rate"),
    }
    names.update(beta_1=("beta_1",), beta_2=("beta_2",))
    rows = {t.name: t for t in ckpt.tensors}
    found = {}
    for key, leaves in names.items():
        for leaf in leaves:
            if f"{prefix}/{leaf}{VALUE}" in rows:
                found[key] = rows[f"{prefix}/{leaf}{VALUE}"]
                break
    return found


def tf_slot_state(ckpt: Checkpoint) -> OptimizerState:
    """A legacy optimizer's slots: each key names its variable (`<var>/.OPTIMIZER_SLOT/<opt>/m`)."""
    rows = {t.name: t for t in ckpt.tensors}
    slots: dict[str, Slot] = {}
    prefix = ""
    for t in ckpt.tensors:
        m = TF_SLOT.fullmatch(t.name)
        if m:
            prefix = m["optimizer"]
            param = m["param"] + VALUE
            slot = slots.setdefault(param, Slot(len(slots), {}, rows.get(param), param))
            slot.tensors[m["slot"]] = t
    opt = OptimizerState(prefix, "tf", list(slots.values()), shared=tf_shared(ckpt, prefix))
    wrong = [s.name for s in opt.slots if s.param is None or any(t.shape != s.param.shape for t in s.tensors.values())]
    if wrong:
        opt.why = f"slots whose variable is missing or shaped otherwise: {', '.join(map(str, wrong[:3]))}"
    return opt


def tf_variables_state(ckpt: Checkpoint) -> OptimizerState:
    """A Keras 2.11+ optimizer's `_variables/N` (N >= 1; 0 is the iteration count, saved as
    `_iterations`): each trainable variable's slots in turn, the variables in the model's order
    (`layer_with_weights-N`, then each layer's creation order: kernel, recurrent kernel, bias)."""
    variables = sorted(
        ((int(m["index"]), m["optimizer"], t) for t in ckpt.tensors if (m := TF_VARIABLE.fullmatch(t.name))),
        key=lambda x: x[0],
    )
    prefix = variables[0][1]
    values = [t for index, _, t in variables if index > 0]
    opt = OptimizerState(prefix, "tf", [], shared=tf_shared(ckpt, prefix))
    trainable = []
    for t in ckpt.tensors:
        m = TF_LAYER_VAR.fullmatch(t.name)
        if m and "/.OPTIMIZER_SLOT/" not in t.name:
            parts = m["path"].split("/")
            if parts[-1] in TF_NOT_TRAINABLE:
                continue
            if parts[-1] not in TF_CREATION_ORDER:
                opt.why = f"the creation order of {m['path']!r} in its layer is unknown"
                return opt
            trainable.append(((int(m["layer"]), parts[:-1], TF_CREATION_ORDER[parts[-1]]), t))
    trainable.sort(key=lambda x: x[0])
    return assign_slots(opt, [t for _, t in trainable], values, ("m", "v"))


# --- figures ---------------------------------------------------------------------------------------


def slot_rows(ckpt: Checkpoint, states: list[OptimizerState]) -> list[dict[str, Any]]:
    """`ls --optimizer`: each optimizer tensor under its parameter's name."""
    rows = []
    for opt in states:
        for slot in opt.slots:
            for state_name, t in slot.tensors.items():
                rows.append(
                    {
                        "param": slot.name if opt.mapped else None,
                        "state": state_name,
                        "index": slot.index,
                        "name": t.name,
                        "shape": list(t.shape),
                        "dtype": t.dtype,
                        "optimizer": opt.label,
                    }
                )
        for state_name, t in opt.shared.items():
            row = {"param": None, "state": state_name, "index": None, "name": t.name, "shape": list(t.shape)}
            rows.append({**row, "dtype": t.dtype, "optimizer": opt.label})
    return rows


def slot_stats(states: list[OptimizerState]) -> list[dict[str, Any]]:
    """`stats --optimizer`: per parameter, its step count, the norms of its moments, and the RMS
    of the update direction Adam takes, m_hat / (sqrt(v_hat) + eps) with the bias corrections of
    its step (the size of a step in units of the learning rate)."""
    import numpy as np

    rows = []
    for opt in states:
        shared_step = opt.shared.get("iterations")
        for slot in opt.slots:
            group = opt.groups[slot.group] if slot.group is not None and slot.group < len(opt.groups) else {}
            step_row = slot.tensors.get("step", shared_step)
            step = float(step_row.array().reshape(-1)[0]) if step_row is not None and step_row.numel == 1 else slot.step
            m, v = slot.moment(MOMENTS), slot.moment(SECOND_MOMENTS)
            mv = m.array().astype(np.float64) if m is not None else None
            vv = v.array().astype(np.float64) if v is not None else None
            update = None
            if mv is not None and vv is not None and mv.shape == vv.shape and mv.size:
                beta1, beta2 = betas(group, opt.shared)
                eps = group.get("eps", 1e-8 if opt.kind == "torch" else 1e-7)
                if step and step > 0:
                    mv, vv = mv / (1 - beta1**step), vv / (1 - beta2**step)
                update = float(np.sqrt(np.mean((mv / (np.sqrt(np.maximum(vv, 0)) + eps)) ** 2)))
            param = slot.param
            rows.append(
                {
                    "param": slot.name if opt.mapped else None,
                    "index": slot.index,
                    "shape": list(param.shape) if param is not None and opt.mapped else moment_shape(slot),
                    "step": step,
                    "lr": learning_rate(group, opt.shared.get("learning_rate")),
                    "m_norm": norm(m),
                    "v_norm": norm(v),
                    "update_rms": update,
                    "optimizer": opt.label,
                }
            )
    return rows


def learning_rate(group: dict, shared: Tensor | None) -> float | None:
    if isinstance(group.get("lr"), (int, float)):
        return float(group["lr"])
    return float(shared.array().reshape(-1)[0]) if shared is not None and shared.numel == 1 else None


def betas(group: dict, shared: dict[str, Tensor]) -> tuple[float, float]:
    """Adam's (beta1, beta2): a torch param group's `betas`, a TF optimizer's variables, or the defaults."""
    if "beta_1" in shared and "beta_2" in shared:
        return tuple(float(shared[b].array().reshape(-1)[0]) for b in ("beta_1", "beta_2"))  # type: ignore[return-value]
    pair = group.get("betas")
    if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(b, (int, float)) for b in pair):
        return float(pair[0]), float(pair[1])
    return 0.9, 0.999


def norm(t: Tensor | None) -> float | None:
    if t is None:
        return None
    import numpy as np

    return float(np.linalg.norm(t.array().astype(np.float64).reshape(-1)))


# --- edits -----------------------------------------------------------------------------------------


def note_unmapped(states: list[OptimizerState], edited: list[Tensor]) -> list[str]:
    """Notes for optimizers whose state the edit of EDITED could not be matched to (an edit of
    optimizer state itself, or of trackers, needs none)."""
    own = {id(t) for opt in states for s in opt.slots for t in [*s.tensors.values()]}
    own |= {id(t) for opt in states for t in opt.shared.values()}
    if all(id(t) in own or t.dtype not in FLOATING for t in edited):
        return []
    return [f"optimizer state in {opt.label} left as it was: {opt.why}" for opt in states if not opt.mapped]


def reset(ckpt: Checkpoint, states: list[OptimizerState], edited: list[Tensor]) -> list[str]:
    """Give each EDITED parameter the optimizer state of a parameter just added: moments zeroed
    (at the parameter's shape, if it changed) and its step count 0.

    For PyTorch's Adam, zero moments at step 0 make exactly the first update a fresh parameter
    (one without state) gets, and every index keeps its entry, so optimizers whose state is made
    at construction (Adagrad) still find theirs. Returns one note per parameter reset."""
    notes = note_unmapped(states, edited)
    ids = {id(t) for t in edited}
    ties = {t.tie for t in edited if t.tie is not None}
    for opt in states:
        for slot in opt.slots:
            param = slot.param
            if param is None or not opt.mapped:
                continue
            if id(param) not in ids and (param.tie is None or param.tie not in ties):
                continue
            if slot.step is not None:  # a numeric step lives in the saved object itself
                lookup(ckpt.extra, opt.position)["state"][slot.key]["step"] = 0
            resized = any(t.shape and t.shape != param.shape for t in slot.tensors.values())
            for t in slot.tensors.values():
                zero(ckpt, t, param.shape if t.shape else t.shape)  # moments follow the parameter; a step is 0-d
            shape = f" at {list(param.shape)}" if resized else ""
            own_step = "step" in slot.tensors or slot.step is not None
            step = ", step 0" if own_step else " (its step count is the optimizer's, shared: kept)"
            notes.append(f"{opt.label}: state of {slot.name} (index {slot.index}) reset: moments 0{shape}{step}")
    return notes


def zero(ckpt: Checkpoint, t: Tensor, shape: tuple[int, ...]) -> None:
    """Set T to zeros of SHAPE (its own storage when the shape changes)."""
    if tuple(shape) == t.shape:
        import numpy as np

        ckpt.assign(t, np.zeros(t.shape))
        return
    from paramctl.dtypes import itemsize

    nbytes = math.prod(shape) * itemsize(t.dtype)
    t.shape, t.storage, t.offset, t.stride = tuple(shape), Storage(nbytes, buffer=bytearray(nbytes)), 0, None


def drop(ckpt: Checkpoint, states: list[OptimizerState], removed: list[Tensor]) -> list[str]:
    """Take REMOVED parameters out of each PyTorch optimizer: their state entries go, their
    indices leave `param_groups`, and the indices after them are renumbered so that the
    optimizer's i-th parameter is still the model's i-th. Call after removing the rows."""
    notes = note_unmapped(states, removed)
    ids = {id(t) for t in removed}
    alive = {t.view_key() for t in ckpt.tensors}  # a tie keeps its parameter while one name stays
    for opt in states:
        if not opt.mapped:
            continue
        gone = {
            s.index for s in opt.slots if s.param is not None and id(s.param) in ids and s.param.view_key() not in alive
        }
        if not gone:
            continue
        if opt.kind != "torch":
            notes.append(f"{opt.label}: state of removed variables kept (a Keras file's variables are positional)")
            continue
        renumber(ckpt, opt, gone)
        names = ", ".join(s.name or "?" for s in opt.slots if s.index in gone)
        notes.append(f"{opt.label}: state of {names} removed; the indices after it renumbered")
    return notes


def renumber(ckpt: Checkpoint, opt: OptimizerState, gone: set[int]) -> None:
    """Take the slots whose index is in GONE out of OPT's state dict and param_groups; integer
    keys after them move down (FSDP's name keys stay as they are); rows follow their entries."""
    from paramctl.formats.pytorch import dotted

    node = lookup(ckpt.extra, opt.position)
    leaving = {s.key for s in opt.slots if s.index in gone}
    numbered = sorted(s.key for s in opt.slots if type(s.key) is int)
    new_key: dict[Any, Any] = {
        k: k - sum(1 for g in leaving if type(g) is int and g < k) for k in numbered if k not in leaving
    }
    new_key.update({s.key: s.key for s in opt.slots if type(s.key) is str and s.key not in leaving})
    state = node["state"]
    kept = [(new_key[k], v) for k, v in state.items() if k in new_key]
    state.clear()
    state.update(kept)
    for group in node["param_groups"]:
        group["params"] = [new_key[i] for i in group["params"] if i in new_key]
    rows = {id(t) for s in opt.slots if s.index in gone for t in s.tensors.values()}
    ckpt.remove([t for t in ckpt.tensors if id(t) in rows])
    depth = len(opt.position)
    for slot in opt.slots:
        if slot.key not in new_key or new_key[slot.key] == slot.key:
            continue
        for t in slot.tensors.values():
            position = t.attrs[POSITION]
            moved = (*position[: depth + 1], new_key[slot.key], *position[depth + 2 :])
            t.attrs[POSITION], t.name = moved, dotted(moved)
    ckpt.link_ties()


def matching(rows: list[dict[str, Any]], pattern: str | None, exclude: tuple[str, ...], source: str) -> list[dict]:
    """ROWS whose parameter (or, unmapped, tensor) name matches PATTERN and none of EXCLUDE; a
    checkpoint without optimizer state, or a PATTERN matching nothing, is an error."""
    from paramctl.table import compile_pattern

    if not rows:
        raise UsageError("no optimizer state (a PyTorch optimizer state_dict or Keras optimizer variables)", source)
    keep = compile_pattern(pattern) if pattern else None
    drops = [compile_pattern(p) for p in exclude]

    def name(row: dict) -> str:
        return row["param"] or row.get("name") or ""

    out = [r for r in rows if (keep is None or keep.search(name(r))) and not any(d.search(name(r)) for d in drops)]
    if not out:
        raise UsageError("no optimizer state matches", source)
    return out


LS_COLUMNS = ["param", "state", "name", "shape", "dtype"]
STATS_COLUMNS = ["param", "index", "shape", "step", "lr", "m_norm", "v_norm", "update_rms"]


def unmapped_notes(states: list[OptimizerState]) -> list[str]:
    return [f"{opt.label}: parameters not named: {opt.why}" for opt in states if not opt.mapped]
