"""Unsafe and malformed input: refused with exit 2 and one line, nothing executed, torch not imported."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import SAMPLES, run

import paramctl


class RunsCommand:
    """Pickles to a call of os.system: what a malicious checkpoint does on a plain pickle.load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_would_run_a_command_is_refused(tmp_path, marker, legacy):
    import torch

    path = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "extra": RunsCommand(f"touch {marker}")}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    for command in ("ls", "info", "tree"):
        result = run(command, str(path))
        assert result.exit_code == 2
        assert len(result.stderr.splitlines()) == 1
        assert "posix.system" in result.stderr
        assert str(path) in result.stderr
    assert run("convert", str(path), str(tmp_path / "out.safetensors")).exit_code == 2
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_refused_globals_are_named(tmp_path, marker):
    """Hand-written protocol-2 pickles reaching builtins.eval through GLOBAL + REDUCE."""
    pkl = b"\x80\x02cbuiltins\neval\nq\x00X\x0c\x00\x00\x00print('boo')q\x01\x85q\x02Rq\x03."
    path = tmp_path / "eval.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
    result = run("ls", str(path))
    assert result.exit_code == 2
    assert "builtins.eval" in result.stderr


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def malformed_files() -> dict[str, bytes]:
    import torch

    pt = _torch_bytes({"w": torch.arange(64, dtype=torch.float32)})
    st = (SAMPLES / "mlp.safetensors").read_bytes()
    h5 = (SAMPLES / "mlp.weights.h5").read_bytes()
    keras = (SAMPLES / "mlp.keras").read_bytes()
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    with io.BytesIO() as buf:
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
            zf.writestr("config.json", "{}")
        bad_keras = buf.getvalue()
    return {
        "empty": b"",
        "random": os.urandom(4096),
        "text": b"hello, world\n",
        "pt-truncated": pt[: len(pt) // 2],
        "pt-no-pickle": _zip({"archive/version": b"3\n"}),
        "pt-bad-pickle": _zip({"archive/data.pkl": b"\x80\x02}q\x00(X"}),
        "pt-missing-storage": _zip({"archive/data.pkl": _pickle_with_storage_ref()}),
        "legacy-truncated": _legacy_bytes()[:100],
        "st-truncated": st[:-10],
        "st-trailing": st + b"\x00" * 8,
        "st-huge-header": struct.pack("<Q", 10**12) + b"{}",
        "st-bad-json": struct.pack("<Q", 5) + b"{oops",
        "st-hole": _safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\x00" * 16),
        "st-overlap": _safetensors_bytes({"a": f32, "b": f32}, b"\x00" * 8),
        "st-size-mismatch": _safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        "st-shape-bomb": _safetensors_bytes(
            {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, bytes(16)
        ),
        "st-bad-dtype": _safetensors_bytes({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "st-bad-metadata": _safetensors_bytes({"__metadata__": {"epoch": 3}}, b""),
        "st-not-object": _safetensors_bytes([1, 2], b""),  # type: ignore[arg-type]
        "h5-truncated": h5[: len(h5) // 2],
        "h5-garbage": b"\x89HDF\r\n\x1a\n" + os.urandom(2048),
        "keras-truncated": keras[: len(keras) // 2],
        "keras-bad-weights": bad_keras,
        "index-no-weight-map": b'{"metadata": {}}',
        "index-missing-shard": json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}).encode(),
        "index-escapes": json.dumps({"weight_map": {"a": "../../etc/passwd"}}).encode(),
    }


def _zip(members: dict[str, bytes]) -> bytes:
    with io.BytesIO() as buf:
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()


def _pickle_with_storage_ref() -> bytes:
    import torch

    with zipfile.ZipFile(io.BytesIO(_torch_bytes({"w": torch.ones(3)}))) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        return zf.read(name)


def _legacy_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(malformed_files()))
def test_malformed_file_gives_one_line_and_exit_2(tmp_path, case):
    path = tmp_path / f"{case}.bin"
    path.write_bytes(malformed_files()[case])
    result = run("ls", str(path))
    assert result.exit_code == 2, result.stdout
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"paramctl: error: {path}")
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert result.stdout == ""


def test_malformed_stdin_names_standard_input():
    result = subprocess.run(
        [sys.executable, "-m", "paramctl", "ls", "-"], input=b"garbage", capture_output=True, text=False
    )
    assert result.returncode == 2
    assert result.stderr.decode().startswith("paramctl: error: -: ")


def test_failed_convert_writes_nothing(tmp_path):
    import torch

    src = tmp_path / "c.pt"
    torch.save({"z": torch.ones(2, dtype=torch.complex128)}, src)
    out = tmp_path / "out.safetensors"
    result = run("convert", str(src), str(out))
    assert result.exit_code == 2
    assert "complex128" in result.stderr
    assert list(tmp_path.iterdir()) == [src]


def test_control_characters_in_names_are_escaped(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    hostile = "evil\x1b[31m\tname\n\u202eright"
    path = tmp_path / "hostile.safetensors"
    save_file({hostile: np.zeros(2, np.float32)}, str(path))
    for tty in (False, True):
        out = run("ls", str(path), tty=tty).stdout
        assert "\x1b" not in out and "\u202e" not in out
        assert "evil\\x1b[31m\\tname\\n\\u202eright" in out
    assert len(run("ls", str(path)).stdout.splitlines()) == 1
    assert json.loads(run("ls", str(path), "-f", "json").stdout)[0]["name"] == hostile


COMMANDS = [["ls"], ["tree"], ["info"], ["stats"], ["check"], ["tied", "--by-value"], ["diff", "{path}"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("sample", ["mlp.safetensors", "mlp.weights.h5", "mlp.h5", "mlp.keras", "mlp.pt", "nested.pt"])
def test_reading_never_imports_torch_or_h5py(command, sample):
    path = str(SAMPLES / sample)
    argv = ["paramctl", command[0], path, *(a.format(path=path) for a in command[1:])]
    code = (
        "import os, sys, runpy\n"
        "del os.fork\n"  # libhdf5 work would run in a forked child, out of sight; here it runs in this process
        f"sys.argv = {argv!r}\n"
        "try: runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit as e: assert not e.code, e.code\n"
        "print(sorted({'torch', 'h5py'} & set(sys.modules)), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[-1] == "[]"  # HDF5 files Keras writes are parsed natively


def test_offsets_beyond_4_gb_in_a_sparse_safetensors_file(tmp_path):
    """A tensor whose bytes start past 4 GiB (a hole: no disk spent) reads, and agrees with safe_open."""
    import struct

    import numpy as np
    from safetensors import safe_open

    big = 5 << 30
    header = {
        "filler": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]},
        "tail": {"dtype": "F32", "shape": [2, 2], "data_offsets": [big, big + 16]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(8 + len(raw) + big)
        f.write(np.arange(4, dtype=np.float32).tobytes())
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse indeed
    rows = json.loads(run("ls", str(path), "-f", "json").stdout)
    assert [(r["name"], r["shape"], r["nbytes"]) for r in rows] == [("filler", [big], big), ("tail", [2, 2], 16)]
    tail = paramctl.load(str(path))["tail"].array()
    with safe_open(path, "np") as f:
        np.testing.assert_array_equal(tail, f.get_tensor("tail"))
    assert tail.ravel().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_very_long_names_stay_one_row(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    long = "layer." * 20_000 + "weight\twith\ttabs"
    path = tmp_path / "long.safetensors"
    save_file({long: np.zeros(1, np.float32), "b": np.ones(1, np.float32)}, str(path))
    rows = run("ls", str(path)).stdout.splitlines()
    assert len(rows) == 2 and all(len(r.split("\t")) == 5 for r in rows)
    assert {r["name"] for r in json.loads(run("ls", str(path), "-f", "json").stdout)} == {long, "b"}
    csv_rows = run("ls", str(path), "-f", "csv").stdout.splitlines()
    assert len(csv_rows) == 3


def _sparse_zip64_pt(path, filler: int) -> None:
    """A torch-layout zip whose second storage starts past FILLER bytes of hole (zip64 records),
    written by hand so that the filler costs no disk: {"filler": uint8[filler], "tail": f32[2, 2]}."""
    import collections
    import pickle
    import struct
    import zlib

    import numpy as np
    import torch

    class Ref:  # a storage, pickled as torch does: a persistent id
        def __init__(self, stype, key, numel):
            self.stype, self.key, self.numel = stype, key, numel

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", obj.stype, obj.key, "cpu", obj.numel) if isinstance(obj, Ref) else None

    class FakeTensor:
        def __init__(self, ref, size):
            self.ref, self.size = ref, size

        def __reduce__(self):
            stride = (self.size[1], 1) if len(self.size) == 2 else (1,)
            args = (self.ref, 0, self.size, stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)

    buf = io.BytesIO()
    Pickler(buf, 2).dump(
        {
            "filler": FakeTensor(Ref(torch.ByteStorage, "0", filler), (filler,)),
            "tail": FakeTensor(Ref(torch.FloatStorage, "1", 4), (2, 2)),
        }
    )
    tail = np.arange(4, dtype=np.float32).tobytes()
    members = [
        ("archive/data.pkl", buf.getvalue()),
        ("archive/data/0", None),
        ("archive/data/1", tail),
        ("archive/version", b"3\n"),
    ]
    central, offset = [], 0
    with open(path, "wb") as f:
        for name, data in members:
            size = filler if data is None else len(data)
            crc = 0 if data is None else zlib.crc32(data)
            extra = struct.pack("<HHQQ", 1, 16, size, size)
            f.write(
                struct.pack(
                    "<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra)
                )
            )
            f.write(name.encode() + extra)
            if data is None:
                f.seek(size, 1)  # a hole
            else:
                f.write(data)
            central.append((name, crc, size, offset))
            offset = f.tell()
        start = f.tell()
        for name, crc, size, at in central:
            extra = struct.pack("<HHQQQ", 1, 24, size, size, at)
            f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    45,
                    45,
                    0,
                    0,
                    0,
                    0,
                    crc,
                    0xFFFFFFFF,
                    0xFFFFFFFF,
                    len(name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    0xFFFFFFFF,
                )
            )
            f.write(name.encode() + extra)
        end = f.tell()
        f.write(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(central), len(central), end - start, start)
        )
        f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


def test_zip64_pt_with_storages_past_4_gb(tmp_path):
    path = tmp_path / "big.pt"
    filler = 5 << 30
    _sparse_zip64_pt(path, filler)
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse indeed
    rows = json.loads(run("ls", str(path), "-f", "json").stdout)
    assert [(r["name"], r["shape"], r["dtype"]) for r in rows] == [
        ("filler", [filler], "uint8"),
        ("tail", [2, 2], "float32"),
    ]
    tail = paramctl.load(str(path))["tail"]
    assert tail.storage.offset > 4 << 30
    assert tail.array().ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
    import torch

    assert torch.load(path, mmap=True)["tail"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]  # torch agrees
