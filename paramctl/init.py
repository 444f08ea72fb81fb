"""Initializers, fans and roles for `reinit`; safe value expressions for `set`.

`reinit` follows MXNet's `Initializer`: each tensor has a role, read from its name (and, for the
Keras 3 `layers/<layer>/vars/<i>` names, from its layer's class and the variable's position).
Weights get the initializer the user names; biases, betas and running means get 0; norm scales
and running variances get 1; integer and bool tensors, and optimizer state, are left alone.
Fans are computed in the layout of the file's framework, so `kaiming_normal` gives a PyTorch
Linear weight `(256, 20)` and a Keras Dense kernel `(20, 256)` the same std, sqrt(2/20).

Every draw is seeded from (seed, name) alone, in float32, and then cast to the tensor's dtype.
A SPEC and an expression are parsed with `ast` and never evaluated as Python. torch is imported
only to draw values.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Tensor

if TYPE_CHECKING:
    import ast

    import numpy as np
    import torch

LAYOUTS = ("torch", "keras")

# --- fans --------------------------------------------------------------------------------------


def default_layout(ckpt: Checkpoint) -> str:
    """The layout of the framework that writes CKPT's format, as its format registers it."""
    from paramctl.formats import layout

    return layout(ckpt)


def fan_in_out(shape: tuple[int, ...], layout: str) -> tuple[int, int] | None:
    """(fan_in, fan_out) as torch.nn.init computes them for `(out, in, *k)` (ConvTranspose:
    `(in, out/groups, *k)`, taken as stored, as PyTorch does), or Keras `compute_fans` for
    `(in, out)` and `(*k, in, out)`. None below two dimensions, where PyTorch has no fans."""
    if len(shape) < 2:
        return None
    if layout == "torch":
        receptive = math.prod(shape[2:])
        return shape[1] * receptive, shape[0] * receptive
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def tensor_seed(seed: int, name: str) -> int:
    """The seed of NAME's draw: a hash of (SEED, NAME) alone, stable across runs and machines
    (unlike `hash()`), so a tensor's values do not depend on what else is re-initialized."""
    import hashlib

    key = f"{seed}\0{name}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


# --- roles -------------------------------------------------------------------------------------

WEIGHT_ROLES = ("weight", "embedding", "recurrent")
ROLE_VALUES = {"bias": 0.0, "beta": 0.0, "mean": 0.0, "gamma": 1.0, "var": 1.0}
KEPT_ROLES = ("integer", "state")  # never re-initialized

LEAF_ROLES = {
    "kernel": "weight",
    "depthwise_kernel": "weight",
    "pointwise_kernel": "weight",
    "in_proj_weight": "weight",
    "q_proj_weight": "weight",
    "k_proj_weight": "weight",
    "v_proj_weight": "weight",
    "recurrent_kernel": "recurrent",
    "embeddings": "embedding",
    "in_proj_bias": "bias",
    "beta": "beta",
    "gamma": "gamma",
    "scale": "gamma",
    "running_mean": "mean",
    "moving_mean": "mean",
    "running_var": "var",
    "moving_variance": "var",
    "moving_var": "var",
    "i2h_weight": "weight",  # Gluon's RNN, LSTM and GRU layers
    "h2h_weight": "recurrent",
    "i2h_bias": "bias",
    "h2h_bias": "bias",
}
GLUON_RNN = re.compile(r"[lr]\d+_(?P<leaf>[ih]2h_(?:weight|bias))")  # a fused layer's l0_i2h_weight, r0_...
ATTENTION = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
TORCH_RNN = re.compile(r"(?P<kind>weight|bias)_(?P<part>ih|hh|hr)(?P<layer>_l\d+)?(?P<reverse>_reverse)?")
STATE = re.compile(r"optim(izer)?(_\w+)?|metrics")  # a name part under which tensors are training state
KERAS_VARS = re.compile(r"(?P<layer>(?:.*/)?(?P<part>[^/]+))/vars/(?P<index>\d+)")

# Keras 3 layers' variables in the order `build` creates them (snake-case class name -> roles)
KERAS_LAYER_VARS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ["dense", "einsum_dense", "conv1d", "conv2d", "conv3d", "conv1d_transpose", "conv2d_transpose"]
        + ["conv3d_transpose", "depthwise_conv1d", "depthwise_conv2d"],
        ("weight", "bias"),
    ),
    **dict.fromkeys(["separable_conv1d", "separable_conv2d"], ("weight", "weight", "bias")),
    **dict.fromkeys(
        ["lstm", "gru", "simple_rnn", "lstm_cell", "gru_cell", "simple_rnn_cell"], ("weight", "recurrent", "bias")
    ),
    "embedding": ("embedding",),
    "batch_normalization": ("gamma", "beta", "mean", "var"),
    "layer_normalization": ("gamma", "beta"),
    "group_normalization": ("gamma", "beta"),
    "rms_normalization": ("gamma",),
}


