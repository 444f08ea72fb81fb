"""TorchScript archives from torch.jit.script and torch.jit.trace: rows and values are
`torch.jit.load(f).state_dict()`'s, read without running or importing the archive's code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import frameworks_imported, run
from safetensors.torch import load_file, load_model

import paramctl

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Block(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)
        self.register_buffer("mask", torch.ones(n))
        self.plain = torch.zeros(2)  # a tensor attribute: neither parameter nor buffer, not in state_dict

    def forward(self, x):
        return self.lin(x) * self.mask + self.plain.sum()


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.blocks = torch.nn.ModuleList([Block(4), Block(4)])
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = torch.nn.Parameter(torch.full((2,), 0.5), requires_grad=False)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h) * self.scale + self.frozen.sum()


def models() -> dict[str, torch.nn.Module]:
    """The eager models by archive name, with the same weights on every call."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    convbn = ConvBN()
    convbn(torch.randn(2, 2, 6, 6))  # running statistics move away from their defaults
    convbn.eval()
    tied = Tied()
    return {
        f"{kind}_{how}": model
        for kind, model in (("linear", linear), ("convbn", convbn), ("tied", tied))
        for how in ("scripted", "traced")
    }


EXAMPLE_INPUTS = {"linear": (1, 5), "convbn": (1, 2, 6, 6)}


def save_archives(root: str) -> None:
    """torch.jit.script / trace every model into ROOT. Run in a fresh interpreter: the TorchScript
    compiler is sensitive to what other tests have imported and patched in this process."""
    for name, model in models().items():
        kind, how = name.rsplit("_", 1)
        example = torch.randn(EXAMPLE_INPUTS[kind]) if kind in EXAMPLE_INPUTS else torch.tensor([[1, 2, 3]])
        compiled = torch.jit.script(model) if how == "scripted" else torch.jit.trace(model, example)
        compiled.save(str(Path(root) / f"{name}.pt"))


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("torchscript")
    here = str(Path(__file__).resolve().parent)
    script = f"import sys; sys.path[:0] = [{here!r}]; import test_torchscript as t; t.save_archives(sys.argv[1])"
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, capture_output=True)
    return {name: (root / f"{name}.pt", eager) for name, eager in models().items()}


def test_rows_and_values_are_the_loaded_state_dict(archives):
    for name, (path, _eager) in archives.items():
        expected = torch.jit.load(str(path)).state_dict()
        result = run("ls", str(path), "-f", "json")
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)
        assert [r["name"] for r in rows] == list(expected), name
        ckpt = paramctl.load(str(path))
        assert ckpt.format == "torchscript"
        for t in ckpt:
            want = expected[t.name]
            assert list(t.shape) == list(want.shape) and t.dtype == str(want.dtype).removeprefix("torch."), t.name
            assert np.array_equal(t.array(), want.numpy()), (name, t.name)


def test_a_tied_parameter_is_one_tensor(archives):
    for name in ("tied_scripted", "tied_traced"):
        result = run("tied", str(archives[name][0]))
        assert result.exit_code == 0
        assert result.stdout == "emb.weight = head.weight\tshared\n"


def test_parameters_buffers_and_plain_attributes(archives):
    ckpt = paramctl.load(str(archives["tied_scripted"][0]))
    kinds = {t.name: t.attrs["parameter"] for t in ckpt}
    assert kinds["frozen"] is True and kinds["scale"] is False and kinds["blocks.0.mask"] is False
    assert not any("plain" in name for name in kinds)
    assert list(kinds)[:2] == ["frozen", "scale"]  # a module's parameters, then its buffers, then submodules'


