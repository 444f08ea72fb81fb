"""reinit and set: initializers against torch.nn.init and Keras, fans, roles, seeds, ties, dtypes,
round trips through the real loaders, pipelines, refusals, and safe expressions."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, REPO, SAMPLES, run
from torch import nn

import paramctl
from paramctl.init import Custom, Roles, fan_in_out, load_custom, tensor_seed

STRANGE = REPO / "examples" / "strange_init.py"


def generator(seed: int, name: str) -> torch.Generator:
    """The generator reinit --seed SEED draws NAME from."""
    return torch.Generator().manual_seed(tensor_seed(seed, name))


def reinit(*args: str) -> None:
    result = run("reinit", *args)
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    return keras


@pytest.fixture(scope="module")
def layers_pt(tmp_path_factory) -> Path:
    """Weights of a Linear, a Conv2d, a grouped Conv2d and a ConvTranspose2d."""
    torch.manual_seed(0)
    modules = {
        "lin": nn.Linear(20, 256),
        "conv": nn.Conv2d(4, 8, 3),
        "gconv": nn.Conv2d(8, 8, 3, groups=4),
        "convt": nn.ConvTranspose2d(4, 6, 3),
    }
    path = tmp_path_factory.mktemp("layers") / "layers.pt"
    torch.save({f"{k}.weight": m.weight.detach() for k, m in modules.items()}, path)
    return path


# --- fans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [nn.Linear(20, 256), nn.Conv1d(3, 5, 7), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, (3, 5), groups=4)]
    + [nn.ConvTranspose2d(4, 6, 3), nn.ConvTranspose2d(8, 6, 3, groups=2), nn.Conv3d(2, 3, 2)],
    ids=["linear", "conv1d", "conv2d", "grouped", "transposed", "transposed-grouped", "conv3d"],
)
def test_torch_fans_are_torchs(module):
    weight = module.weight
    assert fan_in_out(tuple(weight.shape), "torch") == nn.init._calculate_fan_in_and_fan_out(weight)


def test_keras_fans_are_keras(keras):
    from keras.src.initializers.random_initializers import compute_fans

    model = keras.Sequential(
        [
            keras.Input((8, 8, 16)),
            keras.layers.Conv2D(32, 3),
            keras.layers.Conv2DTranspose(4, (3, 5)),
            keras.layers.Flatten(),
            keras.layers.Dense(7),
        ]
    )
    kernels = [tuple(w.shape) for w in model.weights if len(w.shape) >= 2]
    assert [k[-2:] for k in kernels] == [(16, 32), (4, 32), (320, 7)]  # Conv2DTranspose is (kh, kw, out, in)
    for shape in kernels:
        assert fan_in_out(shape, "keras") == compute_fans(shape)


def test_kaiming_normal_std_is_the_same_in_both_layouts(tmp_path):
    """The issue's example: a Keras Dense kernel (20, 256) and a PyTorch Linear weight (256, 20)."""
    from safetensors.numpy import save_file

    src = tmp_path / "k.safetensors"
    save_file({"keras_dense.kernel": np.zeros((20, 256), np.float32)}, str(src))
    torch.save({"linear.weight": torch.zeros(256, 20)}, tmp_path / "t.pt")
    reinit(
        str(src), "--init", "kaiming_normal", "--layout", "keras", "--seed", "1", "-o", str(tmp_path / "k2.safetensors")
    )
    reinit(str(tmp_path / "t.pt"), "--init", "kaiming_normal", "--seed", "1", "-o", str(tmp_path / "t2.pt"))
    keras_values = paramctl.load(str(tmp_path / "k2.safetensors"))["keras_dense.kernel"].array()
    torch_values = torch.load(tmp_path / "t2.pt")["linear.weight"].numpy()
    for values in (keras_values, torch_values):
        assert values.std() == pytest.approx(math.sqrt(2 / 20), rel=0.04)
    assert np.abs(keras_values).max() <= 2 * math.sqrt(2 / 20) / 0.87962566103423978 + 1e-6  # Keras truncates


# --- each initializer against its reference -----------------------------------------------------


def kaiming_uniform_a(a: float, mode: str):
    return lambda t, g: nn.init.kaiming_uniform_(t, a=a, mode=mode, generator=g)