def leaf_of(name: str, by_suffix: bool = False) -> str:
    """The last part of NAME split on `.` and `/`, without a TensorFlow `:0` suffix. A flat MXNet
    symbol name (`dense0_weight`; `arg:dense0_weight`, `aux:batchnorm0_running_mean` from
    `export`) gives the suffix MXNet's Initializer matches it by (`weight`, `running_mean`), as
    does any unknown last part with BY_SUFFIX (an MXNet file: GluonNLP's `position_weight`)."""
    leaf = re.split(r"[./]", re.sub(r":\d+$|/\.ATTRIBUTES/VARIABLE_VALUE$", "", name))[-1]  # TF: k/.ATTRIBUTES/...
    rnn = GLUON_RNN.fullmatch(leaf)
    if rnn:
        return rnn["leaf"]
    if (leaf == name or by_suffix) and leaf not in LEAF_ROLES:
        flat = re.sub(r"^(arg|aux):", "", leaf)
        for known in sorted((*LEAF_ROLES, "weight", "bias"), key=len, reverse=True):
            if flat.endswith("_" + known):
                return known
    return leaf


def sibling_name(name: str, leaf: str) -> str:
    """NAME with its last part replaced by LEAF (`0.bias` -> `0.weight`, `fc/bias:0` -> `fc/kernel:0`)."""
    m = re.fullmatch(r"(?P<head>.*[./])?[^./]*?(?P<tail>:\d+)?", name, re.DOTALL)
    assert m is not None
    return f"{m['head'] or ''}{leaf}{m['tail'] or ''}"


