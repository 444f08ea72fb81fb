"""Shared test helpers: run the CLI in-process, locate the bundled samples and shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

os.environ.setdefault("KERAS_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"
FIXTURES = REPO / "tests" / "fixtures"  # real tf-keras 2 files, copied from shared/fixtures


def run(*args: str, input: bytes | None = None, tty: bool = False) -> Result:
    """Invoke `paramctl ARGS` in-process; TTY pretends standard output is a terminal."""
    from paramctl.cli import cli

    env = {"PARAMCTL_TTY": "1" if tty else "0", "COLUMNS": "200"}
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


@pytest.fixture
def samples() -> Path:
    return SAMPLES


def pytest_terminal_summary(terminalreporter) -> None:
    """The fuzz runs' outcome counts, for the record."""
    fuzz = sys.modules.get("test_fuzz")
    for fmt, counts in sorted(getattr(fuzz, "OUTCOMES", {}).items()):
        total = sum(counts.values())
        tables, errors = counts["table"], counts["error"]
        terminalreporter.write_line(f"fuzz {fmt}: {total} cases, {tables} tables, {errors} clean errors")
    differential = sys.modules.get("test_differential")
    for label, counts in sorted(getattr(differential, "OUTCOMES", {}).items()):
        terminalreporter.write_line(
            f"differential {label}: {counts['cases']} cases: {counts['agree']} read by both and equal, "
            f"{counts['both refused']} refused by both, {counts['paramctl refused']} refused by paramctl only, "
            f"{counts['reference refused']} read by paramctl only (the reference refused or was not run); "
            f"{counts['bound or agreement failures']} agree-or-refuse or bound failures"
        )


def tied_module():
    """A tiny torch module whose head is tied to its embedding (one Parameter under two names)."""
    import torch

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    return Tied()


def frameworks_imported(path: str, commands: tuple[str, ...] = ("ls", "stats", "check")) -> list[str]:
    """Which of torch, h5py and keras a fresh interpreter has imported after running COMMANDS on PATH."""
    import subprocess

    code = (
        "import sys, runpy\n"
        f"for command in {commands!r}:\n"
        "    sys.argv = ['paramctl', command, sys.argv[1]]\n"
        "    try: runpy.run_module('paramctl', run_name='__main__')\n"
        "    except SystemExit: pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'h5py', 'keras'}))"
    )
    import ast

    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])
