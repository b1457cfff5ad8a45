"""A real control plane over HTTP (uvicorn in a thread on a free loopback port) per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from elastiserve.controlplane.api import create_app, serve_in_thread
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.store import Store


@dataclass
class ControlPlane:
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
