"""Differential fuzzing: paramctl against the frameworks' own safe loaders, on generated, mutated
and hostile files.

For each case (a `.pt` in the zip or legacy format, a safetensors file, an `.h5`, `.weights.h5`
or `.keras`), paramctl reads it through the library (`paramctl.load`, every row's bytes) and
through the CLI in-process (`ls`, `stats`, `check`, `convert`), and the real loader reads it
(`torch.load(weights_only=True)`, `safe_open`, h5py). The outcome must be agree-or-refuse:

- where both read, the same names, shapes, dtypes and bytes (bit for bit);
- else paramctl refuses with a one-line ParamctlError (exit 2), never an internal error;
- `convert` leaves no output when it fails, and never changes its input.

and within bounds: each case's peak memory (the worker's RSS high-water mark, forked helpers
included) stays under the file's size plus a fixed allowance, and no case hangs (the worker is
killed after a deadline; a hang is a failure). Times are never asserted beyond the hang guard.

Workers run in subprocesses: paramctl's (no torch imported: its memory is what paramctl costs)
and the reference's (torch, safetensors, h5py; a reference that hangs on a hostile file, as
torch's does on a hash bomb, is killed and counts as a refusal). Cases are seeded and
reproducible: `PARAMCTL_FUZZ=long` (`make fuzz`) runs ten times as many.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import random
import select
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

LONG = os.environ.get("PARAMCTL_FUZZ") == "long"
SCALE = 10 if LONG else 1
SEED = 20261201
CASE_SECONDS = 60.0  # the hang guard per case (generous: a loaded CI machine, forked helpers)
# the reference's own hangs (torch hashing a tuple DAG) are cut short: they count as refusals
REFERENCE_SECONDS = 8.0
RSS_ALLOWANCE = 192 << 20  # bytes beyond the file's size that one case may add to a worker's peak
OUTCOMES: dict[str, Counter] = {}  # printed in the terminal summary (conftest.py)
TESTS = Path(__file__).resolve().parent

# --- generators ---------------------------------------------------------------------------------

PT_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]


def random_tensor(rng: random.Random):
    import torch

    dtype = getattr(torch, rng.choice(PT_DTYPES))
    shape = tuple(rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.choice([0, 1, 1, 2, 2, 3])))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
        if rng.random() < 0.1 and t.numel():
            t.view(-1)[0] = rng.choice([float("nan"), float("inf")])
        return t
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def random_object(rng: random.Random) -> Any:
    """A state dict, sometimes inside a training checkpoint: ties, views, parameters, lists."""
    import torch

    sd: dict = collections.OrderedDict()
    for i in range(rng.randint(1, 6)):
        t = random_tensor(rng)
        kind = rng.random()
        if kind < 0.1 and sd:
            t = rng.choice(list(sd.values()))  # a tie: one tensor under two names
        elif kind < 0.2 and t.dim() == 2 and t.shape[0] > 1:
            t = t[1:] if rng.random() < 0.5 else t.t()  # a view
        elif kind < 0.3 and t.is_floating_point():
            t = torch.nn.Parameter(t, requires_grad=False)
        sd[f"layer{i}.{rng.choice(['weight', 'bias', 'running_mean'])}"] = t
    if rng.random() < 0.1:  # a numpy array: a row too
        sd["array"] = random_tensor(rng).float().numpy()
    shape = rng.random()
    if shape < 0.5:
        return sd
    if shape < 0.6:  # hyper-parameters in an object paramctl keeps opaque (torch's safe load refuses it)
        return {"state_dict": sd, "hparams": argparse.Namespace(lr=0.1, layers=[2, 3])}
    if shape < 0.8:
        return {"epoch": rng.randint(0, 9), "state_dict": sd, "lr": 0.1, "names": ["a", "b"]}
    return {"model": sd, "optimizer": {"state": {0: {"step": random_tensor(rng)}}, "param_groups": [{"lr": 0.01}]}}


def pt_file(rng: random.Random, legacy: bool = False) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(random_object(rng), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def safetensors_file(rng: random.Random) -> bytes:
    from safetensors.torch import save

    tensors = {f"t{i}.{rng.choice(['w', 'b'])}": random_tensor(rng).contiguous() for i in range(rng.randint(1, 6))}
    metadata = {"format": "pt"} if rng.random() < 0.5 else None
    return save(tensors, metadata=metadata)


H5_DTYPES = ["f2", "f4", "f8", "i1", "i4", "i8", "u1", "u2", "bool", ">f4", ">i8", "bf16"]


def h5_file(rng: random.Random, path: Path, legacy: bool = False) -> None:
    """A Keras-like HDF5 file of datasets of many types and layouts, links: Keras 3's layout
    (`layers/<name>/vars/<i>`) or, LEGACY, tf-keras 2's (`<layer>/<layer>/kernel:0` listed by the
    `layer_names` and `weight_names` attributes)."""
    import h5py
    import ml_dtypes
    import numpy as np

    nprng = np.random.default_rng(rng.randrange(1 << 30))
    with h5py.File(path, "w", track_order=rng.random() < 0.3) as f:
        f.attrs["keras_version"] = "2.15.0" if legacy else "3.0.0"
        layers = []
        for i in range(rng.randint(1, 4)):
            layer = f"dense_{i}" if legacy else f"layer{i}"
            group = f.create_group(f"{layer}/{layer}" if legacy else f"layers/{layer}/vars")
            names = []
            for j in range(rng.randint(1, 3)):
                kind = rng.choice(H5_DTYPES)
                shape = tuple(rng.choice([0, 1, 2, 4, 7]) for _ in range(rng.choice([0, 1, 2, 2, 3])))
                values = nprng.standard_normal(shape) * 10
                extra: dict = {}
                # bf16: h5py stores it as opaque 2-byte data, which Keras tags
                data = values.astype(ml_dtypes.bfloat16 if kind == "bf16" else kind)
                if rng.random() < 0.3 and data.ndim and data.size:
                    # (not lzf: h5py's LZF filter decodes a damaged chunk into uninitialized memory,
                    # so h5py itself reads different values each time; no reader can agree with it)
                    extra.update(chunks=True, compression=rng.choice(["gzip", "gzip", None]))
                name = f"w{j}:0" if legacy else str(j)
                ds = group.create_dataset(name, data=data, **extra)
                if kind == "bf16":
                    ds.attrs["dtype"] = "bfloat16"
                names.append(f"{layer}/{name}" if legacy else f"vars/{j}")
            f[layer if legacy else f"layers/{layer}"].attrs["weight_names"] = names
            layers.append(layer)
        first = "dense_0/dense_0/w0:0" if legacy else "layers/layer0/vars/0"
        if legacy:
            f.attrs["layer_names"] = layers
            f.attrs["backend"] = "tensorflow"
        if rng.random() < 0.2:
            f["alias"] = f[first]  # a second hard link: a tie
        if rng.random() < 0.2:
            f["soft"] = h5py.SoftLink("/" + first)
        if rng.random() < 0.2:
            f.create_dataset("unwritten", (3, 2), "f4")  # only a fill value


def keras_file(rng: random.Random, directory: Path) -> bytes:
    weights = directory / "w.h5"
    h5_file(rng, weights)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        zf.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {}}))
        zf.write(weights, "model.weights.h5")
    weights.unlink()
    return buf.getvalue()


# --- mutators -----------------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["flip", "flip", "overwrite", "truncate", "insert"])
    if not data or kind == "truncate":
        return data[: rng.randrange(len(data) + 1)]
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    pos = rng.randrange(len(buf))
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    if kind == "overwrite":
        return bytes(buf[:pos] + junk + buf[pos + len(junk) :])
    return bytes(buf[:pos] + junk + buf[pos:])


def mutate_zip_members(rng: random.Random, data: bytes) -> bytes:
    """Rewrite one member of a torch zip (the pickle or a storage) and re-zip it: the archive
    stays valid, so both readers get past it to the content."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    index = rng.randrange(len(members))
    name, body = members[index]
    pickled = name.endswith("data.pkl") and rng.random() < 0.7
    body = mutate_pickle_arg(rng, body) if pickled else mutate_bytes(rng, body)
    members[index] = (name, body)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for n, b in members:
            out.writestr(n, b)
    return buf.getvalue()