TORCH_REFERENCES = {
    "xavier": lambda t, g: nn.init.xavier_uniform_(t, generator=g),
    "xavier_uniform(gain=2)": lambda t, g: nn.init.xavier_uniform_(t, gain=2, generator=g),
    "xavier_normal(0.5)": lambda t, g: nn.init.xavier_normal_(t, gain=0.5, generator=g),
    "kaiming": lambda t, g: nn.init.kaiming_uniform_(t, generator=g),
    "kaiming_uniform(a=0.1, mode='fan_out')": kaiming_uniform_a(0.1, "fan_out"),
    "kaiming_normal(nonlinearity='relu')": lambda t, g: nn.init.kaiming_normal_(t, nonlinearity="relu", generator=g),
    "kaiming_normal(mode='fan_out', nonlinearity='tanh')": lambda t, g: nn.init.kaiming_normal_(
        t, mode="fan_out", nonlinearity="tanh", generator=g
    ),
    "lecun_normal": lambda t, g: nn.init.kaiming_normal_(t, nonlinearity="linear", generator=g),
    "lecun_uniform": lambda t, g: nn.init.kaiming_uniform_(t, nonlinearity="linear", generator=g),
    "orthogonal(gain=0.5)": lambda t, g: nn.init.orthogonal_(t, gain=0.5, generator=g),
    "normal(mean=1, std=0.5)": lambda t, g: nn.init.normal_(t, 1, 0.5, generator=g),
    "uniform(-0.07, 0.07)": lambda t, g: nn.init.uniform_(t, -0.07, 0.07, generator=g),
    "trunc_normal(std=0.02)": lambda t, g: nn.init.trunc_normal_(t, std=0.02, generator=g),
    "trunc_normal(0, 1, -0.5, 1.5)": lambda t, g: nn.init.trunc_normal_(t, 0, 1, -0.5, 1.5, generator=g),
    "constant(42)": lambda t, g: nn.init.constant_(t, 42),
    "zeros": lambda t, g: nn.init.zeros_(t),
    "ones": lambda t, g: nn.init.ones_(t),
}


@pytest.mark.parametrize("spec", TORCH_REFERENCES)
def test_equals_torch_nn_init_bit_for_bit(layers_pt, tmp_path, spec):
    out = tmp_path / "out.pt"
    reinit(str(layers_pt), "weight", "--init", spec, "--seed", "7", "-o", str(out))
    got = torch.load(out)
    for name, tensor in torch.load(layers_pt).items():
        want = TORCH_REFERENCES[spec](torch.empty_like(tensor), generator(7, name))
        assert torch.equal(got[name], want), name


def test_eye_and_dirac_equal_torch(layers_pt, tmp_path):
    out = tmp_path / "out.pt"
    reinit(str(layers_pt), "^lin", "--init", "eye", "-o", str(out))
    assert torch.equal(torch.load(out)["lin.weight"], torch.eye(256, 20))
    reinit(str(layers_pt), "conv", "--init", "dirac", "-o", str(out))
    got = torch.load(out)
    for name in ("conv.weight", "gconv.weight", "convt.weight"):
        assert torch.equal(got[name], nn.init.dirac_(torch.empty_like(got[name]))), name
    reinit(str(layers_pt), "^gconv", "--init", "dirac(groups=4)", "-o", str(out))
    assert torch.equal(torch.load(out)["gconv.weight"], nn.init.dirac_(torch.empty(8, 2, 3, 3), groups=4))


