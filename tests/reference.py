"""Running code in the reference frameworks' own virtual environments (built by `make test`).

MXNet 1.9.1 needs numpy 1.23.5, TensorFlow 2.15 and transformers 4.57 pin their own stacks: each
lives in its own environment beside the repository (`.venv-mx`, `.venv-tf`, `.venv-hf4`), and tests
run scripts there as subprocesses. Without the environment a test skips, unless
PARAMCTL_REFERENCE_VENVS=1 (set by `make test`), where it fails: CI must not pass by skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENVS = {"mxnet": REPO / ".venv-mx", "tensorflow": REPO / ".venv-tf", "transformers4": REPO / ".venv-hf4"}


def python_of(framework: str) -> Path:
    """The interpreter of FRAMEWORK's environment; skips (or fails under make test) without it."""
    python = VENVS[framework] / "bin" / "python"
    if not (VENVS[framework] / ".installed").exists() or not python.exists():
        message = f"{framework} environment missing: make {VENVS[framework].name}/.installed"
        if os.environ.get("PARAMCTL_REFERENCE_VENVS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_in(framework: str, script: str, *args: str, timeout: float = 600) -> object:
    """Run SCRIPT (Python source) in FRAMEWORK's environment with ARGS as sys.argv[1:]; the JSON
    the script prints on its last line of standard output is returned."""
    python = python_of(framework)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": "tensorflow"})
    proc = subprocess.run(
        [str(python), "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{framework} script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None