def mutate_pickle_arg(rng: random.Random, pkl: bytes) -> bytes:
    """Change one small integer of the pickle (a size, stride, offset or key) in place."""
    ints = [pos for op, arg, pos in pickletools.genops(pkl) if op.name in ("BININT1", "BININT2", "BININT")]
    if not ints:
        return mutate_bytes(rng, pkl)
    pos = rng.choice(ints)
    buf = bytearray(pkl)
    width = {ord("K"): 1, ord("M"): 2, ord("J"): 4}[buf[pos]]
    value = rng.choice([0, 1, 2, 3, 7, 255, 1 << 15, (1 << 31) - 1])
    buf[pos + 1 : pos + 1 + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf)


def mutate_safetensors_header(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    if names:
        entry = header[rng.choice(names)]
        field = rng.choice(["shape", "data_offsets", "dtype"])
        if field == "shape":
            entry["shape"] = rng.choice(
                [[0, 2**62, 2**62], [2**63], list(reversed(entry["shape"])), [], [1] + entry["shape"]]
            )
        elif field == "data_offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[a, b + 2], [a + 1, b], [b, a], [0, b - a]])
        else:
            entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64"])
    if rng.random() < 0.3:
        header.setdefault("__metadata__", {})[rng.choice(names or ["x"])] = rng.choice(names or ["y"])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


# --- hostile files: the red team's classes ------------------------------------------------------


def zip_pt(pkl: bytes, extra: tuple = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        for name, data in extra:
            zf.writestr(name, data)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def dag_body(leaf: Any, levels: int = 64) -> bytes:
    """A protocol-2 pickle body (no PROTO, no STOP) of T_k = (T_{k-1}, T_{k-1}): 2^levels leaves."""
    node = leaf
    for _ in range(levels):
        node = (node, node)
    return pickletools.optimize(pickle.dumps(node, 2))[2:-1]


def hostile_cases(directory: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes) for each hostile class of issue 13."""
    import h5py
    import numpy as np
    import torch

    cases: dict[str, tuple[str, bytes]] = {}

    def saved(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    cases["tuple DAG dict key"] = (".pt", zip_pt(b"\x80\x02}" + dag_body(None) + b"K\x01s."))
    lists: Any = None
    for _ in range(64):
        lists = [lists, lists]
    cases["list DAG"] = (".pt", zip_pt(pickle.dumps({"a": lists}, 2)))
    cases["set of tuple DAGs"] = (".pt", zip_pt(b"\x80\x02cbuiltins\nset\n]" + dag_body("x") + b"a\x85R."))
    cases["frozenset opcode of tuple DAG"] = (".pt", zip_pt(b"\x80\x04(" + dag_body(None) + b"\x91."))
    cases["stride 0 view"] = (".pt", saved({"w": torch.ones(1).expand(750_000_000)}))
    cases["overlapping strides"] = (".pt", saved({"w": torch.ones(55000).as_strided((30000, 25000), (1, 1))}))
    cases["modest stride 0 view"] = (".pt", saved({"w": torch.arange(4.0).expand(16, 4)}))
    big = (1 << 30).to_bytes(4, "little")
    cases["bytearray of a count"] = (
        ".pt",
        zip_pt(b"\x80\x02}X\x01\x00\x00\x00acbuiltins\nbytearray\nJ" + big + b"\x85Rs."),
    )

    class Shadowed:
        def __reduce__(self):
            nan = torch.full((2,), float("nan"))
            return (collections.OrderedDict, (), {"items": 0}, None, iter([("w", nan)]))

    cases["OrderedDict state shadowing items"] = (".pt", saved(Shadowed()))

    class Record:
        """A tensor record of any size and stride, as torch.save would write one."""

        def __init__(self, size: tuple, stride: tuple):
            self.size, self.stride = size, stride

        def __reduce__(self):
            storage = torch.ones(1)._typed_storage()
            args = (storage, 0, self.size, self.stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)

    cases["6000-digit dimension"] = (".pt", saved({"w": Record((10**6000,), (1,))}))
    cases["4000-digit dimension"] = (".pt", saved({"w": Record((10**4000,), (1,))}))
    cases["zero-size [0, 2**62, 2**62] (pt)"] = (".pt", saved({"w": Record((0, 2**62, 2**62), (1, 1, 1))}))

    good = saved({"w": torch.zeros(4), "b": torch.ones(2)})
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for name, data in members:
            out.writestr(name, data)
            if name.endswith("/data/0"):  # a second member of that name
                with warnings.catch_warnings(action="ignore"):
                    out.writestr(name, np.full(4, np.nan, "<f4").tobytes())
    cases["duplicate zip member"] = (".pt", buf.getvalue())

    deflated = io.BytesIO()
    plain = io.BytesIO(saved({"w": torch.zeros(16 << 20), "b": torch.ones(3)}))
    with zipfile.ZipFile(plain) as zf, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for info in zf.infolist():
            out.writestr(info.filename, zf.read(info))
    cases["deflated 64 MiB storage"] = (".pt", deflated.getvalue())
    cases["lazy negation bit"] = (".pt", saved({"b": torch.tensor([1.0, -2.0])._neg_view()}))
    cases["pickled module"] = (".pt", saved({"model": torch.nn.Linear(2, 2)}))
    hidden = argparse.Namespace(w=torch.full((2,), float("nan")))
    marked = bytearray(good)  # a storage member whose central directory entry says "directory"
    entry = marked.find(b"PK\x01\x02")
    while not marked[entry + 46 : entry + 46 + 30].startswith(b"archive/data/0"):
        entry = marked.find(b"PK\x01\x02", entry + 4)
    marked[entry + 38] |= 0x10  # the low byte of the external attributes: MS-DOS directory
    cases["zip member marked as a directory"] = (".pt", bytes(marked))
    cases["tensor inside an opaque object"] = (".pt", saved({"hp": hidden}))

    header = json.dumps({"w": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}).encode()
    cases["safetensors zero-size [0, 2**62, 2**62]"] = (".safetensors", struct.pack("<Q", len(header)) + header)
    header = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 6000 + b'], "data_offsets": [0, 0]}}'
    cases["safetensors 6000-digit dimension"] = (".safetensors", struct.pack("<Q", len(header)) + header)
    entry = b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = b"{" + entry + b", " + entry + b"}"
    cases["safetensors duplicate key"] = (".safetensors", struct.pack("<Q", len(header)) + header + bytes(4))

    def h5(name: str, build) -> None:
        path = directory / f"{len(cases)}.h5"
        with h5py.File(path, "w") as f:
            build(f)
        cases[name] = (".h5", path.read_bytes())

    h5("HDF5 fill-value-only 30000x30000", lambda f: f.create_dataset("w", (30000, 30000), "f4", chunks=(1000, 1000)))
    zeros = np.zeros((2048, 4096), "f4")
    h5(
        "HDF5 compressed zeros (32 MiB)",
        lambda f: f.create_dataset("w", data=zeros, chunks=(256, 4096), compression="gzip"),
    )
    h5(
        "HDF5 attribute of shape (2**40, 0)",
        lambda f: (f.attrs.create("a", data=np.empty((2**40, 0), "f4")), f.create_dataset("w", data=np.ones(2, "f4"))),
    )
    (directory / "values.bin").write_bytes(np.arange(4, dtype="<f4").tobytes())
    h5(
        "HDF5 external storage",
        lambda f: f.create_dataset("w", (4,), "f4", external=[(str(directory / "values.bin"), 0, 16)]),
    )

    def virtual(f) -> None:
        f["plain"] = np.arange(6.0)
        layout = h5py.VirtualLayout((6,), "f8")
        layout[:] = h5py.VirtualSource(".", "plain", shape=(6,))
        f.create_virtual_dataset("v", layout)

    h5("HDF5 virtual dataset", virtual)
    h5(
        "HDF5 external link to /etc/passwd",
        lambda f: (
            f.create_dataset("w", data=np.ones(2, "f4")),
            f.__setitem__("x", h5py.ExternalLink("/etc/passwd", "/x")),
        ),
    )
    return cases


def hostile_keras(directory: Path) -> dict[str, tuple[str, bytes]]:
    """Archives that writers must not amplify or carry: a deflated 64 MiB asset, a zip-slip name."""
    import h5py
    import numpy as np

    weights = directory / "hk.h5"
    with h5py.File(weights, "w") as f:
        f["layers/dense/vars/0"] = np.ones((2, 2), "f4")
    out: dict[str, tuple[str, bytes]] = {}
    for name, member in [("keras deflated 64 MiB asset", "assets/big.bin"), ("keras zip-slip member", "../../zipslip")]:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("metadata.json", "{}")
            zf.writestr("config.json", "{}")
            zf.write(weights, "model.weights.h5")
            zf.writestr(member, bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
        out[name] = (".keras", buf.getvalue())
    return out


def generated_cases(directory: Path, count: int) -> list[tuple[str, str, bytes]]:
    """(kind, extension, bytes) for COUNT seeded cases: valid files and mutations of them."""
    rng = random.Random(SEED)
    makers = {
        "pt": (".pt", lambda: pt_file(rng)),
        "pt-legacy": (".pt", lambda: pt_file(rng, legacy=True)),
        "safetensors": (".safetensors", lambda: safetensors_file(rng)),
        "h5": (".h5", lambda: h5_bytes(rng, directory, legacy=True)),
        "weights.h5": (".weights.h5", lambda: h5_bytes(rng, directory)),
        "keras": (".keras", lambda: keras_file(rng, directory)),
    }
    cases = []
    for i in range(count):
        kind = list(makers)[i % len(makers)]
        ext, make = makers[kind]
        data = make()
        roll = rng.random()
        if roll < 0.3:
            label = "valid"
        elif kind == "pt" and roll < 0.7:
            data, label = mutate_zip_members(rng, data), "member"
        elif kind == "safetensors" and roll < 0.7:
            data, label = mutate_safetensors_header(rng, data), "header"
        else:
            data, label = mutate_bytes(rng, data), "bytes"
        cases.append((f"{kind}/{label}", ext, data))
    return cases


def h5_bytes(rng: random.Random, directory: Path, legacy: bool = False) -> bytes:
    path = directory / "gen.h5"
    h5_file(rng, path, legacy)
    data = path.read_bytes()
    path.unlink()
    return data


# --- the workers --------------------------------------------------------------------------------


def digest(raw: bytes | memoryview) -> str:
    return hashlib.blake2b(bytes(raw), digest_size=12).hexdigest()


def streamed_digest(t: Any) -> str:
    """digest(t.tobytes()), computed chunk by chunk as `stats` reads (never the tensor whole)."""
    h = hashlib.blake2b(digest_size=12)
    for chunk in t.chunks():
        h.update(chunk.tobytes())
    return h.hexdigest()


def paramctl_worker(cases: list[dict]) -> None:
    """Run each case through paramctl (library and CLI) and print one JSON line per case."""
    import resource

    from click.testing import CliRunner

    import paramctl
    from paramctl.cli import cli
    from paramctl.errors import ParamctlError

    runner = CliRunner()
    env = {"PARAMCTL_TTY": "0", "COLUMNS": "200"}

    def peak() -> int:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return max(own, children) * 1024

    # a warm-up so that imports and first-use caches count in the baseline, not against a case
    paramctl.load(str(TESTS.parent / "sample_checkpoints" / "mlp.h5"))
    runner.invoke(cli, ["stats", str(TESTS.parent / "sample_checkpoints" / "mlp.safetensors")], env=env)
    baseline = peak()
    for case in cases:
        print(json.dumps({"begin": case["id"]}), flush=True)
        path = case["path"]
        before = hashlib.blake2b(Path(path).read_bytes()).hexdigest()
        result: dict[str, Any] = {"id": case["id"]}
        try:
            ckpt = paramctl.load(path)
            result["rows"] = [
                [t.name, list(t.shape), t.dtype, streamed_digest(t), t.attrs.get("alias_of")] for t in ckpt
            ]
            result["outcome"] = "table"
        except ParamctlError as e:
            result["outcome"] = "refused"
            result["error"] = str(e)
            result["problems"] = ["multi-line error"] if "\n" in str(e) else []
        except Exception as e:  # noqa: BLE001 - what the test exists to catch
            result["outcome"] = "exception"
            result["error"] = f"{type(e).__name__}: {e}"[:500]
        problems = result.setdefault("problems", [])
        out = Path(path).with_name(f"out-{case['id']}{case['convert_to']}")
        for args in (["ls", path], ["info", path], ["stats", path], ["check", path], ["convert", path, str(out)]):
            r = runner.invoke(cli, args, env=env)
            stderr = r.stderr
            if r.exit_code not in (0, 1, 2) or r.exception and not isinstance(r.exception, SystemExit):
                problems.append(f"{args[0]}: exit {r.exit_code} {r.exception!r:.200}")
            if "internal error" in stderr or "Traceback" in stderr:
                problems.append(f"{args[0]}: {stderr.strip()[:300]}")
            if r.exit_code == 2 and len(stderr.strip().splitlines()) != 1:
                problems.append(f"{args[0]}: an error of {len(stderr.splitlines())} lines")
            deadline = "did not finish" in result.get("error", "")  # the library's read ran out of time
            reads_values = args[0] in ("stats", "check", "convert")  # (ls and info read headers only)
            if r.exit_code == 0 and result["outcome"] != "table" and reads_values and not deadline:
                problems.append(f"{args[0]}: exit 0 on a file the library refused")
            if args[0] == "check" and r.exit_code == 0 and result["outcome"] == "table":
                result["check"] = 0
            if args[0] == "convert":
                if r.exit_code == 2 and out.exists():
                    problems.append("convert failed but left its output")
                if r.exit_code == 0:
                    try:
                        back = paramctl.load(str(out))
                        want = {row[0]: row[1:4] for row in result.get("rows", [])}
                        got = {t.name: [list(t.shape), t.dtype, streamed_digest(t)] for t in back}
                        if got != want:
                            problems.append("convert's output reads back differently")
                    except ParamctlError as e:
                        problems.append(f"convert's output does not read back: {e}")
                    result["converted_size"] = out.stat().st_size
                    out.unlink()
        if hashlib.blake2b(Path(path).read_bytes()).hexdigest() != before:
            problems.append("the input was modified")
        leftovers = [p.name for p in Path(path).parent.iterdir() if p.name.endswith(".paramctl-tmp")]
        if leftovers:
            problems.append(f"temporary files left: {leftovers}")
        result["peak"] = peak() - baseline
        print(json.dumps(result), flush=True)


# hostile cases the reference is not run on: torch.load hashes the DAG for ever (seen once, and
# cut by the hang guard; not worth 8 s a run)
REFERENCE_HANGS = ("tuple DAG dict key", "set of tuple DAGs", "list DAG")


def reference_worker(cases: list[dict]) -> None:
    """Read each case with the framework's own safe loader; one JSON line per case."""
    import h5py  # noqa: F401 - imported before the first case: imports are not the case's time
    import torch  # noqa: F401

    for case in cases:
        print(json.dumps({"begin": case["id"]}), flush=True)
        if case["kind"].endswith(REFERENCE_HANGS):
            print(json.dumps({"id": case["id"], "outcome": "hung"}), flush=True)
            continue
        try:
            rows = reference_rows(case["path"], case["kind"])
            result = {"id": case["id"], "outcome": "table", "rows": rows}
        except Exception as e:  # noqa: BLE001 - any failure is the reference refusing the file
            result = {"id": case["id"], "outcome": "refused", "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(result), flush=True)


MAX_COMPARED = 1 << 26  # elements: a larger tensor (a stride 0 view of 750 M) is not compared


def torch_bytes(t) -> bytes:
    import torch

    if t.numel() > MAX_COMPARED:
        raise ValueError(f"a tensor of {t.numel()} elements: not compared")
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes() if t.numel() else b""


TORCH_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}


def reference_rows(path: str, kind: str) -> list[list]:
    if kind.startswith("pt"):
        import numpy as np
        import torch

        obj = torch.load(path, weights_only=True, map_location="cpu")
        rows: list[list] = []

        def walk(node: Any, keys: tuple) -> None:
            if isinstance(node, np.ndarray):
                node = torch.from_numpy(node)
            if isinstance(node, torch.Tensor):
                name = ".".join(map(str, keys)) or "tensor"
                rows.append([name, list(node.shape), str(node.dtype).removeprefix("torch."), digest(torch_bytes(node))])
            elif isinstance(node, dict):
                for k, v in node.items():
                    walk(v, (*keys, k))
            elif isinstance(node, (list, tuple)):
                for i, v in enumerate(node):
                    walk(v, (*keys, i))

        walk(obj, ())
        return rows
    if kind.startswith("safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return [
                [
                    k,
                    list(f.get_slice(k).get_shape()),
                    str(f.get_tensor(k).dtype).removeprefix("torch."),
                    digest(torch_bytes(f.get_tensor(k))),
                ]
                for k in f.keys()  # noqa: SIM118 - safe_open has keys(), not iteration
            ]
    import h5py

    if kind.startswith("keras"):
        with zipfile.ZipFile(path) as zf:
            if len({i.filename for i in zf.infolist()}) != len(zf.infolist()):
                raise ValueError("duplicate members")
            source: Any = io.BytesIO(zf.read("model.weights.h5"))
    else:
        source = path
    with h5py.File(source, "r") as f:
        return h5_rows(f)


def h5_rows(f) -> list[list]:
    """h5py's view of a Keras file as paramctl names it: every numeric dataset (and tagged opaque
    bf16/float8) by path, through hard links (a second name of a dataset is a row too)."""
    import h5py
    import ml_dtypes
    import numpy as np

    rows: list[list] = []
    seen: set = set()
    stack = [("", f["/"])]
    while stack:
        prefix, group = stack.pop()
        for name in group:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise ValueError("an external link")  # paramctl does not follow them: compare nothing
            if not isinstance(link, h5py.HardLink):
                continue
            item = group[name]
            path = prefix + name
            address = h5py.h5o.get_info(item.id).addr
            if isinstance(item, h5py.Group):
                if address not in seen:
                    seen.add(address)
                    stack.append((path + "/", item))
                continue
            if not isinstance(item, h5py.Dataset) or item.shape is None:
                continue
            if item.is_virtual or item.external:
                raise ValueError("values in another file")
            if item.size > MAX_COMPARED:
                raise ValueError(f"a dataset of {item.size} elements: not compared")
            dt = item.dtype
            if dt.kind == "V" and dt.names is None and dt.subdtype is None:
                tag = item.attrs.get("dtype")
                tag = tag.decode() if isinstance(tag, bytes) else tag
                if tag != "bfloat16" or dt.itemsize != 2:
                    continue
                values = item[()].view(ml_dtypes.bfloat16)
                name_dtype = "bfloat16"
            elif dt.kind in "biuf":
                values = np.asarray(item[()])
                name_dtype = "bool" if dt.kind == "b" else dt.newbyteorder("<").name
            else:
                continue
            values = values.astype(values.dtype.newbyteorder("<"), copy=False)
            rows.append([path, list(item.shape), name_dtype, digest(values.tobytes())])
    return rows


def run_worker(which: str, cases: list[dict], seconds: float) -> dict[str, dict]:
    """Run WHICH worker over CASES with the hang guard: a case that takes longer than SECONDS
    is killed, recorded as hung, and the worker restarted after it."""
    results: dict[str, dict] = {}
    pending = list(cases)
    while pending:
        spec = json.dumps(pending)
        env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=str(TESTS))
        code = f"import sys, json, test_differential as d; d.{which}_worker(json.loads(sys.stdin.read()))"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(spec.encode())
        proc.stdin.close()
        current = None
        began = time.monotonic()
        deadline = [time.monotonic() + 60]  # imports and the warm-up, then per case
        for line in lines(proc.stdout.fileno(), deadline):
            if line is None:  # the case did not finish in time
                proc.kill()
                hung = current or pending[0]["id"]
                results[hung] = {"id": hung, "outcome": "hung"}
                current = None
                break
            message = json.loads(line)
            if "begin" in message:
                current = message["begin"]
                deadline[0] = time.monotonic() + seconds
                began = time.monotonic()
            else:
                message["seconds"] = time.monotonic() - began
                results[message["id"]] = message
                current = None
        proc.wait()
        proc.stdout.close()
        if current is not None:  # the worker died in a case (a crash, the OOM killer)
            results[current] = {"id": current, "outcome": "crashed", "code": proc.returncode}
        pending = [c for c in pending if c["id"] not in results]
    return results


def lines(fd: int, deadline: list[float]) -> Any:
    """The lines written to FD, or None once DEADLINE[0] passes before the next one ends (read
    unbuffered: a buffered reader could hold a finished line that select() no longer sees)."""
    pending = b""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline[0] - time.monotonic()))
        if not ready:
            yield None
            return
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        pending += chunk


