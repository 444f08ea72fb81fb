"""Benchmarks: paramctl against what a user would otherwise run, alternated in one process.

    make bench                      # or: .venv/bin/python bench/bench.py [--runs 5] [--size-mb 1024]
    .venv/bin/python bench/bench.py --only stats,ls

Fixtures are built once into bench/_fixtures/ (in a child process, so that this one stays
small): a GPT-like fp32 checkpoint of about --size-mb as .safetensors, .pt and Keras
.weights.h5; a 1 MB safetensors file; and a sparse "100 GB" safetensors file (a real header,
then `truncate`: no disk is spent). Each workload runs paramctl and its anchor as separate
processes, alternating, and prints medians, the ratio paramctl / anchor, the target, and the
peak RSS of each (from wait4). These machines are noisy: read the ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "_fixtures"
PYTHON = sys.executable
PARAMCTL = [PYTHON, "-m", "paramctl"]
SPARSE_TENSORS = 400

# the scripts a user writes today, with the real libraries
NAIVE_STATS = """
import sys, torch
path = sys.argv[1]
if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    sd = load_file(path)
else:
    sd = torch.load(path, weights_only=True)
for name, t in sd.items():
    x = t.float()
    print(name, x.mean().item(), x.std().item(), x.min().item(), x.max().item(), x.norm().item(),
          x.isnan().sum().item())
"""
SAFE_OPEN_LS = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "np") as f:
    for k in f.keys():
        s = f.get_slice(k)
        print(k, s.get_shape(), s.get_dtype())
"""
TORCH_LS = """
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
for k, v in sd.items():
    print(k, tuple(v.shape), v.dtype)
"""
H5PY_LS = """
import sys, h5py
def show(name, obj):
    if isinstance(obj, h5py.Dataset):
        print(name, obj.shape, obj.dtype)
with h5py.File(sys.argv[1], "r") as f:
    f.visititems(show)
"""
TORCH_CONVERT = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])
"""
# one pass of numpy over the same bytes, in bounded chunks: the memory-bandwidth floor
NUMPY_PASS = """
import sys, numpy as np
buf = bytearray(64 << 20)
total = 0.0
with open(sys.argv[1], "rb") as f:
    while n := f.readinto(buf):
        total += float(np.frombuffer(memoryview(buf)[: n - n % 4], np.float32).sum(dtype=np.float64))
