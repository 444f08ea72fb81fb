"""`convert` across format families (PyTorch / safetensors <-> HDF5), warnings and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLES, run

import paramctl


def values(path) -> dict[str, bytes]:
    return {t.name: bytes(t.tobytes()) for t in paramctl.load(str(path))}


@pytest.mark.parametrize("sample", ["mlp.pt", "mlp.safetensors", "nested.pt"])
def test_through_hdf5_and_back_is_identical(tmp_path, sample):
    src = SAMPLES / sample
    h5 = tmp_path / "x.h5"
    back = tmp_path / f"back{src.suffix}"
    assert run("convert", str(src), str(h5)).exit_code == 0
    assert run("convert", str(h5), str(back)).exit_code == 0
    assert values(back) == values(src)
    assert paramctl.load(str(back)).names() == paramctl.load(str(src)).names()


def test_pt_through_hdf5_loads_into_the_model(tmp_path):
    import torch

    h5, back = tmp_path / "mlp.h5", tmp_path / "mlp.pt"
    run("convert", str(SAMPLES / "mlp.pt"), str(h5))
    run("convert", str(h5), str(back))
    net = torch.nn.Sequential(torch.nn.Linear(20, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    net.load_state_dict(torch.load(back), strict=True)
    assert torch.equal(net[0].weight, torch.load(SAMPLES / "mlp.pt")["0.weight"])


@pytest.mark.parametrize("sample", ["mlp.h5", "mlp.weights.h5", "mlp.keras"])
def test_keras_to_pt_and_safetensors_keeps_every_tensor_and_warns(tmp_path, sample):
    import torch
    from safetensors.numpy import load_file

    src = SAMPLES / sample
    expected = {t.name: t.array() for t in paramctl.load(str(src))}
    for out in (tmp_path / "x.pt", tmp_path / "x.safetensors"):
        result = run("convert", str(src), str(out))
        assert result.exit_code == 0
        if sample != "mlp.weights.h5":  # a Keras 3 weights file has no root attributes to drop
            assert "warning: " in result.stderr and "dropping" in result.stderr and "keras_version" in result.stderr
        loaded = {k: v.numpy() for k, v in torch.load(out).items()} if out.suffix == ".pt" else load_file(str(out))
        assert loaded.keys() == expected.keys()
        for name, array in expected.items():
            np.testing.assert_array_equal(loaded[name], array)


def test_keras_archive_to_weights_h5_warns_and_loads(tmp_path):
    import keras

    out = tmp_path / "mlp.weights.h5"
    result = run("convert", str(SAMPLES / "mlp.keras"), str(out))
    assert result.exit_code == 0
    assert "config.json" in result.stderr
    model = keras.models.load_model(SAMPLES / "mlp.keras")
    fresh = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    fresh.load_weights(out)
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_weights_h5_to_keras_archive_is_refused(tmp_path):
    out = tmp_path / "mlp.keras"
    result = run("convert", str(SAMPLES / "mlp.weights.h5"), str(out))
    assert result.exit_code == 2
    assert "config.json" in result.stderr
    assert not out.exists()


def test_ties_survive_a_trip_through_hdf5(tmp_path):
    """HDF5 holds a tie as copies plus paramctl's record; reading it back re-ties."""
    import h5py
    import torch

    h5, back = tmp_path / "shared.h5", tmp_path / "back.pt"
    assert run("convert", str(SAMPLES / "shared.pt"), str(h5)).exit_code == 0
    with h5py.File(h5) as f:
        assert f["2.weight"][()].tolist() == f["4.weight"][()].tolist()  # a real copy for Keras
        assert json.loads(f.attrs["paramctl_ties"]) == {"4.weight": "2.weight", "4.bias": "2.bias"}
    assert paramctl.load(str(h5)).tie_groups() == [["2.weight", "4.weight"], ["2.bias", "4.bias"]]
    assert run("convert", str(h5), str(back)).exit_code == 0
    sd = torch.load(back)
    assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()


def test_info_shows_keras_attributes():
    info = json.loads(run("info", str(SAMPLES / "mlp.h5"), "-f", "json").stdout)
    assert info["format"] == "hdf5"
    assert info["entries"]["keras_version"] == "3.15.1"
    assert json.loads(info["entries"]["model_config"])["class_name"] == "Sequential"
    archive = json.loads(run("info", str(SAMPLES / "mlp.keras"), "-f", "json").stdout)
    assert archive["entries"]["keras_version"] == "3.15.1"


def test_info_shows_pt_entries(tmp_path):
    import torch

    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "lr": 0.1, "name": "run-1", "state_dict": {"w": torch.ones(2)}}, path)
    info = json.loads(run("info", str(path), "-f", "json").stdout)
    assert info["entries"] == {"epoch": 3, "lr": 0.1, "name": "run-1"}
