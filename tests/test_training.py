"""Training checkpoints: data-only objects kept and written back as pickled, optimizer state by
parameter name (checked against named_parameters() and Keras' trainable variables), and edits
that keep the optimizer consistent, judged by resuming (plain torch loops and Lightning)."""

from __future__ import annotations

import argparse
import collections
import datetime
import enum
import functools
import json
import pathlib
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from conftest import run
from torch import nn


class Phase(enum.Enum):  # an enum member in a checkpoint: pickled as Phase("train")
    TRAIN = "train"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4, generator=gen).to(dtype)).pow(2).mean().backward()
        opt.step()


EXTRAS = {
    "args": argparse.Namespace(lr=1e-3, layers=[4, 8, 3], out=pathlib.PosixPath("/runs/a")),
    "metric": np.float64(0.93125),
    "best": np.float32(1.5),
    "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
    "path": pathlib.PosixPath("/runs/a/last.pt"),
    "counts": collections.defaultdict(list, {"seen": [1, 2]}),
    "phase": Phase.TRAIN,
    "history": np.arange(6, dtype=np.float32).reshape(2, 3),
    "names": np.array(["a", "bc"]),
    "epoch": 3,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """A plain torch training checkpoint: model, Adam state and data-only extras."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt)
    path = tmp_path_factory.mktemp("train") / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **EXTRAS}, path)
    return path


def refused_global(path) -> str:
    """The global torch.load(weights_only=True) names when it refuses PATH."""
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(path)
    return re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e.value))[1]


def globals_of(path) -> list[str]:
    import pickletools

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    return [arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


def test_data_only_objects_list_and_arrays_are_rows(checkpoint):
    listed = run("ls", str(checkpoint), "^(history|names)")
    assert listed.stdout == "history\t[2, 3]\tfloat32\t6\t24\n"
    entries = json.loads(run("info", str(checkpoint), "-f", "json").stdout)["entries"]
    assert entries["args"] == "opaque argparse.Namespace (not loaded)"
    assert entries["when"] == "opaque datetime.datetime 2026-01-02 03:04:05 (not loaded)"
    assert entries["path"] == "opaque pathlib.PosixPath '/runs/a/last.pt' (not loaded)"
    assert entries["counts"] == "opaque collections.defaultdict (not loaded)"
    assert entries["phase"] == "opaque test_training.Phase ('train') (not loaded)"
    assert re.fullmatch(
        r"opaque numpy(\._core|\.core)\.multiarray\.scalar float64 0\.93125 \(not loaded\)", entries["metric"]
    )
    assert re.fullmatch(r"opaque numpy(\._core|\.core)\.multiarray\._reconstruct \(not loaded\)", entries["names"])
    shown = run("show", str(checkpoint), "history")
    assert shown.exit_code == 0 and "5." in shown.stdout


@pytest.mark.parametrize(
    "edit",
    [
        ("reinit", "^model\\.3\\.", "--init", "zeros"),
        ("cast", "--dtype", "float64", "^model\\."),
        ("rm", "^history$"),
        ("set", "model.0.bias[0]", "5"),
        ("convert",),
    ],
    ids=lambda e: e[0],
)
def test_opaque_objects_written_back_as_pickled(checkpoint, tmp_path, edit):
    """Every data-only object loads back equal with weights_only=False, through the same
    globals in the same order; weights_only=True refuses the output naming the input's global."""
    out = tmp_path / "out.pt"
    args = [str(out)] if edit[0] == "convert" else ["-o", str(out)]
    result = run(edit[0], str(checkpoint), *edit[1:], *args)
    assert result.exit_code == 0, result.stderr
    before = torch.load(checkpoint, weights_only=False)
    after = torch.load(out, weights_only=False)
    for key, value in EXTRAS.items():
        if key == "history" and edit[0] == "rm":
            assert key not in after
        elif isinstance(value, np.ndarray):
            assert type(after[key]) is np.ndarray and after[key].dtype == value.dtype
            assert np.array_equal(after[key], value)
        else:
            assert type(after[key]) is type(value) and after[key] == value, key
    assert type(after["counts"]) is collections.defaultdict and after["counts"].default_factory is list
    assert set(before) == set(after) | ({"history"} if edit[0] == "rm" else set())
    assert refused_global(out) == refused_global(checkpoint) == "argparse.Namespace"
    kept = [g for g in globals_of(checkpoint) if not g.startswith("torch")]
    assert [g for g in globals_of(out) if not g.startswith("torch")] == kept


def test_omegaconf_config_round_trips(tmp_path):
    """An OmegaConf DictConfig (fairseq's `cfg`, Hydra runs): nodes that point at their parent
    make cycles, kept as they were."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "name": "run", "n": None})
    path, out = tmp_path / "omega.pt", tmp_path / "out.pt"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": cfg}, path)
    entries = json.loads(run("info", str(path), "-f", "json").stdout)["entries"]
    assert entries["cfg"] == "opaque omegaconf.dictconfig.DictConfig (not loaded)"
    assert run("reinit", str(path), "w", "--init", "zeros", "-o", str(out)).exit_code == 0
    saved = torch.load(out, weights_only=False)
    assert type(saved["cfg"]) is type(cfg) and saved["cfg"] == cfg and saved["cfg"].optim.lr == 0.1
    assert saved["model"]["w"].tolist() == [0.0, 0.0]
    assert refused_global(out) == refused_global(path)


def test_an_edited_numpy_row_is_written_as_numpy(checkpoint, tmp_path):
    out = tmp_path / "out.pt"
    assert run("set", str(checkpoint), "history[0, 0]", "42", "-o", str(out)).exit_code == 0
    history = torch.load(out, weights_only=False)["history"]
    assert type(history) is np.ndarray and history.dtype == np.float32
    assert history.tolist() == [[42, 1, 2], [3, 4, 5]]


def test_code_running_globals_stay_refused(tmp_path):
    """Admitting data-only classes admits nothing that runs code: builtins stay refused when
    called (defaultdict's factory is only ever named), and so do the standard library's classes."""
    import decimal
    import logging

    class Call:
        def __init__(self, func, *args):
            self.func, self.args = func, args

        def __reduce__(self):
            return (self.func, self.args)

    cases = {
        "getattr": (Call(getattr, "x", "upper"), "builtins.getattr"),
        "list": (Call(list, "ab"), "builtins.list"),
        "eval": (Call(eval, "1"), "builtins.eval"),
        "decimal": (decimal.Decimal("0.1"), "decimal.Decimal"),
        "FileHandler": (Call(logging.FileHandler, str(tmp_path / "created")), "logging.FileHandler"),
    }
    for name, (payload, glob) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"w": torch.ones(2), "evil": payload}, path)
        result = run("ls", str(path))
        assert result.exit_code == 2, name
        assert f"pickle global {glob} is not allowed" in result.stderr, name
    assert not (tmp_path / "created").exists()


# --- optimizer state by name -----------------------------------------------------------------------


def test_optimizer_state_named_as_named_parameters(checkpoint):
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    rows = json.loads(run("ls", str(checkpoint), "--optimizer", "-f", "json").stdout)
    moments = [r for r in rows if r["state"] == "exp_avg"]
    assert [r["param"] for r in moments] == names
    assert [r["name"] for r in moments] == [f"optimizer.state.{i}.exp_avg" for i in range(len(names))]
    saved = torch.load(checkpoint, weights_only=False)
    for r in moments:
        assert r["shape"] == list(saved["model"][r["param"]].shape)
    stats = json.loads(run("stats", str(checkpoint), "--optimizer", "-f", "json").stdout)
    assert [s["param"] for s in stats] == names
    for s in stats:
        state = saved["optimizer"]["state"][s["index"]]
        assert s["step"] == 3 and s["lr"] == 0.01
        assert s["m_norm"] == pytest.approx(state["exp_avg"].double().norm().item())
        assert s["v_norm"] == pytest.approx(state["exp_avg_sq"].double().norm().item())
        m_hat = state["exp_avg"].double() / (1 - 0.9**3)
        v_hat = state["exp_avg_sq"].double() / (1 - 0.999**3)
        expected = (m_hat / (v_hat.sqrt() + 1e-8)).pow(2).mean().sqrt().item()
        assert s["update_rms"] == pytest.approx(expected)
    head = run("stats", str(checkpoint), "--optimizer", "^3\\.", "-f", "tsv").stdout.splitlines()
    assert [line.split("\t")[:3] for line in head] == [["3.weight", "4", "[3, 8]"], ["3.bias", "5", "[3]"]]


def test_optimizer_mapping_skips_ties_and_frozen_parameters(tmp_path):
    """A tie is one parameter; a frozen one (not given to the optimizer) leaves a gap that only
    one layout by shape fills."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 4), nn.Linear(4, 10))
    model[4].weight = model[0].weight
    model[3].requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in trainable])
    opt.zero_grad()
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    path = tmp_path / "frozen.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    rows = json.loads(run("ls", str(path), "--optimizer", "-f", "json").stdout)
    assert [r["param"] for r in rows if r["state"] == "exp_avg"] == [n for n, _ in trainable]
    # frozen, model.1 would leave three [6] vectors for two moments: said, not guessed
    model[3].requires_grad_(True)
    model[1].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    result = run("ls", str(path), "--optimizer", "-f", "json")
    assert all(r["param"] is None for r in json.loads(result.stdout))
    assert "do not lay out one way only along the 8 tensors of model by shape" in result.stderr


