"""A gate that cannot be fooled: a PATTERN that selects nothing is an error for every command,
`check` takes several checkpoints and leaves trackers out; and the smaller fixes around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import REPO, SAMPLES, run
from safetensors.numpy import load_file, save_file

MLP = SAMPLES / "mlp.pt"


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A real Lightning checkpoint: a Trainer run of three steps with the default ModelCheckpoint,
    whose `kth_value` tracker is inf by design."""
    import lightning as L
    import torch

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    root = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=4))
    (ckpt,) = (root / "checkpoints").iterdir()
    return ckpt


# every command that takes a PATTERN, with the arguments it needs to get that far
PATTERN_COMMANDS = [
    ("ls",),
    ("tree",),
    ("stats",),
    ("check",),
    ("tied",),
    ("untie", "-o", "OUT"),
    ("reinit", "--init", "zeros", "-o", "OUT"),
    ("cast", "--dtype", "float16", "-o", "OUT"),
    ("rm", "-o", "OUT"),
    ("set", "--expr", "x + 1", "-o", "OUT"),
]


@pytest.mark.parametrize("command", PATTERN_COMMANDS, ids=lambda c: c[0])
def test_a_pattern_that_matches_nothing_is_an_error(command, tmp_path):
    out = tmp_path / "out.pt"
    name, *options = command
    args = [name, str(MLP), r"nomatch\.x", *[str(out) if o == "OUT" else o for o in options]]
    result = run(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    # the pattern once, as typed: one backslash
    assert result.stderr == f"paramctl: error: {MLP}: no tensor matches 'nomatch\\.x'\n"
    assert not out.exists()


def test_exclude_leaving_nothing_is_an_error(tmp_path):
    result = run("stats", str(MLP), "weight", "-x", "weight")
    assert result.exit_code == 2
    assert (
        result.stderr == f"paramctl: error: {MLP}: every tensor matching 'weight' is left out by --exclude 'weight'\n"
    )


def test_rename_and_diff_that_match_nothing_are_errors(tmp_path):
    out = tmp_path / "out.pt"
    result = run("rename", str(MLP), r"s/^nomatch\./x/", "-o", str(out))
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr == f"paramctl: error: {MLP}: no tensor matches '^nomatch\\.' (of 's/^nomatch\\./x/')\n"
    result = run("diff", str(MLP), str(SAMPLES / "mlp.safetensors"), "nomatch")
    assert result.exit_code == 2
    assert result.stderr == f"paramctl: error: {MLP} and {SAMPLES / 'mlp.safetensors'}: no tensor matches 'nomatch'\n"


def test_cast_of_a_pattern_that_matches_nothing_writes_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    result = run("cast", str(SAMPLES / "mlp.safetensors"), "^nomatch", "--dtype", "bfloat16", "-o", str(out))
    assert result.exit_code == 2 and not out.exists()


@pytest.fixture
def shards(tmp_path):
    """Three safetensors files; the second holds a NaN."""
    paths = []
    for i in range(3):
        values = np.arange(4, dtype=np.float32) + i
        if i == 1:
            values[2] = np.nan
        path = tmp_path / f"shard-{i}.safetensors"
        save_file({f"layer{i}.weight": values}, str(path))
        paths.append(path)
    return paths


def test_check_several_checkpoints_checks_every_one(shards):
    # as the shell expands `check shards/*.safetensors`: the second file is not taken for a PATTERN
    result = run("check", *map(str, shards))
    assert result.exit_code == 1
    assert result.stdout == f"{shards[1]}\tlayer1.weight\tnan\t1 NaN of 4\n"
    result = run("check", *map(str, shards), "-f", "json")
    assert json.loads(result.stdout) == {
        "ok": False,
        "checked": 3,
        "failures": [{"file": str(shards[1]), "name": "layer1.weight", "rule": "nan", "detail": "1 NaN of 4"}],
        "files": list(map(str, shards)),
    }


def test_check_pattern_as_last_argument_or_with_p(shards):
    # the last argument is a PATTERN when it is no file: `check model.pt 'weight$'` keeps its meaning
    assert run("check", str(shards[1]), "layer0").exit_code == 2
    assert run("check", str(shards[0]), str(shards[1]), "-p", "layer0").exit_code == 0
    assert run("check", str(shards[0]), str(shards[1]), "-p", "layer1").exit_code == 1
    result = run("check", str(shards[0]), str(shards[2]), "missing.safetensors")
    assert result.exit_code == 2
    assert result.stderr == (
        "paramctl: error: 2 checkpoints: no tensor matches 'missing.safetensors' (and there is no file of that name)\n"
    )
    # a PATTERN matching in one shard only is fine: the selection across them is not empty
    assert run("check", *map(str, shards), "-p", "layer2").exit_code == 0


def test_check_default_scope_leaves_out_lightning_trackers(lightning_ckpt):
    ckpt = str(lightning_ckpt)
    tracker = next(n for n in run("ls", ckpt).stdout.split("\n") if ".kth_value" in n).split("\t")[0]
    assert tracker.startswith("callbacks.ModelCheckpoint{")
    result = run("check", ckpt, "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    # 9 model tensors (with BatchNorm's buffers) and 18 of Adam's state: not the tracker
    assert report == {"ok": True, "checked": 27, "failures": []}
    result = run("check", ckpt, "--all")
    assert result.exit_code == 1
    assert result.stdout == f"{tracker}\tinf\t1 Inf of 1\n"
    result = run("check", ckpt, "-p", "kth_value")
    assert result.exit_code == 2
    assert result.stderr == f"paramctl: error: {ckpt}: 'kth_value' selects trackers only: check them with --all\n"
    info = json.loads(run("info", ckpt, "-f", "json").stdout)
    # parameters are the model's tensors: 15 + 6 (BatchNorm weight, bias) + 7 (its buffers) + 4
    assert (info["parameters"], info["optimizer_state"], info["other_tensors"]) == (32, 56, 1)


def test_check_refuses_a_checkpoint_with_nothing_to_check(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    result = run("check", str(path))
    assert result.exit_code == 2
    assert result.stderr == f"paramctl: error: {path}: nothing to check: no tensors\n"


def test_info_counts_a_tie_once_and_a_sharded_directory_by_its_files(tmp_path):
    info = json.loads(run("info", str(SAMPLES / "shared.pt"), "-f", "json").stdout)
    assert info["dtypes"] == {"float32": {"tensors": 6, "bytes": 484}}  # 8 names, 2 of them ties
    assert (info["tensors"], info["bytes"]) == (8, 484)
    out = tmp_path / "sharded"
    assert run("convert", str(SAMPLES / "mlp.safetensors"), f"{out}/", "--shard-size", "12KB").exit_code == 0
    files = sorted(os.listdir(out))
    assert len(files) > 2
    info = json.loads(run("info", str(out), "-f", "json").stdout)
    assert info["file_size"] == sum(os.path.getsize(out / f) for f in files)


def test_reading_a_missing_file_with_a_piped_stdin_hints_at_dash():
    with open(MLP, "rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-m", "paramctl", "reinit", r"fc\.weight", "--init", "xavier"],
            stdin=stdin,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    assert proc.returncode == 2
    assert (
        proc.stderr == "paramctl: error: fc\\.weight: no such file or directory (to read standard input, name it '-')\n"
    )


def test_all_inf_tensors_leave_stderr_clean(tmp_path):
    path, other = tmp_path / "inf.safetensors", tmp_path / "other.safetensors"
    save_file({"a": np.full(5, np.inf, np.float32), "mix": np.array([np.inf, -np.inf], np.float32)}, str(path))
    save_file({"a": np.full(5, -np.inf, np.float32), "mix": np.array([np.inf, 1], np.float32)}, str(other))
    out = str(tmp_path / "o.pt")
    for command, code in [
        (["stats", str(path)], 0),
        (["stats", str(path), "--hist", "-f", "table"], 0),
        (["check", str(path)], 1),
        (["diff", str(path), str(other)], 1),
        (["cast", str(path), "--dtype", "int8", "--all", "-o", out], 0),
    ]:
        proc = subprocess.run([sys.executable, "-m", "paramctl", *command], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == code, command
        assert all(line.startswith("paramctl: ") for line in proc.stderr.splitlines()), proc.stderr


def test_table_is_not_cut_at_80_columns_when_piped(tmp_path):
    long_name = "encoder.layers.0.attention.self.query_key_value_projection.weight.with.a.long.suffix"
    path = tmp_path / "long.safetensors"
    save_file({long_name: np.zeros((3, 4), np.float32)}, str(path))
    proc = subprocess.run(
        [sys.executable, "-m", "paramctl", "ls", str(path), "-f", "table"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
    )
    assert proc.returncode == 0
    row = proc.stdout.splitlines()[2]
    assert row.split() == [long_name, "[3,", "4]", "float32", "12", "48", "B"]
    assert load_file(str(path))[long_name].shape == (3, 4)


def test_a_bare_tensor_pt_is_written_back_as_a_bare_tensor(tmp_path):
    import torch

    src = tmp_path / "bare.pt"
    torch.save(torch.arange(5, dtype=torch.float32), src)
    for args, want in [
        (["set", str(src), "tensor[0]", "7"], [7, 1, 2, 3, 4]),
        (["reinit", str(src), "--init", "zeros"], [0, 0, 0, 0, 0]),
        (["cast", str(src), "--dtype", "float16"], [0, 1, 2, 3, 4]),
        (["convert", str(src)], [0, 1, 2, 3, 4]),
    ]:
        out = tmp_path / f"{args[0]}.pt"
        result = run(*args, str(out)) if args[0] == "convert" else run(*args, "-o", str(out))
        assert result.exit_code == 0, result.stderr
        loaded = torch.load(out, weights_only=True)
        assert isinstance(loaded, torch.Tensor)
        assert loaded.tolist() == want


def test_info_parameters_leave_out_a_plain_training_checkpoints_optimizer_state(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    info = json.loads(run("info", str(path), "-f", "json").stdout)
    # 8 parameters; Adam keeps step, exp_avg and exp_avg_sq for each of the 2: 1 + 6 + 6 + 1 + 2 + 2
    assert (info["parameters"], info["optimizer_state"]) == (8, 18)
    assert "other_tensors" not in info
    assert json.loads(run("check", str(path), "-f", "json").stdout)["checked"] == 8
