"""Writes under faults: killed writers, full disks, unwritable places and racing writers never
leave a truncated or mixed target, and a failed write leaves no temporary file behind."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLES, run

KILLS = 16


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    """A 24 MB checkpoint (writes take long enough to be killed midway) and its conversions."""
    import torch

    base = tmp_path_factory.mktemp("writes")
    torch.manual_seed(0)
    src = base / "big.pt"
    torch.save({f"layer{i}.weight": torch.randn(512, 1024) for i in range(12)}, src)
    expected = base / "expected.safetensors"
    assert run("convert", str(src), str(expected)).exit_code == 0
    return {"src": src, "expected": expected}


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".paramctl-tmp")]


def writes_unnamed(directory: Path) -> bool:
    """Whether `convert` writes through paramctl.atomic's unnamed file (Linux O_TMPFILE) here."""
    from paramctl import atomic, formats

    fd = atomic.unnamed_file(str(directory))
    if fd is not None:
        os.close(fd)
    return fd is not None and getattr(formats, "atomic_path", None) is atomic.atomic_path


def test_atomic_path_writes_an_unnamed_file_until_it_is_complete(tmp_path):
    """While the writer runs, the directory holds no new name; afterwards only the target, with
    the permissions a new file gets; a failed write leaves the old target and nothing else."""
    from paramctl.atomic import atomic_path, unnamed_file
    from paramctl.errors import ParamctlError

    fd = unnamed_file(str(tmp_path))
    if fd is None:
        pytest.skip("no O_TMPFILE here: the named temporary file is used")
    os.close(fd)
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(str(target)) as tmp:
        assert tmp.startswith("/proc/self/fd/")
        with open(tmp, "wb") as f:
            f.write(b"new contents")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert target.read_bytes() == b"new contents"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ParamctlError), atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise ParamctlError("the writer failed")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_file_system_that_will_not_link_gets_a_copy(tmp_path, monkeypatch):
    """linkat refused (EPERM): the unnamed file's bytes are copied into place instead."""
    from paramctl import atomic

    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", refuse)
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic.atomic_path(str(target)) as tmp, open(tmp, "wb") as f:
        f.write(b"new contents")
    assert target.read_bytes() == b"new contents"
    assert leftovers(tmp_path) == []


def test_sigkill_of_an_unnamed_write_leaves_nothing(tmp_path):
    """A writer killed at any moment of a 24 MB write through paramctl.atomic (torch.save, h5py
    and a plain file, each through the /proc path): the target is old or new, and no temporary
    file is ever left, since it had no name until it was complete."""
    from paramctl.atomic import unnamed_file

    fd = unnamed_file(str(tmp_path))
    if fd is None:
        pytest.skip("no O_TMPFILE here: the named temporary file is used")
    os.close(fd)
    script = (
        "import sys, numpy as np, h5py, torch\n"
        "from paramctl.atomic import atomic_path\n"
        "kind, target = sys.argv[1], sys.argv[2]\n"
        "data = np.random.default_rng(0).standard_normal(3 << 20)\n"
        "print('writing', flush=True)\n"
        "with atomic_path(target) as tmp:\n"
        "    if kind == 'torch': torch.save({'w': torch.from_numpy(data)}, tmp)\n"
        "    elif kind == 'h5py':\n"
        "        with h5py.File(open(tmp, 'w+b'), 'w') as f: f['w'] = data\n"
        "    else:\n"
        "        with open(tmp, 'wb') as f: f.write(data.tobytes())\n"
        "print('done', flush=True)\n"
    )
    rng = random.Random(5)
    for kind in ("torch", "h5py", "plain"):
        target = tmp_path / f"out.{kind}"
        for _ in range(4):
            target.write_bytes(b"old")
            proc = subprocess.Popen([sys.executable, "-c", script, kind, str(target)], stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
            time.sleep(rng.uniform(0.0, 0.3))  # about what the write takes
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert target.read_bytes() == b"old" or target.stat().st_size >= 24 << 20
            assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("out.")) == []


def paramctl(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "paramctl", *args], stderr=subprocess.PIPE, **kwargs)