def test_ambiguous_groups_are_said_not_guessed(tmp_path):
    """Two groups whose parameters interleave over layers of one shape: no single layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    params = list(model.parameters())
    opt = torch.optim.Adam([{"params": [params[4], params[0]]}, {"params": [params[2]] + params[1::2]}])
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    path = tmp_path / "groups.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    result = run("ls", str(path), "--optimizer", "-f", "json")
    assert result.exit_code == 0
    assert all(r["param"] is None for r in json.loads(result.stdout))
    assert "optimizer: parameters not named: 6 parameters" in result.stderr


def test_keras_optimizer_variables_by_trainable_variable(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(3)]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.fit(x, x[:, :3] * 2, epochs=2, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    rows = json.loads(run("stats", str(path), "--optimizer", "-f", "json").stdout)
    assert len(rows) == len(model.trainable_variables)
    optimizer_values = {v.path: np.asarray(v) for v in model.optimizer.variables}
    from paramctl.formats import load

    table = load(str(path))
    for row, var in zip(rows, model.trainable_variables):
        assert np.array_equal(table[row["param"]].array(), np.asarray(var))  # the same variable
        slot = var.path.replace("/", "_")
        momentum = next(v for k, v in optimizer_values.items() if k.endswith(f"{slot}_momentum"))
        assert row["m_norm"] == pytest.approx(float(np.linalg.norm(momentum.astype(np.float64))))
        assert row["step"] == model.optimizer.iterations.numpy()
        assert row["lr"] == pytest.approx(0.01)
    # reinit of the head zeroes its moments (the step count is the optimizer's); training resumes
    edited = tmp_path / "edited.keras"
    result = run("reinit", str(path), "^layers/dense_1/", "--init", "normal(std=0.1)", "-o", str(edited))
    assert "optimizer/vars: state of layers/dense_1/vars/0 (index 4) reset: moments 0 (its step" in result.stderr
    resumed = keras.models.load_model(edited)
    head = resumed.layers[-1].kernel.path.replace("/", "_")
    zeroed = [v for v in resumed.optimizer.variables if v.path.endswith((f"/{head}_momentum", f"/{head}_velocity"))]
    assert len(zeroed) == 2 and all(not np.asarray(v).any() for v in zeroed)
    resumed.fit(x, x[:, :3] * 2, epochs=1, verbose=0)
    assert resumed.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() + 1


# --- edits keep the optimizer consistent, judged by resuming ----------------------------------------


def resume(path, model: nn.Module, opt_class=torch.optim.Adam) -> torch.optim.Optimizer:
    """Load PATH into MODEL strictly and its optimizer state into a new optimizer; take a step."""
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["model"], strict=True)
    opt = opt_class(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved["optimizer"])
    train(model, opt, steps=1)
    return opt


def test_reinit_resets_moments_as_for_a_new_parameter(checkpoint, tmp_path):
    out = tmp_path / "head.pt"
    result = run("reinit", str(checkpoint), "^model\\.3\\.", "--init", "normal(std=0.1)", "--seed", "0", "-o", str(out))
    assert result.exit_code == 0
    assert "optimizer: state of 3.weight (index 4) reset: moments 0, step 0" in result.stderr
    assert "optimizer: state of 3.bias (index 5) reset: moments 0, step 0" in result.stderr
    saved = torch.load(out, weights_only=False)
    original = torch.load(checkpoint, weights_only=False)
    for i in range(4):  # the others keep theirs
        assert torch.equal(saved["optimizer"]["state"][i]["exp_avg"], original["optimizer"]["state"][i]["exp_avg"])
    # the head's next step is the step a fresh Adam takes on a fresh parameter
    model = make_model()
    resume(out, model)
    fresh = make_model()
    fresh.load_state_dict(saved["model"])
    body = torch.optim.Adam(list(fresh.parameters())[:4], lr=1e-2)
    body.load_state_dict(
        {
            "state": {i: saved["optimizer"]["state"][i] for i in range(4)},
            "param_groups": [{**saved["optimizer"]["param_groups"][0], "params": [0, 1, 2, 3]}],
        }
    )
    head = torch.optim.Adam(list(fresh.parameters())[4:], lr=1e-2)
    train(fresh, _Both(body, head), steps=1)
    assert torch.allclose(model[3].weight, fresh[3].weight) and torch.allclose(model[3].bias, fresh[3].bias)
    kept = run("reinit", str(checkpoint), "^model\\.3\\.", "--init", "zeros", "--keep-optimizer", "-o", str(out))
    assert "reset" not in kept.stderr
    assert torch.equal(
        torch.load(out, weights_only=False)["optimizer"]["state"][5]["exp_avg"],
        original["optimizer"]["state"][5]["exp_avg"],
    )


class _Both:
    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def test_rm_removes_state_and_renumbers(checkpoint, tmp_path):
    out = tmp_path / "nobias.pt"
    result = run("rm", str(checkpoint), "^model\\.0\\.bias$", "-o", str(out))
    assert result.exit_code == 0
    assert "optimizer: state of 0.bias removed; the indices after it renumbered" in result.stderr
    original = torch.load(checkpoint, weights_only=False)["optimizer"]
    saved = torch.load(out, weights_only=False)["optimizer"]
    assert saved["param_groups"][0]["params"] == [0, 1, 2, 3, 4]
    assert list(saved["state"]) == [0, 1, 2, 3, 4]
    for new, old in zip(range(5), [0, 2, 3, 4, 5]):
        assert torch.equal(saved["state"][new]["exp_avg"], original["state"][old]["exp_avg"])
    model = make_model()
    model[0] = nn.Linear(4, 8, bias=False)
    opt = resume(out, model)
    assert [tuple(opt.state[p]["exp_avg"].shape) for p in model.parameters()] == [
        tuple(p.shape) for p in model.parameters()
    ]
    rows = json.loads(run("ls", str(out), "--optimizer", "-f", "json").stdout)
    assert [r["param"] for r in rows if r["state"] == "exp_avg"] == [n for n, _ in model.named_parameters()]


def test_rename_and_cast_carry_the_state(checkpoint, tmp_path):
    out = tmp_path / "renamed.pt"
    assert run("rename", str(checkpoint), "s/^model\\./model.net./", "-o", str(out)).exit_code == 0
    rows = json.loads(run("ls", str(out), "--optimizer", "-f", "json").stdout)
    assert rows[0]["param"] == "net.0.weight"
    cast = tmp_path / "cast.pt"
    assert run("cast", str(checkpoint), "--dtype", "float64", "^model\\.", "-o", str(cast)).exit_code == 0
    resume(cast, make_model().double())


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory) -> pathlib.Path:
    import lightning.pytorch as pl

    root = tmp_path_factory.mktemp("lightning")
    trainer = pl.Trainer(
        max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(lit_module()(argparse.Namespace(lr=0.01, hidden=8)), data())
    path = root / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3]), batch_size=8)


@functools.cache
def lit_module():
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self, args):
            super().__init__()
            self.save_hyperparameters()  # {"args": the Namespace}, as fairseq-style scripts do
            bias = getattr(args, "bias", True)
            self.body = nn.Sequential(nn.Linear(4, args.hidden, bias=bias), nn.BatchNorm1d(args.hidden))
            self.head = nn.Linear(args.hidden, getattr(args, "classes", 3))

        def training_step(self, batch, _):
            x, _y = batch
            return self.head(self.body(x)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.args.lr)

    return Lit


def test_lightning_checkpoint_edited_then_resumed(lightning_checkpoint, tmp_path):
    import lightning.pytorch as pl

    entries = json.loads(run("info", str(lightning_checkpoint), "-f", "json").stdout)["entries"]
    assert entries["hyper_parameters.args"] == "opaque argparse.Namespace (not loaded)"
    rows = json.loads(run("ls", str(lightning_checkpoint), "--optimizer", "-f", "json").stdout)
    model = lit_module()(argparse.Namespace(lr=0.01, hidden=8))
    assert [r["param"] for r in rows if r["state"] == "exp_avg"] == [n for n, _ in model.named_parameters()]
    edited = tmp_path / "edited.ckpt"
    result = run(
        "reinit", str(lightning_checkpoint), "^state_dict\\.head\\.", "--init", "normal(std=0.1)", "-o", str(edited)
    )
    assert result.exit_code == 0
    assert "optimizer_states.0: state of head.weight (index 4) reset" in result.stderr
    saved = torch.load(edited, weights_only=False)
    assert saved["hyper_parameters"]["args"] == argparse.Namespace(lr=0.01, hidden=8)
    assert saved["optimizer_states"][0]["state"][4]["step"] == 0
    args = argparse.Namespace(lr=0.01, hidden=8)
    for out, edit, sizes in [
        (edited, None, {}),
        (tmp_path / "cast.ckpt", ("cast", "--dtype", "float16", "^state_dict\\.head"), {}),
        (tmp_path / "set.ckpt", ("set", "state_dict.body.0.bias[0]", "1"), {}),
        (tmp_path / "rm.ckpt", ("rm", "^state_dict\\.body\\.0\\.bias$"), {"bias": False}),
        (tmp_path / "five.ckpt", ("reinit", "^state_dict\\.head\\.", "--out", "5", "--init", "xavier"), {"classes": 5}),
    ]:
        if edit:
            assert run(edit[0], str(lightning_checkpoint), *edit[1:], "-o", str(out)).exit_code == 0
        model = lit_module()(argparse.Namespace(**vars(args), **sizes))
        trainer = pl.Trainer(
            max_epochs=2,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, data(), ckpt_path=out, weights_only=False)
        assert trainer.current_epoch == 2
        states = trainer.optimizers[0].state
        assert all(states[p]["exp_avg"].shape == p.shape for p in model.parameters())


TF_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf

out = {}
for kind in ("keras", "legacy"):
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(8),
                                 tf.keras.layers.BatchNormalization(), tf.keras.layers.Dense(3)])
    opt = tf.keras.optimizers.Adam(0.01) if kind == "keras" else tf.keras.optimizers.legacy.Adam(0.01)
    model.compile(opt, "mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.fit(x, x[:, :3] * 2, epochs=2, verbose=0)
    model.save_weights(sys.argv[1] + "/" + kind + "/ckpt")
    rows = []
    for var in model.trainable_variables:
        if kind == "keras":
            m = opt._momentums[opt._index_dict[opt._var_key(var)]]
        else:
            m = opt.get_slot(var, "m")
        rows.append([list(var.shape), float(np.linalg.norm(np.asarray(m, dtype=np.float64))),
                     float(np.linalg.norm(np.asarray(var, dtype=np.float64)))])
    out[kind] = {"rows": rows, "step": int(opt.iterations.numpy())}
print(json.dumps(out))
"""


