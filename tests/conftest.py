"""Shared fixtures: the example model repository, generated once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def example_repo() -> Path:
    """examples/models with its generated binaries (make_models.py is idempotent)."""
    subprocess.run([sys.executable, str(EXAMPLES / "make_models.py")], check=True, timeout=300)
    return EXAMPLES / "models"
