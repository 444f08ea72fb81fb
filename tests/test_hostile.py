"""Malicious pickles in every PyTorch container (zip, legacy, sharded .bin), through every opcode
that reaches a global: all refused with exit 2 naming the global, none executed."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES as SAMPLES_DIR
from conftest import run

import paramctl
from paramctl.errors import ParamctlError

LEGACY_HEADER = (
    pickle.dumps(0x1950A86A20F9469CFC6C, 2)
    + pickle.dumps(1001, 2)
    + pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, 2)
)


class Call:
    """Pickles (through REDUCE) to FUNC(*ARGS)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def payloads(marker: str) -> dict[str, tuple[bytes, str]]:
    """name -> (a pickle of a state dict holding the payload, the global it must be refused for)."""
    command = f"touch {marker}"

    def state_dict(evil, protocol: int = 2) -> bytes:
        return pickle.dumps({"0.weight": [1.0, 2.0], "extra": {"evil": evil}}, protocol)

    def raw(body: bytes) -> bytes:  # a hand-written protocol-0 pickle: {"evil": <body>}
        return b"(dp0\nS'evil'\np1\n" + body + b"p2\ns."

    def text(value: str) -> bytes:  # a protocol-2 BINUNICODE string
        return b"X" + len(value.encode()).to_bytes(4, "little") + value.encode()

    # {"evil": Popen.__new__(Popen) with BUILD state {"args": command}}, protocol 2
    newobj = b"\x80\x02}" + text("evil") + b"csubprocess\nPopen\n)\x81}" + text("args") + text(command) + b"sbs."

    return {
        "GLOBAL+REDUCE os.system": (state_dict(Call(os.system, command)), "posix.system"),
        "STACK_GLOBAL os.system": (state_dict(Call(os.system, command), 4), "posix.system"),
        "eval": (state_dict(Call(eval, f"__import__('os').system('{command}')")), "builtins.eval"),
        "exec": (state_dict(Call(exec, f"import os; os.system('{command}')")), "builtins.exec"),
        "__import__": (state_dict(Call(__import__, "os")), "builtins.__import__"),
        "subprocess.Popen": (state_dict(Call(subprocess.Popen, ["touch", marker])), "subprocess.Popen"),
        "importlib": (state_dict(Call(__import__("importlib").import_module, "os")), "importlib.import_module"),
        "NEWOBJ+BUILD Popen": (newobj, "subprocess.Popen"),
        "INST": (raw(f"(S'{command}'\nios\nsystem\n".encode()), "os.system"),
        "OBJ": (raw(f"(cos\nsystem\nS'{command}'\no".encode()), "os.system"),
        "BUILD on a dict": (raw(f"(dp9\n(dcos\nsystem\nS'{command}'\ntRb".encode()), "os.system"),
    }