def test_convert_to_safetensors_and_pt_load_strictly_into_the_eager_model(archives, tmp_path):
    for name, (path, eager) in archives.items():
        fresh = type(eager)() if not isinstance(eager, torch.nn.Linear) else torch.nn.Linear(5, 3)
        out = tmp_path / f"{name}.safetensors"
        result = run("convert", str(path), str(out))
        assert result.exit_code == 0, result.stderr
        if name.startswith("tied"):
            missing, unexpected = load_model(fresh, str(out), strict=True)
            assert not missing and not unexpected
        else:
            fresh.load_state_dict(load_file(out), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), eager.state_dict().values()))
        pt = tmp_path / f"{name}.pth"
        assert run("convert", str(path), str(pt)).exit_code == 0
        again = type(fresh)() if not isinstance(eager, torch.nn.Linear) else torch.nn.Linear(5, 3)
        again.load_state_dict(torch.load(pt, weights_only=True), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), eager.state_dict().values()))


def test_stats_check_and_diff(archives, tmp_path):
    path = archives["convbn_scripted"][0]
    assert run("check", str(path)).exit_code == 0
    assert run("stats", str(path)).exit_code == 0
    pt = tmp_path / "convbn.pt"
    assert run("convert", str(path), str(pt)).exit_code == 0
    result = run("diff", str(path), str(pt))
    assert result.exit_code == 0 and "different" not in result.stdout
    model = torch.jit.load(str(path))
    with torch.no_grad():
        model.bn.running_var[1] = float("nan")
    bad = tmp_path / "nan.pt"
    model.save(str(bad))
    result = run("check", str(bad))
    assert result.exit_code == 1 and "bn.running_var" in result.stdout + result.stderr


def test_an_archive_is_read_only(archives, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(archives["linear_scripted"][0], copy)
    before = copy.read_bytes()
    result = run("rename", str(copy), "s/weight/w/", "--in-place")
    assert result.exit_code == 2
    assert result.stderr == (
        f"paramctl: error: {copy}: TorchScript archive (torch.jit.save) is read-only in paramctl: "
        "convert to .pt or safetensors\n"
    )
    assert copy.read_bytes() == before
    assert run("convert", str(copy), str(tmp_path / "x.pt"), "--to", "torchscript").exit_code == 2


def rewritten(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """SOURCE's archive with some members' bytes replaced."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.get(info.filename.split("/", 1)[1], zin.read(info)))
    return target


def test_the_code_is_never_run(archives, tmp_path):
    marker = tmp_path / "ran"
    payload = b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
    payload += f"touch {marker}".encode() + b"\x85R."
    bad = rewritten(archives["linear_scripted"][0], tmp_path / "bad.pt", {"data.pkl": payload})
    result = run("ls", str(bad))
    assert result.exit_code == 2 and "pickle global posix.system is not allowed" in result.stderr
    assert not marker.exists()
    # a module class whose definition is missing from code/: refused, not guessed
    path = archives["linear_scripted"][0]
    with zipfile.ZipFile(path) as z:
        code = [n.split("/", 1)[1] for n in z.namelist() if n.endswith("linear.py")]
    gone = rewritten(path, tmp_path / "gone.pt", dict.fromkeys(code, b"# nothing here\n"))
    result = run("check", str(gone))
    assert result.exit_code == 2 and "is not defined in the archive's code/" in result.stderr


def test_a_module_shared_at_every_level_is_refused_not_walked_exponentially(tmp_path):
    # module k holds module k-1 under two names: 2**60 paths through 60 objects
    ops = b"\x80\x02c__torch__\nM\nq\x00h\x00)\x81}bq\x01"
    for k in range(1, 61):
        child = b"h" + bytes([k])
        ops += b"h\x00)\x81}(X\x01\x00\x00\x00a" + child + b"X\x01\x00\x00\x00b" + child + b"ubq" + bytes([k + 1])
    path = tmp_path / "dag.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("dag/data.pkl", ops + b".")
        z.writestr("dag/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        z.writestr("dag/constants.pkl", b"\x80\x02).")
    result = run("ls", str(path))
    assert result.exit_code == 2
    assert "modules nest too deeply or are shared too often to be a state dict" in result.stderr


def test_reading_imports_no_torch(archives):
    assert frameworks_imported(str(archives["tied_scripted"][0])) == []
