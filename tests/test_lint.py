"""The code passes ruff's checks as pyproject.toml configures them ([tool.ruff]: pycodestyle errors and warnings,
pyflakes, lines of at most 120 characters), over the whole repository, and mypy's on the core ([tool.mypy])."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes_on_the_core():
    """mypy (pyproject.toml [tool.mypy]: the engine, the methods and the protocol, with pydantic's plugin) finds
    no error; a state's hooks are typed by ``Method[State]``."""
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
