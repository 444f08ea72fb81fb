"""A corpus of checkpoints written by the real libraries, read and written back by paramctl.

Every expectation is what torch (`torch.load(weights_only=True)`) or safetensors (`safe_open`,
`load_file`, `load_model`) itself reads: names, shapes, dtypes and the bytes of every value.
The corpus is built once per module in a temporary directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import paramctl
from paramctl.cli import cli

DTYPES = [
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
]
# the pre-1.6 format has no typed storage for these, so torch.save(..., legacy) cannot write them
NOT_IN_LEGACY = {"float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"}
ENV = {"PARAMCTL_TTY": "0", "COLUMNS": "200"}


# --- helpers -------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_bytes(t: torch.Tensor) -> bytes:
    """The values of T in C order, bit for bit (NaN payloads and -0.0 included)."""
    packed = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # fresh C-order strides, even for size-1 dims
    return packed.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype, name
    assert tuple(got.shape) == tuple(want.shape), name
    assert raw_bytes(got) == raw_bytes(want), name


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert_same_tensor(got[name], t, name)


def assert_same_object(got: Any, want: Any, where: str = "") -> None:
    """GOT equals WANT structurally: same container types and keys, equal scalars, same tensors."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert_same_tensor(got, want, where)
        assert got.requires_grad == want.requires_grad, where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same_object(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_object(g, w, f"{where}.{i}")
    else:
        assert got == want, where


def flatten(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor in OBJ by its path of dict keys and list indices joined with '.'."""
    out: dict[str, torch.Tensor] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, torch.Tensor):
            out[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}" if prefix else str(i))

    walk(obj, "")
    return out


def torch_load(path: Path | str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    return flatten(torch_load(path))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            out[name] = f.get_tensor(name)
            assert list(f.get_slice(name).get_shape()) == list(out[name].shape)
    return out


def read_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        path = index.parent / shard
        out.update(read_safetensors(path) if shard.endswith(".safetensors") else read_torch(path))
    assert sorted(out) == sorted(weight_map)
    return out


def read_any(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        return read_sharded(path)
    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path)


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=ENV, catch_exceptions=False)


def run_process(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **ENV}
    env.pop("PARAMCTL_DEBUG", None)
    cmd = [sys.executable, "-m", "paramctl", *map(str, args)]
    return subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=120, check=False)


def ls_json(*args: str | Path) -> list[dict[str, Any]]:
    result = run("ls", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_row_values(row: paramctl.Tensor, want: torch.Tensor) -> None:
    arr = row.array()
    assert arr.dtype.name == dtype_name(want.dtype), row.name
    assert arr.shape == tuple(want.shape), row.name
    assert np.ascontiguousarray(arr).tobytes() == raw_bytes(want), row.name
    assert bytes(row.tobytes()) == raw_bytes(want), row.name


# --- models --------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


def tied_net() -> nn.Module:
    """The chapter's shared layer: layers 2 and 4 are one nn.Linear."""
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 1))


def lightning_module() -> nn.Module:
    return nn.ModuleDict({"model": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))})


# --- the corpus ----------------------------------------------------------------------------------