def test_tensorflow_checkpoint_optimizer_slots_by_variable(tmp_path):
    """Keras 2.11+ optimizers (`optimizer/_variables/N`) and legacy ones (`.OPTIMIZER_SLOT` keys),
    checked against TensorFlow's own slot of each trainable variable."""
    from reference import run_in

    from paramctl.formats import load

    expected = run_in("tensorflow", TF_SCRIPT, str(tmp_path))
    for kind in ("keras", "legacy"):
        path = str(tmp_path / kind / "ckpt")
        stats = json.loads(run("stats", path, "--optimizer", "-f", "json").stdout)
        table = load(path)
        by_value = [(float(np.linalg.norm(table[s["param"]].array().astype(np.float64))), s) for s in stats]
        assert len(stats) == len(expected[kind]["rows"]) == 6
        for shape, m_norm, var_norm in expected[kind]["rows"]:  # each variable's slot: found by its values
            mine = next(s for norm, s in by_value if norm == pytest.approx(var_norm))
            assert mine["shape"] == shape and mine["m_norm"] == pytest.approx(m_norm, rel=1e-6, abs=1e-12)
        assert all(s["step"] == expected[kind]["step"] and s["lr"] == pytest.approx(0.01) for s in stats)
        if kind == "keras":  # in the model's order
            assert [s["shape"] for s in stats] == [r[0] for r in expected[kind]["rows"]]


