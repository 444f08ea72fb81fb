"""MXNet NDArray files (.params, .nd): read and written without MXNet, checked against MXNet 1.9.1.

The quick tests read the committed fixtures (tests/fixtures/mxnet, made by MXNet 1.9.1 with
make_fixtures.py, nd.load's values beside them) and hand-made records. The reference tests (they
skip without .venv-mx and fail under `make test`) make the fixtures afresh, edit them with every
writing command, and have MXNet load each output with nd.load, npx.load, load_parameters or
SymbolBlock.imports: two MXNet subprocesses for the whole module.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REPO, run
from reference import run_in

import paramctl
from paramctl.errors import FormatError

FIX = FIXTURES / "mxnet"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA


# --- hand-made files ------------------------------------------------------------------------------


def nd_file(records: list[bytes], names: list[str] | None, count: int | None = None, reserved: int = 0) -> bytes:
    """An NDArray file of RECORDS and NAMES (None: a list file)."""
    head = struct.pack("<QQQ", 0x112, reserved, len(records) if count is None else count)
    tail = struct.pack("<Q", len(names or []))
    for name in names or []:
        tail += struct.pack("<Q", len(name.encode())) + name.encode()
    return head + b"".join(records) + tail


def record(shape, flag: int, data: bytes, magic: int = V2, stype: int = 0, ctx=(1, 0)) -> bytes:
    """A V2/V3 record (V1 without its storage type)."""
    dims = struct.pack("<i", len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    kind = b"" if magic == V1 else struct.pack("<i", stype)
    return struct.pack("<I", magic) + kind + dims + struct.pack("<iii", *ctx, flag) + data


def pre_v1(shape, flag: int, data: bytes) -> bytes:
    """A record from before V1: the first word is ndim, the dimensions are u32."""
    return struct.pack(f"<I{len(shape)}I", len(shape), *shape) + struct.pack("<iii", 1, 0, flag) + data


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# files MXNet 1.9.1 loads with nd.load: name -> (bytes, what paramctl must read: name -> array)
LEGACY = {
    "v1.nd": (
        nd_file([record((2, 2), 0, f32(1, 2, 3, 4), V1), record((), 6, struct.pack("<q", -5), V1)], ["w", "s"]),
        {"w": np.array([[1, 2], [3, 4]], np.float32), "s": np.array(-5, np.int64)},
    ),
    "pre-v1.nd": (
        nd_file([pre_v1((3,), 1, struct.pack("<3d", 1, 2, 3)), pre_v1((), 0, f32(7)), pre_v1((0, 3), 0, b"")], None),
        {"0": np.array([1, 2, 3], np.float64), "1": np.array(7, np.float32), "2": np.zeros((0, 3), np.float32)},
    ),
    "devices.nd": (  # saved from gpu(3) and an unknown device: MXNet loads both on the CPU
        nd_file([record((1,), 0, f32(1), ctx=(2, 3)), record((2,), 3, b"\x01\x02", ctx=(99, -7))], ["g", "u"]),
        {"g": np.array([1], np.float32), "u": np.array([1, 2], np.uint8)},
    ),
    "trailing.nd": (  # MXNet reads neither the reserved word nor bytes after the names
        nd_file([record((1,), 0, f32(1.5))], ["a"], reserved=5) + b"junk after the names",
        {"a": np.array([1.5], np.float32)},
    ),
    "bf16.nd": (
        nd_file([record((3,), 12, struct.pack("<3H", 0x3FC0, 0xC010, 0x7F80))], ["b"]),
        {"b": np.array([0x3FC0, 0xC010, 0x7F80], np.uint16)},  # bits: 1.5, -2.25, inf
    ),
}

# files paramctl refuses: name -> (bytes, the message's gist, whether nd.load refuses them too)
REFUSED = {
    **{
        f"flag{flag}.nd": (nd_file([record((2,), flag, b"\0" * 16)], ["a"]), f"type flag {flag}", True)
        for flag in (8, 9, 10, 11, 13, -1)
    },
    "v2-0d.nd": (  # what nd.save writes for the legacy 0-d nd.array(3.5)
        nd_file([record((), 0, f32(3.5)), record((1,), 0, f32(1))], ["x", "y"]),
        "empty NDArray handle (V2 ndim 0",
        True,
    ),
    "negative-dim.nd": (nd_file([record((-2,), 0, f32(1, 2))], ["a"]), "negative size", True),
    "storage-type.nd": (nd_file([record((2,), 0, f32(1, 2), stype=3)], ["a"]), "storage type 3", True),
    "name-count.nd": (nd_file([record((1,), 0, f32(1)), record((1,), 0, f32(2))], ["a"]), "1 names for 2", True),
    "not-utf8.nd": (nd_file([record((1,), 0, f32(1))], ["a"])[:-1] + b"\xff", "not UTF-8", True),
    "v3-none.nd": (nd_file([struct.pack("<Iii", V3, 0, -1)], ["a"]), "ndim -1", None),  # npx.load segfaults
    "duplicate.nd": (
        nd_file([record((1,), 0, f32(1)), record((1,), 0, f32(2))], ["a", "a"]),
        "appear more than once",
        False,  # nd.load keeps the last silently
    ),
}

HOSTILE = {
    "count": (nd_file([], [], count=2**60), "claims 1152921504606846976 arrays"),
    "ndim": (struct.pack("<QQQIii", 0x112, 0, 1, V2, 0, 2**30) + bytes(16), "claims 1073741824 dimensions"),
    "huge shape": (nd_file([record((2**40, 2**20), 0, b"")], ["a"]), "truncated: array #0's data"),
    "64-bit product": (nd_file([record((2**62, 2**62), 0, b"")], ["a"]), "exceeds 64 bits"),
    "empty but too large": (nd_file([record((0, 2**61), 0, b"")], ["a"]), "shape too large to index"),
    "pre-V1 ndim": (struct.pack("<QQQI", 0x112, 0, 1, 0x7FFFFFFF) + bytes(24), "no NDArray magic"),
    "name length": (nd_file([record((1,), 0, f32(1))], [])[:-8] + struct.pack("<QQ", 1, 2**62), "name 0 needs"),
    "sparse unknown shape": (
        nd_file([struct.pack("<Iii", V2, 1, -1) + b"\0" * 16], ["a"]),
        "row_sparse (sparse) with an unknown storage shape",
    ),
}


def write(directory: Path, files: dict) -> None:
    for name, (data, *_) in files.items():
        (directory / name).write_bytes(data)


def rows(path) -> list[tuple[str, list[int], str]]:
    return [(t.name, list(t.shape), t.dtype) for t in paramctl.load(str(path))]


def values(path) -> dict[str, np.ndarray]:
    """paramctl's values, bfloat16 as its uint16 bits (what nd.load returns)."""
    out = {}
    for t in paramctl.load(str(path)):
        a = t.array()
        out[t.name] = a.view(np.uint16) if t.dtype == "bfloat16" else a
    return out


