"""rename, rm, cast: outputs that the real loaders accept, refusals that write nothing."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import SAMPLES, run
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import paramctl
from paramctl.commands.edit import parse_substitution
from paramctl.errors import UsageError


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))


class DDP(nn.Module):
    """What DistributedDataParallel's state_dict looks like: the model under `module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def lightning(model: nn.Module) -> dict:
    """A Lightning checkpoint's shape, with an Adam state dict as torch.optim writes it (built by
    hand: a first optimizer step imports torch._dynamo, seconds of a test run)."""
    params = list(model.parameters())
    state = {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for i, p in enumerate(params)
    }
    groups = [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "params": list(range(len(params)))}]
    return {
        "epoch": 2,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [{"state": state, "param_groups": groups}],
        "hyper_parameters": {"lr": 0.001},
    }


def torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_not_written(result, out) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("paramctl: error: ") and result.stderr.count("\n") == 1
    assert not out.exists()


# --- rename ------------------------------------------------------------------------------------------


def test_ddp_strip_loads_strictly_into_the_bare_model(tmp_path):
    model = net()
    ddp = DDP(model).state_dict()
    torch.save(ddp, tmp_path / "ddp.pt")
    result = run("rename", str(tmp_path / "ddp.pt"), r"s/^module\.//", "-o", str(tmp_path / "bare.pt"))
    assert result.exit_code == 0, result.stderr
    sd = torch_load(tmp_path / "bare.pt")
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))
    fresh.load_state_dict(sd, strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    expected = DDP(model).state_dict()
    consume_prefix_in_state_dict_if_present(expected, "module.")
    assert list(sd) == list(expected)
    assert dict(sd._metadata) == dict(expected._metadata)  # module versions follow their modules


def test_collision_names_both_and_writes_nothing(tmp_path):
    out = tmp_path / "out.pt"
    result = run("rename", str(SAMPLES / "mlp.pt"), r"s/\.(weight|bias)$//", "-o", str(out))
    assert_not_written(result, out)
    assert "'0.weight' and '0.bias'" in result.stderr
    result = run("rename", str(SAMPLES / "mlp.pt"), "s/^0/2/", "-o", str(out))  # onto names that stay
    assert_not_written(result, out)
    assert "'2.weight'" in result.stderr and "'0.weight'" in result.stderr


def test_dry_run_shows_old_and_new_and_writes_nothing(tmp_path):
    out = tmp_path / "out.pt"
    result = run("rename", str(SAMPLES / "mlp.pt"), r"s/^(\d)\./layer\1./", "-e", "s/weight/w/", "--dry-run")
    assert result.exit_code == 0
    assert result.stdout == "0.weight\tlayer0.w\n0.bias\tlayer0.bias\n2.weight\tlayer2.w\n2.bias\tlayer2.bias\n"
    assert not out.exists()
    table = run("rename", str(SAMPLES / "mlp.pt"), "s/^0/zero/", "--dry-run", tty=True).stdout.splitlines()
    assert table[1].split() == ["old", "new"] and table[2].split() == ["0.weight", "zero.weight"]


def test_substitution_syntax():
    s = parse_substitution(r"s|a/b|c|g")
    assert s.apply("a/b.a/b") == "c.c"
    assert parse_substitution(r"s/a\/b/c/").apply("a/b") == "c"
    assert parse_substitution(r"s|x\|y|z|").apply("x|y") == "z"  # an escaped delimiter is literal
    assert parse_substitution("s/A/b/i").apply("aA") == "bA"  # the first match only, as sed
    assert parse_substitution(r"s/(?P<n>\d+)/[\g<n>]/g").apply("1.2") == "[1].[2]"
    for bad in ("module.", "s/a/b", "s/a/b/c/", "s/a/b/x", "s/(/x/", "sab"):
        with pytest.raises(UsageError):
            parse_substitution(bad)
    with pytest.raises(UsageError):
        parse_substitution(r"s/a/\2/").apply("a")


def test_lightning_rename_moves_keys_inside_their_dict(tmp_path):
    model = net()
    ckpt = lightning(model)
    torch.save(ckpt, tmp_path / "l.ckpt")
    out = tmp_path / "out.ckpt"
    result = run("rename", str(tmp_path / "l.ckpt"), r"s/^state_dict\.model\./state_dict./", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    got = torch_load(out)
    assert list(got) == list(ckpt)
    assert list(got["state_dict"]) == list(model.state_dict())
    model.load_state_dict(got["state_dict"], strict=True)
    assert got["epoch"] == 2 and got["hyper_parameters"] == {"lr": 0.001}
    assert got["optimizer_states"][0]["param_groups"] == ckpt["optimizer_states"][0]["param_groups"]
    for i, state in ckpt["optimizer_states"][0]["state"].items():
        assert torch.equal(got["optimizer_states"][0]["state"][i]["exp_avg"], state["exp_avg"])
    assert paramctl.load(str(out)).names()[:2] == ["state_dict.0.weight", "state_dict.0.bias"]


def test_rename_out_of_its_container_goes_to_the_dict_its_name_begins(tmp_path):
    torch.save(lightning(net()), tmp_path / "l.ckpt")
    out = tmp_path / "out.ckpt"
    result = run("rename", str(tmp_path / "l.ckpt"), r"s/^state_dict\.model\.0\.weight$/first_weight/", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    got = torch_load(out)
    assert "model.0.weight" not in got["state_dict"]
    assert list(got)[-1] == "first_weight" and got["first_weight"].shape == (8, 4)
    # a dict keyed by integers (an optimizer's state) stays keyed by integers
    torch.save({"state": {0: torch.zeros(1), 1: torch.ones(1)}}, tmp_path / "int.pt")
    assert run("rename", str(tmp_path / "int.pt"), r"s/^state\.1$/state.7/", "-o", str(out)).exit_code == 0
    assert list(torch_load(out)["state"]) == [0, 7]


def test_rename_onto_a_non_tensor_entry_is_refused(tmp_path):
    torch.save(lightning(net()), tmp_path / "l.ckpt")
    out = tmp_path / "out.ckpt"
    result = run("rename", str(tmp_path / "l.ckpt"), r"s/^state_dict\.model\.0\.bias$/epoch/", "-o", str(out))
    assert_not_written(result, out)
    assert "'epoch'" in result.stderr


def test_rename_keeps_ties(tmp_path):
    pt, st = tmp_path / "r.pt", tmp_path / "r.safetensors"
    assert run("rename", str(SAMPLES / "shared.pt"), r"s/^2\./shared./", "-o", str(pt)).exit_code == 0
    sd = torch_load(pt)
    assert sd["shared.weight"].data_ptr() == sd["4.weight"].data_ptr()
    assert run("rename", str(pt), r"s/^4\./again./", "-o", str(st)).exit_code == 0
    with safe_open(str(st), "pt") as f:
        # save_model's {dropped: kept}; the kept name is the group's first in the source's order
        assert f.metadata()["again.weight"] == "shared.weight"
    assert json.loads(run("tied", str(st), "-f", "json").stdout) == [
        {"names": ["shared.weight", "again.weight"], "kind": "declared"},
        {"names": ["shared.bias", "again.bias"], "kind": "declared"},
    ]


def test_rename_without_a_match_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    src = SAMPLES / "mlp.safetensors"
    result = run("rename", str(src), r"s/^0\.weight$/first/", "-e", r"s/nothing\.x/y/", "-o", str(out))
    assert result.exit_code == 2
    assert result.stderr == f"paramctl: error: {src}: no tensor matches 'nothing\\.x' (of 's/nothing\\.x/y/')\n"
    assert not out.exists()


def test_rename_moves_hdf5_datasets_and_warns(tmp_path):
    out = tmp_path / "out.weights.h5"
    result = run("rename", str(SAMPLES / "mlp.weights.h5"), "s|^layers/dense/|layers/first/|", "-o", str(out))
    assert result.exit_code == 0
    assert "Keras loads weights by their paths" in result.stderr
    with h5py.File(out) as f, h5py.File(SAMPLES / "mlp.weights.h5") as src:
        assert "layers/dense/vars/0" not in f
        np.testing.assert_array_equal(f["layers/first/vars/0"][()], src["layers/dense/vars/0"][()])
        np.testing.assert_array_equal(f["layers/dense_1/vars/0"][()], src["layers/dense_1/vars/0"][()])


# --- rm ------------------------------------------------------------------------------------------


def test_rm_optimizer_state_from_lightning(tmp_path):
    model = net()
    ckpt = lightning(model)
    torch.save(ckpt, tmp_path / "l.ckpt")
    out = tmp_path / "out.ckpt"
    assert run("rm", str(tmp_path / "l.ckpt"), r"^optimizer_states\.", "-o", str(out)).exit_code == 0
    got = torch_load(out)
    assert list(got) == list(ckpt)
    assert all(not state for state in got["optimizer_states"][0]["state"].values())
    assert got["optimizer_states"][0]["param_groups"] == ckpt["optimizer_states"][0]["param_groups"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in got["state_dict"].items()}, strict=True)


def test_rm_keeps_state_dict_metadata_and_loads(tmp_path):
    out = tmp_path / "out.pt"
    assert run("rm", str(SAMPLES / "mlp.pt"), "^2", "-o", str(out)).exit_code == 0
    sd = torch_load(out)
    assert list(sd) == ["0.weight", "0.bias"]
    assert dict(sd._metadata) == dict(torch_load(SAMPLES / "mlp.pt")._metadata)
    nn.Sequential(nn.Linear(20, 256)).load_state_dict(sd, strict=True)


def test_rm_safetensors_and_hdf5_load_in_their_libraries(tmp_path):
    st = tmp_path / "out.safetensors"
    assert run("rm", str(SAMPLES / "mlp.safetensors"), "bias", "-o", str(st)).exit_code == 0
    assert sorted(load_file(st)) == ["0.weight", "2.weight"]
    h5 = tmp_path / "out.weights.h5"
    assert run("rm", str(SAMPLES / "mlp.weights.h5"), "dense_1", "-o", str(h5)).exit_code == 0
    with h5py.File(h5) as f:
        assert "layers/dense_1/vars/0" not in f and f["layers/dense/vars/0"].shape == (20, 256)


def test_rm_one_name_of_a_tie_keeps_the_other(tmp_path):
    out = tmp_path / "out.pt"
    assert run("rm", str(SAMPLES / "shared.pt"), r"^2\.", "-o", str(out)).exit_code == 0
    sd, src = torch_load(out), torch_load(SAMPLES / "shared.pt")
    assert "2.weight" not in sd and torch.equal(sd["4.weight"], src["4.weight"])


def test_rm_refusals_write_nothing(tmp_path):
    out = tmp_path / "out.pt"
    assert_not_written(run("rm", str(SAMPLES / "mlp.pt"), "nothing", "-o", str(out)), out)
    torch.save({"params": [torch.zeros(1), torch.ones(1), torch.ones(2)]}, tmp_path / "list.pt")
    result = run("rm", str(tmp_path / "list.pt"), r"^params\.1$", "-o", str(out))
    assert_not_written(result, out)
    assert "renumbered" in result.stderr
    assert run("rm", str(tmp_path / "list.pt"), r"^params\.[12]$", "-o", str(out)).exit_code == 0
    assert [t.shape for t in torch_load(out)["params"]] == [(1,)]


def test_rm_dry_run(tmp_path):
    result = run("rm", str(SAMPLES / "mlp.pt"), "bias", "-x", "^2", "--dry-run")
    assert result.stdout == "0.bias\t[256]\tfloat32\n"


# --- cast ----------------------------------------------------------------------------------------


def test_cast_floating_only_and_loads(tmp_path):
    model = net()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "m.pt")
    for out in (tmp_path / "h.pt", tmp_path / "h.safetensors"):
        result = run("cast", str(tmp_path / "m.pt"), "--dtype", "float16", "-o", str(out))
        assert result.exit_code == 0, result.stderr
        got = torch_load(out) if out.suffix == ".pt" else load_file(out)
        assert got["2.num_batches_tracked"].dtype == torch.int64
        for name, value in sd.items():
            if value.is_floating_point():
                assert got[name].dtype == torch.float16 and torch.equal(got[name], value.half()), name
    model.half().load_state_dict(torch_load(tmp_path / "h.pt"), strict=True)


def test_cast_all_and_pattern(tmp_path):
    torch.save(
        {"w": torch.randn(3), "i": torch.arange(3), "c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "m.pt"
    )
    out = tmp_path / "out.pt"
    assert run("cast", str(tmp_path / "m.pt"), "--dtype", "float64", "-o", str(out)).exit_code == 0
    assert [t.dtype for t in torch_load(out).values()] == [torch.float64, torch.int64, torch.complex64]
    result = run("cast", str(tmp_path / "m.pt"), "^i$", "--dtype", "float64", "-o", str(out))
    assert "non-floating" in result.stderr and torch_load(out)["i"].dtype == torch.int64
    assert run("cast", str(tmp_path / "m.pt"), "--dtype", "int32", "--all", "-o", str(out)).exit_code == 0
    assert [t.dtype for t in torch_load(out).values()] == [torch.int32] * 3
    out_bad = tmp_path / "bad.pt"
    assert_not_written(run("cast", str(tmp_path / "m.pt"), "--dtype", "float13", "-o", str(out_bad)), out_bad)


def test_cast_warns_when_range_is_lost(tmp_path):
    values = torch.tensor([1.0, 7e4, -1e5, 1e-9, 0.0, math.inf, math.nan])
    torch.save({"x": values, "ok": torch.ones(2)}, tmp_path / "m.pt")
    out = tmp_path / "out.safetensors"
    result = run("cast", str(tmp_path / "m.pt"), "--dtype", "float16", "-o", str(out))
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "paramctl: warning: x: 2 value(s) beyond the range of float16 (-65504 to 65504)",
        "paramctl: warning: x: 1 non-zero value(s) become 0 in float16",
    ]
    got = load_file(out)["x"]
    assert got[1] == math.inf and got[2] == -math.inf and got[3] == 0
    quiet = run("cast", str(tmp_path / "m.pt"), "--dtype", "bfloat16", "-o", str(out))
    assert quiet.stderr == ""  # bfloat16 has float32's range
    dry = run("cast", str(tmp_path / "m.pt"), "--dtype", "int8", "--all", "--dry-run", "-f", "json")
    assert json.loads(dry.stdout) == [
        {"name": "x", "from": "float32", "to": "int8", "beyond": 4, "to_zero": 0},
        {"name": "ok", "from": "float32", "to": "int8", "beyond": 0, "to_zero": 0},
    ]


def test_cast_keeps_ties(tmp_path):
    pt, st = tmp_path / "h.pt", tmp_path / "h.safetensors"
    assert run("cast", str(SAMPLES / "shared.pt"), "--dtype", "bfloat16", "-o", str(pt)).exit_code == 0
    sd = torch_load(pt)
    assert sd["2.weight"].dtype == torch.bfloat16 and sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()
    assert run("cast", str(SAMPLES / "shared.pt"), "--dtype", "float16", "-o", str(st)).exit_code == 0
    assert json.loads(run("tied", str(st), "-f", "json").stdout)[0]["names"] == ["2.weight", "4.weight"]


def test_in_place_edits_replace_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(net(), str(path))
    assert run("rm", str(path), "^2", "--in-place").exit_code == 0
    assert run("rename", str(path), "s/^0/first/", "--in-place").exit_code == 0
    assert run("cast", str(path), "--dtype", "float16", "--in-place").exit_code == 0
    got = load_file(path)
    assert sorted(got) == ["3.bias", "3.weight", "first.bias", "first.weight"]
    assert {t.dtype for t in got.values()} == {torch.float16}


def test_every_edit_command_has_help_with_an_example():
    for command in ("diff", "rename", "rm", "cast"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout, command


def test_library_rename_and_remove():
    ckpt = paramctl.load(str(SAMPLES / "shared.pt"))
    ckpt.rename({"4.weight": "tied.weight"})
    assert ckpt["tied.weight"].tie == "2.weight"
    ckpt.remove([ckpt["2.weight"]])
    assert ckpt["tied.weight"].tie is None
    with pytest.raises(UsageError, match="merge"):
        ckpt.rename({"0.weight": "0.bias"})
