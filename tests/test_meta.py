"""meta: metadata shown as JSON; safetensors __metadata__ and HDF5 root attributes edited, read
back by safe_open and h5py."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SAMPLES, run, tied_module
from safetensors import safe_open
from safetensors.torch import save_file, save_model


@pytest.fixture
def tied_file(tmp_path) -> Path:
    """A safetensors file with metadata and a declared tie (save_model writes {dropped: kept})."""

    path = tmp_path / "tied.safetensors"
    save_model(tied_module(), str(path), metadata={"format": "pt", "license": "apache-2.0"})
    return path


def data_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def test_show_safetensors_header_metadata(tied_file):
    result = run("meta", str(tied_file))
    assert result.exit_code == 0
    with safe_open(tied_file, "pt") as f:
        assert json.loads(result.output) == f.metadata()
    assert json.loads(result.output) == {"format": "pt", "license": "apache-2.0", "head.weight": "emb.weight"}
    table = run("meta", str(tied_file), "--format", "tsv")
    assert sorted(table.output.splitlines()) == ["format\tpt", "head.weight\temb.weight", "license\tapache-2.0"]


def test_set_and_unset_rewrite_the_header_only(tied_file, tmp_path):
    out = tmp_path / "out.safetensors"
    result = run(
        "meta", str(tied_file), "--set", "license=mit", "--set", "note=a=b", "--unset", "format", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"license": "mit", "head.weight": "emb.weight", "note": "a=b"}
    assert data_bytes(out) == data_bytes(tied_file)  # the tensor bytes copied as they were
    assert (len(out.read_bytes()) - len(data_bytes(out))) % 8 == 0  # the data stays 8-byte aligned
    # the declared tie still re-ties in safetensors' own loader
    from safetensors.torch import load_model

    model = tied_module()
    load_model(model, str(out))
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    assert run("meta", str(out)).output == run("meta", str(out), "--format", "json").output


def test_in_place_and_removing_all_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path), metadata={"k": "v"})
    before = data_bytes(path)
    assert run("meta", str(path), "--unset", "k", "--in-place").exit_code == 0
    with safe_open(path, "pt") as f:
        assert f.metadata() is None
        assert torch.equal(f.get_tensor("w"), torch.arange(6.0).reshape(2, 3))
    assert data_bytes(path) == before
    assert run("meta", str(path), "--set", "k=", "--in-place").exit_code == 0
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"k": ""}


def test_hdf5_root_attributes(tmp_path):
    src = SAMPLES / "mlp.h5"
    out = tmp_path / "mlp.h5"
    result = run("meta", str(src), "--set", "note=pruned 20%", "--unset", "backend", "-o", str(out))
    assert result.exit_code == 0, result.output
    with h5py.File(src, "r") as a, h5py.File(out, "r") as b:
        want = {k: a.attrs[k] for k in a.attrs if k != "backend"}
        got = dict(b.attrs)
        assert got.pop("note") == "pruned 20%"
        assert set(got) == set(want) and all(np.all(got[k] == want[k]) for k in want)
        datasets: list[str] = []
        a.visit(lambda n: datasets.append(n) if isinstance(a[n], h5py.Dataset) else None)
        for name in datasets:
            np.testing.assert_array_equal(a[name][()], b[name][()])
    shown = json.loads(run("meta", str(out)).output)
    assert shown["note"] == "pruned 20%" and "backend" not in shown and "keras_version" in shown


def test_pt_non_tensor_entries_shown_and_edit_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "hparams": {"lr": 0.1, "name": "run"}, "model": {"w": torch.zeros(2)}}, path)
    result = run("meta", str(path))
    assert result.exit_code == 0
    assert json.loads(result.output) == {"epoch": 3, "hparams.lr": 0.1, "hparams.name": "run"}
    result = run("meta", str(path), "--set", "a=b", "-o", str(tmp_path / "x.pt"))
    assert result.exit_code == 2
    assert "meta edits safetensors metadata and HDF5 root attributes; this is a pt checkpoint" in result.output
    assert not (tmp_path / "x.pt").exists()


def test_errors(tied_file, tmp_path):
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["meta", str(tied_file), "--unset", "nope", "-o", out], "no metadata key 'nope' to unset"),
        (["meta", str(tied_file), "--set", "novalue", "-o", out], "--set takes KEY=VALUE"),
        (["meta", str(tied_file), "--set", "emb.weight=x", "-o", out], "'emb.weight' is a tensor name"),
        (["meta", str(tied_file), "--set", "a=b"], "name the output"),
        (["meta", str(tied_file), "-o", out], "nothing to write"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
    assert not Path(out).exists()
