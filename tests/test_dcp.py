"""torch.distributed.checkpoint directories written by `dcp.save` (one process, and two gloo
ranks on loopback for sharded tensors), read without torch and checked against
`dcp_to_torch_save`'s output."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import frameworks_imported, run
from safetensors.torch import load_file

import paramctl

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def flatten(obj, prefix: str = "") -> dict:
    """A nested state dict's leaves by dotted path, as dcp_to_torch_save's output flattens."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and any(isinstance(v, (torch.Tensor, dict, list)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


def same_object(a, b) -> bool:
    """Equal nested objects, tensors compared by dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_object(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_object(x, y) for x, y in zip(a, b))
    return a == b


def save_dcp(state: dict, directory: Path) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp.save(state, checkpoint_id=str(directory))
    dcp_to_torch_save(str(directory), str(directory) + ".reference.pt")
    return directory


def reference(directory: Path):
    return torch.load(str(directory) + ".reference.pt", weights_only=False)


def trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return model, opt


SHARDED = r"""
import os, sys, time
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

out, port = sys.argv[1], sys.argv[2]

def rank_main(rank):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    rows = torch.arange(35, dtype=torch.float32).reshape(7, 5)
    cols = torch.randn(3, 8).to(torch.bfloat16)
    big = torch.randn(64, 3, 5)
    state = {
        "rows": distribute_tensor(rows, mesh, [Shard(0)]),
        "cols": distribute_tensor(cols, mesh, [Shard(1)]),
        "big": distribute_tensor(big, mesh, [Shard(2)]),
        "replicated": distribute_tensor(torch.ones(4), mesh, [Replicate()]),
        "local": {"step": torch.tensor(rank), "note": "rank %d" % rank},
    }
    dcp.save(state, checkpoint_id=out)
    sys.stdout.flush()
    os._exit(0)

children = []
for rank in range(2):
    pid = os.fork()
    if pid == 0:
        try:
            rank_main(rank)
        finally:
            os._exit(1)
    children.append(pid)
