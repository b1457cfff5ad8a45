"""gRPC through the gateway (``--grpc-port``) in front of the real engines' gRPC ports.

The control plane does not publish instances' gRPC ports yet (endpoints are ``{ip, port,
weight}``), so this test runs a gateway in-process with an unreachable control plane and gives
it the service list and the endpoints (with ``grpc_port``) directly: the part under test is the
proxy, not discovery.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from elastiserve.gateway import auth
from elastiserve.gateway.app import Gateway, GatewayOptions
from elastiserve.gateway.traffic import ServiceConfig
from elastiserve.testing import free_port
from tests.gateway.conftest import Platform

TOKEN = "grpc-gateway-token"


class ThreadedGateway:
    """A :class:`Gateway` on its own event loop in a thread; ``call`` runs a function on that loop."""

    def __init__(self, options: GatewayOptions) -> None:
        self.loop = asyncio.new_event_loop()
        self.gateway = Gateway(options)
        threading.Thread(target=self.loop.run_forever, daemon=True, name="gateway-under-test").start()
        self.run(self.gateway.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def call(self, fn: Any, *args: Any) -> Any:
        done: Future[Any] = Future()

        def invoke() -> None:
            try:
                done.set_result(fn(*args))
            except Exception as exc:  # pragma: no cover - surfaced to the test
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return done.result(10)

    def close(self) -> None:
        self.run(self.gateway.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def grpc_gateway(platform: Platform) -> Iterator[ThreadedGateway]:
    options = GatewayOptions(
        control_plane=f"http://127.0.0.1:{free_port()}",  # nobody there: the table is set below
        port=0,
        grpc_port=0,
        connect_timeout=0.5,
        refresh_interval=3600,
    )
    gw = ThreadedGateway(options)
    e0, e1 = platform.engines
    configs = [
        ServiceConfig("g", token_digest=auth.digest(TOKEN), enable_grpc=True),
        ServiceConfig("g-dead", enable_grpc=True),
        ServiceConfig("no-grpc"),
        ServiceConfig("limited", enable_grpc=True, rate_limit=2),
    ]
    endpoints = {
        "g": [{"ip": "127.0.0.1", "port": e.http_port, "grpc_port": e.grpc_port} for e in (e0, e1)],
        "g-dead": [
            {"ip": "127.0.0.1", "port": e0.http_port, "grpc_port": e0.grpc_port},
            {"ip": "127.0.0.1", "port": free_port(), "grpc_port": free_port()},
        ],
        "no-grpc": [{"ip": "127.0.0.1", "port": e0.http_port, "grpc_port": e0.grpc_port}],
        "limited": [{"ip": "127.0.0.1", "port": e0.http_port, "grpc_port": e0.grpc_port}],
    }

    def install() -> None:
        assert gw.gateway.catalog is not None
        gw.gateway.catalog.apply(configs)
        for name, eps in endpoints.items():
            gw.gateway.table.services[name].set_endpoints(eps, "test")

    gw.call(install)
    yield gw
    gw.close()


def _client(gw: ThreadedGateway) -> grpcclient.InferenceServerClient:
    assert gw.gateway.grpc is not None
    return grpcclient.InferenceServerClient(f"127.0.0.1:{gw.gateway.grpc.port}")


def _add_sub(client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> np.ndarray:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
        grpcclient.InferInput("INPUT1", [1, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    return client.infer("add_sub", inputs, headers=headers).as_numpy("OUTPUT0")


def test_grpc_infer_and_metadata_through_the_gateway(grpc_gateway: ThreadedGateway) -> None:
    client = _client(grpc_gateway)
    headers = {"service": "g", "authorization": TOKEN}
    assert client.is_server_ready(headers=headers)
    assert client.get_model_metadata("add_sub", headers=headers).name == "add_sub"
    for _ in range(20):
        np.testing.assert_allclose(
            _add_sub(client, headers), 2 * np.arange(16, dtype=np.float32).reshape(1, 16)
        )
    spread = [inst.requests for inst in grpc_gateway.gateway.table.services["g"].balancer.instances]
    assert min(spread) >= 3, spread
    client.close()


def test_grpc_refusals(grpc_gateway: ThreadedGateway) -> None:
    client = _client(grpc_gateway)

    def status(headers: dict[str, str]) -> str:
        with pytest.raises(InferenceServerException) as info:
            client.is_server_ready(headers=headers)
        return str(info.value.status())

    assert status({}) == "StatusCode.INVALID_ARGUMENT"
    assert status({"service": "nosuch"}) == "StatusCode.NOT_FOUND"
    assert status({"service": "g"}) == "StatusCode.UNAUTHENTICATED"
    assert status({"service": "g", "authorization": "wrong-token-1"}) == "StatusCode.PERMISSION_DENIED"
    assert status({"service": "no-grpc"}) == "StatusCode.UNIMPLEMENTED"
    codes = []
    for _ in range(6):
        try:
            client.is_server_ready(headers={"service": "limited"})
            codes.append("OK")
        except InferenceServerException as exc:
            codes.append(str(exc.status()))
    assert "StatusCode.RESOURCE_EXHAUSTED" in codes and "OK" in codes
    client.close()


def test_grpc_retries_a_dead_instance(grpc_gateway: ThreadedGateway) -> None:
    client = _client(grpc_gateway)
    for _ in range(10):
        assert _add_sub(client, {"service": "g-dead"}).shape == (1, 16)
    stats = grpc_gateway.gateway.table.services["g-dead"].stats
    assert stats.codes == {200: 10}
    client.close()