def test_torch_default_is_what_the_modules_do(tmp_path):
    """Linear and Conv2d: kaiming_uniform(a=sqrt(5)) and U(+-1/sqrt(fan_in)) biases, drawn as their
    reset_parameters() does; BatchNorm ones and zeros; Embedding N(0, 1); LSTM U(+-1/sqrt(hidden))."""
    model = nn.ModuleDict(
        {"fc": nn.Linear(20, 64), "conv": nn.Conv2d(3, 16, 3), "bn": nn.BatchNorm1d(64)}
        | {"embed": nn.Embedding(500, 16), "lstm": nn.LSTM(16, 32)}
    )
    src, out = tmp_path / "m.pt", tmp_path / "out.pt"
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    torch.save(model.state_dict(), src)
    reinit(str(src), "--init", "torch_default", "--seed", "3", "-o", str(out))
    got = torch.load(out)
    model.load_state_dict(got, strict=True)
    for layer in ("fc", "conv"):
        weight = nn.init.kaiming_uniform_(
            torch.empty_like(got[f"{layer}.weight"]), a=math.sqrt(5), generator=generator(3, f"{layer}.weight")
        )
        assert torch.equal(got[f"{layer}.weight"], weight)
        bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(weight)[0])
        bias = nn.init.uniform_(
            torch.empty_like(got[f"{layer}.bias"]), -bound, bound, generator=generator(3, f"{layer}.bias")
        )
        assert torch.equal(got[f"{layer}.bias"], bias)
    assert torch.equal(got["bn.weight"], torch.ones(64)) and torch.equal(got["bn.bias"], torch.zeros(64))
    assert got["embed.weight"].std().item() == pytest.approx(1, rel=0.05)
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        values = got[f"lstm.{name}"]
        assert values.abs().max() <= 1 / math.sqrt(32) and values.abs().max() > 0.9 / math.sqrt(32), name


KERAS_REFERENCES = {
    "xavier": "glorot_uniform",
    "xavier_normal": "glorot_normal",
    "kaiming_uniform": "he_uniform",
    "kaiming_normal": "he_normal",
    "lecun_uniform": "lecun_uniform",
    "lecun_normal": "lecun_normal",
    "orthogonal": "orthogonal",
}


@pytest.mark.parametrize("spec", KERAS_REFERENCES)
def test_keras_layout_matches_keras_initializers(keras, tmp_path, spec):
    """A Dense kernel and a Conv2D kernel, drawn by paramctl in the Keras layout and by the Keras
    initializer: the same std and bounds (truncated at 2 std for the normal ones)."""
    from safetensors.numpy import save_file

    shapes = {"dense.kernel": (20, 256), "conv.kernel": (3, 3, 16, 32)}
    src, out = tmp_path / "k.safetensors", tmp_path / "out.safetensors"
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(src))
    reinit(str(src), "--init", spec, "--layout", "keras", "--seed", "0", "-o", str(out))
    got = paramctl.load(str(out))
    initializer = keras.initializers.get(KERAS_REFERENCES[spec])
    for name, shape in shapes.items():
        ours = got[name].array()
        theirs = keras.ops.convert_to_numpy(initializer(shape))
        assert ours.std() == pytest.approx(theirs.std(), rel=0.05), name
        if spec == "orthogonal":  # Keras flattens to (prod(shape[:-1]), shape[-1]): orthonormal columns or rows
            flat = ours.reshape(-1, shape[-1]).astype(np.float64)
            flat = flat if flat.shape[0] >= flat.shape[1] else flat.T
            np.testing.assert_allclose(flat.T @ flat, np.eye(flat.shape[1]), atol=1e-5)
        else:  # the same bound: the uniform limit, or 2 std of the truncated normal
            bound = np.abs(theirs).max()
            assert bound * 0.9 <= np.abs(ours).max() <= bound * 1.02, name