def to_snake_case(name: str) -> str:
    """Keras' `naming.to_snake_case`: the class name Keras 3 files a layer's variables under."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_layer_configs(config: bytes | None) -> dict[str, dict[str, Any]]:
    """Each layer's config in a `.keras` archive's config.json, by the path Keras 3 saves its
    variables under: `layers/<snake_case(class)>[_<n>]`, nested models under their own path."""
    try:
        model = json.loads(config) if config else None
    except (ValueError, RecursionError):
        return {}
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, prefix: str) -> None:
        layers = node.get("config", {}).get("layers") if isinstance(node, dict) else None
        if not isinstance(layers, list):
            return
        used: dict[str, int] = {}
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
                continue
            name = to_snake_case(layer["class_name"])
            used[name] = used[name] + 1 if name in used else 0
            path = f"{prefix}layers/{name}" + (f"_{used[name]}" if used[name] else "")
            found[path] = layer
            walk(layer, path + "/")

    walk(model, "")
    return found


@dataclass(frozen=True)
class Target:
    """One tensor to fill (a tie group is one): what an initializer may ask about it."""

    name: str  # the first name of its tie group: what seeds the draw and what a custom initializer sees
    shape: tuple[int, ...]
    layout: str
    role: str
    fans: tuple[int, int] | None
    layer: str | None = None  # what torch_default / keras_default treat specially: "rnn", "attention", "lstm"
    weight_fans: tuple[int, int] | None = None  # a bias's: the fans of the weight beside it
    hidden: int | None = None  # a PyTorch RNN parameter's: the hidden size


class Roles:
    """The role of each tensor of CKPT, and what `*_default` initializers need to know about it."""

    def __init__(self, ckpt: Checkpoint, layout: str):
        self.layout = layout
        self.by_suffix = ckpt.format == "mxnet"  # roles by the name's end, as MXNet's Initializer
        self.tensors = {t.name: t for t in ckpt}
        self.layers = keras_layer_configs(getattr(ckpt.extra, "config", None))
        self.var_counts: dict[str, int] = {}
        for name in self.tensors:
            m = KERAS_VARS.fullmatch(name)
            if m:
                self.var_counts[m["layer"]] = self.var_counts.get(m["layer"], 0) + 1

    def role(self, t: Tensor) -> str:
        """weight, embedding, recurrent, bias, beta, gamma, mean, var, other; or integer
        (integer, bool and complex tensors) and state (optimizer and metric state), kept."""
        if not t.dtype.startswith(("float", "bfloat")):
            return "integer"
        parts = re.split(r"[./]", t.name)
        if any(STATE.fullmatch(p) for p in parts[:-1]):
            return "state"
        m = KERAS_VARS.fullmatch(t.name)
        if m:
            return self.keras_var_role(t, m)
        leaf = leaf_of(t.name, self.by_suffix)
        rnn = TORCH_RNN.fullmatch(leaf)
        if rnn:
            return {"weight": "recurrent" if rnn["part"] == "hh" else "weight", "bias": "bias"}[rnn["kind"]]
        if leaf == "weight":
            if len(t.shape) < 2:
                return "gamma" if t.shape else "other"  # a 1-D weight is a norm layer's scale
            return "embedding" if any("embed" in p.lower() or p in ("wte", "wpe") for p in parts) else "weight"
        if leaf == "bias":
            weight = self.tensors.get(sibling_name(t.name, "weight"))
            norm = (weight is not None and len(weight.shape) < 2) or sibling_name(
                t.name, "running_mean"
            ) in self.tensors
            return "beta" if norm else "bias"
        return LEAF_ROLES.get(leaf, "other")

    def keras_var_role(self, t: Tensor, m: re.Match[str]) -> str:
        """A Keras 3 `vars/<i>`: the role its layer class gives position i (the config's flags
        say which optional variables exist); else a weight if 2-D or more."""
        layer_path, index = m["layer"], int(m["index"])
        layer, part = layer_path, m["part"]
        if part == "cell" and "/" in layer_path:  # layers/lstm/cell/vars/0
            layer = layer_path.rsplit("/", 1)[0]
            part = layer.rsplit("/", 1)[-1]
        config = self.layers.get(layer)
        kind = to_snake_case(config["class_name"]) if config else re.sub(r"_\d+$", "", part)
        if kind not in KERAS_LAYER_VARS and kind.endswith("_dense"):  # MultiHeadAttention's query_dense, ...
            kind = "einsum_dense"
        expected = KERAS_LAYER_VARS.get(kind)
        if expected is None:
            return "weight" if len(t.shape) >= 2 else "other"
        flags = config.get("config", {}) if config else {}
        if isinstance(flags, dict) and kind.endswith("normalization"):
            scale = flags.get("scale", True) or flags.get("rms_scaling", False)
            center = flags.get("center", True) and not flags.get("rms_scaling", False)
            expected = tuple(r for r in expected if (r != "gamma" or scale) and (r != "beta" or center))
        count = self.var_counts.get(layer_path, 0)
        if count == len(expected) or (expected[-1] == "bias" and index < len(expected)):
            return expected[index] if index < len(expected) else "other"  # a missing bias is the last one
        if kind == "batch_normalization" and count - index <= 2:
            return ("mean", "var")[index - count + 2]  # the moving statistics always come last
        return "other"

    def target(self, t: Tensor, role: str) -> Target:
        leaf = leaf_of(t.name, self.by_suffix)
        layer = weight_fans = hidden = None
        rnn = TORCH_RNN.fullmatch(leaf)
        if rnn and self.layout == "torch":
            layer, hidden = "rnn", self.rnn_hidden_size(t, rnn)
        elif leaf in ATTENTION or (
            t.name.endswith(".out_proj.bias")
            and t.name.removesuffix("out_proj.bias") + "in_proj_weight" in self.tensors
        ):
            layer = "attention"  # nn.MultiheadAttention: xavier_uniform projections, zero biases
        elif re.search(r"(^|[./])lstm(_cell)?(_\d+)?[./]", t.name):
            layer = "lstm"
        if role == "bias":
            weight = self.bias_weight(t)
            weight_fans = fan_in_out(weight.shape, self.layout) if weight is not None else None
        return Target(
            t.tie or t.name, t.shape, self.layout, role, fan_in_out(t.shape, self.layout), layer, weight_fans, hidden
        )

    def bias_weight(self, t: Tensor) -> Tensor | None:
        """The weight beside bias T (`0.bias` -> `0.weight`, `fc/bias:0` -> `fc/kernel:0`, `vars/1` -> `vars/0`)."""
        m = KERAS_VARS.fullmatch(t.name)
        names = [f"{m['layer']}/vars/0"] if m else [sibling_name(t.name, "weight"), sibling_name(t.name, "kernel")]
        return next((self.tensors[n] for n in names if n in self.tensors and n != t.name), None)

    def rnn_hidden_size(self, t: Tensor, rnn: re.Match[str]) -> int | None:
        """The hidden size of the PyTorch RNN layer T belongs to: `weight_hr` (with proj_size),
        else `weight_hh` is `(gates * hidden, hidden)`."""
        suffix = (rnn["layer"] or "") + (rnn["reverse"] or "")
        for part in ("hr", "hh"):
            other = self.tensors.get(sibling_name(t.name, f"weight_{part}{suffix}"))
            if other is not None and len(other.shape) == 2:
                return other.shape[1]
        return None


# --- initializers ------------------------------------------------------------------------------

NONLINEARITIES = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
)
KERAS_TRUNCATION = 0.87962566103423978  # std of a unit normal truncated at +-2: Keras divides by it


class Initializer:
    """Fills a float32 torch tensor shaped like its target, in place or by returning a new one."""

    label = ""
    role_aware = False  # True: it has a rule for every role (the *_default initializers)

    def choose(self, target: Target) -> Initializer | str:
        """What fills TARGET (self, or the rule for its role), or why nothing can."""
        return self.refusal(target) or self

    def refusal(self, target: Target) -> str | None:
        return None

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> Any:
        raise NotImplementedError


class Constant(Initializer):
    def __init__(self, value: float, label: str | None = None):
        self.value = value
        self.label = label or f"constant({value!r})"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        values.fill_(self.value)


class Normal(Initializer):
    def __init__(self, mean: float, std: float, label: str | None = None):
        self.mean, self.std = mean, std
        self.label = label or f"normal(mean={mean!r}, std={std!r})"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        values.normal_(self.mean, self.std, generator=generator)


class Uniform(Initializer):
    def __init__(self, low: float, high: float, label: str | None = None):
        self.low, self.high = low, high
        self.label = label or f"uniform(low={low!r}, high={high!r})"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        values.uniform_(self.low, self.high, generator=generator)


class TruncNormal(Initializer):
    """torch.nn.init.trunc_normal_: N(mean, std) redrawn outside the absolute bounds [a, b]."""

    def __init__(self, mean: float, std: float, a: float, b: float):
        self.mean, self.std, self.a, self.b = mean, std, a, b
        self.label = f"trunc_normal(mean={mean!r}, std={std!r}, a={a!r}, b={b!r})"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        import torch

        torch.nn.init.trunc_normal_(values, self.mean, self.std, self.a, self.b, generator=generator)


class VarianceScaling(Initializer):
    """xavier_*, kaiming_*, lecun_*: std from the fans, computed as torch.nn.init does (so that a
    PyTorch-layout draw equals torch's bit for bit). In the Keras layout the normal variants are
    Keras': truncated at two standard deviations, the std divided by 0.8796 to make up for it."""

    def __init__(self, label: str, distribution: str, gain: float | None = None, **kaiming: Any):
        self.label, self.distribution, self.gain, self.kaiming = label, distribution, gain, kaiming

    def refusal(self, target: Target) -> str | None:
        if target.fans is None:
            return "needs at least 2 dimensions to have fans"
        if 0 in target.fans:
            return "has a zero fan"
        return None

    def std(self, fans: tuple[int, int]) -> float:
        import torch

        fan_in, fan_out = fans
        if self.gain is not None:  # xavier
            return self.gain * math.sqrt(2.0 / float(fan_in + fan_out))
        fan = fan_in if self.kaiming["mode"] == "fan_in" else fan_out
        gain = torch.nn.init.calculate_gain(self.kaiming["nonlinearity"], self.kaiming["a"])
        return gain / math.sqrt(fan)

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        import torch

        assert target.fans is not None
        std = self.std(target.fans)
        if self.distribution == "uniform":
            bound = math.sqrt(3.0) * std
            values.uniform_(-bound, bound, generator=generator)
        elif target.layout == "keras":
            std /= KERAS_TRUNCATION
            torch.nn.init.trunc_normal_(values, 0.0, std, -2 * std, 2 * std, generator=generator)
        else:
            values.normal_(0.0, std, generator=generator)


class Orthogonal(Initializer):
    """torch.nn.init.orthogonal_ (rows: dim 0) in the PyTorch layout; Keras' Orthogonal (columns:
    the last dim) in the Keras layout. Either way each output unit's weights are orthonormal."""

    def __init__(self, gain: float, label: str | None = None):
        self.gain = gain
        self.label = label or f"orthogonal(gain={gain!r})"

    def refusal(self, target: Target) -> str | None:
        return None if len(target.shape) >= 2 else "needs at least 2 dimensions"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        import torch

        if target.layout == "torch":
            torch.nn.init.orthogonal_(values, self.gain, generator=generator)
            return
        rows, cols = math.prod(target.shape[:-1]), target.shape[-1]
        draw = torch.empty(max(rows, cols), min(rows, cols)).normal_(0.0, 1.0, generator=generator)
        q, r = torch.linalg.qr(draw)
        q *= torch.sign(torch.diag(r))
        values.copy_((q.T if rows < cols else q).reshape(target.shape) * self.gain)


class Eye(Initializer):
    label = "eye"

    def refusal(self, target: Target) -> str | None:
        return None if len(target.shape) == 2 else "needs exactly 2 dimensions"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        import torch

        torch.nn.init.eye_(values)


class Dirac(Initializer):
    """torch.nn.init.dirac_: identity convolutions; in the Keras layout `(*k, in, out)` the same
    kernel, transposed."""

    def __init__(self, groups: int):
        self.groups = groups
        self.label = f"dirac(groups={groups})"

    def refusal(self, target: Target) -> str | None:
        if len(target.shape) not in (3, 4, 5):
            return "needs 3 to 5 dimensions (a convolution kernel)"
        out = target.shape[0] if target.layout == "torch" else target.shape[-1]
        return None if out % self.groups == 0 else f"{out} output channels do not split into {self.groups} groups"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        import torch

        n = values.dim()
        view = values if target.layout == "torch" else values.permute(n - 1, n - 2, *range(n - 2))
        torch.nn.init.dirac_(view, self.groups)


class Custom(Initializer):
    """A user's function, called as `func(tensor, name=, generator=, fan_in=, fan_out=)`."""

    def __init__(self, func: Callable[..., Any], label: str):
        self.func, self.label = func, label

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> Any:
        fan_in, fan_out = target.fans or (None, None)
        return self.func(values, name=target.name, generator=generator, fan_in=fan_in, fan_out=fan_out)


class FrameworkDefault(Initializer):
    """What a framework's layers do when they are built: a rule for every role."""

    role_aware = True

    def __init__(self, framework: str):
        self.framework = framework
        self.label = f"{framework}_default"

    def choose(self, target: Target) -> Initializer | str:
        rule = {"torch": self.torch_rule, "keras": self.keras_rule, "mxnet": self.mxnet_rule}[self.framework](target)
        if isinstance(rule, str):
            return rule
        return rule.refusal(target) or rule

    def torch_rule(self, target: Target) -> Initializer | str:
        """nn.Linear / nn.Conv* / nn.ConvTranspose* / nn.Embedding / norm layers' reset_parameters,
        nn.RNN / LSTM / GRU (U(+-1/sqrt(hidden)) everywhere), nn.MultiheadAttention."""
        role = target.role
        if target.layer == "rnn":
            if target.hidden is None:
                return "no weight_hh beside it to take the RNN's hidden size from"
            bound = 1.0 / math.sqrt(target.hidden)
            return Uniform(-bound, bound, f"uniform(+-1/sqrt({target.hidden}))")
        if target.layer == "attention":
            return xavier_uniform(1.0) if role == "weight" else zeros()
        if role in ("weight", "recurrent"):
            return kaiming("uniform", math.sqrt(5), "fan_in", "leaky_relu", "kaiming_uniform(a=sqrt(5))")
        if role == "embedding":
            return Normal(0.0, 1.0)
        if role == "bias":
            if target.weight_fans is None:
                return "no weight beside it to take fan_in from"
            fan_in = target.weight_fans[0]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            return Uniform(-bound, bound, f"uniform(+-1/sqrt({fan_in}))")
        return role_constant(role) or "no rule for a tensor of unknown role"

    def keras_rule(self, target: Target) -> Initializer | str:
        """Keras layers' defaults: glorot_uniform kernels, orthogonal recurrent kernels,
        U(+-0.05) embeddings, zero biases (an LSTM's forget gate: ones), ones and zeros for norms."""
        role = target.role
        if role == "weight":
            return VarianceScaling("glorot_uniform", "uniform", gain=1.0)
        if role == "recurrent":
            return orthogonal(1.0)
        if role == "embedding":
            return Uniform(-0.05, 0.05)
        if role == "bias" and target.layer == "lstm":
            return LstmBias()
        return role_constant(role) or "no rule for a tensor of unknown role"

    def mxnet_rule(self, target: Target) -> Initializer | str:
        """MXNet Gluon's global default: U(+-0.07) for weights, zeros and ones by role."""
        if target.role in WEIGHT_ROLES:
            return Uniform(-0.07, 0.07)
        return role_constant(target.role) or "no rule for a tensor of unknown role"


class LstmBias(Initializer):
    """Keras LSTM's `unit_forget_bias=True`: zeros, but ones for the forget gate (i, f, c, o)."""

    label = "zeros, forget gate ones"

    def refusal(self, target: Target) -> str | None:
        return None if target.shape and target.shape[-1] % 4 == 0 else "not an LSTM bias of 4 gates"

    def fill(self, values: torch.Tensor, target: Target, generator: torch.Generator) -> None:
        units = target.shape[-1] // 4
        values.zero_()
        values[..., units : 2 * units] = 1.0


def role_constant(role: str) -> Initializer | None:
    """The MXNet role default: 0 for biases, betas and means, 1 for gammas and variances."""
    if role not in ROLE_VALUES:
        return None
    return ones() if ROLE_VALUES[role] else zeros()


# --- the registry of named initializers: SPEC name -> factory of the SPEC's arguments ----------

REGISTRY: dict[str, Callable[..., Initializer]] = {}
ALIASES: dict[str, str] = {}


def registered(*aliases: str) -> Callable[[Callable[..., Initializer]], Callable[..., Initializer]]:
    def register(factory: Callable[..., Initializer]) -> Callable[..., Initializer]:
        REGISTRY[factory.__name__] = factory
        for alias in aliases:
            REGISTRY[alias] = factory
            ALIASES[alias] = factory.__name__
        return factory

    return register


def real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    if real(name, value) < 0:
        raise ValueError(f"{name} must not be negative, not {value!r}")
    return float(value)


@registered()
def zeros() -> Initializer:
    return Constant(0.0, "zeros")


@registered()
def ones() -> Initializer:
    return Constant(1.0, "ones")


@registered()
def constant(value: float) -> Initializer:
    return Constant(real("value", value))


@registered()
def normal(mean: float = 0.0, std: float = 1.0) -> Initializer:
    return Normal(real("mean", mean), positive("std", std))


@registered()
def uniform(low: float = 0.0, high: float = 1.0) -> Initializer:
    if real("low", low) > real("high", high):
        raise ValueError(f"low ({low!r}) must not exceed high ({high!r})")
    return Uniform(float(low), float(high))


@registered()
def trunc_normal(mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> Initializer:
    if positive("std", std) == 0:
        raise ValueError("std must be above 0")
    if real("a", a) >= real("b", b):
        raise ValueError(f"a ({a!r}) must be below b ({b!r}): they are absolute bounds, as in torch")
    return TruncNormal(real("mean", mean), float(std), float(a), float(b))


@registered("xavier", "glorot_uniform")
def xavier_uniform(gain: float = 1.0) -> Initializer:
    gain = real("gain", gain)
    return VarianceScaling(f"xavier_uniform(gain={gain!r})", "uniform", gain=gain)


@registered("glorot_normal")
def xavier_normal(gain: float = 1.0) -> Initializer:
    gain = real("gain", gain)
    return VarianceScaling(f"xavier_normal(gain={gain!r})", "normal", gain=gain)


def kaiming(distribution: str, a: Any, mode: Any, nonlinearity: Any, label: str | None) -> Initializer:
    a = real("a", a)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', not {mode!r}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}; not {nonlinearity!r}")
    label = label or f"kaiming_{distribution}(a={a!r}, mode={mode!r}, nonlinearity={nonlinearity!r})"
    return VarianceScaling(label, distribution, a=a, mode=mode, nonlinearity=nonlinearity)


@registered("kaiming", "he_uniform")
def kaiming_uniform(a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu") -> Initializer:
    return kaiming("uniform", a, mode, nonlinearity, None)


@registered("he_normal")
def kaiming_normal(a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu") -> Initializer:
    return kaiming("normal", a, mode, nonlinearity, None)


@registered()
def lecun_normal() -> Initializer:
    return kaiming("normal", 0.0, "fan_in", "linear", "lecun_normal")


@registered()
def lecun_uniform() -> Initializer:
    return kaiming("uniform", 0.0, "fan_in", "linear", "lecun_uniform")


@registered()
def orthogonal(gain: float = 1.0) -> Initializer:
    return Orthogonal(real("gain", gain))


@registered()
def eye() -> Initializer:
    return Eye()


@registered()
def dirac(groups: int = 1) -> Initializer:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, not {groups!r}")
    return Dirac(groups)


@registered()
def torch_default() -> Initializer:
    return FrameworkDefault("torch")


@registered()
def keras_default() -> Initializer:
    return FrameworkDefault("keras")


@registered()
def mxnet_default() -> Initializer:
    return FrameworkDefault("mxnet")


def known_initializers() -> str:
    """The registry as the user writes it: `normal(mean=0.0, std=1.0)`, with aliases."""
    by_name: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        by_name.setdefault(name, []).append(alias)
    shown = []
    for name, factory in REGISTRY.items():
        if name in ALIASES:
            continue
        params = list(inspect.signature(factory).parameters.values())
        args = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        aliases = f" (= {', '.join(by_name[name])})" if name in by_name else ""
        shown.append(f"{name}({args}){aliases}" if params else f"{name}{aliases}")
    return "; ".join(shown)


# --- SPEC parsing ------------------------------------------------------------------------------

CUSTOM_SPEC = re.compile(r"(?P<where>[^()\[\]'\"=,]+):(?P<func>[A-Za-z_]\w*)", re.DOTALL)


def parse_spec(spec: str) -> Initializer:
    """An initializer from SPEC: `xavier`, `normal(std=0.01)` (arguments are literals: the SPEC
    is parsed, never evaluated), or a custom one, `path/to/file.py:func` or `package.module:func`."""
    spec = spec.strip()
    custom = CUSTOM_SPEC.fullmatch(spec)
    if custom:
        return load_custom(custom["where"].strip(), custom["func"])
    import ast

    try:
        node = ast.parse(spec, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise bad_spec(spec, "not a name or a call with literal arguments") from None
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise bad_spec(spec, "arguments are literals: no * or **")
        args = [literal(spec, a) for a in node.args]
        kwargs = {k.arg: literal(spec, k.value) for k in node.keywords if k.arg is not None}
    else:
        raise bad_spec(spec, "not a name or a call with literal arguments")
    factory = REGISTRY.get(name)
    if factory is None:
        raise bad_spec(spec, f"unknown initializer {name!r}")
    try:
        inspect.signature(factory).bind(*args, **kwargs)
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise bad_spec(spec, f"{name}: {e}") from None


def literal(spec: str, node: ast.expr) -> Any:
    import ast

    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise bad_spec(spec, f"{ast.unparse(node)!r} is not a literal") from None


def bad_spec(spec: str, why: str) -> UsageError:
    return UsageError(f"invalid --init {spec!r}: {why}. Known initializers: {known_initializers()}")


def load_custom(where: str, func_name: str) -> Initializer:
    """`FILE.py:func` (the file is run as a module) or `package.module:func` (imported, the
    current directory first on the path, as `python -c` has it)."""
    label = f"{where}:{func_name}"
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            if not os.path.isfile(where):
                raise UsageError(f"invalid --init {label!r}: no such file {where!r}")
            module_name = "paramctl_custom_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(where))[0])
            loader_spec = importlib.util.spec_from_file_location(module_name, where)
            if loader_spec is None or loader_spec.loader is None:
                raise UsageError(f"invalid --init {label!r}: cannot load {where!r} as Python")
            module = importlib.util.module_from_spec(loader_spec)
            cache, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # run as a script: no __pycache__
            try:
                loader_spec.loader.exec_module(module)
            finally:
                sys.dont_write_bytecode = cache
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(where)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except UsageError:
        raise
    except (Exception, SystemExit) as e:
        raise UsageError(f"invalid --init {label!r}: loading {where} failed: {type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"invalid --init {label!r}: {where} has no function {func_name!r}")
    return Custom(func, label)


# --- the plan and the draw ---------------------------------------------------------------------


@dataclass
class Step:
    """What reinit does to one tensor (one tie group): fill it with `init`, or leave it (`init` None, `why`)."""

    tensor: Tensor
    target: Target
    init: Initializer | None
    why: str = ""


def plan(ckpt: Checkpoint, spec: Initializer, tensors: list[Tensor], layout: str, by_pattern: bool) -> list[Step]:
    """What SPEC does to each of TENSORS (a tie group once). Without a PATTERN (BY_PATTERN
    false), non-weights get their role's default and what SPEC cannot take is kept; with one,
    every selected tensor must take SPEC: a UsageError names each that cannot."""
    roles = Roles(ckpt, layout)
    steps, offenders, seen = [], [], set()
    for t in tensors:
        key = t.view_key()
        if key in seen:
            continue
        seen.add(key)
        role = roles.role(t)
        target = roles.target(t, role)
        if role in KEPT_ROLES:
            steps.append(Step(t, target, None, "optimizer state" if role == "state" else f"{t.dtype} values"))
            continue
        if t.numel == 0:
            steps.append(Step(t, target, None, "empty"))
            continue
        default = None if by_pattern or spec.role_aware else role_constant(role)
        if default is not None:
            steps.append(Step(t, target, default, f"{role} default"))
            continue
        chosen = spec.choose(target)
        if isinstance(chosen, Initializer):
            steps.append(Step(t, target, chosen))
        elif by_pattern or role in WEIGHT_ROLES:
            offenders.append(f"{t.name} {list(t.shape)} ({role}: {chosen})")
        else:
            steps.append(Step(t, target, None, chosen))
    if offenders:
        hint = "select what it can take with PATTERN" if not by_pattern else "narrow PATTERN or use --exclude"
        raise UsageError(f"{spec.label} cannot initialize {len(offenders)} tensor(s) ({hint}): " + "; ".join(offenders))
    return steps


def draw(step: Step, seed: int) -> np.ndarray:
    """STEP's values as a float32 array: drawn by its initializer from the generator seeded by
    (SEED, name)."""
    import numpy as np
    import torch

    assert step.init is not None
    target = step.target
    generator = torch.Generator().manual_seed(tensor_seed(seed, target.name))
    values = torch.empty(target.shape, dtype=torch.float32)
    try:
        with torch.no_grad():
            result = step.init.fill(values, target, generator)
    except Exception as e:
        if not isinstance(step.init, Custom):
            raise
        raise UsageError(f"{step.init.label} failed on {target.name!r}: {type(e).__name__}: {e}") from None
    if result is None:
        result = values
    if isinstance(result, torch.Tensor):
        result = result.detach().to("cpu", torch.float32).numpy()
    if not isinstance(result, np.ndarray) or result.dtype.kind not in "biuf":
        raise UsageError(f"{step.init.label} returned {type(result).__name__} for {target.name!r}, not a tensor")
    if tuple(result.shape) != target.shape:
        raise UsageError(
            f"{step.init.label} returned shape {list(result.shape)} for {target.name!r} of shape {list(target.shape)}"
        )
    return result.astype(np.float32)


def reinitialize(ckpt: Checkpoint, steps: list[Step], seed: int) -> None:
    """Draw each step's values and write them into CKPT (through ties and views), one tensor at
    a time so that only one float32 draw is held at once."""
    for step in steps:
        if step.init is not None:
            ckpt.assign(step.tensor, draw(step, seed))


# --- new shapes (deferred initialization on files) ---------------------------------------------------

# a grown vocabulary's new rows, as transformers' resize_token_embeddings draws them: a normal with
# the old rows' mean and this fraction of their covariance (in effect the mean, slightly jittered)
EMBEDDING_COVARIANCE_SCALE = 1e-9


@dataclass
class Resize:
    """One tensor (a tie group is one) given a new shape; its old values kept for --keep."""

    tensor: Tensor
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    role: str
    old: np.ndarray | None = None


def parse_shape(text: str) -> tuple[int, ...]:
    """`15,4` (or `15x4`, `[15, 4]`) as a shape."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("[]()")) if p]
    if not parts or not all(p.isdecimal() for p in parts):
        raise UsageError(f"invalid shape {text!r}: expected sizes separated by commas, such as 15,4")
    return tuple(int(p) for p in parts)


def resized_shape(shape: tuple[int, ...], role: str, layout: str, out: int | None, in_: int | None) -> tuple[int, ...]:
    """SHAPE with its output axis set to OUT and its input axis to IN_: PyTorch `(out, in, *k)`,
    Keras `(*k, in, out)`; a 1-D tensor (bias, norm scale, running mean) has only an output axis;
    an embedding's output axis is its rows (the vocabulary) in either layout."""
    new = list(shape)
    if not shape:
        return shape
    if len(shape) == 1 or role == "embedding":
        out_axis, in_axis = 0, (1 if len(shape) > 1 else None)
    elif layout == "torch":
        out_axis, in_axis = 0, 1
    else:
        out_axis, in_axis = len(shape) - 1, len(shape) - 2
    if out is not None:
        new[out_axis] = out
    if in_ is not None and in_axis is not None:
        new[in_axis] = in_
    return tuple(new)


def plan_resizes(
    ckpt: Checkpoint,
    tensors: list[Tensor],
    layout: str,
    shape: tuple[int, ...] | None,
    out: int | None,
    in_: int | None,
) -> list[Resize]:
    """The new shape of each of TENSORS (a tie group once; integer tensors never change)."""
    roles = Roles(ckpt, layout)
    resizes, seen = [], set()
    for t in tensors:
        key = t.view_key()
        if key in seen:
            continue
        seen.add(key)
        role = roles.role(t)
        if role in KEPT_ROLES:
            continue
        new = shape if shape is not None else resized_shape(t.shape, role, layout, out, in_)
        if new != t.shape:
            resizes.append(Resize(t, t.shape, new, role))
    if not resizes:
        raise UsageError("no selected tensor changes shape", ckpt.source)
    return resizes


def apply_resizes(ckpt: Checkpoint, resizes: list[Resize], keep: bool) -> None:
    """Give each resized tensor, under every name of its tie, a zeroed storage of its new shape
    (the values are drawn next); with KEEP, hold on to the old values first."""
    import numpy as np

    from paramctl.dtypes import itemsize
    from paramctl.table import Storage

    for r in resizes:
        key = r.tensor.view_key()
        if keep:
            r.old = np.array(r.tensor.array())
        nbytes = math.prod(r.new_shape) * itemsize(r.tensor.dtype)
        storage = Storage(nbytes, buffer=bytearray(nbytes))
        for t in ckpt.tensors:
            if t is r.tensor or (t.tie is not None and t.view_key() == key):
                t.shape, t.storage, t.offset, t.stride = r.new_shape, storage, 0, None
    ckpt.link_ties()


def keep_old_values(ckpt: Checkpoint, resizes: list[Resize], seed: int) -> list[str]:
    """Put each resized tensor's old values back where the shapes overlap. The rows a vocabulary
    (an embedding, or an output layer named lm_head) gains along its first axis are drawn as
    transformers' resize_token_embeddings draws them, from the old rows' mean and covariance."""
    import numpy as np

    notes = []
    for r in resizes:
        assert r.old is not None
        values = r.tensor.array().astype(np.float64)
        block = tuple(slice(0, min(a, b)) for a, b in zip(r.old_shape, r.new_shape))
        if len(r.old_shape) == len(r.new_shape):
            values[block] = r.old[block]
        grown = len(r.old_shape) == len(r.new_shape) == 2 and r.new_shape[0] > r.old_shape[0]
        vocabulary = r.role == "embedding" or "lm_head" in r.tensor.name
        if grown and vocabulary and r.old_shape[1] == r.new_shape[1] and r.old_shape[0] > 0:
            added = r.new_shape[0] - r.old_shape[0]
            values[r.old_shape[0] :] = mean_covariance_rows(r.old, added, tensor_seed(seed, r.tensor.name))
            notes.append(f"{r.tensor.name}: {added} new rows from the old rows' mean and covariance")
        ckpt.assign(r.tensor, values)
    return notes


def mean_covariance_rows(old: np.ndarray, count: int, seed: int) -> np.ndarray:
    """COUNT rows drawn as transformers' `_init_added_embeddings_weights_with_mean` draws them:
    a multivariate normal with the old rows' mean and 1e-9 times their covariance, or the mean
    itself when that covariance is not positive definite."""
    import numpy as np
    import torch

    rows = torch.from_numpy(np.asarray(old, dtype=np.float32))
    mean = rows.mean(dim=0)
    centered = rows - mean
    covariance = centered.T @ centered / rows.shape[0]
    scaled = EMBEDDING_COVARIANCE_SCALE * covariance
    try:
        torch.linalg.cholesky(scaled.double())
    except RuntimeError:  # not positive definite (fewer rows than columns, constant columns)
        return mean[None, :].repeat(count, 1).numpy()
    distribution = torch.distributions.MultivariateNormal(mean, covariance_matrix=scaled)
    with torch.random.fork_rng():  # MultivariateNormal.sample takes no generator
        torch.manual_seed(seed)
        return distribution.sample((count,)).numpy()
