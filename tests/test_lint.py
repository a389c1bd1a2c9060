"""The code stays ruff-clean (including the ASYNC rules that catch blocking calls in async code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mounting import REPO_ROOT


def test_ruff_is_clean() -> None:
    # The ruff installed with the test extras, beside this interpreter; else whatever is on PATH.
    ruff = str(Path(sys.executable).parent / "ruff")
    if not os.path.exists(ruff):
        ruff = shutil.which("ruff") or ruff
    if not os.path.exists(ruff):
        pytest.fail("ruff is not installed (it is in the test extras)")
    done = subprocess.run([ruff, "check", "mxfs", "tests", "bench"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
