"""A real control plane over HTTP (uvicorn in a thread on a free loopback port) per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from elastiserve.controlplane.api import create_app, serve_in_thread
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.store import Store

ADMIN = "admin-token-for-tests"


@dataclass
class RecordingNotifier:
    calls: list[str | None] = field(default_factory=list)

    def notify(self, service: str | None = None) -> None:
        self.calls.append(service)


@dataclass
class ControlPlane:
    url: str
    store: Store
    runtime: FakeRuntime
    notifier: RecordingNotifier
    admin: str = ADMIN


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    store = Store.open(tmp_path / "state")
    runtime = FakeRuntime()
    notifier = RecordingNotifier()
    app = create_app(
        store,
        admin_token=ADMIN,
        notifier=notifier,
        runtime=runtime,
        gateway_url="http://127.0.0.1:9999",
        max_body_bytes=64 * 1024,
        max_wait=5,
    )
    with serve_in_thread(app) as url:
        yield ControlPlane(url, store, runtime, notifier)
    store.close()
