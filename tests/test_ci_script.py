"""`.ci/run`: it runs the README's test command, and a failure anywhere in it fails CI."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = "pip install -r requirements.txt && pip install --no-build-isolation -e '.[test]' && python -m pytest -q"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_ci_fails_when_the_install_fails(tmp_path):
    # A `pip` that always fails, first on PATH: the chain stops at once and CI must report it.
    stub = tmp_path / "pip"
    stub.write_text("#!/bin/sh\necho stub pip failing >&2\nexit 7\n")
    stub.chmod(0o755)
    # .ci/run puts $CUDA_HOME/bin first on PATH: point it at an empty directory so the stub wins.
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "cuda"), PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 7, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert re.search(r"exit status 7", done.stdout)
