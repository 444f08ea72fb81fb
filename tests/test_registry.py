"""The format registry: formats register themselves, and everything else asks the registry."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import REPO, SAMPLES, run

import paramctl
from paramctl import formats
from paramctl.formats import FORMATS, Format, register
from paramctl.table import Checkpoint, tensor_from_array


def test_readme_format_list_is_the_registry():
    block = re.search(r"```console\n\$ paramctl formats\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no `paramctl formats` block"
    result = run("formats", "-f", "table")
    assert result.exit_code == 0
    shown = [line.rstrip() for line in result.stdout.splitlines()]
    assert shown == block.group(1).rstrip("\n").splitlines()


def test_registry_is_consistent():
    names = [f.name for f in formats.formats()]
    assert len(names) == len(set(names))
    assert {"pt", "safetensors", "hdf5", "keras", "sharded"} <= set(names)
    every_extension = [ext for f in formats.formats() for ext in f.extensions]
    assert len(every_extension) == len(set(every_extension))  # one format per output extension
    for fmt in formats.formats():
        assert fmt.layout in ("torch", "keras")
        assert all(ext.startswith(".") and ext == ext.lower() for ext in fmt.extensions)
    assert formats.writable() == [f.name for f in formats.formats() if f.save is not None]
    listed = json.loads(run("formats", "-f", "json").stdout)
    assert sorted(row["format"] for row in listed) == sorted(names)
    help_text = run("convert", "--help").stdout
    for name in formats.writable():
        assert name in help_text  # --to offers every writable format


@pytest.mark.parametrize(
    ("sample", "fmt"),
    [("mlp.pt", "pt"), ("mlp.safetensors", "safetensors"), ("mlp.h5", "hdf5"), ("mlp.keras", "keras")],
)
def test_sniff_by_content_not_extension(tmp_path, sample, fmt):
    renamed = tmp_path / "checkpoint.data"
    shutil.copy(SAMPLES / sample, renamed)
    assert formats.sniff(str(renamed)) == fmt
    assert paramctl.load(str(renamed)).format == fmt


def test_a_new_format_is_one_registration(tmp_path):
    """A format registered from outside the package is recognised, read, written, listed and
    chosen by its extension, with nothing else changed."""

    def load(path, source):
        with open(path, "rb") as f:
            raw = f.read()[4:]
        return Checkpoint(source, "toy", [tensor_from_array("w", np.frombuffer(raw, np.float32))])

    def save(ckpt, path):
        with open(path, "wb") as f:
            f.write(b"TOY!" + ckpt["w"].tobytes())

    register(Format("toy", "a toy format", load, save, (".toy",), accept=lambda probe: probe.head[:4] == b"TOY!"))
    try:
        (tmp_path / "a.bin").write_bytes(b"TOY!" + np.arange(3, dtype=np.float32).tobytes())
        assert run("ls", str(tmp_path / "a.bin"), "-f", "json").stdout.count('"w"') == 1
        assert run("convert", str(tmp_path / "a.bin"), str(tmp_path / "b.toy")).exit_code == 0
        assert formats.sniff(str(tmp_path / "b.toy")) == "toy"
        np.testing.assert_array_equal(paramctl.load(str(tmp_path / "b.toy"))["w"].array(), np.arange(3))
        assert "toy" in run("formats").stdout
    finally:
        del FORMATS["toy"]


def write_safetensors(path, value):
    from safetensors.numpy import save_file

    save_file({"w": np.full(3, value, np.float32)}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "weights", ["model.safetensors", "diffusion_pytorch_model.safetensors", "adapter_model.safetensors"]
)
def test_a_save_pretrained_directory_is_its_weights_file(tmp_path, weights):
    write_safetensors(tmp_path / weights, 1.0)
    (tmp_path / "config.json").write_text("{}")
    result = run("ls", str(tmp_path), "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert [r["name"] for r in json.loads(result.stdout)] == ["w"]
    assert result.stderr == ""


def test_several_candidates_read_safetensors_first_and_say_so(tmp_path):
    import torch

    write_safetensors(tmp_path / "model.safetensors", 1.0)
    torch.save({"w": torch.full((3,), 2.0)}, tmp_path / "pytorch_model.bin")
    result = run("stats", str(tmp_path), "-f", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)[0]["mean"] == 1.0
    assert "reading model.safetensors (also here: pytorch_model.bin)" in result.stderr


def test_an_unrecognised_directory_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run("ls", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    for looked_for in ("*.index.json", "model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors"):
        assert looked_for in result.stderr


def test_missing_parent_directories_of_the_output_are_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "model.safetensors"
    result = run("convert", str(SAMPLES / "mlp.pt"), str(out))
    assert result.exit_code == 0, result.stderr
    assert paramctl.load(str(out)).names() == paramctl.load(str(SAMPLES / "mlp.pt")).names()


def test_a_failed_write_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new" / "deeper" / "model.keras"  # a .keras needs a config.json a .pt has not
    result = run("convert", str(SAMPLES / "mlp.pt"), str(out))
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_meta_and_estimate_of_a_save_pretrained_directory(tmp_path):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", 1.0)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [32]}))
    meta = run("meta", str(tmp_path))
    assert meta.exit_code == 0, meta.stderr
    assert json.loads(meta.stdout) == {"format": "pt"}
    estimate = run("estimate", str(tmp_path), "-f", "json")
    assert estimate.exit_code == 0, estimate.stderr
    assert json.loads(estimate.stdout)["parameters"] == 3 and "no KV cache" in estimate.stderr
