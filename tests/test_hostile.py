"""Malicious pickles in every PyTorch container (zip, legacy, sharded .bin), through every opcode
that reaches a global: all refused with exit 2 naming the global, none executed."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import zipfile

import pytest
import torch
from conftest import run

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
