"""Benchmarks: paramctl against the script a user would otherwise run, alternated in one process.

    .venv/bin/python bench/bench.py [--runs 5] [--size-mb 1024]

The fixtures (a transformer-like fp32 checkpoint of about --size-mb, as .safetensors and .pt) are
built once into bench/_fixtures/. Each workload runs its paramctl command and its anchor as
separate processes, alternating, and reports medians, the ratio paramctl/anchor, and the peak
RSS of each (from wait4). Machines here are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "_fixtures"
PYTHON = sys.executable

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


def build_fixtures(size_mb: int) -> dict[str, Path]:
    """A GPT-like stack of fp32 tensors: embeddings, then per layer attention, MLP and norms."""
    FIXTURES.mkdir(exist_ok=True)
    paths = {"safetensors": FIXTURES / f"model-{size_mb}mb.safetensors", "pt": FIXTURES / f"model-{size_mb}mb.pt"}
    if all(p.exists() for p in paths.values()):
        return paths
    import torch
    from safetensors.torch import save_file

    d = 1024
    per_layer = 12 * d * d  # qkv (3d*d) + proj (d*d) + mlp (8 d*d) + small vectors
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
    return paths


def measure(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of ARGV, output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss * 1024


def compare(name: str, ours: list[str], anchor: list[str], runs: int) -> dict:
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    rss: dict[str, int] = {"ours": 0, "anchor": 0}
    for _ in range(runs):
        for key, argv in (("ours", ours), ("anchor", anchor)):
            t, r = measure(argv)
            times[key].append(t)
            rss[key] = max(rss[key], r)
    ours_t, anchor_t = statistics.median(times["ours"]), statistics.median(times["anchor"])
    return {
        "workload": name,
        "ours": ours_t,
        "anchor": anchor_t,
        "ratio": ours_t / anchor_t,
        **{"ours_rss": rss["ours"], "anchor_rss": rss["anchor"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_fixtures(args.size_mb)
        return
    # built in a child: a child forked from a process holding torch tensors would inherit their RSS
    subprocess.run([PYTHON, __file__, "--build-only", "--size-mb", str(args.size_mb)], check=True)
    paths = build_fixtures(args.size_mb)
    paramctl = [PYTHON, "-m", "paramctl"]
    workloads = [
        (
            "stats .safetensors",
            paramctl + ["stats", str(paths["safetensors"])],
            [PYTHON, "-c", NAIVE_STATS, str(paths["safetensors"])],
        ),
        ("stats .pt", paramctl + ["stats", str(paths["pt"])], [PYTHON, "-c", NAIVE_STATS, str(paths["pt"])]),
    ]
    size = paths["safetensors"].stat().st_size
    print(f"fixture: {size / 2**20:.0f} MiB fp32, {args.runs} alternated runs each, {os.cpu_count()} cores")
    print(f"{'workload':24} {'paramctl s':>10} {'anchor s':>9} {'ratio':>6} {'paramctl RSS':>13} {'anchor RSS':>11}")
    for name, ours, anchor in workloads:
        r = compare(name, ours, anchor, args.runs)
        print(
            f"{name:24} {r['ours']:10.2f} {r['anchor']:9.2f} {r['ratio']:6.2f} "
            f"{r['ours_rss'] / 2**20:9.0f} MiB {r['anchor_rss'] / 2**20:7.0f} MiB"
        )


if __name__ == "__main__":
    main()