# --- roles --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_roles_on_a_trained_model_with_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    model(torch.randn(5, 3, 8, 8)).sum().backward()  # a training step: running statistics move
    src, out = tmp_path / "convnet.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), src)
    result = run("reinit", str(src), "--init", "xavier", "--seed", "5", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    for line in ("conv.weight", "bn.running_var", "bn.num_batches_tracked"):
        assert line in result.stderr
    got, before = torch.load(out), model.state_dict()
    fresh = ConvNet()
    fresh.load_state_dict(got, strict=True)
    for name in ("conv.weight", "fc.weight"):
        assert torch.equal(
            got[name], nn.init.xavier_uniform_(torch.empty_like(before[name]), generator=generator(5, name))
        )
    for name in ("conv.bias", "bn.bias", "bn.running_mean", "fc.bias"):
        assert torch.equal(got[name], torch.zeros_like(before[name])), name
    for name in ("bn.weight", "bn.running_var"):
        assert torch.equal(got[name], torch.ones_like(before[name])), name
    assert got["bn.num_batches_tracked"].item() == before["bn.num_batches_tracked"].item() == 1


def test_keras_roles_come_from_the_layer_class_and_config(keras, tmp_path):
    """Keras 3 `vars/<i>`: a BatchNormalization without its scale has beta, mean, variance."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(scale=False),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    path = tmp_path / "m.keras"
    model.save(path)
    ckpt = paramctl.load(str(path))
    roles = Roles(ckpt, "keras")
    assert {t.name: roles.role(t) for t in ckpt} == {
        "layers/batch_normalization/vars/0": "beta",
        "layers/batch_normalization/vars/1": "mean",
        "layers/batch_normalization/vars/2": "var",
        "layers/conv2d/vars/0": "weight",
        "layers/conv2d/vars/1": "bias",
        "layers/dense/vars/0": "weight",
        "layers/dense/vars/1": "bias",
    }
    out = tmp_path / "out.keras"
    reinit(str(path), "--init", "keras_default", "--seed", "0", "-o", str(out))
    loaded = keras.models.load_model(out)
    bn = loaded.layers[1]
    assert np.all(keras.ops.convert_to_numpy(bn.moving_variance) == 1)
    assert np.all(keras.ops.convert_to_numpy(bn.beta) == 0)
    kernel = keras.ops.convert_to_numpy(loaded.layers[0].kernel)
    limit = math.sqrt(6 / (18 + 36))
    assert np.abs(kernel).max() <= limit and kernel.std() > 0


def test_keras_default_is_what_keras_layers_do(keras, tmp_path):
    """An LSTM: glorot_uniform kernel, orthogonal recurrent kernel, a bias of zeros with the forget
    gate's ones (unit_forget_bias), exactly as a freshly built layer has it."""
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4)])
    src, out = tmp_path / "lstm.keras", tmp_path / "out.keras"
    model.save(src)
    reinit(str(src), "--init", "keras_default", "--seed", "0", "-o", str(out))
    cell = keras.models.load_model(out).layers[0].cell
    np.testing.assert_array_equal(*(keras.ops.convert_to_numpy(c.bias) for c in (cell, model.layers[0].cell)))
    recurrent = keras.ops.convert_to_numpy(cell.recurrent_kernel)  # (4, 16): orthonormal rows
    np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(4), atol=1e-5)
    assert np.abs(keras.ops.convert_to_numpy(cell.kernel)).max() <= math.sqrt(6 / (3 + 16))


def test_a_tensor_of_unknown_role_is_kept_when_spec_cannot_take_it(tmp_path):
    src, out = tmp_path / "m.pt", tmp_path / "out.pt"
    torch.save({"fc.weight": torch.zeros(4, 4), "prelu.alpha": torch.full((1,), 0.25)}, src)
    result = run("reinit", str(src), "--init", "xavier", "-o", str(out))
    assert result.exit_code == 0
    assert result.stderr.splitlines()[-1].split()[1:6] == ["prelu.alpha", "[1]", "other", "keep", "(needs"]
    assert torch.load(out)["prelu.alpha"].item() == 0.25 and torch.load(out)["fc.weight"].any()
    result = run("reinit", str(src), "--init", "normal", "-o", str(out))  # what it can take, it gets
    assert torch.load(out)["prelu.alpha"].item() != 0.25


def test_integer_tensors_and_optimizer_state_are_kept(tmp_path):
    out = tmp_path / "out.h5"
    src = FIXTURES / "tfkeras2_cnn_full.h5"
    reinit(str(src), "--init", "normal(std=0.01)", "--seed", "0", "-o", str(out))
    before, after = paramctl.load(str(src)), paramctl.load(str(out))
    for t in before:
        same = bytes(t.tobytes()) == bytes(after[t.name].tobytes())
        assert same == t.name.startswith("optimizer_weights/"), t.name


# --- the chapter's custom "strange" initializer -------------------------------------------------