# --- the comparison -----------------------------------------------------------------------------


def verdict(case: dict, ours: dict, theirs: dict) -> tuple[str, list[str]]:
    """(category, problems): problems empty unless agree-or-refuse or a bound is broken."""
    problems = list(ours.get("problems", []))
    outcome = ours.get("outcome")
    if outcome in ("hung", "crashed"):
        problems.append(f"paramctl {outcome}")
    if outcome == "exception":
        problems.append(f"an internal error: {ours.get('error')}")
    if ours.get("peak", 0) > case["size"] + RSS_ALLOWANCE:
        problems.append(f"peak memory grew by {ours['peak']} bytes on a {case['size']}-byte file")
    if outcome == "table" and theirs.get("outcome") == "table":
        mine = [r for r in ours["rows"] if not r[4]]  # paramctl's declared-alias rows: extra names
        aliases = [r for r in ours["rows"] if r[4]]
        if not case["kind"].startswith("pt"):  # file order: h5py's and safe_open's differ from Keras's listing
            same = sorted(r[:4] for r in mine) == sorted(theirs["rows"])
        else:
            same = [r[:4] for r in mine] == theirs["rows"]
        by_name = {r[0]: r for r in mine}
        if not same or any(by_name.get(a[4], [None] * 4)[1:4] != a[1:4] for a in aliases):
            problems.append(f"rows differ: paramctl {ours['rows']!r:.600} vs reference {theirs['rows']!r:.600}")
        category = "agree"
    elif outcome == "table":
        category = "reference refused"
    elif outcome == "refused":
        category = "paramctl refused" if theirs.get("outcome") == "table" else "both refused"
    else:
        category = outcome or "missing"
    return category, problems