def zip_pt(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    return buf.getvalue()


def legacy_pt(pkl: bytes) -> bytes:
    return LEGACY_HEADER + pkl + pickle.dumps([], 2)


@pytest.mark.parametrize("container", ["zip", "legacy", "sharded-bin"])
@pytest.mark.parametrize("case", sorted(payloads("M")))
def test_refused_and_never_run(tmp_path, container, case):
    marker = tmp_path / "pwned"
    pkl, glob = payloads(str(marker))[case]
    data = legacy_pt(pkl) if container == "legacy" else zip_pt(pkl)
    if container == "sharded-bin":
        good = tmp_path / "pytorch_model-00001-of-00002.bin"
        torch.save({"a": torch.ones(2)}, good)
        (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(data)
        index = {"weight_map": {"a": good.name, "0.weight": "pytorch_model-00002-of-00002.bin"}}
        path = tmp_path / "pytorch_model.bin.index.json"
        path.write_text(json.dumps(index))
    else:
        path = tmp_path / "evil.pt"
        path.write_bytes(data)
    for command in ("ls", "info", "stats"):
        result = run(command, str(path))
        assert result.exit_code == 2
        assert len(result.stderr.splitlines()) == 1
        assert f"pickle global {glob} is not allowed" in result.stderr
    assert run("convert", str(path), str(tmp_path / "out.safetensors")).exit_code == 2
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_harmless_objects_are_opaque_entries_and_tensors_still_list(tmp_path):
    """An argparse.Namespace in Lightning hyper-parameters: listed by name in info, never built;
    the tensors list, take statistics and convert; a .pt written from it holds it as it was."""
    import argparse
    import json

    path = tmp_path / "run.ckpt"
    hparams = argparse.Namespace(lr=0.1, layers=[256, 10])
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"args": hparams}}, path)
    assert run("ls", str(path)).stdout == "state_dict.w\t[2]\tfloat32\t2\t8\n"
    assert run("stats", str(path)).exit_code == 0
    info = json.loads(run("info", str(path), "-f", "json").stdout)
    assert info["entries"]["hyper_parameters.args"] == "opaque argparse.Namespace (not loaded)"
    converted = run("convert", str(path), str(tmp_path / "w.safetensors"))
    assert converted.exit_code == 0 and "hyper_parameters.args" in converted.stderr
    # written back as it was pickled (tests/test_training.py checks the round trip in full)
    assert run("convert", str(path), str(tmp_path / "back.pt")).exit_code == 0
    assert torch.load(tmp_path / "back.pt", weights_only=False)["hyper_parameters"]["args"] == hparams


def test_calling_an_unknown_global_is_refused(tmp_path):
    """REDUCE of a class paramctl does not know would run its code: refused, naming it."""
    import decimal

    path = tmp_path / "dec.pt"
    torch.save({"w": torch.ones(2), "lr": decimal.Decimal("0.1")}, path)
    result = run("ls", str(path))
    assert result.exit_code == 2
    assert "pickle global decimal.Decimal is not allowed (called)" in result.stderr


# --- issue 13: bounded work, agree or refuse, writers that carry nothing hostile -------------------

# each hostile class of tests/test_differential.py, and the one-line reason paramctl refuses it with
REFUSALS = {
    "tuple DAG dict key": "refuses the pickle: a dict key that is a tuple of containers or objects",
    "list DAG": "the object's shared parts expand past what the file can hold (memo bomb)",
    "set of tuple DAGs": "refuses the pickle: builtins.set given items that are containers or objects",
    "frozenset opcode of tuple DAG": "refuses the pickle: a set item that is a tuple of containers or objects",
    "stride 0 view": "tensor 'w' views 750000000 elements over a storage of 1 (more than 16 times",
    "overlapping strides": "tensor 'w' views 750000000 elements over a storage of 55000 (more than 16 times",
    "bytearray of a count": "refuses builtins.bytearray(int): only bytes or text are admitted",
    "OrderedDict state shadowing items": "a container (OrderedDict) whose pickled state sets attribute 'items'",
    "6000-digit dimension": "refuses the pickle: an integer of 19932 bits",
    "4000-digit dimension": "tensor 'w' has a size that is not a 64-bit count",
    "zero-size [0, 2**62, 2**62] (pt)": "tensor 'w' has sizes whose product exceeds 64 bits",
    "duplicate zip member": "the archive holds two members named 'archive/data/0': ambiguous",
    "lazy negation bit": "a tensor record with metadata ['neg'] (a lazy negation or conjugation): not read",
    "zip member marked as a directory": "zip member 'archive/data/0' is marked as a directory: ambiguous",
    "pickled module": "pickle global torch.nn.modules.linear.Linear is not allowed",
    "tensor inside an opaque object": "a tensor in an object of class argparse.Namespace that paramctl keeps opaque",
    "safetensors zero-size [0, 2**62, 2**62]": "tensor 'w' has sizes whose product exceeds 64 bits",
    "safetensors 6000-digit dimension": "invalid safetensors header: Exceeds the limit (4300 digits)",
    "safetensors duplicate key": "invalid safetensors header: the key 'w' appears twice",
    "HDF5 fill-value-only 30000x30000": "dataset 'w' claims 3600000000 bytes, more than 1032 times the file's",
    "HDF5 external storage": "dataset 'w' keeps its values outside this file (external storage or a virtual dataset)",
    "HDF5 virtual dataset": "dataset 'v' keeps its values outside this file (external storage or a virtual dataset)",
    "HDF5 external link to /etc/passwd": "'x' is an external link to /etc/passwd:/x: not followed, so refused",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    from test_differential import hostile_cases, hostile_keras

    directory = tmp_path_factory.mktemp("hostile")
    paths = {}
    for i, (name, (ext, data)) in enumerate({**hostile_cases(directory), **hostile_keras(directory)}.items()):
        paths[name] = directory / f"case{i}{ext}"
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_hostile_file_is_refused_in_one_line_by_every_command(tmp_path, hostile, case):
    path = str(hostile[case])
    for command in (["ls", path], ["info", path], ["stats", path], ["check", path]):
        result = run(*command)
        assert result.exit_code == 2, (command, result.stdout)
        assert result.stderr == f"paramctl: error: {path}: {result.stderr.split(': ', 3)[-1]}"
        assert len(result.stderr.splitlines()) == 1
        assert REFUSALS[case] in result.stderr, result.stderr
    out = tmp_path / "out.safetensors"
    assert run("convert", path, str(out)).exit_code == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".paramctl-tmp")]