def test_strange_init_example(tmp_path):
    out = tmp_path / "strange.pt"
    result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", f"{STRANGE}:strange", "--seed", "0", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    got = torch.load(out)
    weights = torch.cat([got["0.weight"].flatten(), got["2.weight"].flatten()])
    magnitude = weights.abs()
    assert torch.all((weights == 0) | ((magnitude >= 5) & (magnitude <= 10)))
    assert (weights == 0).float().mean().item() == pytest.approx(1 / 2, abs=0.03)
    assert (weights >= 5).float().mean().item() == pytest.approx(1 / 4, abs=0.03)
    assert (weights <= -5).float().mean().item() == pytest.approx(1 / 4, abs=0.03)
    assert torch.equal(got["0.bias"], torch.zeros(256)) and torch.equal(got["2.bias"], torch.zeros(10))
    # the function itself follows the custom-initializer contract, and the draw is the generator's
    strange = load_custom(str(STRANGE), "strange")
    assert isinstance(strange, Custom)
    want = strange.func(
        torch.empty(256, 20), name="0.weight", generator=generator(0, "0.weight"), fan_in=20, fan_out=256
    )
    assert torch.equal(got["0.weight"], want)


def test_custom_module_function_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myinits.py").write_text(
        "import torch\n"
        "def fans(tensor, *, name, generator, fan_in, fan_out):\n"
        "    return torch.full(tensor.shape, float(fan_in * 1000 + fan_out), dtype=torch.float64)\n"
        "def wrong_shape(tensor, **kw):\n"
        "    return torch.zeros(3)\n"
        "def fails(tensor, **kw):\n"
        "    raise RuntimeError('no luck')\n"
    )
    out = tmp_path / "out.pt"
    reinit(str(SAMPLES / "mlp.pt"), "weight", "--init", "myinits:fans", "-o", str(out))
    got = torch.load(out)
    assert torch.all(got["0.weight"] == 20256) and torch.all(got["2.weight"] == 256010)
    out.unlink()
    for spec, message in [
        ("myinits:wrong_shape", "returned shape [3]"),
        ("myinits:fails", "RuntimeError: no luck"),
        ("myinits:missing", "no function 'missing'"),
        ("nowhere.py:f", "no such file"),
        ("no_such_module_here:f", "ModuleNotFoundError"),
    ]:
        result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", spec, "-o", str(out))
        assert result.exit_code == 2, spec
        assert message in result.stderr.splitlines()[-1] and "error" in result.stderr.splitlines()[-1], result.stderr
        assert not out.exists()


# --- selection errors, seeds, dtypes, ties ------------------------------------------------------


def test_a_pattern_selecting_what_spec_cannot_take_is_an_error(tmp_path):
    out = tmp_path / "out.pt"
    result = run("reinit", str(SAMPLES / "mlp.pt"), ".", "--init", "xavier", "-o", str(out))
    assert result.exit_code == 2
    assert "0.bias [256]" in result.stderr and "2.bias [10]" in result.stderr
    assert "cannot initialize 2 tensor(s)" in result.stderr and "0.weight [" not in result.stderr
    assert not out.exists()
    result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", "dirac", "-o", str(out))  # weights have no default
    assert result.exit_code == 2 and "0.weight" in result.stderr and "2.weight" in result.stderr
    assert not out.exists()


