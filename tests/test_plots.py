"""stats --plot and --trend: pictures rendered (PNG of the expected size, SVG and HTML that parse),
matplotlib imported only for --plot, and trend figures against numpy across checkpoints."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLES, run
from safetensors.numpy import save_file

from paramctl.plots import depth_of, depth_part


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.parametrize("sample", ["mlp.pt", "nested.pt", "mlp.safetensors", "mlp.weights.h5"])
def test_stats_plot_png(sample, tmp_path):
    out = tmp_path / "p.png"
    result = run("stats", str(SAMPLES / sample), "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output  # the note on stderr
    tensors = {"nested.pt": 18}.get(sample, 4)
    assert f"histograms of {tensors} tensors" in result.output
    rows = -(-tensors // 4)
    assert png_size(out) == (16 * 90, round((3.6 + 2.3 * rows) * 90))
    assert out.stat().st_size > 20_000


def test_stats_plot_svg_and_html(tmp_path):
    svg, page = tmp_path / "p.svg", tmp_path / "p.html"
    assert run("stats", str(SAMPLES / "mlp.pt"), "--plot", str(svg)).exit_code == 0
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    result = run("stats", str(SAMPLES / "mlp.pt"), "weight", "--plot", str(page), "--format", "json")
    assert result.exit_code == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and text.count("<tr>") == 3  # header + 2 tensors
    assert "<td>0.weight</td>" in text and "<td>2.weight</td>" in text
    rows = json.loads(result.output[result.output.index("[") :])  # stdout keeps its rows
    assert [r["name"] for r in rows] == ["0.weight", "2.weight"]


def test_plot_refuses_unknown_kinds(tmp_path):
    result = run("stats", str(SAMPLES / "mlp.pt"), "--plot", str(tmp_path / "p.jpg"))
    assert result.exit_code == 2 and "--plot writes .png, .svg, .html files" in result.output
    assert not (tmp_path / "p.jpg").exists()


def test_matplotlib_imported_only_for_plot(tmp_path):
    code = (
        "import sys\nfrom paramctl.cli import cli\n"
        "try:\n    cli(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print('MPL', 'matplotlib' in sys.modules, file=sys.stderr)\n"
    )
    for args, imported in (([], False), (["--plot", str(tmp_path / "x.png")], True)):
        done = subprocess.run(
            [sys.executable, "-c", code, "stats", str(SAMPLES / "mlp.pt"), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert f"MPL {imported}" in done.stderr, done.stderr


def test_depth_detection():
    gpt2 = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)] + ["transformer.wte.weight"]
    part = depth_part(gpt2)
    assert depth_of(gpt2[2], part) == (2, "transformer.h.*.attn.c_attn.weight")
    assert depth_of("transformer.wte.weight", part) == (None, "transformer.wte.weight")
    nested = [f"0.block {b}.{i}.weight" for b in range(4) for i in (0, 2)]
    part = depth_part(nested)
    assert depth_of("0.block 3.2.weight", part) == (3, "0.block *.2.weight")
    keras = ["layers/dense/vars/0", "layers/dense_1/vars/0"]
    assert depth_part(keras) is None


@pytest.fixture
def run_dir(tmp_path) -> tuple[Path, dict[int, dict[str, np.ndarray]]]:
    """Three checkpoints of one run, named so that a shell glob sorts them out of step order."""
    rng = np.random.default_rng(0)
    values = {
        "layers.0.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "layers.0.bias": np.zeros(8, np.float32),
    }
    saved = {}
    for step in (5, 10, 100):
        values = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 * step**0.5 for k, v in values.items()}
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(values, folder / "model.safetensors")
        saved[step] = values
    return tmp_path / "run", saved


def test_trend_rows_against_numpy(run_dir, tmp_path):
    root, saved = run_dir
    globbed = sorted(str(p) + "/" for p in root.iterdir())  # checkpoint-10, checkpoint-100, checkpoint-5
    result = run("stats", *globbed, "weight$", "--trend", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["name"], r["step"]) for r in rows] == [("layers.0.weight", s) for s in (5, 10, 100)]
    previous = None
    for r in rows:
        x = saved[r["step"]]["layers.0.weight"].astype(np.float64)
        assert r["checkpoint"].endswith(f"checkpoint-{r['step']}/")
        assert r["norm"] == pytest.approx(np.linalg.norm(x), rel=1e-12)
        assert r["std"] == pytest.approx(x.std(), rel=1e-12)
        assert r["mean"] == pytest.approx(x.mean(), rel=1e-9, abs=1e-15)
        want = None if previous is None else np.linalg.norm(x - previous) / np.linalg.norm(previous)
        assert r["rel_change"] == (None if want is None else pytest.approx(want, rel=1e-9))
        previous = x
    out = tmp_path / "trend.png"
    table = run("stats", *globbed, "--trend", "--plot", str(out), "--format", "tsv")
    assert table.exit_code == 0
    assert len([line for line in table.output.splitlines() if line.startswith("layers.")]) == 6  # 2 tensors x 3
    assert png_size(out) == (15 * 90, round(4.6 * 90))


def test_trend_grammar_errors(run_dir):
    root, _ = run_dir
    a, b = str(root / "checkpoint-5"), str(root / "checkpoint-10")
    result = run("stats", a, b, "weight")
    assert result.exit_code == 2 and "for several checkpoints, add --trend" in result.output
    result = run("stats", a, str(root / "checkpoint-7"), b, "--trend")
    assert result.exit_code == 2 and "checkpoint-7: no such checkpoint" in result.output
    result = run("stats", a, b, "nothing-like-this", "--trend")
    assert result.exit_code == 2 and "no tensor matches" in result.output
