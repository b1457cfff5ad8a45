"""Fixtures for the storage tests: one moto S3 server per session, a clean AWS/OSS environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.storage.moto_support import MotoServer, moto_server

_CLOUD_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "OSS_ENDPOINT",
    "OSS_ACCESS_KEY_ID",
    "OSS_ACCESS_KEY_SECRET",
    "OSS_ADDRESSING_STYLE",
    "OSS_REGION",
    "ELASTISERVE_CACHE_DIR",
)


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def cloud_env(monkeypatch: pytest.MonkeyPatch, moto: MotoServer) -> MotoServer:
    """This process's environment pointed at the moto server (and at nothing else)."""
    for name in _CLOUD_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    return moto