def run_cases(tmp_path: Path, label: str, cases: list[tuple[str, str, bytes]]) -> list[str]:
    specs = []
    for i, (kind, ext, data) in enumerate(cases):
        directory = tmp_path / f"c{i}"
        directory.mkdir()
        path = directory / f"case{ext}"
        path.write_bytes(data)
        convert_to = ext if ext in (".h5", ".weights.h5", ".keras") else ".safetensors"  # (a Keras layout is kept)
        specs.append({"id": str(i), "kind": kind, "path": str(path), "size": len(data), "convert_to": convert_to})
    ours = run_worker("paramctl", specs, CASE_SECONDS)
    theirs = run_worker("reference", specs, REFERENCE_SECONDS)
    failures = []
    counts = OUTCOMES.setdefault(label, Counter())
    for spec in specs:
        category, problems = verdict(spec, ours.get(spec["id"], {}), theirs.get(spec["id"], {}))
        counts[category] += 1
        counts["cases"] += 1
        counts["bound or agreement failures"] += bool(problems)
        if problems:
            failures.append(f"{spec['kind']} case {spec['id']} ({spec['path']}): {'; '.join(problems)}")
    return failures


def test_generated_and_mutated_files_agree_or_refuse(tmp_path):
    import torch  # noqa: F401 - the generators use it

    cases = generated_cases(tmp_path, 240 * SCALE)
    failures = run_cases(tmp_path, "generated", cases)
    assert not failures, "\n".join(failures[:20])
    counts = OUTCOMES["generated"]
    assert counts["agree"] > 50 and counts["both refused"] > 20  # the cases reach both outcomes


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[str, bytes]]:
    directory = tmp_path_factory.mktemp("hostile-src")
    return {**hostile_cases(directory), **hostile_keras(directory)}


def test_hostile_classes_are_bounded_and_agree_or_refuse(tmp_path, hostile):
    kinds = {".pt": "pt", ".safetensors": "safetensors", ".h5": "h5", ".keras": "keras"}
    names = sorted(hostile)
    cases = [(f"{kinds[hostile[n][0]]}/{n}", hostile[n][0], hostile[n][1]) for n in names]
    failures = run_cases(tmp_path, "hostile", cases)
    assert not failures, "\n".join(failures)
