"""Shared fixtures: the example model repository, generated once per session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from elastiserve.controlplane.api import create_app, serve_in_thread
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.store import Store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def example_repo() -> Path:
    """examples/models with its generated binaries (make_models.py is idempotent)."""
    subprocess.run([sys.executable, str(EXAMPLES / "make_models.py")], check=True, timeout=300)
    return EXAMPLES / "models"


@dataclass
class ControlPlane:
    """A real control plane over HTTP (uvicorn in a thread on a free loopback port) with a FakeRuntime."""

    url: str
    store: Store
    runtime: FakeRuntime
    admin: str
    home: Path


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    home = tmp_path / "home"
    store = Store.open(home)
    runtime = FakeRuntime()
    admin = "admin-token-for-tests"
    with serve_in_thread(create_app(store, admin_token=admin, runtime=runtime)) as url:
        yield ControlPlane(url, store, runtime, admin, home)
    store.close()