def assert_reads_like_nd_load(directory: Path, manifest: dict) -> None:
    for name, info in manifest.items():
        want = [
            (a["name"] if a["name"] is not None else str(i), a["shape"], a["dtype"])
            for i, a in enumerate(info["arrays"])
        ]
        assert rows(directory / name) == want, name
        expected = np.load(directory / f"{name}.npz")
        for i, got in enumerate(values(directory / name).values()):
            assert got.dtype == expected[str(i)].dtype and np.array_equal(got, expected[str(i)]), (name, i)
        assert paramctl.load(str(directory / name)).extra.is_list == info["list"]


# --- quick: the committed fixtures and hand-made records ------------------------------------------


def test_reads_what_nd_load_returns():
    assert len(MANIFEST) == 17
    assert_reads_like_nd_load(FIX, MANIFEST)


def test_ls_the_chapter_mlp():
    result = run("ls", str(FIX / "mlp.params"))
    assert result.exit_code == 0
    assert result.output == (
        "0.weight\t[8, 4]\tfloat32\t32\t128\n0.bias\t[8]\tfloat32\t8\t32\n"
        "1.weight\t[1, 8]\tfloat32\t8\t32\n1.bias\t[1]\tfloat32\t1\t4\n"
    )
    info = json.loads(run("info", str(FIX / "model-0007.params"), "--format", "json").output)
    assert (info["format"], info["tensors"], info["parameters"]) == ("mxnet", 8, 46)


def test_export_names_and_numpy_semantics():
    assert run("ls", str(FIX / "model-0007.params"), "aux:").output == (
        "aux:batchnorm0_running_mean\t[4]\tfloat32\t4\t16\naux:batchnorm0_running_var\t[4]\tfloat32\t4\t16\n"
    )
    assert run("ls", str(FIX / "np.nd")).output == (
        "scalar\t[]\tfloat32\t1\t4\ncount\t[]\tint64\t1\t8\nempty\t[0, 3]\tfloat32\t0\t0\n"
        "w\t[2, 3]\tfloat32\t6\t24\nmask\t[2]\tbool\t2\t2\n"
    )


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_rewrite_is_byte_identical(tmp_path, name):
    out = tmp_path / ("out" + Path(name).suffix)
    assert run("convert", str(FIX / name), str(out)).exit_code == 0
    assert out.read_bytes() == (FIX / name).read_bytes()


