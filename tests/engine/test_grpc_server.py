"""The gRPC server's lifecycle and limits, driven by ``tritonclient.grpc.aio`` from the same
event loop as the server (as the engine runs it), on every transport."""

from __future__ import annotations

import asyncio
import gc
import queue
import socket
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from elastiserve.engine.frontends import grpc as grpc_frontend
from elastiserve.engine.frontends.grpc import GrpcServerHandle, start_grpc_server
from elastiserve.engine.frontends.grpc_transport import CoreUnavailable, grpc_address
from elastiserve.testing import free_port
from tests.engine.grpc_fake import FakeRegistry, GrpcServerThread, make_dataplane

TRANSPORTS = ["h2", "core", "aio"]


class Running:
    def __init__(self, handle: GrpcServerHandle, registry: FakeRegistry) -> None:
        self.handle = handle
        self.registry = registry
        self.url = f"127.0.0.1:{handle.port}"


@pytest.fixture(params=TRANSPORTS)
async def running(request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    dataplane, registry = make_dataplane()
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0, transport=request.param)
    yield Running(handle, registry)
    await handle.close(0.5)


def fp32(array: np.ndarray, name: str = "INPUT0") -> aioclient.InferInput:
    tensor = aioclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


async def test_aio_client_concurrent_requests(running: Running) -> None:
    async with aioclient.InferenceServerClient(running.url) as client:
        assert await client.is_server_ready()
        arrays = [np.full((1, 16), i, dtype=np.float32) for i in range(200)]
        results = await asyncio.gather(*(client.infer("identity_fp32", [fp32(a)]) for a in arrays))
        for array, result in zip(arrays, results, strict=True):
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
        with pytest.raises(InferenceServerException) as info:
            await client.infer("identity_fp32", [fp32(np.zeros((1, 8), dtype=np.float32))])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert (await client.get_model_metadata("add_sub")).name == "add_sub"
        assert running.registry.models["identity_fp32"].count == 200


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_message_size_limit(transport: str) -> None:
    dataplane, _ = make_dataplane()
    handle = await start_grpc_server(
        dataplane, "127.0.0.1", 0, transport=transport, max_message_bytes=1 << 20
    )
    try:
        async with aioclient.InferenceServerClient(f"127.0.0.1:{handle.port}") as client:
            big = np.zeros((1, 300_000), dtype=np.float32)  # 1.2 MB > 1 MiB
            with pytest.raises(InferenceServerException) as info:
                await client.infer("echo", [fp32(big)])
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "larger than max" in info.value.message()
            # under the limit: fine, and the response may be as large as the request
            ok = np.ones((1, 200_000), dtype=np.float32)
            result = await client.infer("echo", [fp32(ok)])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), ok)
    finally:
        await handle.close(0.5)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_close_lets_in_flight_calls_finish(transport: str) -> None:
    dataplane, registry = make_dataplane()
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0, transport=transport)
    gate = registry.models["identity_fp32"].gate = asyncio.Event()
    async with aioclient.InferenceServerClient(f"127.0.0.1:{handle.port}") as client:
        array = np.ones((1, 16), dtype=np.float32)
        call = asyncio.create_task(client.infer("identity_fp32", [fp32(array)]))
        while registry.models["identity_fp32"].last_request is None:
            await asyncio.sleep(0.01)
        closing = asyncio.create_task(handle.close(5.0))
        await asyncio.sleep(0.1)
        assert not closing.done()
        gate.set()
        result = await call
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
        await asyncio.wait_for(closing, 5.0)
    # the port is free again: a new server binds it
    again = await start_grpc_server(dataplane, "127.0.0.1", handle.port, transport=transport)
    await again.close(0.1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_close_cancels_calls_after_grace(transport: str) -> None:
    dataplane, registry = make_dataplane()
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0, transport=transport)
    registry.models["identity_fp32"].gate = asyncio.Event()  # never set
    async with aioclient.InferenceServerClient(f"127.0.0.1:{handle.port}") as client:
        call = asyncio.create_task(client.infer("identity_fp32", [fp32(np.ones((1, 16), dtype=np.float32))]))
        while registry.models["identity_fp32"].last_request is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(handle.close(0.2), 5.0)
        with pytest.raises(InferenceServerException) as info:
            await asyncio.wait_for(call, 5.0)
        assert info.value.status() in ("StatusCode.CANCELLED", "StatusCode.UNAVAILABLE")
    await handle.close(0.1)  # closing twice is harmless


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_server_runs_until_closed_even_if_the_handle_is_dropped(transport: str) -> None:
    dataplane, _ = make_dataplane()
    port = (await start_grpc_server(dataplane, "127.0.0.1", 0, transport=transport)).port
    gc.collect()
    async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert await client.is_server_live()
    handle = next(h for h in grpc_frontend._RUNNING if h.port == port)
    await asyncio.gather(handle.close(0.1), handle.close(0.1))  # concurrent closes are one close
    assert handle not in grpc_frontend._RUNNING


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_port_in_use_fails(transport: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        dataplane, _ = make_dataplane()
        with pytest.raises(OSError, match=r"failed to bind the gRPC server to 127\.0\.0\.1"):
            await start_grpc_server(dataplane, "127.0.0.1", sock.getsockname()[1], transport=transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stream_infer_with_a_plain_model(transport: str) -> None:
    """ModelStreamInfer on every transport: one final response per request of a non-decoupled
    model, errors in error_message while the stream goes on, the status once the client is done."""
    server = GrpcServerThread(transport=transport).start()
    try:
        results: queue.Queue[tuple[object, object]] = queue.Queue()
        with grpcclient.InferenceServerClient(server.url) as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.arange(16, dtype=np.float32).reshape(1, 16))
            client.async_stream_infer("missing", [tensor], request_id="bad")
            for i in range(20):
                client.async_stream_infer("identity_fp32", [tensor], request_id=f"r{i}")
            got = [results.get(timeout=10) for _ in range(21)]
            client.stop_stream()
            errors = [str(error) for _, error in got if error is not None]
            assert errors == ["Request for unknown model: 'missing' is not found"]
            ids = sorted(r.get_response().id for r, e in got if e is None)  # type: ignore[union-attr]
            assert ids == sorted(f"r{i}" for i in range(20))
            first = next(r for r, e in got if e is None)
            assert first.get_response().parameters["triton_final_response"].bool_param  # type: ignore[union-attr]
            np.testing.assert_array_equal(first.as_numpy("OUTPUT0"), np.arange(16).reshape(1, 16))  # type: ignore[union-attr]
            assert results.empty()
            assert client.is_server_live()
    finally:
        server.stop()


async def test_transport_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    dataplane, _ = make_dataplane()
    with pytest.raises(ValueError, match="unknown gRPC transport"):
        await start_grpc_server(dataplane, "127.0.0.1", 0, transport="quic")
    monkeypatch.setenv(grpc_frontend.TRANSPORT_ENV, "aio")
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0)
    assert handle.transport == "aio"
    await handle.close(0.1)
    monkeypatch.setenv(grpc_frontend.TRANSPORT_ENV, "CORE")
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0)
    assert handle.transport == "core"
    await handle.close(0.1)
    monkeypatch.delenv(grpc_frontend.TRANSPORT_ENV)
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0)
    assert handle.transport == grpc_frontend.DEFAULT_TRANSPORT == "h2"
    await handle.close(0.1)

    def unavailable(*args: object) -> None:
        raise CoreUnavailable("cygrpc changed")

    monkeypatch.setattr(grpc_frontend, "CoreTransport", unavailable)
    handle = await start_grpc_server(dataplane, "127.0.0.1", 0, transport="core")
    assert handle.transport == "aio"  # fell back, and serves
    async with aioclient.InferenceServerClient(f"127.0.0.1:{handle.port}") as client:
        assert await client.is_server_live()
    await handle.close(0.1)


async def test_fixed_port_and_addresses() -> None:
    assert grpc_address("0.0.0.0", 8001) == "0.0.0.0:8001"
    assert grpc_address("::", 8001) == "[::]:8001"
    assert grpc_address("[::1]", 1) == "[::1]:1"
    dataplane, _ = make_dataplane()
    port = free_port()
    handle = await start_grpc_server(dataplane, "127.0.0.1", port)
    assert handle.port == port and handle.transport == "h2"
    async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        assert await live(b"") == b"\x08\x01"  # ServerLiveResponse(live=True)
    await handle.close()