print(total)
"""


def build_fixtures(size_mb: int) -> dict[str, Path]:
    """A GPT-like stack of fp32 tensors: embeddings, then per layer attention, MLP and norms."""
    FIXTURES.mkdir(exist_ok=True)
    paths = {
        "safetensors": FIXTURES / f"model-{size_mb}mb.safetensors",
        "pt": FIXTURES / f"model-{size_mb}mb.pt",
        "h5": FIXTURES / f"model-{size_mb}mb.weights.h5",
        "edited": FIXTURES / f"model-{size_mb}mb-edited.safetensors",
        "small": FIXTURES / "small-1mb.safetensors",
        "sparse": FIXTURES / "sparse-100gb.safetensors",
    }
    if not paths["small"].exists() or not paths["sparse"].exists():
        import numpy as np
        from safetensors.numpy import save_file as save_numpy

        # the same number of tensors in both: what differs is only the size of the data behind them
        save_numpy({f"layers.{i}.weight": np.zeros(640, np.float32) for i in range(SPARSE_TENSORS)}, paths["small"])
        write_sparse(paths["sparse"], 100 << 30)
    if all(p.exists() for p in paths.values()):
        return paths
    import h5py
    import torch
    from safetensors.torch import save_file

    d = 1024
    per_layer = 12 * d * d
    layers = max(1, (size_mb * 2**20 // 4 - 2 * 8192 * d) // per_layer)
    gen = torch.Generator().manual_seed(0)
    sd = {"wte.weight": torch.randn(8192, d, generator=gen), "wpe.weight": torch.randn(8192, d, generator=gen)}
    for i in range(layers):
        p = f"h.{i}."
        sd[p + "ln_1.weight"] = torch.ones(d)
        sd[p + "ln_1.bias"] = torch.zeros(d)
        sd[p + "attn.c_attn.weight"] = torch.randn(3 * d, d, generator=gen) * 0.02
        sd[p + "attn.c_attn.bias"] = torch.zeros(3 * d)
        sd[p + "attn.c_proj.weight"] = torch.randn(d, d, generator=gen) * 0.02
        sd[p + "attn.c_proj.bias"] = torch.zeros(d)
        sd[p + "ln_2.weight"] = torch.ones(d)
        sd[p + "ln_2.bias"] = torch.zeros(d)
        sd[p + "mlp.c_fc.weight"] = torch.randn(4 * d, d, generator=gen) * 0.02
        sd[p + "mlp.c_fc.bias"] = torch.zeros(4 * d)
        sd[p + "mlp.c_proj.weight"] = torch.randn(d, 4 * d, generator=gen) * 0.02
        sd[p + "mlp.c_proj.bias"] = torch.zeros(d)
    sd["ln_f.weight"] = torch.ones(d)
    sd["ln_f.bias"] = torch.zeros(d)
    save_file(sd, paths["safetensors"])
    torch.save(sd, paths["pt"])
    with h5py.File(paths["h5"], "w") as f:  # Keras 3 layout: layers/<layer>/vars/<i>
        for i, (name, t) in enumerate(sd.items()):
            f[f"layers/{name.rsplit('.', 1)[0].replace('.', '_')}/vars/{i}"] = t.numpy().T
    edited = dict(sd)
    for name in list(edited)[5::40]:  # a fine-tuning step touched a few tensors
        edited[name] = edited[name] + 1e-3
    save_file(edited, paths["edited"])
    return paths


def write_sparse(path: Path, size: int) -> None:
    """A valid safetensors header describing SIZE bytes of tensors; the data is a hole."""
    header, offset = {}, 0
    block = size // SPARSE_TENSORS
    for i in range(SPARSE_TENSORS):
        header[f"layers.{i}.weight"] = {"dtype": "U8", "shape": [block], "data_offsets": [offset, offset + block]}
        offset += block
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


# cast: the one-liner a user writes with safetensors and ml_dtypes (each tensor whole in memory)
ML_DTYPES_CAST = """
import sys, ml_dtypes
from safetensors import safe_open
from safetensors.numpy import save_file
with safe_open(sys.argv[1], "np") as f:
    save_file({k: f.get_tensor(k).astype(ml_dtypes.bfloat16) for k in f.keys()}, sys.argv[2])