@pytest.mark.parametrize("command, heavy", [("ls", "numpy"), ("tree", "numpy"), ("info", "torch")])
def test_listing_imports_nothing_heavy(command, heavy):
    """Listing an MXNet file reads its headers: neither mxnet nor torch is imported (nor numpy by
    ls and tree; info's counts use numpy)."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['paramctl', {command!r}, {str(FIX / 'model-0007.params')!r}]\n"
        "try: runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit: pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'mxnet', 'h5py', {heavy!r}}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"


def test_recognised_by_content_under_any_name(tmp_path):
    odd = tmp_path / "weights.bin"
    shutil.copy(FIX / "mlp.params", odd)
    assert json.loads(run("info", str(odd), "--format", "json").output)["format"] == "mxnet"
    assert rows(odd) == rows(FIX / "mlp.params")


@pytest.mark.parametrize(
    "name, array, kind", [("sparse-rsp.nd", "embedding", "row_sparse"), ("sparse-csr.nd", "1", "csr")]
)
def test_sparse_arrays_are_refused_by_name(name, array, kind):
    result = run("ls", str(FIX / name))
    assert result.exit_code == 2
    assert result.stderr == (
        f"paramctl: error: {FIX / name}: array {array!r} is {kind} (sparse); paramctl reads dense arrays only "
        "(in MXNet: x.tostype('default') before saving)\n"
    )


def test_a_legacy_0d_array_is_refused():
    """MXNet 1.x outside numpy semantics writes nd.array(3.5) as V2 ndim 0 followed by its data,
    which nd.load reads as an empty handle and then fails on ('Unknown type enum')."""
    result = run("ls", str(FIX / "legacy-0d.nd"))
    assert result.exit_code == 2
    assert "array #0 is an empty NDArray handle (V2 ndim 0" in result.stderr


@pytest.mark.parametrize("prefix", ["", "d2l-"])
def test_tied_by_value_finds_gluon_shared_parameters(prefix):
    result = run("tied", str(FIX / f"{prefix}shared.params"), "--by-value")
    # `shared` is 1 and 2; the three Dense(8) biases are all still zero, so equal as well
    assert result.output == "0.bias = 1.bias = 2.bias\tequal\n1.weight = 2.weight\tequal\n"
    assert run("tied", str(FIX / f"{prefix}shared.params")).output == ""


def test_reinit_roles_of_export_names():
    path = FIX / "model-0007.params"
    result = run("reinit", str(path), "--init", "mxnet_default", "--seed", "0", "--dry-run")
    assert result.exit_code == 0
    assert result.stderr == (
        f"paramctl: {path}: re-initializing 8 of 8 tensors, layout torch, seed 0\n"
        "paramctl:   tensor                       shape   role    init                           fan_in  fan_out\n"
        "paramctl:   arg:dense17_weight           [4, 4]  weight  uniform(low=-0.07, high=0.07)  4       4\n"
        "paramctl:   arg:dense17_bias             [4]     bias    zeros                          -       -\n"
        "paramctl:   arg:batchnorm0_gamma         [4]     gamma   ones                           -       -\n"
        "paramctl:   arg:batchnorm0_beta          [4]     beta    zeros                          -       -\n"
        "paramctl:   aux:batchnorm0_running_mean  [4]     mean    zeros                          -       -\n"
        "paramctl:   aux:batchnorm0_running_var   [4]     var     ones                           -       -\n"
        "paramctl:   arg:dense18_weight           [2, 4]  weight  uniform(low=-0.07, high=0.07)  4       2\n"
        "paramctl:   arg:dense18_bias             [2]     bias    zeros                          -       -\n"
    )


def test_reinit_roles_of_gluon_layers():
    """save_parameters' structural names and collect_params().save's flat ones get the roles
    MXNet's Initializer gives them (it matches the name's end: weight, bias, gamma, ...)."""
    plans = []
    for name in ("layers.params", "layers-prefixed.params"):
        result = run("reinit", str(FIX / name), "--init", "mxnet_default", "--dry-run")
        assert result.exit_code == 0
        plans.append([re.split(r"\s{2,}", line)[3] for line in result.stderr.splitlines()[2:]])
    roles = ["weight", "weight", "recurrent", "bias", "bias", "weight", "bias"]
    roles += ["gamma", "beta", "mean", "var", "weight", "bias", "weight", "bias"]
    assert plans == [roles, ["embedding", *roles[1:]]]  # a flat name says embedding0_weight


def test_reinit_roles_by_name_end_in_mxnet_files_only(tmp_path):
    """MXNet's Initializer matches a name's end (GluonNLP's `position_weight` is a weight); in a
    file of another format such a name has no role paramctl can be sure of."""
    names = ["encoder.position_weight", "encoder.proj_bias"]
    data = nd_file([record((2, 3), 0, f32(*range(6))), record((2,), 0, f32(1, 2))], names)
    (tmp_path / "bert.params").write_bytes(data)
    assert run("convert", str(tmp_path / "bert.params"), str(tmp_path / "bert.safetensors")).exit_code == 0
    roles = {}
    for name in ("bert.params", "bert.safetensors"):
        result = run("reinit", str(tmp_path / name), "--init", "mxnet_default", "--dry-run", "--seed", "0")
        plan = [line for line in result.stderr.splitlines()[2:] if line.startswith("paramctl:   ")]
        roles[name] = [re.split(r"\s{2,}", line)[3] for line in plan]
    assert roles == {"bert.params": ["weight", "bias"], "bert.safetensors": ["other", "other"]}


def test_legacy_layouts_and_devices(tmp_path):
    write(tmp_path, LEGACY)
    for name, (_, want) in LEGACY.items():
        got = values(tmp_path / name)
        assert list(got) == list(want), name
        for key, array in want.items():
            assert got[key].dtype == array.dtype and np.array_equal(got[key], array), (name, key)
    assert paramctl.load(str(tmp_path / "bf16.nd"))["b"].dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_in_one_line(tmp_path, name):
    data, gist, _ = REFUSED[name]
    (tmp_path / name).write_bytes(data)
    result = run("ls", str(tmp_path / name))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and gist in result.stderr, result.stderr


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_claims_refused_before_allocating(tmp_path, name):
    data, gist = HOSTILE[name]
    (tmp_path / "x.params").write_bytes(data)
    result = run("stats", str(tmp_path / "x.params"))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and gist in result.stderr, result.stderr


def test_every_truncation_is_a_format_error(tmp_path):
    whole = (FIX / "dict.nd").read_bytes()
    path = tmp_path / "cut.nd"
    for end in range(8, len(whole)):
        path.write_bytes(whole[:end])
        with pytest.raises(FormatError):
            paramctl.load(str(path))


def test_mutated_files_load_or_refuse(tmp_path):
    """Real files with bytes flipped, words overwritten with extreme counts and runs deleted: each
    gives a table whose values read, or a FormatError (PARAMCTL_FUZZ=long: 20 times as many)."""
    rng = random.Random(0)
    sources = [(FIX / name).read_bytes() for name in ("dict.nd", "np.nd", "mlp.params", "dtypes.nd", "list.nd")]
    path, tables = tmp_path / "m.params", 0
    for _ in range(6000 if os.environ.get("PARAMCTL_FUZZ") == "long" else 150):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 3)):
            pos, kind = rng.randrange(8, len(data)), rng.random()
            if kind < 0.5:
                data[pos] = rng.randrange(256)
            elif kind < 0.8:
                data[pos : pos + 8] = struct.pack("<q", rng.choice([-1, 0, 1, 3, 2**31, 2**40, 2**62, -(2**63)]))
            else:
                del data[pos : pos + rng.randint(1, 16)]
        path.write_bytes(data)
        try:
            ckpt = paramctl.load(str(path))
        except FormatError:
            continue
        tables += 1
        for t in ckpt:
            assert t.array().shape == t.shape
    assert tables  # some mutations (a value's bytes) still make a valid file


def test_list_files_stay_lists_while_named_0_to_n(tmp_path):
    reinit, renamed, removed = tmp_path / "r.nd", tmp_path / "n.nd", tmp_path / "m.nd"
    assert run("reinit", str(FIX / "list.nd"), "^0$", "--init", "zeros", "-o", str(reinit)).exit_code == 0
    assert run("rename", str(FIX / "list.nd"), "s/^0$/first/", "-o", str(renamed)).exit_code == 0
    assert run("rm", str(FIX / "np-list.nd"), "^2$", "-o", str(removed)).exit_code == 0
    assert paramctl.load(str(reinit)).extra.is_list and rows(reinit) == rows(FIX / "list.nd")
    assert not paramctl.load(str(renamed)).extra.is_list and rows(renamed)[0][0] == "first"
    assert paramctl.load(str(removed)).extra == paramctl.load(str(FIX / "np-list.nd")).extra  # still a V3 list
    assert rows(removed) == rows(FIX / "np-list.nd")[:2]


def test_stats_streams_from_the_file():
    result = run("stats", str(FIX / "dict.nd"), "cube", "--format", "json")
    (row,) = json.loads(result.output)
    assert (row["numel"], row["mean"], row["min"], row["max"]) == (24, 11.5, 0.0, 23.0)
    assert paramctl.load(str(FIX / "dict.nd"))["cube"].streams


def test_zero_d_tensors_are_written_as_v3(tmp_path):
    import torch

    src, out = tmp_path / "s.pt", tmp_path / "s.params"
    torch.save({"step": torch.tensor(3), "w": torch.ones(2, 2)}, src)
    result = run("convert", str(src), str(out))
    assert result.exit_code == 0
    assert "written as V3 records" in result.stderr
    assert struct.unpack_from("<I", out.read_bytes(), 24)[0] == V3
    assert rows(out) == [("step", [], "int64"), ("w", [2, 2], "float32")]


def test_dtypes_mxnet_cannot_load_are_refused(tmp_path):
    from safetensors.numpy import save_file

    src, out = tmp_path / "s.safetensors", tmp_path / "s.params"
    save_file({"a": np.ones(2, np.int16)}, str(src))
    result = run("convert", str(src), str(out))
    assert result.exit_code == 2 and not out.exists()
    assert "MXNet cannot store 'a': dtype int16" in result.stderr


def test_keras_layout_said_on_conversion(tmp_path):
    from conftest import SAMPLES

    out = tmp_path / "k.params"
    result = run("convert", str(SAMPLES / "mlp.h5"), str(out))
    assert result.exit_code == 0
    assert "warning: the tensors keep Keras's axis order, (*k, in, out)" in result.stderr
    assert rows(out)[0] == ("model_weights/dense/sequential/dense/kernel", [20, 256], "float32")


def test_gluon_shared_parameters_reinitialized_together(tmp_path):
    """An MXNet file keeps no tie, so tie the copies in a .pt, then write .params from it."""
    tied, out = tmp_path / "t.pt", tmp_path / "r.params"
    assert run("tie", str(FIX / "shared.params"), "1.weight", "2.weight", "-o", str(tied)).exit_code == 0
    result = run("reinit", str(tied), "--init", "xavier", "--seed", "3", "-o", str(out))
    assert result.exit_code == 0
    assert "warning: mxnet stores tied tensors as equal copies, as Gluon does (1.weight = 2.weight)" in result.stderr
    got = values(out)
    assert np.array_equal(got["1.weight"], got["2.weight"])
    assert not np.array_equal(got["1.weight"], values(FIX / "shared.params")["1.weight"])
    assert run("tied", str(out), "weight", "--by-value").stdout == "1.weight = 2.weight\tequal\n"


# --- reference: MXNet 1.9.1 makes the files and loads every output --------------------------------

VERIFY = r"""
import json, sys
import numpy as onp
import mxnet as mx
from mxnet import gluon, nd, npx
from mxnet.gluon import nn, rnn

BF16 = onp.dtype([("bfloat16", onp.uint16)])


def mlp():
    net = nn.Sequential()
    net.add(nn.Dense(8, activation="relu"))
    net.add(nn.Dense(1))
    return net


def nested():
    def block1():
        net = nn.Sequential()
        net.add(nn.Dense(32, activation="relu"))
        net.add(nn.Dense(16, activation="relu"))
        return net

    net = nn.Sequential()
    for _ in range(4):
        net.add(block1())
    rgnet = nn.Sequential()
    rgnet.add(net)
    rgnet.add(nn.Dense(10))
    return rgnet


def shared_net():
    net = nn.Sequential()
    shared = nn.Dense(8, activation="relu")
    net.add(nn.Dense(8, activation="relu"), shared, nn.Dense(8, activation="relu", params=shared.params), nn.Dense(10))
    return net


def torch_mlp():  # nn.Sequential(Linear(4, 8), ReLU(), Linear(8, 1)) in Gluon
    net = nn.Sequential()
    net.add(nn.Dense(8, in_units=4), nn.Activation("relu"), nn.Dense(1, in_units=8))
    return net


def layers():  # as make_fixtures.py builds it
    net = nn.Sequential()
    net.add(nn.Embedding(10, 3), rnn.LSTM(4, input_size=3), nn.Conv2D(2, 3, in_channels=1))
    net.add(nn.BatchNorm(in_channels=2), nn.Conv2DTranspose(2, 3, in_channels=2), nn.Dense(3, in_units=2))
    return net


NETS = {"mlp": mlp, "nested": nested, "shared": shared_net, "torch_mlp": torch_mlp, "layers": layers}


def plain(v):
    a = v.asnumpy()
    return (a.view(onp.uint16), "bfloat16") if a.dtype == BF16 else (a, str(a.dtype))


def run(job):
    kind = job["load"]
    result = {}
    if kind in ("nd", "npx"):
        loaded = (nd.load if kind == "nd" else npx.load)(job["path"])
        items = list(loaded.items()) if isinstance(loaded, dict) else [(None, v) for v in loaded]
        result["list"] = not isinstance(loaded, dict)
    elif kind == "params":
        net = NETS[job["net"]]()
        if job.get("dtype"):
            net.cast(job["dtype"])
        net.load_parameters(job["path"])
        items = [(k, p.data()) for k, p in net._collect_params_with_prefix().items()]
        if "input" in job:
            x = (mx.np.array if job["np"] else nd.array)(onp.array(job["input"], onp.float32))
            result["forward"] = net(x).asnumpy().tolist()
    else:  # the symbol and parameters export wrote
        net = gluon.SymbolBlock.imports(job["symbol"], ["data"], job["path"])
        items = [(k, p.data()) for k, p in net.collect_params().items()]
    arrays = [plain(v) for _, v in items]
    onp.savez(job["npz"], **{str(i): a for i, (a, _) in enumerate(arrays)})
    result.update(names=[k for k, _ in items], dtypes=[d for _, d in arrays], shapes=[list(a.shape) for a, _ in arrays])
    return result


jobs = json.load(open(sys.argv[1]))
results = {}
for np_mode in (False, True):  # the legacy jobs first: npx.set_np() is for the rest of the process
    if np_mode:
        npx.set_np()
    for job in jobs:
        if job["np"] == np_mode:
            try:
                results[job["id"]] = {"ok": True, **run(job)}
            except Exception as e:
                lines = [line for line in str(e).splitlines() if line.strip()]
                results[job["id"]] = {"ok": False, "error": f"{type(e).__name__}: {lines[-1] if lines else ''}"}
print(json.dumps(results))
"""

# id -> (paramctl command on the fresh fixtures, output name, how MXNet loads it)
EDITS = {
    "reinit": (["reinit", "{F}/mlp.params", "--init", "mxnet_default", "--seed", "0"], "reinit.params", "mlp"),
    "xavier": (["reinit", "{F}/nested.params", "--init", "xavier", "--seed", "1"], "xavier.params", "nested"),
    "strange": (
        ["reinit", "{F}/mlp.params", "--init", f"{REPO}/examples/strange_init.py:strange", "--seed", "2"],
        "strange.params",
        "mlp",
    ),
    "layers": (["reinit", "{F}/layers.params", "--init", "mxnet_default", "--seed", "5"], "layers.params", "layers"),
    "prefixed": (["reinit", "{F}/layers-prefixed.params", "--init", "xavier", "--seed", "6"], "prefixed.params", "nd"),
    "set": (["set", "{F}/mlp.params", "0.weight[0, 0]", "42"], "set.params", "mlp"),
    "expr": (["set", "{F}/custom.params", "weight", "--expr", "x + 1"], "expr.params", "mlp"),
    "cast16": (["cast", "{F}/mlp.params", "--dtype", "float16"], "cast16.params", "mlp:float16"),
    "castbf16": (["cast", "{F}/dtypes.nd", "--dtype", "bfloat16"], "castbf16.nd", "nd"),
    "rename-dict": (["rename", "{F}/dict.nd", "s/^w$/weight/"], "rename-dict.nd", "nd"),
    "rename-list": (["rename", "{F}/list.nd", "s/^0$/first/"], "rename-list.nd", "nd"),
    "rm-dict": (["rm", "{F}/dict.nd", "cube"], "rm-dict.nd", "nd"),
    "rm-list": (["rm", "{F}/list.nd", "^1$"], "rm-list.nd", "nd"),
    "reinit-list": (["reinit", "{F}/list.nd", "^0$", "--init", "normal(std=0.5)"], "reinit-list.nd", "nd"),
    "export": (["reinit", "{F}/model-0007.params", "--init", "mxnet_default"], "export-0007.params", "imports"),
    "tie-reinit": (["reinit", "{O}/tied.pt", "--init", "xavier", "--seed", "3"], "tie-reinit.params", "shared"),
    "dtypes": (["convert", "{F}/dtypes.nd"], "dtypes.nd", "nd"),
    "from-torch": (["convert", "{O}/torch_mlp.pt"], "from-torch.params", "torch_mlp"),
    "from-safetensors": (["convert", "{O}/mixed.safetensors"], "from-safetensors.nd", "nd"),
    "zero-d": (["convert", "{O}/scalars.pt"], "zero-d.params", "npx"),
    "d2l-reinit": (["reinit", "{F}/d2l-mlp.params", "--init", "mxnet_default"], "d2l-reinit.params", "np:mlp"),
    "d2l-cast": (["cast", "{F}/d2l-nested.params", "--dtype", "float64"], "d2l-cast.params", "np:nested:float64"),
    "np-set": (["set", "{F}/np.nd", "scalar", "7"], "np-set.nd", "npx"),
    "np-rm": (["rm", "{F}/np-list.nd", "^2$"], "np-rm.nd", "npx"),
    "np-rename": (["rename", "{F}/np.nd", "s/^w$/weight/"], "np-rename.nd", "npx"),
}
TORCH_INPUT = [[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 3.0]]


def make_sources(out: Path) -> np.ndarray:
    """Files from other frameworks to convert: a torch MLP (returns its output on TORCH_INPUT),
    a safetensors file of every dtype MXNet loads, a .pt holding 0-d tensors."""
    import torch
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    torch.save(net.state_dict(), out / "torch_mlp.pt")
    import ml_dtypes

    mixed = {
        "half": np.array([0.5, -1.5], np.float16),
        "double": np.arange(3, dtype=np.float64),
        "bytes": np.array([0, 255], np.uint8),
        "signed": np.array([-128, 127], np.int8),
        "int": np.array([[1, -2]], np.int32),
        "long": np.array([2**40], np.int64),
        "flags": np.array([True, False]),
        "brain": np.array([1.5, -0.1], ml_dtypes.bfloat16),
        "empty": np.zeros((0, 2), np.float32),
    }
    save_file(mixed, str(out / "mixed.safetensors"))
    torch.save(
        {"step": torch.tensor(3), "lr": torch.tensor(0.5), "w": torch.ones(2, 3), "e": torch.zeros(0)},
        out / "scalars.pt",
    )
    with torch.no_grad():
        return net(torch.tensor(TORCH_INPUT)).numpy()


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    """MXNet makes the fixtures afresh; paramctl edits them; MXNet loads every output."""
    fresh, out = tmp_path_factory.mktemp("mx-fresh"), tmp_path_factory.mktemp("mx-out")
    made = run_in("mxnet", (FIX / "make_fixtures.py").read_text(), str(fresh))
    torch_output = make_sources(out)
    assert run("tie", f"{fresh}/shared.params", "1.weight", "2.weight", "-o", str(out / "tied.pt")).exit_code == 0
    jobs = []
    for job_id, (argv, name, how) in EDITS.items():
        args = [a.format(F=fresh, O=out) for a in argv]
        result = (
            run(*args[:2], str(out / name), *args[2:]) if args[0] == "convert" else run(*args, "-o", str(out / name))
        )
        assert result.exit_code == 0, (job_id, result.stderr)
        np_mode = how.startswith("np:") or how == "npx"
        kind, *rest = how.removeprefix("np:").split(":")
        job = {"id": job_id, "path": str(out / name), "np": np_mode, "npz": str(out / f"{job_id}.mx.npz")}
        if kind in ("nd", "npx"):
            job["load"] = kind
        elif kind == "imports":
            job.update(load="imports", symbol=f"{fresh}/model-symbol.json")
        else:
            job.update(load="params", net=kind, dtype=rest[0] if rest else None)
        if kind == "torch_mlp":
            job["input"] = TORCH_INPUT
        jobs.append(job)
    for name, (data, *_) in {**LEGACY, **REFUSED}.items():
        if name != "v3-none.nd":  # npx.load segfaults on it
            (out / name).write_bytes(data)
            jobs.append(
                {"id": name, "path": str(out / name), "np": False, "load": "nd", "npz": str(out / f"{name}.mx.npz")}
            )
    legacy_0d = {"id": "legacy-0d", "path": str(fresh / "legacy-0d.nd"), "np": False, "load": "nd"}
    jobs.append({**legacy_0d, "npz": str(out / "legacy-0d.mx.npz")})
    (out / "jobs.json").write_text(json.dumps(jobs))
    results = run_in("mxnet", VERIFY, str(out / "jobs.json"))
    return {
        "fresh": fresh,
        "out": out,
        "made": made,
        "jobs": {j["id"]: j for j in jobs},
        "results": results,
        "torch": torch_output,
    }


def loaded_by_mxnet(mx, job_id: str) -> tuple[dict, dict[str, np.ndarray]]:
    """What MXNet returned for JOB_ID: its result and the arrays by name (a list's by position)."""
    result = mx["results"][job_id]
    assert result["ok"], (job_id, result)
    npz = np.load(mx["jobs"][job_id]["npz"])
    names = [str(i) for i in range(len(result["names"]))] if result.get("list") else result["names"]
    return result, {name: npz[str(i)] for i, name in enumerate(names)}


def test_fresh_fixtures_read_like_nd_load(mx):
    manifest = json.loads((mx["fresh"] / "manifest.json").read_text())
    assert mx["made"] == sorted(MANIFEST) == sorted(manifest)
    assert_reads_like_nd_load(mx["fresh"], manifest)


@pytest.mark.parametrize("job_id", sorted(EDITS))
def test_outputs_load_back_in_mxnet(mx, job_id):
    result, theirs = loaded_by_mxnet(mx, job_id)
    job = mx["jobs"][job_id]
    ours = values(job["path"])
    if job["load"] == "imports":  # SymbolBlock names its parameters without export's arg:/aux:
        ours = {name.split(":", 1)[1]: a for name, a in ours.items()}
    if job["load"] in ("nd", "npx"):
        assert result["list"] == paramctl.load(job["path"]).extra.is_list
        assert list(theirs) == list(ours)  # a list's are 0..N-1 on both sides
    assert sorted(theirs) == sorted(ours)
    for name, a in ours.items():
        assert theirs[name].dtype == a.dtype and theirs[name].shape == a.shape, (name, theirs[name].dtype, a.dtype)
        assert np.array_equal(theirs[name], a, equal_nan=a.dtype.kind == "f"), name


def test_edits_did_what_they_say(mx):
    out, fresh = mx["out"], mx["fresh"]
    src = values(fresh / "mlp.params")
    reinit = values(out / "reinit.params")
    assert np.abs(reinit["0.weight"]).max() <= 0.07 and not np.array_equal(reinit["0.weight"], src["0.weight"])
    assert not reinit["0.bias"].any()
    assert values(out / "set.params")["0.weight"][0, 0] == 42
    assert values(out / "cast16.params")["0.weight"].dtype == np.float16
    assert list(values(out / "rm-list.nd")) == ["0", "2"]
    assert mx["results"]["rename-list"]["names"] == ["first", "1", "2"]
    assert mx["results"]["np-rm"]["list"] and mx["results"]["reinit-list"]["list"]
    tied = values(out / "tie-reinit.params")
    assert np.array_equal(tied["1.weight"], tied["2.weight"])
    export = values(out / "export-0007.params")
    assert not export["aux:batchnorm0_running_mean"].any() and (export["aux:batchnorm0_running_var"] == 1).all()
    for name, prefix in (("layers.params", "1._unfused.0."), ("prefixed.params", "lstm0_l0_")):
        edited, before = values(out / name), values(fresh / name.replace("prefixed", "layers-prefixed"))
        for part in ("i2h_weight", "h2h_weight"):
            assert not np.array_equal(edited[prefix + part], before[prefix + part]), (name, part)
        assert not edited[prefix + "i2h_bias"].any() and not edited[prefix + "h2h_bias"].any()
    scalars = values(out / "zero-d.params")
    assert scalars["step"].shape == () and scalars["step"] == 3 and scalars["e"].shape == (0,)


def test_torch_mlp_converted_computes_the_same_in_gluon(mx):
    result, _ = loaded_by_mxnet(mx, "from-torch")
    np.testing.assert_allclose(np.array(result["forward"]), mx["torch"], rtol=1e-5, atol=1e-6)


def test_legacy_records_agree_with_nd_load(mx):
    for name, (_, want) in LEGACY.items():
        result, theirs = loaded_by_mxnet(mx, name)
        ours = values(mx["jobs"][name]["path"])
        assert list(ours) == list(want)
        for (key, a), b in zip(ours.items(), theirs.values()):
            assert a.dtype == b.dtype and np.array_equal(a, b), (name, key)


def test_refusals_agree_with_nd_load(mx):
    assert "Unknown type enum" in mx["results"]["legacy-0d"]["error"]
    for name, (_, _, mxnet_refuses) in REFUSED.items():
        if mxnet_refuses is None:
            continue
        assert mx["results"][name]["ok"] is not mxnet_refuses, (name, mx["results"][name])
