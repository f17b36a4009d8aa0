"""The Makefile picks a supported Python (3.11, 3.12, 3.13: the first that runs) or says in one line
which it needs, before building anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .test_demo import REPO


def run_make(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    # As a user types it: no PYTHON, and none inherited from an outer `make PYTHON=... test` either.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = path or os.environ["PATH"]
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_make_picks_the_first_supported_python_that_runs(tmp_path):
    broken = tmp_path / "python3.11"  # a pyenv shim for a version that is not active exits non-zero
    broken.write_text("#!/bin/sh\nexit 127\n")
    broken.chmod(0o755)
    (tmp_path / "python3.12").symlink_to(sys.executable)
    result = run_make("--eval", "which-python: ; @echo $(PYTHON)", "which-python", path=f"{tmp_path}:/usr/bin:/bin")
    assert result.stdout.strip() == "python3.12", result.stderr


def test_an_unsupported_python_is_refused_in_one_line_before_a_venv_is_made(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\nexec " + sys.executable + ' -c "import sys; sys.exit(1)" "$@"\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = run_make("venv", f"PYTHON={fake}", f"VENV={venv}")
    assert result.returncode != 0
    (message,) = [line for line in result.stdout.splitlines() if line.strip()]
    assert message == (f"m365-pipeline needs Python 3.11, 3.12 or 3.13 (python3.11/3.12/3.13 in PATH, or "
                       f"PYTHON=/path/to/python3.x); {fake} does not run or is not one")
    assert not Path(venv).exists()