codes = [os.waitpid(pid, 0)[1] for pid in children]
assert codes == [0, 0], codes
dcp_to_torch_save(out, out + ".reference.pt")
print("ok", flush=True)
os._exit(0)
"""


@pytest.fixture(scope="module")
def dcp_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dcp")
    model, opt = trained()
    nested = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "epoch": 3,
        "nested": {"a": [torch.ones(2), torch.zeros(3, dtype=torch.float16)], 7: torch.arange(4)},
        "pair": (1, "x"),
        "views": {"t": torch.arange(6.0).reshape(2, 3).t(), "bf": torch.linspace(-2, 2, 5).to(torch.bfloat16)},
    }
    dirs = {"nested": save_dcp(nested, root / "nested")}
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dirs["stateful"] = save_dcp({"model": model_sd, "optim": optim_sd}, root / "stateful")
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    dirs["nan"] = save_dcp({"ok": torch.zeros(2), "layer": {"w": bad}}, root / "nan")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-c", SHARDED, str(root / "sharded"), str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    dirs["sharded"] = root / "sharded"
    return dirs


def ls(path) -> list[dict]:
    result = run("ls", str(path), "-f", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def metadata_names(directory: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(directory)).read_metadata()
    return [k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]


def test_names_shapes_dtypes_and_values_are_dcp_to_torch_save_s(dcp_dirs):
    for which in ("nested", "stateful"):
        directory = dcp_dirs[which]
        expected = {k: v for k, v in flatten(reference(directory)).items() if isinstance(v, torch.Tensor)}
        rows = ls(directory)
        assert [r["name"] for r in rows] == metadata_names(directory)
        assert sorted(r["name"] for r in rows) == sorted(expected)
        for r in rows:
            t = expected[r["name"]]
            assert r["shape"] == list(t.shape)
            assert r["dtype"] == str(t.dtype).removeprefix("torch.")
        ckpt = paramctl.load(str(directory))
        assert ckpt.format == "dcp"
        for t in ckpt.tensors:
            want = expected[t.name]
            got = torch.from_numpy(t.array().copy()) if t.dtype != "bfloat16" else None
            if got is None:
                assert np.array_equal(t.array().astype(np.float32), want.float().numpy())
            else:
                assert torch.equal(got, want), t.name


def test_optimizer_state_from_get_state_dict_keeps_its_fully_qualified_names(dcp_dirs):
    names = [r["name"] for r in ls(dcp_dirs["stateful"])]
    assert "optim.state.0.weight.exp_avg" in names
    assert "optim.state.1.running_mean" not in names
    assert names[:2] == ["model.0.weight", "model.0.bias"]


def test_convert_to_pt_writes_what_dcp_to_torch_save_writes(dcp_dirs, tmp_path):
    for which in ("nested", "stateful", "sharded"):
        out = tmp_path / f"{which}.pt"
        result = run("convert", str(dcp_dirs[which]), str(out))
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""  # nothing is dropped: the non-tensor items are written too
        assert same_object(torch.load(out, weights_only=True), reference(dcp_dirs[which]))


def test_convert_to_safetensors_holds_the_tensors_and_says_what_it_drops(dcp_dirs, tmp_path):
    out = tmp_path / "nested.safetensors"
    result = run("convert", str(dcp_dirs["nested"]), str(out))
    assert result.exit_code == 0
    assert result.stderr.startswith(
        "paramctl: warning: safetensors holds tensors only: dropping 21 non-tensor entries (optim.param_groups.0.lr,"
    )
    loaded = load_file(out)
    expected = {k: v for k, v in flatten(reference(dcp_dirs["nested"])).items() if isinstance(v, torch.Tensor)}
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_sharded_tensors_are_assembled_from_their_chunks(dcp_dirs, tmp_path):
    directory = dcp_dirs["sharded"]
    assert sorted(os.listdir(directory)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    expected = {k: v for k, v in flatten(reference(directory)).items() if isinstance(v, torch.Tensor)}
    ckpt = paramctl.load(str(directory))
    assert [t.name for t in ckpt] == metadata_names(directory)
    for t in ckpt:
        want = expected[t.name]
        assert list(t.shape) == list(want.shape) and t.dtype == str(want.dtype).removeprefix("torch.")
        assert np.array_equal(t.array().astype(np.float64), want.double().numpy()), t.name
        # a range read across the chunk boundary, as stats streams it
        flat = np.concatenate([c.astype(np.float64) for c in t.chunks(elements=7)])
        assert np.array_equal(flat, want.double().reshape(-1).numpy()), t.name
    result = run("diff", str(directory), str(directory) + ".reference.pt")
    assert result.exit_code == 0, result.stdout
    stats = run("stats", str(directory), "-f", "json")
    ref_stats = run("stats", str(directory) + ".reference.pt", "-f", "json")
    assert stats.exit_code == 0 and json.loads(stats.stdout) == json.loads(ref_stats.stdout)


def test_info_tree_and_entries(dcp_dirs):
    result = run("info", str(dcp_dirs["nested"]), "-f", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "dcp"
    assert info["tensors"] == len(metadata_names(dcp_dirs["nested"]))
    assert info["entries"]["epoch"] == 3 and info["entries"]["pair.1"] == "x"
    assert info["entries"]["optim.param_groups.0.lr"] == 0.01
    tree = run("tree", str(dcp_dirs["nested"]))
    assert tree.exit_code == 0 and "model" in tree.stdout


def test_check_fails_on_a_nan_in_a_shard_and_passes_clean_ones(dcp_dirs):
    result = run("check", str(dcp_dirs["nan"]))
    assert result.exit_code == 1
    assert "layer.w" in result.stdout + result.stderr
    for which in ("nested", "sharded"):
        assert run("check", str(dcp_dirs[which])).exit_code == 0


def test_listing_reads_only_the_metadata(dcp_dirs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dcp_dirs["nan"], copy)
    shard = copy / "__0_0.distcp"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # the items are gone; .metadata still says where they were
    assert ls(copy) == ls(dcp_dirs["nan"])
    result = run("check", str(copy))
    assert result.exit_code == 2
    assert "__0_0.distcp" in result.stderr and "not a valid archive" in result.stderr


def test_metadata_named_directly_reads_the_directory(dcp_dirs):
    assert ls(dcp_dirs["nested"] / ".metadata") == ls(dcp_dirs["nested"])


def test_a_lone_distcp_file_is_refused_naming_its_directory(dcp_dirs, tmp_path):
    shard = dcp_dirs["sharded"] / "__1_0.distcp"
    result = run("ls", str(shard))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"paramctl: error: {shard}: one shard of a torch.distributed.checkpoint (concatenated torch.save "
        f"archives, one per item): open its directory: paramctl ls {dcp_dirs['sharded']}"
    )
    # renamed and alone, still never read as a .pt showing its last item
    alone = tmp_path / "weights.bin"
    shutil.copy(shard, alone)
    result = run("check", str(alone))
    assert result.exit_code == 2 and "open the directory with it and its .metadata" in result.stderr


def test_a_dcp_directory_is_never_overwritten_in_another_format(dcp_dirs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dcp_dirs["nested"], copy)
    before = sorted(os.listdir(copy))
    result = run("rm", str(copy), "nested.*", "--in-place", "--to", "safetensors")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] + "\n" == (
        f"paramctl: error: {copy}: a torch.distributed.checkpoint directory (.metadata + .distcp) is not "
        "replaced in place by safetensors: write to another path (-o)\n"
    )
    assert sorted(os.listdir(copy)) == before


def hostile_metadata(tmp_path: Path, source: Path, payload: bytes) -> Path:
    directory = tmp_path / "hostile"
    shutil.copytree(source, directory)
    (directory / ".metadata").write_bytes(payload)
    return directory


def test_hostile_metadata_is_refused(dcp_dirs, tmp_path):
    marker = tmp_path / "ran"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    directory = hostile_metadata(tmp_path, dcp_dirs["nan"], payload)
    result = run("ls", str(directory))
    assert result.exit_code == 2
    assert "pickle global os.system is not allowed" in result.stderr
    assert not marker.exists()
    # a harmless global outside the metadata's own list is refused as well
    (directory / ".metadata").write_bytes(pickle.dumps({"x": __import__("collections").OrderedDict()}, protocol=4))
    result = run("ls", str(directory))
    assert result.exit_code == 2 and "collections.OrderedDict is not allowed in a DCP .metadata" in result.stderr


def test_metadata_pointing_outside_its_directory_is_refused(dcp_dirs, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dcp_dirs["nan"])).read_metadata()
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    directory = hostile_metadata(tmp_path, dcp_dirs["nan"], pickle.dumps(md, protocol=4))
    result = run("ls", str(directory))
    assert result.exit_code == 2
    assert "a storage file outside the checkpoint directory: '../elsewhere.distcp'" in result.stderr


def test_edits_write_a_dcp_directory_that_dcp_load_reads(dcp_dirs, tmp_path):
    import torch.distributed.checkpoint as dcp

    copy = tmp_path / "copy"
    shutil.copytree(dcp_dirs["nested"], copy)
    (copy / "notes.txt").write_text("kept")
    result = run("rename", str(copy), "s/^model\\./net./", "--in-place")
    assert result.exit_code == 0 and result.stderr == ""
    assert sorted(os.listdir(copy)) == [".metadata", "__0_0.distcp", "notes.txt"]
    assert not [p for p in os.listdir(tmp_path) if "paramctl" in p]
    source = reference(dcp_dirs["nested"])
    template = {"net": {k: torch.zeros_like(v) for k, v in source["model"].items()}, "epoch": 0, "pair": None}
    template["optim"] = {
        "state": {k: {n: torch.zeros_like(v) for n, v in s.items()} for k, s in source["optim"]["state"].items()}
    }
    dcp.load(template, checkpoint_id=str(copy))
    assert same_object(template["net"], source["model"]) and template["epoch"] == 3 and template["pair"] == (1, "x")
    assert same_object(template["optim"]["state"], source["optim"]["state"])
    # the rest of the table is as it was: the same rows, the renamed ones under their new names
    renamed = {r["name"].replace("net.", "model.", 1): r for r in ls(copy)}
    assert sorted(renamed) == sorted(r["name"] for r in ls(dcp_dirs["nested"]))


def test_convert_and_cast_into_dcp(dcp_dirs, tmp_path):
    import torch.distributed.checkpoint as dcp

    model, _ = trained()
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    out = tmp_path / "out"
    result = run("convert", str(pt), str(out), "--to", "dcp")
    assert result.exit_code == 0, result.stderr
    template = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(template, checkpoint_id=str(out))
    assert same_object(template, model.state_dict())
    half = tmp_path / "half"
    assert run("cast", str(out), "--dtype", "bfloat16", "-o", str(half), "--to", "dcp").exit_code == 0
    assert {r["dtype"] for r in ls(half) if r["name"] != "1.num_batches_tracked"} == {"bfloat16"}
    loaded = {
        k: torch.zeros_like(v, dtype=torch.bfloat16) if v.is_floating_point() else torch.zeros_like(v)
        for k, v in model.state_dict().items()
    }
    dcp.load(loaded, checkpoint_id=str(half))
    assert torch.equal(loaded["0.weight"], model.state_dict()["0.weight"].to(torch.bfloat16))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    result = run("convert", str(pt), str(other), "--to", "dcp")
    assert result.exit_code == 2 and "a directory that is not a DCP checkpoint" in result.stderr
    assert os.listdir(other) == ["config.json"]


def test_chunks_assemble_for_any_read_range_and_must_tile_the_tensor():
    from paramctl.errors import FormatError
    from paramctl.formats.dcp import Assembly, Chunk, Entry, Item, _check_tiling
    from paramctl.table import Storage, Tensor, tensor_from_array

    values = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    cuts = [(0, 2, 5), (0, 1, 6), (0, 4, 7)]  # uneven, on a grid
    boxes = [
        [(a[i], a[i + 1]) for a, i in zip(cuts, (i0, i1, i2))] for i0 in range(2) for i1 in range(2) for i2 in range(2)
    ]
    chunks = [Chunk(tuple(lo for lo, _ in b), tuple(hi - lo for lo, hi in b), Item("x", 0, 0)) for b in boxes]
    entry = Entry("w", ("w",), "float32", values.shape, chunks)
    _check_tiling("w", values.shape, chunks, "x")
    assembly = Assembly(entry)
    for i, b in enumerate(boxes):
        assembly.tensors[i] = tensor_from_array("w", values[tuple(slice(lo, hi) for lo, hi in b)])
    t = Tensor("w", values.shape, "float32", Storage(values.nbytes, reader=assembly.read))
    for step in (1, 5, 7, 41, 210):
        assert np.array_equal(np.concatenate(list(t.chunks(elements=step))), values.reshape(-1)), step
    assert np.array_equal(t.array(), values)
    # a valid tiling off a grid is checked pair by pair; an overlap, or a gap, is refused
    rows = [Chunk((0, 0), (2, 6), Item("x", 0, 0)), Chunk((2, 0), (3, 2), Item("x", 0, 0))]
    _check_tiling("v", (5, 6), [*rows, Chunk((2, 2), (3, 4), Item("x", 0, 0))], "x")
    with pytest.raises(FormatError, match="overlap"):  # as many elements as the tensor, one column twice
        _check_tiling("v", (5, 6), [*rows, Chunk((2, 1), (3, 4), Item("x", 0, 0))], "x")
    with pytest.raises(FormatError, match="hold 18 of its 30 elements"):
        _check_tiling("v", (5, 6), rows, "x")


def test_planner_paths_that_collide_or_claim_huge_lists_are_refused(dcp_dirs, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dcp_dirs["nan"])).read_metadata()
    md.planner_data["ok"] = ("layer", "w", "inside")  # layer.w is a tensor
    directory = hostile_metadata(tmp_path, dcp_dirs["nan"], pickle.dumps(md, protocol=4))
    assert run("ls", str(directory)).exit_code == 0  # listing needs no nesting
    result = run("convert", str(directory), str(tmp_path / "out.pt"))
    assert result.exit_code == 2 and "the planner path of 'layer.w' runs into another name's" in result.stderr
    assert not (tmp_path / "out.pt").exists()
    md.planner_data["ok"] = ("lst", 10**12)  # a list index no state dict could fill
    (directory / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    result = run("ls", str(directory))
    assert result.exit_code == 2 and "invalid planner path for 'ok'" in result.stderr


def test_reading_imports_no_torch(dcp_dirs):
    """ls, stats and check of a DCP directory (chunked tensors included) never import torch."""
    assert frameworks_imported(str(dcp_dirs["sharded"])) == []