def test_empty_attribute_of_2_to_the_40_lists_costs_nothing(hostile):
    """numpy's tolist would build 2**40 empty lists (2.8 GB and growing): described instead."""
    path = str(hostile["HDF5 attribute of shape (2**40, 0)"])
    info = json.loads(run("info", path, "-f", "json").stdout)
    assert info["entries"] == {"a": "empty array of shape (1099511627776, 0)"}
    assert run("ls", path).stdout == "w\t[2]\tfloat32\t2\t8\n"


def test_compressed_dataset_is_read_a_range_at_a_time(hostile):
    """32 MiB of deflated zeros in a 36 KB file: decoded by h5py a block of rows at a time."""
    import numpy as np

    ckpt = paramctl.load(str(hostile["HDF5 compressed zeros (32 MiB)"]))
    (t,) = ckpt.tensors
    assert t.storage.reader is not None and t.storage.buffer is None
    sizes = [chunk.size for chunk in t.chunks(elements=3_000_000)]
    assert sizes == [3_000_000, 3_000_000, 2_388_608]
    assert t.storage.buffer is None  # nothing held whole
    assert np.count_nonzero(next(t.chunks(start=4095, stop=4099))) == 0
    row = run("stats", str(hostile["HDF5 compressed zeros (32 MiB)"]), "-f", "json")
    assert json.loads(row.stdout)[0]["zeros"] == 2048 * 4096


def test_strided_views_stream_stride_aware():
    """A view repeating its storage (stride 0, within the stated factor) is read chunk by chunk
    from the storage's span, in C order."""
    import numpy as np

    from paramctl.table import Storage, Tensor

    storage = Storage(16, buffer=np.arange(4, dtype="<f4").tobytes())
    t = Tensor("w", (16, 4), "float32", storage, stride=(0, 1))
    t.check_bounds()
    flat = np.concatenate(list(t.chunks(elements=5)))
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0] * 16
    assert t.array().tolist() == [[0.0, 1.0, 2.0, 3.0]] * 16
    over = Tensor("w", (65, 1), "float32", storage, stride=(0, 1))  # 65 elements over 4: past 16 times
    with pytest.raises(ParamctlError, match="more than 16 times"):
        over.check_bounds()