def test_seed_gives_the_same_bytes_whatever_else_is_selected(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "two.safetensors"
    save_file({"a.weight": torch.zeros(16, 16), "b.weight": torch.zeros(16, 16)}, str(src))
    outs = {}
    for key, args in {"all": [], "one": ["^a"], "again": [], "other-seed": []}.items():
        outs[key] = tmp_path / f"{key}.safetensors"
        seed = "2" if key == "other-seed" else "1"
        reinit(str(src), *args, "--init", "normal", "--seed", seed, "-o", str(outs[key]))
    a = {k: bytes(paramctl.load(str(p))["a.weight"].tobytes()) for k, p in outs.items()}
    assert a["all"] == a["one"] == a["again"] != a["other-seed"]
    every = paramctl.load(str(outs["all"]))
    assert bytes(every["a.weight"].tobytes()) != bytes(every["b.weight"].tobytes())  # names draw differently


def test_random_seed_is_reported_and_repeats(tmp_path):
    out, again = tmp_path / "a.pt", tmp_path / "b.pt"
    result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", "xavier", "-o", str(out))
    assert result.exit_code == 0
    seed = result.stderr.split("(random: --seed ")[1].split()[0]
    reinit(str(SAMPLES / "mlp.pt"), "--init", "xavier", "--seed", seed, "-o", str(again))
    assert all(torch.equal(v, torch.load(again)[k]) for k, v in torch.load(out).items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_draws_in_float32_and_keeps_the_dtype(tmp_path, dtype):
    src, out = tmp_path / "m.pt", tmp_path / "out.pt"
    torch.save({"fc.weight": torch.zeros(64, 32, dtype=dtype), "fc.bias": torch.ones(64, dtype=dtype)}, src)
    reinit(str(src), "--init", "kaiming_normal", "--seed", "4", "-o", str(out))
    got = torch.load(out)
    want = nn.init.kaiming_normal_(torch.empty(64, 32), generator=generator(4, "fc.weight")).to(dtype)
    assert got["fc.weight"].dtype == dtype and torch.equal(got["fc.weight"], want)
    assert got["fc.bias"].dtype == dtype and torch.equal(got["fc.bias"], torch.zeros(64, dtype=dtype))


def test_a_tie_is_one_parameter_and_stays_tied(tmp_path):
    outs = [tmp_path / "via2.pt", tmp_path / "via4.pt"]
    for pattern, out in zip([r"^2\.weight$", r"^4\.weight$"], outs):
        result = run("reinit", str(SAMPLES / "shared.pt"), pattern, "--init", "normal", "--seed", "9", "-o", str(out))
        assert result.exit_code == 0, result.stderr
        assert "re-initializing 1 of 1" in result.stderr and "weight (= " in result.stderr
    before = torch.load(SAMPLES / "shared.pt")
    for out in outs:
        got = torch.load(out)
        assert got["2.weight"].data_ptr() == got["4.weight"].data_ptr()
        assert not torch.equal(got["2.weight"], before["2.weight"])
        assert torch.equal(got["2.weight"], nn.init.normal_(torch.empty(8, 8), generator=generator(9, "2.weight")))
        for name in ("0.weight", "2.bias", "4.bias", "6.weight"):
            assert torch.equal(got[name], before[name])
        assert got["2.bias"].data_ptr() == got["4.bias"].data_ptr()


# --- round trips through the real loaders -------------------------------------------------------


def test_pt_loads_strictly_and_unselected_tensors_are_bit_identical(tmp_path):
    out = tmp_path / "out.pt"
    reinit(str(SAMPLES / "mlp.pt"), r"^2\.", "--init", "zeros", "-o", str(out))
    got, before = torch.load(out), torch.load(SAMPLES / "mlp.pt")
    net = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))
    net.load_state_dict(got, strict=True)
    assert torch.equal(got["0.weight"], before["0.weight"]) and torch.equal(got["0.bias"], before["0.bias"])
    assert not got["2.weight"].any() and not got["2.bias"].any()


def test_safetensors_keeps_metadata(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out.safetensors"
    reinit(str(SAMPLES / "mlp.safetensors"), "--init", "xavier", "--seed", "0", "-o", str(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(
            f.get_tensor("0.weight"), nn.init.xavier_uniform_(torch.empty(256, 20), generator=generator(0, "0.weight"))
        )


def test_keras_files_load_after_reinit(keras, tmp_path):
    out = tmp_path / "mlp.keras"
    reinit(str(SAMPLES / "mlp.keras"), "--init", "kaiming_normal", "--seed", "0", "-o", str(out))
    model = keras.models.load_model(out)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.layers[0].weights)
    assert kernel.shape == (20, 256) and kernel.std() == pytest.approx(math.sqrt(2 / 20), rel=0.05)
    assert not bias.any()

    out = tmp_path / "mlp.weights.h5"
    reinit(str(SAMPLES / "mlp.weights.h5"), "dense_1", "--init", "ones", "-o", str(out))
    fresh = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    fresh.load_weights(out)
    reference = keras.models.load_model(SAMPLES / "mlp.keras")
    np.testing.assert_array_equal(*(keras.ops.convert_to_numpy(m.layers[0].kernel) for m in (fresh, reference)))
    assert np.all(keras.ops.convert_to_numpy(fresh.layers[1].kernel) == 1)

    out = tmp_path / "gru.h5"
    reinit(str(FIXTURES / "tfkeras2_gru_weights.h5"), "--init", "keras_default", "--seed", "0", "-o", str(out))
    gru = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(30, 4, name="tok"),
            keras.layers.GRU(3, name="gru"),
            keras.layers.Dense(1, name="y"),
        ]
    )
    gru.load_weights(out)
    recurrent = keras.ops.convert_to_numpy(gru.layers[1].cell.recurrent_kernel)  # (3, 9): orthonormal rows
    np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(3), atol=1e-5)
    assert np.abs(keras.ops.convert_to_numpy(gru.layers[0].embeddings)).max() <= 0.05