"""


def measure(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of ARGV, output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):  # 1: diff found differences
        assert proc.stderr is not None
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss * 1024


@dataclass
class Workload:
    name: str
    ours: list[str]
    anchor: list[str]
    anchor_name: str
    target: float  # ratio paramctl / anchor to stay at or below
    max_rss_mib: float | None = None  # paramctl's peak RSS to stay at or below, where that is a target


def workloads(p: dict[str, Path], tmp: Path) -> list[Workload]:
    st, pt, h5 = str(p["safetensors"]), str(p["pt"]), str(p["h5"])
    return [
        Workload("ls .safetensors", PARAMCTL + ["ls", st], [PYTHON, "-c", SAFE_OPEN_LS, st], "safe_open", 1.0),
        Workload("ls .pt", PARAMCTL + ["ls", pt], [PYTHON, "-c", TORCH_LS, pt], "torch.load mmap", 0.15),
        Workload("ls .weights.h5", PARAMCTL + ["ls", h5], [PYTHON, "-c", H5PY_LS, h5], "h5py visititems", 1.0),
        Workload(
            "ls 100 GB sparse", PARAMCTL + ["ls", str(p["sparse"])], PARAMCTL + ["ls", str(p["small"])], "ls 1 MB", 1.2
        ),
        Workload("stats .safetensors", PARAMCTL + ["stats", st], [PYTHON, "-c", NAIVE_STATS, st], "torch script", 0.30),
        Workload("stats .safetensors", PARAMCTL + ["stats", st], [PYTHON, "-c", NUMPY_PASS, st], "numpy pass", 3.0),
        Workload("stats .pt", PARAMCTL + ["stats", pt], [PYTHON, "-c", NAIVE_STATS, pt], "torch script", 0.30),
        Workload(
            "convert .pt->safetensors",
            PARAMCTL + ["convert", pt, str(tmp / "ours.safetensors")],
            [PYTHON, "-c", TORCH_CONVERT, pt, str(tmp / "theirs.safetensors")],
            "torch.load+save_file",
            1.0,
        ),
        Workload(
            "tied --by-value", PARAMCTL + ["tied", st, "--by-value"], [PYTHON, "-c", NUMPY_PASS, st], "numpy pass", 2.0
        ),
        Workload("diff", PARAMCTL + ["diff", st, str(p["edited"])], [PYTHON, "-c", NUMPY_PASS, st], "numpy pass", 2.0),
        Workload(
            "cast .safetensors->bf16",
            PARAMCTL + ["cast", st, "--dtype", "bfloat16", "-o", str(tmp / "ours.bf16.safetensors")],
            [PYTHON, "-c", ML_DTYPES_CAST, st, str(tmp / "theirs.bf16.safetensors")],
            "safetensors+ml_dtypes",
            1.0,
        ),
        Workload("--help", PARAMCTL + ["--help"], [PYTHON, "-c", "pass"], "python -c pass", 10.0),
    ]


# TensorFlow checkpoints: paramctl's listing against TensorFlow's own, in TensorFlow's environment
# (.venv-tf, built by `make test`); the checkpoint is written there by tf.train.Checkpoint, once
TF_PYTHON = HERE.parent / ".venv-tf" / "bin" / "python"
TF_LIST = "import sys, tensorflow as tf; print(tf.train.list_variables(sys.argv[1]))"
TF_WRITE = """
import sys, tensorflow as tf
size_mb, prefix, d = int(sys.argv[1]), sys.argv[2], 1024
shapes = {"wte": (8192, d), "wpe": (8192, d)}
for i in range(max(1, (size_mb * 2**20 // 4 - 2 * 8192 * d) // (12 * d * d))):
    shapes.update({f"h{i}_attn_c_attn": (d, 3 * d), f"h{i}_attn_c_proj": (d, d), f"h{i}_mlp_c_fc": (d, 4 * d)})
    shapes.update({f"h{i}_mlp_c_proj": (4 * d, d), f"h{i}_ln_1_gamma": (d,), f"h{i}_ln_1_beta": (d,)})
    shapes.update({f"h{i}_attn_c_attn_bias": (3 * d,), f"h{i}_mlp_c_fc_bias": (4 * d,)})
variables = {name: tf.Variable(tf.random.normal(shape, stddev=0.02)) for name, shape in shapes.items()}
tf.train.Checkpoint(model=variables).write(prefix)
"""


def tf_workloads(size_mb: int) -> list[Workload]:
    """`ls` on a TensorFlow checkpoint of about SIZE_MB against tf.train.list_variables (none without .venv-tf)."""
    if not TF_PYTHON.exists():
        print("no .venv-tf: skipping the TensorFlow checkpoint workload (make .venv-tf/.installed)")
        return []
    prefix = FIXTURES / f"model-{size_mb}mb-tf" / "ckpt"
    if not Path(f"{prefix}.index").exists():
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([str(TF_PYTHON), "-c", TF_WRITE, str(size_mb), str(prefix)], check=True, env=env)
    anchor = [str(TF_PYTHON), "-c", TF_LIST, str(prefix)]
    return [Workload("ls TF checkpoint", PARAMCTL + ["ls", str(prefix)], anchor, "tf.list_variables", 0.1)]


# torch.distributed.checkpoint: paramctl reads the DCP directory itself; a user converts it first
# with dcp_to_torch_save, then lists (or computes on) the .pt. The directory is written once by
# dcp.save from the .pt fixture.
DCP_WRITE = """
import sys, warnings, torch, torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")
dcp.save(torch.load(sys.argv[1], weights_only=True), checkpoint_id=sys.argv[2])
"""
DCP_CONVERT = """
import os, sys, tempfile, warnings, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
warnings.simplefilter("ignore")
with tempfile.TemporaryDirectory() as tmp:
    dcp_to_torch_save(sys.argv[1], os.path.join(tmp, "model.pt"))
    for k, v in torch.load(os.path.join(tmp, "model.pt"), mmap=True, weights_only=True).items():
        print(k, tuple(v.shape), v.dtype) if sys.argv[2] == "ls" else print(k, v.float().mean().item())
"""


def dcp_workloads(p: dict[str, Path]) -> list[Workload]:
    """`ls` and `stats` on a DCP directory of the fixture against dcp_to_torch_save plus the same on the .pt."""
    directory = FIXTURES / (p["pt"].stem + "-dcp")
    if not (directory / ".metadata").exists():
        subprocess.run([PYTHON, "-c", DCP_WRITE, str(p["pt"]), str(directory)], check=True)
    d = str(directory)
    return [
        Workload("ls DCP", PARAMCTL + ["ls", d], [PYTHON, "-c", DCP_CONVERT, d, "ls"], "dcp_to_torch_save+ls", 0.15),
        Workload(
            "stats DCP", PARAMCTL + ["stats", d], [PYTHON, "-c", DCP_CONVERT, d, "stats"], "dcp_to_torch_save+mean", 1.0
        ),
    ]


# GGUF: paramctl's listing against llama.cpp's own gguf-dump, on a llama-like file (a 32,000-token
# vocabulary in its metadata, Q8_0 and F32 tensors) written once by gguf.GGUFWriter
GGUF_WRITE = """
import sys, numpy as np, gguf
from gguf import GGMLQuantizationType as Q, quants
w = gguf.GGUFWriter(sys.argv[1], "llama")
w.add_block_count(16); w.add_context_length(4096); w.add_embedding_length(512)
w.add_token_list([f"token{i}" for i in range(32000)])
rng = np.random.default_rng(0)
embd = rng.standard_normal((32000, 512)).astype(np.float32)
w.add_tensor("token_embd.weight", quants.quantize(embd, Q.Q8_0), raw_dtype=Q.Q8_0)
for i in range(16):
    for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down", "ffn_gate"):
        x = rng.standard_normal((512, 512)).astype(np.float32)
        w.add_tensor(f"blk.{i}.{part}.weight", quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(512, np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


def gguf_workloads() -> list[Workload]:
    path = FIXTURES / "llama-q8_0.gguf"
    if not path.exists():
        subprocess.run([PYTHON, "-c", GGUF_WRITE, str(path)], check=True)
    dump = [str(Path(PYTHON).parent / "gguf-dump"), str(path)]
    return [Workload("ls GGUF", PARAMCTL + ["ls", str(path)], dump, "gguf-dump", 1.0)]


# a 100 GB sparse sharded safetensors set (20 shards of 5 GB, headers real, data holes) served over
# loopback HTTP by a threaded server that honours Range and logs every request and byte it sends
SHARDS = 20
RANGE_SERVER = """
import json, os, re, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
root, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self, head):
        path = os.path.join(root, self.path.lstrip("/"))
        size = os.path.getsize(path)
        m = re.fullmatch(r"bytes=(\\d+)-(\\d*)", self.headers.get("Range") or "")
        start, end = (int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)) if m else (0, size - 1)
        self.send_response(206 if m else 200)
        if m: self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1)); self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        sent = 0
        if not head:
            with open(path, "rb") as f:
                f.seek(start); data = f.read(end - start + 1); self.wfile.write(data); sent = len(data)
        log.write(json.dumps([self.command, self.path, sent]) + "\\n")
    def do_GET(self): self.answer(False)
    def do_HEAD(self): self.answer(True)
server = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_port, flush=True)
server.serve_forever()
"""


def sparse_sharded_set() -> Path:
    directory = FIXTURES / "sparse-100gb-sharded"
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return index
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    per_shard = SPARSE_TENSORS // SHARDS
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        header, offset, block = {}, 0, (100 << 30) // SPARSE_TENSORS
        for i in range(s * per_shard, (s + 1) * per_shard):
            header[f"layers.{i}.weight"] = {"dtype": "U8", "shape": [block], "data_offsets": [offset, offset + block]}
            weight_map[f"layers.{i}.weight"] = name
            offset += block
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    index.write_text(json.dumps({"metadata": {"total_size": 100 << 30}, "weight_map": weight_map}))
    return index


def remote_workloads(runs: int) -> tuple[list[Workload], subprocess.Popen, Path]:
    index = sparse_sharded_set()
    log = FIXTURES / f"range-server-{os.getpid()}.log"
    log.unlink(missing_ok=True)
    server = subprocess.Popen([PYTHON, "-c", RANGE_SERVER, str(index.parent), str(log)], stdout=subprocess.PIPE)
    assert server.stdout is not None
    url = f"http://127.0.0.1:{server.stdout.readline().decode().strip()}/{index.name}"
    local = PARAMCTL + ["ls", str(index)]
    return [Workload("ls 100 GB sharded, HTTP", PARAMCTL + ["ls", url], local, "local ls", 1.5)], server, log


def report_remote(log: Path, runs: int, index: Path) -> None:
    """Requests per shard and bytes fetched per listing, from the server's log."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    per_file: dict[str, int] = {}
    for _, path, _ in entries:
        per_file[path] = per_file.get(path, 0) + 1
    shards = [n for n in per_file if n != "/" + index.name]
    fetched = sum(sent for _, _, sent in entries) / runs
    total = sum(p.stat().st_size for p in index.parent.glob("*.safetensors"))
    print(
        f"  HTTP per listing: {per_file.get('/' + index.name, 0) / runs:.0f} request(s) for the index, at most "
        f"{max(per_file[n] for n in shards) / runs:.0f} per shard ({len(shards)} shards); "
        f"{fetched / 2**10:.0f} KiB fetched of {total / 2**30:.0f} GiB ({fetched / total:.1e})"
    )


# MXNet: paramctl's listing against nd.load + print in MXNet's environment (.venv-mx, built by
# `make test`); the .params file is written there by nd.save, once
MX_PYTHON = HERE.parent / ".venv-mx" / "bin" / "python"
MX_LIST = "import sys, mxnet as mx; d = mx.nd.load(sys.argv[1]); [print(k, v.shape, v.dtype) for k, v in d.items()]"
MX_WRITE = """
import sys, mxnet as mx
size_mb, path, d = int(sys.argv[1]), sys.argv[2], 1024
shapes = {"wte.weight": (8192, d), "wpe.weight": (8192, d)}
for i in range(max(1, (size_mb * 2**20 // 4 - 2 * 8192 * d) // (12 * d * d))):
    shapes.update({f"h.{i}.attn.c_attn.weight": (3 * d, d), f"h.{i}.attn.c_proj.weight": (d, d)})
    shapes.update({f"h.{i}.mlp.c_fc.weight": (4 * d, d), f"h.{i}.mlp.c_proj.weight": (d, 4 * d)})
    shapes.update({f"h.{i}.ln_1.gamma": (d,), f"h.{i}.ln_1.beta": (d,), f"h.{i}.mlp.c_fc.bias": (4 * d,)})
mx.nd.save(path, {name: mx.nd.random.normal(0, 0.02, shape) for name, shape in shapes.items()})
"""


def mx_workloads(size_mb: int) -> list[Workload]:
    """`ls` on an MXNet .params of about SIZE_MB against nd.load + print (none without .venv-mx)."""
    if not MX_PYTHON.exists():
        print("no .venv-mx: skipping the MXNet workload (make .venv-mx/.installed)")
        return []
    path = FIXTURES / f"model-{size_mb}mb.params"
    if not path.exists():
        subprocess.run([str(MX_PYTHON), "-c", MX_WRITE, str(size_mb), str(path)], check=True)
    anchor = [str(MX_PYTHON), "-c", MX_LIST, str(path)]
    return [Workload("ls MXNet .params", PARAMCTL + ["ls", str(path)], anchor, "mx.nd.load", 0.1)]


# merge: a linear merge (the mean) of two 1 GiB checkpoints, streamed, against the numpy one-liner
# that loads both with safe_open (2 GiB held) and writes the mean with save_file
NUMPY_MERGE = """
import sys
from safetensors import safe_open
from safetensors.numpy import save_file
with safe_open(sys.argv[1], "np") as fa, safe_open(sys.argv[2], "np") as fb:
    a, b = {k: fa.get_tensor(k) for k in fa.keys()}, {k: fb.get_tensor(k) for k in fb.keys()}
save_file({k: a[k] * 0.5 + b[k] * 0.5 for k in a}, sys.argv[3])
"""


def merge_workloads(p: dict[str, Path], tmp: Path) -> list[Workload]:
    st, edited = str(p["safetensors"]), str(p["edited"])
    return [
        Workload(
            "merge linear 2 x 1 GiB",
            PARAMCTL + ["merge", st, edited, "-o", str(tmp / "ours.merged.safetensors")],
            [PYTHON, "-c", NUMPY_MERGE, st, edited, str(tmp / "theirs.merged.safetensors")],
            "safe_open+save_file",
            1.5,
            max_rss_mib=200,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--only", help="Comma-separated workload name prefixes (e.g. 'ls,stats').")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_fixtures(args.size_mb)
        return
    # built in a child: a child forked from a process holding torch tensors would inherit their RSS
    subprocess.run([PYTHON, __file__, "--build-only", "--size-mb", str(args.size_mb)], check=True)
    paths = build_fixtures(args.size_mb)
    remote, server, server_log = remote_workloads(args.runs)
    chosen = workloads(paths, FIXTURES) + tf_workloads(args.size_mb) + gguf_workloads() + remote + dcp_workloads(paths)
    chosen += mx_workloads(args.size_mb)
    chosen += merge_workloads(paths, FIXTURES)
    if args.only:
        prefixes = tuple(args.only.split(","))
        chosen = [w for w in chosen if w.name.startswith(prefixes)]
    size = paths["safetensors"].stat().st_size
    print(f"fixture: {size / 2**20:.0f} MiB fp32; {args.runs} alternated runs each; {os.cpu_count()} cores")
    head = f"{'workload':26} {'anchor':21} {'paramctl s':>10} {'anchor s':>9} {'ratio':>6} {'target':>7}"
    print(head + f" {'paramctl RSS':>13} {'anchor RSS':>11}")
    for w in chosen:
        times: dict[str, list[float]] = {"ours": [], "anchor": []}
        rss = {"ours": 0, "anchor": 0}
        for _ in range(args.runs):
            for key, argv in (("ours", w.ours), ("anchor", w.anchor)):
                t, r = measure(argv)
                times[key].append(t)
                rss[key] = max(rss[key], r)
        ours, anchor = statistics.median(times["ours"]), statistics.median(times["anchor"])
        ratio = ours / anchor
        verdict = "ok" if ratio <= w.target else "MISS"
        if w.max_rss_mib is not None and rss["ours"] > w.max_rss_mib * 2**20:
            verdict = f"MISS (RSS > {w.max_rss_mib:.0f} MiB)"
        print(
            f"{w.name:26} {w.anchor_name:21} {ours:10.3f} {anchor:9.3f} {ratio:6.2f} {'<=' + str(w.target):>7}"
            f" {rss['ours'] / 2**20:9.0f} MiB {rss['anchor'] / 2**20:7.0f} MiB  {verdict}",
            flush=True,
        )
        if w in remote:
            report_remote(server_log, args.runs, sparse_sharded_set())
    server.terminate()
    server_log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
