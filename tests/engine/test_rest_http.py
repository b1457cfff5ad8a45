"""HTTP/1.1 semantics of the engine's HTTP server, over raw sockets: keep-alive, pipelining,
chunked bodies, ``Expect: 100-continue``, HTTP/1.0, malformed requests, limits, graceful close,
and the plain server the metrics port uses."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from elastiserve.engine.frontends.http_server import Response, start_plain_http_server, start_server
from elastiserve.engine.frontends.rest import start_http_server

from .rest_fake import FakeRegistry, ServerThread, make_dataplane

DATA = np.arange(16, dtype=np.float32).tobytes()
HEAD = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
).encode()


def infer_bytes(extra_headers: str = "", version: str = "1.1") -> bytes:
    body = HEAD + DATA
    return (
        f"POST /v2/models/identity_fp32/infer HTTP/{version}\r\nHost: x\r\n"
        f"Inference-Header-Content-Length: {len(HEAD)}\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n"
    ).encode() + body


def get_bytes(path: str, extra_headers: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: x\r\n{extra_headers}\r\n".encode()


class Reader:
    """Reads whole HTTP responses off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if status == 100:
            return status, headers, b""
        length = int(headers["content-length"])
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, BlockingIOError):
            return False
        except ConnectionResetError:
            return True


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    dataplane, _ = make_dataplane()
    srv = ServerThread(dataplane, max_body_bytes=1 << 20).start()
    yield srv
    srv.stop()


@pytest.fixture()
def conn(server: ServerThread) -> Iterator[tuple[socket.socket, Reader]]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    yield sock, Reader(sock)
    sock.close()