def sample(dtype: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values of DTYPE: normal floats with NaN, ±Inf and -0.0 among them; integers over their whole range."""
    dt = getattr(torch, dtype)
    n = math.prod(shape)
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    if dt.is_floating_point or dt.is_complex:
        base = torch.complex64 if dt.is_complex else torch.float32
        values = torch.randn(n, generator=gen, dtype=base)
        values[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])
        return values.to(dt).reshape(shape)
    bits = torch.randint(0, 256, (n * dt.itemsize,), generator=gen, dtype=torch.uint8)
    return bits.view(dt).reshape(shape)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    sd: dict[str, torch.Tensor] = {f"dtype.{d}": sample(d, (3, 5), gen) for d in DTYPES}
    w = torch.randn(4, 6, generator=gen)
    big = torch.randn(10, 5, generator=gen)
    sd.update(
        {
            "scalar": torch.tensor(3.5),
            "scalar_int": torch.tensor(-7),
            "empty": torch.empty(0),
            "empty_2d": torch.empty(256, 0),
            "nonfinite": torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, 3.4e38]),
            "view.t": w.t(),  # non-contiguous
            "view.rows": big[3:7],  # storage offset 15, the whole of `big` is saved
            "view.col": big[:, 2],  # offset 2, stride 5
            "view.expand": torch.arange(3.0).expand(4, 3),  # stride 0
            "param": nn.Parameter(torch.randn(3, 3, generator=gen)),
            "param_frozen": nn.Parameter(torch.randn(2, generator=gen), requires_grad=False),
        }
    )
    return sd


def lightning_checkpoint() -> dict[str, Any]:
    torch.manual_seed(0)
    module = lightning_module()
    opt = torch.optim.Adam(module.parameters(), lr=0.001)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss = module["model"](torch.randn(5, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    sched.step()
    callback = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}"
    return {
        "epoch": 3,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4, "completed": 3}}, "state_dict": {}}},
        "callbacks": {callback: {"best_model_score": torch.tensor(0.25), "best_model_path": "epoch=2.ckpt"}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hyper_parameters": {"lr": 0.001, "hidden": [256, 10]},
    }


def trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """MODEL after a forward pass in training mode (BatchNorm running stats and counters move)."""
    model.train()
    with torch.no_grad():
        model(x)
    return model


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], count: int, kind: str) -> Path:
    """A transformers-style sharded checkpoint of COUNT shards; returns the index path."""
    directory.mkdir()
    names = list(tensors)
    per = -(-len(names) // count)
    weight_map = {}
    for i in range(count):
        chunk = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        if kind == "safetensors":
            shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            save_file(chunk, directory / shard, metadata={"format": "pt"})
        else:
            shard = f"pytorch_model-{i + 1:05d}-of-{count:05d}.bin"
            torch.save(chunk, directory / shard)
        weight_map.update(dict.fromkeys(chunk, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = directory / ("model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json")
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index.write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
    return index


@dataclass
class Entry:
    path: Path
    read: Callable[[], dict[str, torch.Tensor]]  # what the real library reads
    ordered: bool  # the file has one order of tensors, which the listing keeps


@dataclass
class Corpus:
    entries: dict[str, Entry]
    mixed: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> Path:
        return self.entries[key].path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    entries: dict[str, Entry] = {}

    def add_torch(key: str, obj: Any, **kwargs: Any) -> None:
        path = root / key
        torch.save(obj, path, **kwargs)
        entries[key] = Entry(path, lambda: read_torch(path), ordered=True)

    sd = mixed_state_dict()
    add_torch("mixed.pt", sd)
    legacy = {k: v for k, v in sd.items() if k.removeprefix("dtype.") not in NOT_IN_LEGACY}
    add_torch("legacy.pt", legacy, _use_new_zipfile_serialization=False)
    add_torch("lightning.ckpt", lightning_checkpoint())
    torch.manual_seed(1)
    add_torch("mlp.pt", trained(mlp(), torch.randn(4, 20)).state_dict())
    cnn_sd = trained(cnn(), torch.randn(2, 3, 9, 9)).state_dict()
    add_torch("cnn.pt", cnn_sd)
    add_torch("cnn_legacy.pt", cnn_sd, _use_new_zipfile_serialization=False)
    add_torch("tied.pt", tied_net().state_dict())
    add_torch("complex128.pt", {"a": torch.randn(2), "z": torch.randn(3, dtype=torch.complex128)})

    contiguous = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    mixed_st = root / "mixed.safetensors"
    save_file(contiguous, mixed_st, metadata={"format": "pt"})
    entries["mixed.safetensors"] = Entry(mixed_st, lambda: read_safetensors(mixed_st), ordered=False)

    tied_st = root / "tied_model.safetensors"
    save_model(tied_net(), str(tied_st))

    def read_tied_model() -> dict[str, torch.Tensor]:
        fresh = tied_net()
        load_model(fresh, str(tied_st))
        return dict(fresh.state_dict())

    entries["tied_model.safetensors"] = Entry(tied_st, read_tied_model, ordered=False)

    st_index = write_shards(root / "sharded-st", contiguous, 3, "safetensors")
    entries["sharded-st"] = Entry(st_index, lambda: read_sharded(st_index), ordered=False)
    entries["sharded-st-dir"] = Entry(st_index.parent, lambda: read_sharded(st_index), ordered=False)
    bin_index = write_shards(root / "sharded-bin", sd, 2, "pt")
    entries["sharded-bin"] = Entry(bin_index, lambda: read_sharded(bin_index), ordered=False)
    entries["sharded-bin-dir"] = Entry(bin_index.parent, lambda: read_sharded(bin_index), ordered=False)
    return Corpus(entries, sd)


VIEWS = ["view.t", "view.rows", "view.col", "view.expand"]
READABLE = [
    "mixed.pt",
    "legacy.pt",
    "lightning.ckpt",
    "mlp.pt",
    "cnn.pt",
    "cnn_legacy.pt",
    "tied.pt",
    "complex128.pt",
    "mixed.safetensors",
    "tied_model.safetensors",
    "sharded-st",
    "sharded-st-dir",
    "sharded-bin",
    "sharded-bin-dir",
]


# --- 1. reading: the listing and the values are what the real library reads ---------------------


def test_corpus_has_every_dtype(corpus: Corpus) -> None:
    assert {dtype_name(t.dtype) for t in read_torch(corpus["mixed.pt"]).values()} >= set(DTYPES)
    assert {dtype_name(t.dtype) for t in read_safetensors(corpus["mixed.safetensors"]).values()} >= set(DTYPES)


@pytest.mark.parametrize("key", READABLE)
def test_ls_matches_real_reader(corpus: Corpus, key: str) -> None:
    entry = corpus.entries[key]
    want = entry.read()
    rows = ls_json(entry.path)
    assert all(list(row) == ["name", "shape", "dtype", "numel", "nbytes", "tie"] for row in rows)
    names = [row["name"] for row in rows]
    if entry.ordered:
        assert names == list(want)
    else:
        assert sorted(names) == sorted(want)
    for row in rows:
        t = want[row["name"]]
        assert row["shape"] == list(t.shape), row["name"]
        assert row["dtype"] == dtype_name(t.dtype), row["name"]
        assert row["numel"] == t.numel(), row["name"]
        assert row["nbytes"] == t.numel() * t.element_size(), row["name"]


@pytest.mark.parametrize("key", READABLE)
def test_values_match_real_reader(corpus: Corpus, key: str) -> None:
    entry = corpus.entries[key]
    want = entry.read()
    ckpt = paramctl.load(str(entry.path))
    assert sorted(ckpt.names()) == sorted(want)
    for name, t in want.items():
        assert_row_values(ckpt[name], t)


def test_lightning_names(corpus: Corpus) -> None:
    names = [row["name"] for row in ls_json(corpus["lightning.ckpt"])]
    for expected in [
        "state_dict.model.0.weight",
        "state_dict.model.2.bias",
        "optimizer_states.0.state.0.exp_avg",
        "optimizer_states.0.state.0.exp_avg_sq",
        "optimizer_states.0.state.0.step",
        "optimizer_states.0.state.3.step",
    ]:
        assert expected in names
    assert not any(n.startswith(("epoch", "hyper_parameters", "lr_schedulers")) for n in names)


def test_views_read_as_torch_reads_them(corpus: Corpus) -> None:
    sd = corpus.mixed
    for key in ["mixed.pt", "legacy.pt"]:
        ckpt = paramctl.load(str(corpus[key]))
        for name in VIEWS:
            row = ckpt[name]
            assert row.offset == sd[name].storage_offset(), (key, name)
            assert row.strides == sd[name].stride(), (key, name)
            assert_row_values(row, sd[name])


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_of_every_dtype(tmp_path: Path, dtype: str) -> None:
    base = sample(dtype, (4, 6), torch.Generator().manual_seed(7))
    sd = {"t": base.t(), "step": base[::2, 1::2], "col": base[:, 3]}
    src = tmp_path / "views.pt"
    torch.save(sd, src)
    ckpt = paramctl.load(str(src))
    for name, t in sd.items():
        assert_row_values(ckpt[name], t)
    out = tmp_path / "views.safetensors"
    result = run("convert", src, out)
    assert result.exit_code == 0, result.stderr
    assert_same_tensors(load_file(out), sd)


def test_empty_views_past_the_end_of_their_storage(tmp_path: Path) -> None:
    # torch keeps a view's offset even when it selects nothing: (1, 0)[1:] has offset 1 in 0 bytes
    sd = {"tail": torch.empty(1, 0)[1:], "end": torch.zeros(3)[3:], "full": torch.ones(2)}
    assert sd["tail"].storage_offset() == 1
    src = tmp_path / "empty.pt"
    torch.save(sd, src)
    assert [row["shape"] for row in ls_json(src)] == [[0, 0], [0], [2]]
    for suffix in [".safetensors", ".pt"]:
        out = tmp_path / f"out{suffix}"
        result = run("convert", src, out)
        assert result.exit_code == 0, result.stderr
        assert_same_tensors(read_any(out), sd)


@pytest.mark.parametrize("key", ["mixed.pt", "mixed.safetensors"])
def test_ls_in_a_subprocess(corpus: Corpus, key: str) -> None:
    proc = run_process("ls", corpus[key], "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert json.loads(proc.stdout) == ls_json(corpus[key])


# --- 2. standard input ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["mixed.pt", "legacy.pt", "mixed.safetensors"])
def test_ls_standard_input(corpus: Corpus, key: str) -> None:
    proc = run_process("ls", "-", "--format", "json", input=corpus[key].read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ls_json(corpus[key])


# --- 3. writers, through the real loaders --------------------------------------------------------


MODULE_FILES = [("mlp.pt", mlp), ("cnn.pt", cnn), ("cnn_legacy.pt", cnn)]


@pytest.mark.parametrize(("key", "make"), MODULE_FILES, ids=["mlp", "cnn", "cnn-legacy"])
def test_pt_round_trip_loads_into_module(
    corpus: Corpus, tmp_path: Path, key: str, make: Callable[[], nn.Module]
) -> None:
    src = corpus[key]
    original = torch_load(src)
    out = tmp_path / "out.pt"
    paramctl.save(paramctl.load(str(src)), str(out))
    sd = torch_load(out)
    assert_same_object(sd, original)
    assert sd._metadata == original._metadata
    model = make()
    model.load_state_dict(sd, strict=True)
    for name, t in model.state_dict().items():
        assert_same_tensor(t, original[name], name)
    if make is cnn:
        assert sd["1.num_batches_tracked"].dtype == torch.int64
        assert sd["1.num_batches_tracked"].item() == 1


@pytest.mark.parametrize("key", ["mixed.pt", "legacy.pt"])
def test_pt_round_trip_keeps_everything(corpus: Corpus, tmp_path: Path, key: str) -> None:
    original = torch_load(corpus[key])
    out = tmp_path / "out.pt"
    paramctl.save(paramctl.load(str(corpus[key])), str(out))
    got = torch_load(out)
    assert_same_object(got, original)
    for name in VIEWS:
        assert got[name].stride() == original[name].stride(), name
        assert got[name].storage_offset() == original[name].storage_offset(), name
    assert got["view.rows"].untyped_storage().data_ptr() == got["view.col"].untyped_storage().data_ptr()
    assert got["param_frozen"].requires_grad is False


def test_lightning_round_trip(corpus: Corpus, tmp_path: Path) -> None:
    src = corpus["lightning.ckpt"]
    original = torch_load(src)
    out = tmp_path / "out.ckpt"
    paramctl.save(paramctl.load(str(src)), str(out))
    got = torch_load(out)
    assert_same_object(got, original)
    for key in ["epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "lr_schedulers", "loops"]:
        assert got[key] == original[key]
    groups = got["optimizer_states"][0]["param_groups"]
    assert groups == original["optimizer_states"][0]["param_groups"]
    assert groups[0]["betas"] == (0.9, 0.999)
    assert got["state_dict"]._metadata == original["state_dict"]._metadata

    module = lightning_module()
    module.load_state_dict(got["state_dict"], strict=True)
    opt = torch.optim.Adam(module.parameters(), lr=0.001)
    opt.load_state_dict(got["optimizer_states"][0])
    module["model"](torch.randn(5, 4)).sum().backward()
    opt.step()
    assert opt.state_dict()["state"][0]["step"].item() == 2


def test_safetensors_round_trip_keeps_metadata(corpus: Corpus, tmp_path: Path) -> None:
    src = corpus["mixed.safetensors"]
    out = tmp_path / "out.safetensors"
    paramctl.save(paramctl.load(str(src)), str(out))
    assert_same_tensors(load_file(out), load_file(src))
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


CONVERT_SOURCES = ["mixed.pt", "legacy.pt", "mixed.safetensors", "sharded-st", "sharded-st-dir", "sharded-bin"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("key", CONVERT_SOURCES)
def test_convert(corpus: Corpus, tmp_path: Path, key: str, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    result = run("convert", corpus[key], out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert_same_tensors(read_any(out), corpus.entries[key].read())


def test_convert_lightning_to_safetensors_warns(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = run("convert", corpus["lightning.ckpt"], out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "warning" in result.stderr
    assert "epoch" in result.stderr
    assert "global_step" in result.stderr
    assert_same_tensors(load_file(out), read_torch(corpus["lightning.ckpt"]))


def test_convert_refuses_complex128(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = run("convert", corpus["complex128.pt"], out)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "complex128" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_tied_state_dict(corpus: Corpus, tmp_path: Path) -> None:
    src = corpus["tied.pt"]
    original = torch_load(src)
    assert original["2.weight"].data_ptr() == original["4.weight"].data_ptr()
    names = [row["name"] for row in ls_json(src)]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias", "6.weight", "6.bias"]

    st_out = tmp_path / "tied.safetensors"
    assert run("convert", src, st_out).exit_code == 0
    stored = load_file(st_out)
    assert len(stored) == 6
    assert not ({"2.weight", "4.weight"} <= set(stored))
    fresh = tied_net()
    load_model(fresh, str(st_out))
    assert fresh[2] is fresh[4]
    for name, t in fresh.state_dict().items():
        assert_same_tensor(t, original[name], name)
    assert sorted(row["name"] for row in ls_json(st_out)) == sorted(names)

    for src_path in [st_out, src]:
        pt_out = tmp_path / f"back-from-{src_path.suffix[1:]}.pt"
        assert run("convert", src_path, pt_out).exit_code == 0
        sd = torch_load(pt_out)
        assert sorted(sd) == sorted(names)
        assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()
        assert sd["2.bias"].data_ptr() == sd["4.bias"].data_ptr()
        assert sd["0.weight"].data_ptr() != sd["6.weight"].data_ptr()
        model = tied_net()
        model.load_state_dict(sd, strict=True)
        for name, t in model.state_dict().items():
            assert_same_tensor(t, original[name], name)


# --- 4. Hypothesis: random dtypes, shapes and bit patterns through both writers -------------------


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    dt = getattr(torch, dtype)
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    n = math.prod(shape) * dt.itemsize
    if n == 0:
        return torch.empty(shape, dtype=dt)
    if dtype == "bool":
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        data = draw(st.binary(min_size=n, max_size=n))  # any bit pattern, NaN payloads included
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(shape).clone()


@st.composite
def views(draw: st.DrawFn) -> torch.Tensor:
    """A tensor, or a view of one as torch saves it: transposed, strided, offset or broadcast."""
    t = draw(tensors())
    how = draw(st.sampled_from(["whole", "transpose", "step", "offset", "expand"]))
    if how == "transpose" and t.dim() >= 2:
        return t.transpose(0, -1)
    if how == "step" and t.dim() >= 1:
        return t[::2]
    if how == "offset" and t.dim() >= 1:
        return t[1:]
    if how == "expand":
        return t.unsqueeze(0).expand(2, *t.shape)
    return t


NAMES = st.text(alphabet="abcxyz0189._-/é中", min_size=1, max_size=10).filter(lambda s: s != "__metadata__")
HYPOTHESIS = settings(max_examples=30, deadline=None, derandomize=True)


@HYPOTHESIS
@given(st.dictionaries(NAMES, tensors(), max_size=5))
def test_hypothesis_safetensors_to_pt(sd: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.pt")
        save_file(sd, src)
        paramctl.save(paramctl.load(src), out)
        got = torch_load(out)
        assert isinstance(got, dict)
        assert_same_tensors(got, sd)


@HYPOTHESIS
@given(st.dictionaries(NAMES, views(), max_size=5))
def test_hypothesis_pt_to_safetensors_and_pt(sd: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, st_out, pt_out = (os.path.join(tmp, n) for n in ("in.pt", "out.safetensors", "out.pt"))
        torch.save(sd, src)
        ckpt = paramctl.load(src)
        paramctl.save(ckpt, st_out)
        assert_same_tensors(load_file(st_out), sd)
        paramctl.save(ckpt, pt_out)
        got = torch_load(pt_out)
        assert_same_tensors(got, sd)
        for name, t in sd.items():
            assert got[name].stride() == t.stride(), name
            assert got[name].storage_offset() == t.storage_offset(), name