def test_sigkill_during_output_leaves_old_or_new(tmp_path, big):
    """Kill `convert -o` at moments spread over 1.5x the time one conversion takes: the target is
    always the complete old file or the complete new one, never a truncated mix."""
    old = (SAMPLES / "mlp.safetensors").read_bytes()
    new = big["expected"].read_bytes()
    target = tmp_path / "out.safetensors"
    start = time.perf_counter()
    paramctl("convert", str(big["src"]), str(tmp_path / "timed.safetensors")).wait()
    whole = time.perf_counter() - start
    seen = {"old": 0, "new": 0}
    unnamed = writes_unnamed(tmp_path)
    for i in range(KILLS):
        target.write_bytes(old)
        proc = paramctl("convert", str(big["src"]), str(target))
        time.sleep(whole * 1.5 * (i + 0.5) / KILLS)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert data in (old, new), f"target has {len(data)} bytes: neither the old nor the new file"
        seen["old" if data == old else "new"] += 1
        if unnamed:  # the output was an unnamed file until it was complete: nothing to clean up
            assert leftovers(tmp_path) == []
        for name in leftovers(tmp_path):  # a named temporary file: the next run must not care
            (tmp_path / name).unlink()
    assert seen["old"] and seen["new"], seen  # the kills landed both before and after the rename


def test_sigkill_during_in_place_edit(tmp_path, big):
    import torch

    original = big["src"].read_bytes()
    target = tmp_path / "model.pt"
    rng = random.Random(11)
    for _ in range(KILLS // 2):
        target.write_bytes(original)
        proc = paramctl("cast", str(target), "--dtype", "float16", "--in-place")
        time.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sd = torch.load(target)  # loads, whichever it is
        assert {t.dtype for t in sd.values()} in ({torch.float32}, {torch.float16})
        if next(iter(sd.values())).dtype == torch.float32:
            assert target.read_bytes() == original


def test_full_disk_gives_exit_2_and_leaves_target_and_no_temp(tmp_path, big):
    """RLIMIT_FSIZE makes the write fail part way (EFBIG, as a full disk fails with ENOSPC)."""
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous contents")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = paramctl("convert", str(big["src"]), str(target), preexec_fn=limit)
    _, err = proc.communicate()
    assert proc.returncode == 2
    assert err.decode().startswith(f"paramctl: error: {target}: cannot write")
    assert len(err.decode().splitlines()) == 1
    assert target.read_bytes() == b"previous contents"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".h5"])
def test_enospc_at_flush_in_process(tmp_path, monkeypatch, suffix):
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / f"out{suffix}"
    result = run("convert", str(SAMPLES / "mlp.pt"), str(target))
    assert result.exit_code == 2
    assert "No space left on device" in result.stderr
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_unwritable_place_gives_exit_2_and_input_intact(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((SAMPLES / "mlp.pt").read_bytes())
    for target in ("/proc/paramctl-out.pt", str(src / "not-a-directory.pt")):
        result = run("convert", str(src), target)
        assert result.exit_code == 2, target
        assert result.stderr.startswith(f"paramctl: error: {target}: cannot write")
    assert src.read_bytes() == (SAMPLES / "mlp.pt").read_bytes()
    assert leftovers(tmp_path) == []


def test_failed_edit_leaves_no_temp_and_input_intact(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((SAMPLES / "shared.pt").read_bytes())
    result = run("tie", str(src), "0.weight", "2.weight", "--in-place")  # shapes differ: refused
    assert result.exit_code == 2
    assert src.read_bytes() == (SAMPLES / "shared.pt").read_bytes()
    assert leftovers(tmp_path) == []


def test_concurrent_writers_never_mix(tmp_path, big):
    """Two writers racing for one path: the result is one complete output or the other."""
    outputs = {
        "big": big["expected"].read_bytes(),
        "small": None,
    }
    small = tmp_path / "small.safetensors"
    run("convert", str(SAMPLES / "mlp.pt"), str(small))
    outputs["small"] = small.read_bytes()
    target = tmp_path / "race.safetensors"
    for _ in range(4):
        procs = [
            paramctl("convert", str(big["src"]), str(target)),
            paramctl("convert", str(SAMPLES / "mlp.pt"), str(target)),
        ]
        for p in procs:
            p.communicate()
            assert p.returncode == 0
        assert target.read_bytes() in outputs.values()
    assert leftovers(tmp_path) == []