# --- the command line: pipelines, dry runs, refusals --------------------------------------------


def test_stdin_to_stdout_pipeline(tmp_path):
    direct = tmp_path / "direct.pt"
    reinit(str(SAMPLES / "mlp.pt"), "--init", "xavier", "--seed", "0", "-o", str(direct))
    with open(SAMPLES / "mlp.pt", "rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-m", "paramctl", "reinit", "--init", "xavier", "--seed", "0"],
            stdin=stdin,
            capture_output=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert b"0.weight" in proc.stderr  # the plan
    (tmp_path / "piped.pt").write_bytes(proc.stdout)
    piped, want = torch.load(tmp_path / "piped.pt"), torch.load(direct)
    assert piped.keys() == want.keys() and all(torch.equal(piped[k], want[k]) for k in want)


def test_refuses_binary_on_a_terminal():
    for args in (["-o", "-"], []):
        result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", "xavier", *args, tty=True)
        assert result.exit_code == 2
        assert "terminal" in result.stderr or "name the output" in result.stderr
        assert result.stdout == ""


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out.pt"
    result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", "xavier", "--seed", "0", "--dry-run", "-o", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    plan = [line.split() for line in result.stderr.splitlines()[2:]]
    assert plan == [
        ["paramctl:", "0.weight", "[256,", "20]", "weight", "xavier_uniform(gain=1.0)", "20", "256"],
        ["paramctl:", "0.bias", "[256]", "bias", "zeros", "-", "-"],
        ["paramctl:", "2.weight", "[10,", "256]", "weight", "xavier_uniform(gain=1.0)", "256", "10"],
        ["paramctl:", "2.bias", "[10]", "bias", "zeros", "-", "-"],
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("glorious", "unknown initializer 'glorious'"),
        ("normal(std=-1)", "std must not be negative"),
        ("normal(1, 2, 3)", "too many positional arguments"),
        ("kaiming(mode='fan_avg')", "mode must be 'fan_in' or 'fan_out'"),
        ("kaiming(nonlinearity='swish')", "nonlinearity must be one of"),
        ("constant('a')", "value must be a finite number"),
        ("uniform(1, 0)", "must not exceed"),
        ("normal(std=__import__('os'))", "is not a literal"),
        ("__import__('os').system('true')", "not a name or a call"),
        ("xavier.__class__", "not a name or a call"),
        ("normal(**{'std': 1})", "no * or **"),
    ],
)
def test_bad_specs_list_the_known_initializers(tmp_path, spec, message):
    out = tmp_path / "out.pt"
    result = run("reinit", str(SAMPLES / "mlp.pt"), "--init", spec, "-o", str(out))
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Known initializers: zeros; ones; constant(value)" in result.stderr and "mxnet_default" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


# --- set ----------------------------------------------------------------------------------------


