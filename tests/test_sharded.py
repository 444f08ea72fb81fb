"""Sharded output as transformers writes it, read back by transformers' own logic; edits of a
sharded checkpoint rewrite only the shards that changed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, run
from safetensors import safe_open
from safetensors.torch import load_file

import paramctl
from paramctl.formats.sharded import parse_size, split
from paramctl.table import tensor_from_array


def transformers_read(index: Path) -> dict[str, torch.Tensor]:
    """What `from_pretrained` does with an index: read weight_map, load every shard it names."""
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        loaded = load_file(path) if shard.endswith(".safetensors") else torch.load(path, weights_only=True)
        assert {n for n, s in weight_map.items() if s == shard} == set(loaded), shard
        state.update(loaded)
    return state


def ls(path) -> list[dict]:
    result = run("ls", str(path), "-f", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each file's inode, modification time and bytes."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


NAMES = [f"layers.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")]


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: torch.randn(64, 64) if name.endswith("weight") else torch.randn(64) for name in NAMES}


@pytest.fixture
def source(tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    sd = state_dict()
    torch.save(sd, tmp_path / "model.pt")
    return sd, tmp_path / "model.pt"


@pytest.fixture
def sharded(tmp_path, source) -> tuple[dict[str, torch.Tensor], Path]:
    """A 4-shard safetensors checkpoint written by paramctl (16 KiB weights, 20 KB shards)."""
    sd, pt = source
    index = tmp_path / "hf" / "model.safetensors.index.json"
    result = run("cast", str(pt), "--dtype", "float32", "--shard-size", "20KB", "-o", str(index))
    assert result.exit_code == 0, result.stderr
    return sd, index


# --- writing -------------------------------------------------------------------------------------


def test_safetensors_shards_load_the_transformers_way(sharded, source):
    sd, index = sharded
    names = sorted(p.name for p in index.parent.iterdir())
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    got = transformers_read(index)
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    content = json.loads(index.read_text())
    assert content["metadata"] == {"total_size": sum(t.numel() * 4 for t in sd.values())}
    assert index.read_text() == json.dumps(content, indent=2, sort_keys=True) + "\n"  # as transformers writes it
    for shard in names[:-1]:
        assert (index.parent / shard).stat().st_size < 20_000 + 1000  # header included
        with safe_open(str(index.parent / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses shards without it
    assert ls(index) == ls(source[1]) == ls(index.parent)
    assert run("diff", str(source[1]), str(index)).exit_code == 0


def test_bin_shards_load_the_transformers_way(tmp_path, source):
    sd, pt = source
    index = tmp_path / "bin" / "pytorch_model.bin.index.json"
    assert run("rm", str(pt), "^nothing$|^layers.3.bias$", "--shard-size", "40KB", "-o", str(index)).exit_code == 0
    assert sorted(os.listdir(index.parent)) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    got = transformers_read(index)
    assert list(got) == [n for n in sd if n != "layers.3.bias"]
    assert all(torch.equal(got[k], sd[k]) for k in got)


def test_an_index_path_alone_writes_shards_of_the_default_size(tmp_path):
    index = tmp_path / "out" / "model.safetensors.index.json"
    assert run("convert", str(SAMPLES / "mlp.pt"), str(index)).exit_code == 0
    assert json.loads(index.read_text())["weight_map"] == dict.fromkeys(
        ["0.bias", "0.weight", "2.bias", "2.weight"], "model-00001-of-00001.safetensors"
    )
    assert ls(index) == ls(SAMPLES / "mlp.pt")
    # into a directory, the source's own name, and one file when it fits one shard (save_pretrained)
    to_dir = tmp_path / "pt_dir"
    assert run("convert", str(SAMPLES / "mlp.pt"), f"{to_dir}/").exit_code == 0  # a directory: the input's format
    assert sorted(os.listdir(to_dir)) == ["mlp.pt"]
    assert run("diff", str(SAMPLES / "mlp.pt"), str(to_dir / "mlp.pt")).exit_code == 0
    # written again in shards, they replace the single file (a loader would read it first), and
    # the other way round, as save_pretrained clears stale shards
    result = run("convert", str(SAMPLES / "mlp.pt"), str(to_dir), "--shard-size", "20KB")
    assert result.exit_code == 0
    assert result.stderr == f"paramctl: removed mlp.pt from {to_dir}: the checkpoint written there replaces them\n"
    assert sorted(os.listdir(to_dir)) == ["mlp-00001-of-00002.pt", "mlp-00002-of-00002.pt", "mlp.pt.index.json"]
    assert ls(to_dir) == ls(SAMPLES / "mlp.pt")
    assert run("convert", str(SAMPLES / "mlp.pt"), str(to_dir)).exit_code == 0
    assert sorted(os.listdir(to_dir)) == ["mlp.pt"]


def test_a_tie_stays_in_one_shard(tmp_path):
    for suffix in ("safetensors", "bin"):
        index = tmp_path / suffix / f"model.{suffix}.index.json"
        result = run("cast", str(SAMPLES / "shared.pt"), "--dtype", "float32", "--shard-size", "150B", "-o", str(index))
        assert result.exit_code == 0
        weight_map = json.loads(index.read_text())["weight_map"]
        if suffix == "bin":
            assert weight_map["2.weight"] == weight_map["4.weight"] and weight_map["2.bias"] == weight_map["4.bias"]
            shard = torch.load(index.parent / weight_map["2.weight"], weights_only=True)
            assert shard["2.weight"].data_ptr() == shard["4.weight"].data_ptr()
        else:
            assert "4.weight" not in weight_map  # a declared alias, as safetensors.torch.save_model writes it
            with safe_open(str(index.parent / weight_map["2.weight"]), "pt") as f:
                assert f.metadata()["4.weight"] == "2.weight"
        assert json.loads(run("tied", str(index), "-f", "json").stdout)[0]["names"] == ["2.weight", "4.weight"]
        assert run("diff", str(SAMPLES / "shared.pt"), str(index)).exit_code == 0


def test_split_keeps_order_and_puts_a_large_tensor_alone():
    sizes = [10, 10, 50, 10, 10, 10]
    rows = [tensor_from_array(f"t{i}", bytearray(n)) for i, n in enumerate(sizes)]
    assert [[t.name for t in shard] for shard in split(rows, 25)] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("1000") == 1000
    assert parse_size(" 10 kb ") == 10_000
    for bad in ("", "GB", "-1GB", "2XB", "0"):
        with pytest.raises(paramctl.UsageError):
            parse_size(bad)
    result = run("cast", str(SAMPLES / "mlp.pt"), "--dtype", "float16", "--shard-size", "lots", "-o", "x")
    assert result.exit_code == 2 and "lots" in result.stderr


def test_refusals(tmp_path):
    assert run("cast", str(SAMPLES / "mlp.pt"), "--dtype", "float16", "--shard-size", "1MB", "-o", "-").exit_code == 2
    result = run("convert", str(SAMPLES / "mlp.pt"), str(tmp_path / "x.h5.index.json"))
    assert result.exit_code == 2 and "safetensors or .bin" in result.stderr
    assert not list(tmp_path.iterdir())


# --- editing a sharded checkpoint ----------------------------------------------------------------


def test_in_place_edit_rewrites_only_the_changed_shard(sharded):
    sd, index = sharded
    before = snapshot(index.parent)
    weight_map = json.loads(index.read_text())["weight_map"]
    changed = weight_map["layers.1.weight"]
    result = run("cast", str(index), r"^layers\.1\.weight$", "--dtype", "float16", "--in-place")
    assert result.exit_code == 0, result.stderr
    after = snapshot(index.parent)
    assert after.keys() == before.keys()
    for name in before:
        if name in (changed, index.name):
            assert after[name] != before[name], name
        else:
            assert after[name] == before[name], name  # same inode, same mtime, same bytes
    got = transformers_read(index)
    assert got["layers.1.weight"].dtype == torch.float16 and torch.equal(
        got["layers.1.weight"], sd["layers.1.weight"].half()
    )
    assert [r["name"] for r in ls(index)] == list(sd)


def test_edit_to_another_index_in_the_same_directory_reuses_unchanged_shards(sharded):
    sd, index = sharded
    before = snapshot(index.parent)
    weight_map = json.loads(index.read_text())["weight_map"]
    edited = index.parent / "edited.safetensors.index.json"
    result = run("rename", str(index), r"s/^layers\.2\./block.2./", "-o", str(edited))
    assert result.exit_code == 0, result.stderr
    new_map = json.loads(edited.read_text())["weight_map"]
    shard = weight_map["layers.2.weight"]
    number = re.search(r"-(\d{5}-of-\d{5})\.", shard).group(1)
    assert new_map["block.2.weight"] == f"edited-{number}.safetensors"
    assert {n: s for n, s in new_map.items() if not n.startswith("block.")} == {
        n: s for n, s in weight_map.items() if not n.startswith("layers.2.")
    }  # the unchanged shards are the input's own files
    after = snapshot(index.parent)
    assert {k: v for k, v in after.items() if k in before} == before  # the input is untouched
    assert set(after) - set(before) == {edited.name, f"edited-{number}.safetensors"}
    assert [r["name"] for r in ls(edited)] == [n.replace("layers.2.", "block.2.") for n in sd]


def test_edit_to_another_directory_copies_unchanged_shards_byte_for_byte(sharded, tmp_path):
    sd, index = sharded
    out = tmp_path / "copy" / "model.safetensors.index.json"
    assert run("rm", str(index), r"^layers\.0\.bias$", "-o", str(out)).exit_code == 0
    weight_map = json.loads(index.read_text())["weight_map"]
    changed = weight_map["layers.0.bias"]
    for shard in set(weight_map.values()) - {changed}:
        assert (out.parent / shard).read_bytes() == (index.parent / shard).read_bytes(), shard
    assert (out.parent / changed).read_bytes() != (index.parent / changed).read_bytes()
    assert transformers_read(out).keys() == sd.keys() - {"layers.0.bias"}


def test_in_place_rm_of_a_whole_shard_deletes_it(sharded):
    sd, index = sharded
    weight_map = json.loads(index.read_text())["weight_map"]
    first = weight_map["layers.0.weight"]
    on_first = [n for n, s in weight_map.items() if s == first]
    pattern = "^(" + "|".join(re.escape(n) for n in on_first) + ")$"
    assert run("rm", str(index.parent), pattern, "--in-place").exit_code == 0
    assert not (index.parent / first).exists()
    assert transformers_read(index).keys() == sd.keys() - set(on_first)


def test_writing_over_an_input_shard_is_refused(sharded):
    _, index = sharded
    before = snapshot(index.parent)
    other = index.parent / "model.index.json"  # would name its shards model-0000N-of-00004.safetensors too
    result = run("cast", str(index), "^layers.0.weight$", "--dtype", "float16", "-o", str(other))
    assert result.exit_code == 2 and "would overwrite" in result.stderr
    assert snapshot(index.parent) == before


def test_bin_shards_keep_their_objects_when_edited(tmp_path):
    shards = tmp_path / "bin"
    shards.mkdir()
    sd = state_dict()
    names = list(sd)
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:]), 1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, shards / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = shards / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    before = snapshot(shards)
    assert run("rename", str(index), r"s/^layers\.3\./last./", "--in-place").exit_code == 0
    after = snapshot(shards)
    assert after["pytorch_model-00001-of-00002.bin"] == before["pytorch_model-00001-of-00002.bin"]
    second = torch.load(shards / "pytorch_model-00002-of-00002.bin", weights_only=True)
    assert list(second) == ["layers.2.weight", "layers.2.bias", "last.weight", "last.bias"]
    assert type(second) is dict  # the shard's own object (a plain dict), not a new OrderedDict
    assert transformers_read(index).keys() == {n.replace("layers.3.", "last.") for n in sd}


def test_sharded_input_to_a_single_file(sharded, tmp_path):
    sd, index = sharded
    out = tmp_path / "merged.safetensors"
    assert run("convert", str(index), str(out)).exit_code == 0
    assert sorted(load_file(out)) == sorted(sd)
    assert [r["name"] for r in ls(out)] == list(sd)


@pytest.mark.parametrize(
    "source,to,name",
    [
        ("model.safetensors", "pt", "pytorch_model.bin"),
        ("pytorch_model.bin", "safetensors", "model.safetensors"),
        ("diffusion_pytorch_model.safetensors", "pt", "diffusion_pytorch_model.bin"),
        ("adapter_model.bin", "safetensors", "adapter_model.safetensors"),
        ("model.fp16.safetensors", "pt", "pytorch_model.fp16.bin"),
        ("pytorch_model.fp16.bin", "safetensors", "model.fp16.safetensors"),
        ("weights.ckpt", "pt", "weights.ckpt"),
        ("weights.ckpt", "safetensors", "weights.safetensors"),
        ("net.safetensors", "pt", "net.pt"),
        ("-", "safetensors", "model.safetensors"),
        ("-", "pt", "pytorch_model.bin"),
    ],
)
def test_weights_written_into_a_directory_keep_the_sources_name(tmp_path, source, to, name):
    """The name the weights take in `-o out/`: the source's, in the output format's spelling."""
    data = (SAMPLES / "mlp.pt").read_bytes() if source.endswith((".bin", ".ckpt")) else None
    if data is None:
        result = run("convert", str(SAMPLES / "mlp.pt"), str(tmp_path / "src.safetensors"))
        assert result.exit_code == 0
        data = (tmp_path / "src.safetensors").read_bytes()
    out = tmp_path / "out"
    if source == "-":
        result = run("convert", "-", f"{out}/", "--to", to, input=data)
    else:
        (tmp_path / source).write_bytes(data)
        result = run("convert", str(tmp_path / source), f"{out}/", "--to", to)
    assert result.exit_code == 0, result.stderr
    assert os.listdir(out) == [name]
    assert ls(out / name) == ls(SAMPLES / "mlp.pt")


def test_a_directory_is_not_replaced_in_place_by_another_format(tmp_path):
    """pytorch_model.bin written beside model.safetensors would leave the old weights where
    from_pretrained looks first: refused, nothing written."""
    directory = tmp_path / "hf"
    assert run("convert", str(SAMPLES / "mlp.pt"), str(directory / "model.safetensors")).exit_code == 0
    (directory / "config.json").write_text("{}")
    result = run("cast", str(directory), "--dtype", "float16", "--in-place", "--to", "pt")
    assert result.exit_code == 2
    assert result.stderr == (
        f"paramctl: error: {directory}: its safetensors weights are not replaced in place by pt (a loader would "
        "still read them): write to another directory (-o)\n"
    )
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    assert run("cast", str(directory), "--dtype", "float16", "--in-place").exit_code == 0
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    assert {r["dtype"] for r in ls(directory)} == {"float16"}


def test_safetensors_shards_without_format_metadata_are_rewritten_with_it(tmp_path):
    """transformers 4 refuses a shard whose metadata lacks `format`: an edit does not copy such a
    shard as it is, though its tensors are unchanged."""
    from safetensors.torch import save_file

    sd = state_dict()
    weight_map = {}
    for i, names in enumerate([NAMES[:4], NAMES[4:]], 1):
        save_file({n: sd[n] for n in names}, tmp_path / f"model-0000{i}-of-00002.safetensors", {"note": "x"})
        weight_map.update(dict.fromkeys(names, f"model-0000{i}-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    out = tmp_path / "out"
    assert run("set", str(index), "layers.0.bias[0]", "1", "-o", f"{out}/").exit_code == 0
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt", "note": "x"}
    assert transformers_read(out / "model.safetensors.index.json").keys() == sd.keys()


def test_only_a_save_pretrained_source_brings_its_directorys_files(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    hf, plain, distributed = tmp_path / "hf", tmp_path / "plain", tmp_path / "dcp"
    for directory in (hf, plain):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    (hf / "optimizer.pt").write_bytes((SAMPLES / "mlp.pt").read_bytes())
    (hf / ".hidden").write_text("")
    (hf / "pytorch_model.bin").write_bytes((SAMPLES / "mlp.pt").read_bytes())
    (plain / "net.pt").write_bytes((SAMPLES / "mlp.pt").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=distributed)
    (distributed / "config.json").write_text("{}")
    result = run("convert", str(hf), f"{tmp_path / 'out-hf'}/", "--to", "safetensors")
    assert result.exit_code == 0 and result.stderr == (
        f"paramctl: copied config.json, tokenizer.json from {hf} beside the weights\n"
    )
    assert sorted(os.listdir(tmp_path / "out-hf")) == ["config.json", "model.safetensors", "tokenizer.json"]
    for source in (plain / "net.pt", distributed):
        out = tmp_path / f"out-{source.name}"
        result = run("convert", str(source), f"{out}/", "--to", "safetensors")
        assert result.exit_code == 0 and result.stderr == "", result.stderr
        assert [p.suffix for p in out.iterdir()] == [".safetensors"]