def test_keras_archive_keeps_member_compression(tmp_path, hostile):
    """A 64 MiB deflated asset stays deflated in the output (no 2 GB amplification)."""
    src = hostile["keras deflated 64 MiB asset"]
    out = tmp_path / "out.keras"
    result = run("reinit", str(src), "--init", "zeros", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size < 1 << 20
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out) as b:
        assert [i.filename for i in b.infolist()] == [i.filename for i in a.infolist()]
        asset = b.getinfo("assets/big.bin")
        assert asset.compress_type == zipfile.ZIP_DEFLATED and asset.file_size == 64 << 20
        assert b.read("assets/big.bin") == bytes(64 << 20)
        assert b.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED


def test_keras_member_outside_the_archive_is_refused_by_writers(tmp_path, hostile):
    src = str(hostile["keras zip-slip member"])
    assert run("ls", src).exit_code == 0  # reading never extracts anything
    out = tmp_path / "out.keras"
    result = run("convert", src, str(out))
    assert result.exit_code == 2
    assert result.stderr == (
        f"paramctl: error: {src}: refuses to copy archive member '../../zipslip': a path outside the archive\n"
    )
    assert not out.exists()


def test_hdf5_writer_never_carries_an_external_link(tmp_path):
    """Reading refuses such a file; the writer refuses to copy one from its source too."""
    import h5py
    import numpy as np

    from paramctl.errors import UsageError
    from paramctl.formats import hdf5

    clean, linked = tmp_path / "clean.h5", tmp_path / "linked.h5"
    with h5py.File(clean, "w") as f:
        f["w"] = np.ones(2, "f4")
    with h5py.File(linked, "w") as f:
        f["w"] = np.ones(2, "f4")
        f["x"] = h5py.ExternalLink("/etc/passwd", "/x")
    ckpt = paramctl.load(str(clean))
    with pytest.raises(UsageError, match="refuses to copy 'x': it points outside the file"):
        hdf5.write_file(ckpt, str(tmp_path / "out.h5"), hdf5.H5Image(str(linked)))


def test_safe_member_names():
    from paramctl.formats.keras import safe_member_name

    assert all(map(safe_member_name, ["config.json", "assets/a/b.txt", "model.weights.h5", "a..b"]))
    assert not any(map(safe_member_name, ["../x", "a/../../x", "/etc/passwd", "\\\\server\\x", "C:x", "a\\..\\b", ""]))


def test_deflated_storage_is_read_a_range_at_a_time(hostile):
    """A .pt whose storage member is deflated (64 MiB of zeros in 64 KB): torch reads it; paramctl
    decompresses it as it streams, never whole."""
    ckpt = paramctl.load(str(hostile["deflated 64 MiB storage"]))
    w = ckpt["w"]
    assert w.storage.reader is not None and w.storage.buffer is None and w.storage.load is None
    assert sum(int(chunk.any()) for chunk in w.chunks(elements=1 << 20)) == 0
    assert w.storage.buffer is None
    assert ckpt["b"].array().tolist() == [1.0, 1.0, 1.0]


def test_keras_member_whose_headers_disagree_is_a_clean_error_when_copied(tmp_path):
    """A member reading never opens (its central and local names differ): the writer says so."""
    src = tmp_path / "a.keras"
    src.write_bytes((SAMPLES_DIR / "mlp.keras").read_bytes())
    data = bytearray(src.read_bytes())
    central = data.rfind(b"metadata.json")  # the central directory's copy of the name comes last
    data[central] = ord("l")
    src.write_bytes(bytes(data))
    result = run("convert", str(src), str(tmp_path / "out.keras"))
    assert result.exit_code == 2 and "invalid zip archive: File name in directory" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out.keras").exists()


def test_a_zip_claiming_several_disks_is_refused_as_torch_refuses_it(tmp_path):
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    data = bytearray(buf.getvalue())
    end = data.rfind(b"PK\x05\x06")
    data[end + 4 : end + 6] = struct.pack("<H", 1)  # the end record's disk number
    path = tmp_path / "disks.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="multidisk"):
        torch.load(path, weights_only=True)
    for command in ("ls", "check", "info"):
        result = run(command, str(path))
        assert result.exit_code == 2 and "span several disks" in result.stderr, command
        assert result.stderr.count("\n") == 1