def test_set_one_value_like_the_chapter(tmp_path):
    out = tmp_path / "out.pt"
    result = run("set", str(SAMPLES / "mlp.pt"), "0.weight[0, 0]", "42", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    got, before = torch.load(out), torch.load(SAMPLES / "mlp.pt")
    want = before["0.weight"].clone()
    want[0, 0] = 42
    assert torch.equal(got["0.weight"], want)
    assert all(torch.equal(got[k], before[k]) for k in ("0.bias", "2.weight", "2.bias"))


def test_set_expr_adds_one_like_the_chapter(tmp_path):
    out = tmp_path / "out.pt"
    result = run("set", str(SAMPLES / "mlp.pt"), r"^0\.weight$", "--expr", "x + 1", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    got, before = torch.load(out), torch.load(SAMPLES / "mlp.pt")
    assert torch.equal(got["0.weight"], before["0.weight"] + 1)
    assert torch.equal(got["2.weight"], before["2.weight"])


def test_set_slices_lists_negative_values_ties_and_integers(tmp_path):
    out = tmp_path / "out.pt"
    assert run("set", str(SAMPLES / "mlp.pt"), "0.bias[:3]", "[1, 2, 3]", "-o", str(out)).exit_code == 0
    assert torch.load(out)["0.bias"][:3].tolist() == [1, 2, 3]
    assert run("set", str(SAMPLES / "mlp.pt"), "2.bias", "-1.5", "-o", str(out)).exit_code == 0
    assert torch.equal(torch.load(out)["2.bias"], torch.full((10,), -1.5))
    assert run("set", str(SAMPLES / "shared.pt"), "4.weight[1, 2]", "7", "-o", str(out)).exit_code == 0
    got = torch.load(out)
    assert got["2.weight"][1, 2] == 7 and got["2.weight"].data_ptr() == got["4.weight"].data_ptr()
    assert run("set", str(SAMPLES / "shared.pt"), "weight", "--expr", "x * 2", "-o", str(out)).exit_code == 0
    assert torch.equal(
        torch.load(out)["4.weight"], torch.load(SAMPLES / "shared.pt")["4.weight"] * 2
    )  # once, not twice

    src = tmp_path / "bn.pt"
    torch.save(nn.BatchNorm1d(3).state_dict(), src)
    assert run("set", str(src), "num_batches", "--expr", "x + 5", "-o", str(out)).exit_code == 0
    assert torch.load(out)["num_batches_tracked"].item() == 5
    result = run("set", str(src), "num_batches", "--expr", "x + 0.5", "-o", str(out))
    assert result.exit_code == 2 and "not integers" in result.stderr


def test_set_keeps_bf16_and_warns_on_overflow(tmp_path):
    src, out = tmp_path / "h.pt", tmp_path / "out.pt"
    torch.save({"w": torch.ones(4, dtype=torch.float16), "b": torch.ones(4, dtype=torch.bfloat16)}, src)
    result = run("set", str(src), "w", "--expr", "where(x > 0, x * 1e6, x)", "-o", str(out))
    assert result.exit_code == 0 and "4 value(s) became NaN or infinite in float16" in result.stderr
    result = run("set", str(src), "b", "--expr", "x / 3", "-o", str(out))
    assert torch.equal(torch.load(out)["b"], (torch.ones(4, dtype=torch.float64) / 3).to(torch.bfloat16))


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('touch {marker}')",
        "x.__class__",
        "().__class__.__bases__[0].__subclasses__()",
        "open('{marker}', 'w')",
        "eval('1')",
        "lambda: 1",
        "[y for y in x]",
        "x[0]",
        "'a' * 10",
        "(y := 1)",
        "abs",
        "abs(x, x)",
        "where(x > 0, x)",
        "np.sqrt(x)",
        "x + y",
        "True + x",
        "f'{{x}}'",
        "(" * 1000 + "x" + ")" * 1000,
        "-" * 1000 + "x",
        "x" + " + x" * 300,
    ],
)
def test_hostile_expressions_are_refused(tmp_path, expr):
    marker, out = tmp_path / "pwned", tmp_path / "out.pt"
    result = run("set", str(SAMPLES / "mlp.pt"), "weight", "--expr", expr.format(marker=marker), "-o", str(out))
    assert result.exit_code == 2
    assert "invalid --expr" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not marker.exists() and not out.exists()


def test_values_may_not_use_x_and_huge_powers_are_quick(tmp_path):
    out = tmp_path / "out.pt"
    result = run("set", str(SAMPLES / "mlp.pt"), "0.bias", "x + 1", "-o", str(out))
    assert result.exit_code == 2 and "--expr" in result.stderr
    result = run("set", str(SAMPLES / "mlp.pt"), "0.bias", "--expr", "9 ** 9 ** 9 ** 9 + x", "-o", str(out))
    assert result.exit_code == 0
    result = run("set", str(SAMPLES / "mlp.pt"), "0.bias[300]", "1", "-o", str(out))
    assert result.exit_code == 2 and "does not fit" in result.stderr
    result = run("set", str(SAMPLES / "mlp.pt"), "bias", "1", "-o", str(out))
    assert result.exit_code == 2 and "no tensor named 'bias'" in result.stderr