def check_infer(response: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = response
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    assert body.endswith(DATA)
    assert len(body) == int(headers["content-length"]) == int(headers["inference-header-content-length"]) + 64


def test_keep_alive_sequential(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    for _ in range(5):
        sock.sendall(infer_bytes())
        check_infer(reader.response())
    sock.sendall(get_bytes("/v2/health/live"))
    status, headers, body = reader.response()
    assert (status, body, headers["content-length"]) == (200, b"", "0")
    assert "connection" not in headers


def test_pipelining_answers_in_order(server: ServerThread, conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    registry: FakeRegistry = server.dataplane.registry  # type: ignore[assignment]
    # An async infer, then a sync route, then an infer again: responses must keep request order.
    sock.sendall(infer_bytes() + get_bytes("/v2/models/add_sub") + infer_bytes() + get_bytes("/v2/nope"))
    check_infer(reader.response())
    status, _, body = reader.response()
    assert status == 200 and json.loads(body)["name"] == "add_sub"
    check_infer(reader.response())
    assert reader.response()[0] == 404
    # Far more pipelined requests than the connection queues before pausing reads.
    before = registry.models["identity_fp32"].count
    sock.sendall(infer_bytes() * 150)
    for _ in range(150):
        check_infer(reader.response())
    assert registry.models["identity_fp32"].count == before + 150


def test_chunked_request_body(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    body = HEAD + DATA
    pieces = [body[:7], body[7:100], body[100:]]
    sock.sendall(
        f"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Inference-Header-Content-Length: {len(HEAD)}\r\n\r\n".encode()
    )
    for piece in pieces:
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.01)
    sock.sendall(b"0\r\n\r\n")
    check_infer(reader.response())


def test_body_split_over_many_writes(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw = infer_bytes()
    for i in range(0, len(raw), 37):
        sock.sendall(raw[i : i + 37])
        time.sleep(0.001)
    check_infer(reader.response())


def test_expect_100_continue(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    raw = infer_bytes("Expect: 100-continue\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    sock.sendall(head + b"\r\n\r\n")
    status, _, _ = reader.response()
    assert status == 100
    sock.sendall(body)
    check_infer(reader.response())


def test_expect_100_continue_too_large(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    sock.sendall(
        b"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    status, headers, body = reader.response()
    assert status == 413 and headers["connection"] == "close"
    assert "exceeds the limit of 1048576 bytes" in json.loads(body)["error"]
    assert reader.closed()


def test_413_keeps_the_connection(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    big = b"x" * ((1 << 20) + 10)
    sock.sendall(
        b"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    )
    sock.sendall(big)
    status, headers, _ = reader.response()
    assert status == 413 and "connection" not in headers
    sock.sendall(infer_bytes())
    check_infer(reader.response())


def test_http10_closes_unless_keep_alive(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        reader = Reader(sock)
        sock.sendall(get_bytes("/v2/health/ready", version="1.0"))
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert reader.closed()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        reader = Reader(sock)
        for _ in range(2):
            sock.sendall(infer_bytes("Connection: keep-alive\r\n", version="1.0"))
            response = reader.response()
            check_infer(response)
            assert response[1]["connection"] == "keep-alive"


def test_connection_close_header(conn: tuple[socket.socket, Reader]) -> None:
    sock, reader = conn
    sock.sendall(infer_bytes("Connection: close\r\n"))
    response = reader.response()
    check_infer(response)
    assert response[1]["connection"] == "close"
    assert reader.closed()


def test_malformed_http_is_400_then_closed(conn: tuple[socket.socket, Reader], server: ServerThread) -> None:
    sock, reader = conn
    sock.sendall(infer_bytes() + b"THIS IS NOT HTTP\r\n\r\n")
    check_infer(reader.response())  # the good request before it is still answered
    status, headers, body = reader.response()
    assert status == 400 and headers["connection"] == "close"
    assert "malformed HTTP request" in json.loads(body)["error"]
    assert reader.closed()
    # The server itself is fine.
    assert httpx.get(f"http://{server.url}/v2/health/live").status_code == 200


def test_large_tensor_round_trip(server: ServerThread) -> None:
    array = np.random.default_rng(1).random(200_000).astype(np.float32)  # 800 KB each way
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [200_000],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": array.nbytes},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = httpx.post(
        f"http://{server.url}/v2/models/echo/infer",
        content=head + array.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 200
    header_length = int(r.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(r.content[header_length:], np.float32), array)


async def test_graceful_close() -> None:
    dataplane, registry = make_dataplane()
    model = registry.models["identity_fp32"]
    model.gate = asyncio.Event()
    handle = await start_http_server(dataplane, "127.0.0.1", 0)
    port = handle.port
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(get_bytes("/v2/health/live"))
    await idle_writer.drain()
    assert (await idle_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(infer_bytes())
    await busy_writer.drain()
    while model.last_request is None:
        await asyncio.sleep(0.01)
    assert handle.connection_count == 2

    closing = asyncio.create_task(handle.close(timeout=5))
    assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # idle keep-alive closed at once
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    assert not closing.done()
    model.gate.set()  # the in-flight request finishes and is answered, then its connection closes
    head = await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head
    await asyncio.wait_for(closing, 5)
    assert handle.connection_count == 0
    idle_writer.close()
    busy_writer.close()


async def test_close_aborts_stuck_requests() -> None:
    dataplane, registry = make_dataplane()
    registry.models["identity_fp32"].gate = asyncio.Event()  # never set
    handle = await start_http_server(dataplane, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", handle.port)
    writer.write(infer_bytes())
    await writer.drain()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await handle.close(timeout=0.2)
    assert time.monotonic() - started < 2
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_idle_keep_alive_timeout() -> None:
    handle = await start_server(lambda request: Response(200, b"ok"), "127.0.0.1", 0, keep_alive_timeout=0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", handle.port)
    writer.write(get_bytes("/"))
    assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 OK")
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed after idling 0.1-0.2 s
    await handle.close()
    writer.close()


async def test_plain_http_server_for_metrics() -> None:
    calls = []

    def metrics() -> tuple[int, dict[str, str], bytes]:
        calls.append(1)
        return 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}, b"nv_inference_count 1\n"

    async def slow() -> tuple[int, dict[str, str], bytes]:
        await asyncio.sleep(0.01)
        return 200, {}, b"later"

    handle = await start_plain_http_server("127.0.0.1", 0, {"/metrics": metrics, "/slow": slow})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.port}") as c:
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.text == "nv_inference_count 1\n"
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert (await c.get("/slow")).text == "later"
        assert (await c.get("/nope")).status_code == 404
        assert (await c.post("/metrics")).status_code == 405
        head = await c.head("/metrics")
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "21"
    assert len(calls) == 2
    await handle.close()


def test_upgrade_request_is_answered_as_http11(conn: tuple[socket.socket, Reader]) -> None:
    """curl --http2 sends "Upgrade: h2c"; we answer in HTTP/1.1 and keep serving the connection."""
    sock, reader = conn
    upgrade = (
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
    )
    sock.sendall(get_bytes("/v2/health/live", upgrade) + get_bytes("/v2/health/ready"))
    assert reader.response()[0] == 200
    assert reader.response()[0] == 200
    sock.sendall(get_bytes("/v2", upgrade))
    status, _, body = reader.response()
    assert status == 200 and json.loads(body)["name"] == "elastiserve"
    sock.sendall(infer_bytes())
    check_infer(reader.response())


async def test_handler_returning_a_future_or_garbage() -> None:
    loop = asyncio.get_running_loop()

    def handler(request: object) -> object:
        path = getattr(request, "path", "")
        if path == "/future":
            future = loop.create_future()
            loop.call_later(0.01, future.set_result, Response(200, b"from a future"))
            return future
        if path == "/garbage":
            return 42
        return Response(200, b"plain")

    handle = await start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.port}") as c:
        assert (await c.get("/future")).text == "from a future"
        r = await c.get("/garbage")
        assert r.status_code == 500 and "internal error: TypeError" in r.json()["error"]
        assert (await c.get("/")).text == "plain"
    await handle.close()


async def test_slow_reader_back_pressure() -> None:
    """A client that pipelines requests but does not read: the server stops running requests
    once its write buffer is full, instead of buffering every response in memory."""
    dataplane, registry = make_dataplane()
    handle = await start_http_server(dataplane, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    array = np.ones(128 * 1024, dtype=np.float32)  # 512 KB out per request
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [array.size],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": array.nbytes},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = head + array.tobytes()
    request = (
        f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\n\r\n"
    ).encode() + body
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", handle.port))
    count = 24
    await loop.sock_sendall(sock, request * count)
    await asyncio.sleep(0.3)
    model = registry.models["echo"]
    assert model.count < count  # paused, not everything computed and buffered
    received = 0
    expected = count * (array.nbytes + len(head))  # lower bound of what must arrive
    while received < expected:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
        assert chunk
        received += len(chunk)
    assert model.count == count
    sock.close()
    await handle.close()
