"""QA: an output named like one shard of a DCP directory is refused, not written as another format."""

from __future__ import annotations

import pytest
from conftest import SAMPLES, run

import paramctl


def test_an_output_named_distcp_is_refused(tmp_path):
    """`convert m.pt out.distcp` once wrote a PyTorch zip that paramctl itself then refused to
    read ("one shard of a torch.distributed.checkpoint"), with exit 0."""
    out = tmp_path / "out.distcp"
    result = run("convert", str(SAMPLES / "mlp.pt"), str(out))
    assert result.exit_code == 2
    assert result.output == (
        f"paramctl: error: {out}: a .distcp file is one shard of a DCP directory: write the directory (--to dcp)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_dcp_directory_is_still_written(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "ckpt"
    result = run("convert", str(SAMPLES / "mlp.pt"), str(out), "--to", "dcp")
    assert result.exit_code == 0, result.output
    assert paramctl.load(str(out)).format == "dcp"
    assert paramctl.load(str(out)).names() == paramctl.load(str(SAMPLES / "mlp.pt")).names()