def test_state_keyed_by_name_and_numeric_steps(tmp_path):
    """FSDP's full_optim_state_dict keys state by parameter name, and torch < 1.12 kept `step`
    as a number: both are named, reset and removed."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, steps=2)
    names = [n for n, _ in model.named_parameters()]
    saved = opt.state_dict()
    state = {names[i]: {**v, "step": int(v["step"])} for i, v in saved["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
    path = tmp_path / "fsdp.pt"
    torch.save({"model": model.state_dict(), "optimizer": {"state": state, "param_groups": groups}}, path)
    stats = json.loads(run("stats", str(path), "--optimizer", "-f", "json").stdout)
    assert [(s["param"], s["step"]) for s in stats] == [(n, 2) for n in names]
    out = tmp_path / "out.pt"
    result = run("reinit", str(path), "^model\\.3\\.weight$", "--init", "zeros", "-o", str(out))
    assert "optimizer: state of 3.weight (index 4) reset: moments 0, step 0" in result.stderr
    edited = torch.load(out, weights_only=False)["optimizer"]["state"]
    assert edited["3.weight"]["step"] == 0 and not edited["3.weight"]["exp_avg"].any()
    assert edited["0.weight"]["step"] == 2
    assert run("rm", str(path), "^model\\.0\\.bias$", "-o", str(out)).exit_code == 0
    removed = torch.load(out, weights_only=False)["optimizer"]
    assert list(removed["state"]) == [n for n in names if n != "0.bias"]
    assert removed["param_groups"][0]["params"] == [n for n in names if n != "0.bias"]


def test_set_resets_the_edited_parameter_only(checkpoint, tmp_path):
    out = tmp_path / "set.pt"
    result = run("set", str(checkpoint), "model.0.bias[0]", "1", "-o", str(out))
    assert "optimizer: state of 0.bias (index 1) reset: moments 0, step 0" in result.stderr
    edited = torch.load(out, weights_only=False)["optimizer"]["state"]
    original = torch.load(checkpoint, weights_only=False)["optimizer"]["state"]
    assert edited[1]["step"] == 0 and not edited[1]["exp_avg"].any() and not edited[1]["exp_avg_sq"].any()
    assert all(torch.equal(edited[i]["exp_avg"], original[i]["exp_avg"]) for i in (0, 2, 3, 4, 5))
    kept = run("set", str(checkpoint), "model.0.bias[0]", "1", "--keep-optimizer", "-o", str(out))
    assert "reset" not in kept.stderr
    assert torch.equal(torch.load(out, weights_only=False)["optimizer"]["state"][1]["exp_avg"], original[1]["exp_avg"])


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "decay-groups"])
def test_transformers_models_named_with_ties_and_decay_groups(tmp_path, split):
    """GPT-2 (wte tied to lm_head, once in named_parameters) and BERT, with one param group or
    the usual weight-decay split (biases and norms in a second group)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    models = {
        "bert": BertForSequenceClassification(
            BertConfig(
                vocab_size=60,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
            )
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
    }
    for name, model in models.items():
        named = list(model.named_parameters())

        def no_decay(n):
            return n.endswith("bias") or "LayerNorm" in n or ".ln_" in n

        if split:
            order = [n for n, _ in named if not no_decay(n)] + [n for n, _ in named if no_decay(n)]
            groups = [
                {"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
                {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
            ]
        else:
            order, groups = [n for n, _ in named], [{"params": [p for _, p in named]}]
        opt = torch.optim.AdamW(groups)
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        opt.step()
        path = tmp_path / f"{name}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        rows = json.loads(run("ls", str(path), "--optimizer", "-f", "json").stdout)
        assert [r["param"] for r in rows if r["state"] == "exp_avg"] == order, name
