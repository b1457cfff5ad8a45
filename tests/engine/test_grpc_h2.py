"""Transport ``h2`` (our own HTTP/2 server) at the protocol level: a raw-socket client (frames and
HPACK by hand, no HTTP/2 library) for the edge cases real gRPC clients never produce, plus the
real clients (tritonclient sync/aio, grpc.aio generic calls with metadata, h2load)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from hpack import Decoder, Encoder
from tritonclient.grpc import service_pb2

from elastiserve.engine.frontends import grpc_h2
from elastiserve.engine.frontends.grpc_h2 import percent_encode
from tests.engine.grpc_fake import GrpcServerThread

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
SERVICE = "/inference.GRPCInferenceService"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">L", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">L", sid) + payload


def settings(**values: int) -> bytes:
    keys = {"header_table_size": 1, "initial_window_size": 4, "max_frame_size": 5}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", keys[k], v) for k, v in values.items()))


def grpc_message(data: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BL", int(compressed), len(data)) + data


def infer_request(model: str = "identity_fp32", values: np.ndarray | None = None) -> bytes:
    array = np.arange(16, dtype=np.float32).reshape(1, 16) if values is None else values
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString()


class Response:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.data = b""
        self.reset: int | None = None

    @property
    def messages(self) -> list[bytes]:
        out, pos = [], 0
        while pos < len(self.data):
            _, length = struct.unpack_from(">BL", self.data, pos)
            out.append(self.data[pos + 5 : pos + 5 + length])
            pos += 5 + length
        return out

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers or a Trailers-Only answer."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)


class RawClient:
    """A blocking HTTP/2 client speaking frames directly (prior knowledge h2c)."""

    def __init__(
        self, port: int, *, handshake: bool = True, window: int | None = None, auto_window: bool = True
    ):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.auto_window = auto_window
        self.server_settings: dict[int, int] = {}
        self.goaway: tuple[int, int] | None = None
        self.pings: list[bytes] = []
        self.responses: dict[int, Response] = {}
        self.done: set[int] = set()
        if handshake:
            extra = {"initial_window_size": window} if window is not None else {}
            self.send(PREFACE + settings(**extra))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, data: bytes) -> None:
        """An automatic answer (ACK, WINDOW_UPDATE): the server may have closed already."""
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def headers_block(
        self, path: str, extra: list[tuple[str, str]] | None = None, ctype: str = "application/grpc"
    ) -> bytes:
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost")]
        fields += [("content-type", ctype), ("te", "trailers")] + (extra or [])
        return self.encoder.encode(fields)

    def request(
        self,
        sid: int,
        path: str,
        message: bytes | None,
        extra: list[tuple[str, str]] | None = None,
        ctype: str = "application/grpc",
    ) -> bytes:
        out = frame(HEADERS, END_HEADERS, sid, self.headers_block(path, extra, ctype))
        if message is not None:
            out += frame(DATA, END_STREAM, sid, grpc_message(message))
        return out

    def read_frame(self) -> tuple[int, int, int, bytes] | None:
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        length = int.from_bytes(self.buf[:3], "big")
        ftype, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        payload, self.buf = self.buf[9 : 9 + length], self.buf[9 + length :]
        self.handle(ftype, flags, sid, payload)
        return ftype, flags, sid, payload

    def handle(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == SETTINGS and not flags & 1:
            for i in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HL", payload, i)
                self.server_settings[key] = value
            self.reply(frame(SETTINGS, 1, 0))
        elif ftype == PING and flags & 1:
            self.pings.append(payload)
        elif ftype == GOAWAY:
            self.goaway = struct.unpack(">LL", payload[:8])
        elif ftype == HEADERS:
            response = self.responses.setdefault(sid, Response())
            fields = {k: v for k, v in self.decoder.decode(payload)}
            if response.headers:
                response.trailers = fields
            else:
                response.headers = fields
            if flags & END_STREAM:
                self.done.add(sid)
        elif ftype == DATA:
            self.responses.setdefault(sid, Response()).data += payload
            if self.auto_window and payload:
                self.reply(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", len(payload))))
                if not flags & END_STREAM:
                    self.reply(frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", len(payload))))
            if flags & END_STREAM:
                self.done.add(sid)
        elif ftype == RST_STREAM:
            self.responses.setdefault(sid, Response()).reset = struct.unpack(">L", payload)[0]
            self.done.add(sid)

    def wait(self, *sids: int) -> list[Response]:
        while not set(sids) <= self.done:
            if self.read_frame() is None:
                raise ConnectionError(f"closed before streams {set(sids) - self.done} ended")
        return [self.responses[sid] for sid in sids]

    def until_closed(self) -> None:
        """Read until the server closes the connection (bounded by the socket timeout)."""
        while self.read_frame() is not None:
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[GrpcServerThread]:
    thread = GrpcServerThread(transport="h2").start()
    assert thread.handle is not None and thread.handle.transport == "h2"
    yield thread
    thread.stop()


@pytest.fixture
def client(server: GrpcServerThread) -> Iterator[RawClient]:
    raw = RawClient(server.port)
    yield raw
    raw.close()


def assert_alive(server: GrpcServerThread) -> None:
    with grpcclient.InferenceServerClient(server.url) as tc:
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
        assert tc.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0").sum() == 16


def output(response: Response) -> np.ndarray:
    (message,) = response.messages
    parsed = service_pb2.ModelInferResponse.FromString(message)
    return np.frombuffer(parsed.raw_output_contents[0], dtype=np.float32)


# -- connection level ------------------------------------------------------------------------------
def test_server_preface_and_ping(client: RawClient) -> None:
    client.send(frame(PING, 0, 0, b"12345678"))
    while not client.pings:
        assert client.read_frame() is not None
    assert client.pings == [b"12345678"]
    assert client.server_settings[4] >= 1 << 20  # a large INITIAL_WINDOW_SIZE
    assert client.server_settings[3] == grpc_h2.MAX_CONCURRENT_STREAMS


def test_bad_preface_gets_goaway_and_close(server: GrpcServerThread) -> None:
    raw = RawClient(server.port, handshake=False)
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    raw.until_closed()
    assert raw.goaway is not None and raw.goaway[1] == 0x1  # PROTOCOL_ERROR
    raw.close()
    assert_alive(server)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (frame(DATA, 0, 0, b"x"), 0x1),  # DATA on stream 0
        (frame(HEADERS, END_HEADERS, 2, b"\x83"), 0x1),  # even stream id
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), 0x1),  # increment 0
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0x7FFFFFFF)), 0x3),  # window overflow
        (frame(PING, 0, 0, b"short"), 0x6),  # FRAME_SIZE_ERROR
        (frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"), 0x1),  # MAX_FRAME_SIZE too small
        (frame(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), 0x3),  # INITIAL_WINDOW_SIZE too large
        (frame(SETTINGS, 0, 0, b"\x00"), 0x6),
        (frame(CONTINUATION, END_HEADERS, 1, b"\x83"), 0x1),  # CONTINUATION without HEADERS
        (frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, b"12345678"), 0x1),  # interleaved header block
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), 0x9),  # COMPRESSION_ERROR
        (frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02"), 0x1),
        (frame(RST_STREAM, 0, 9, b"\x00\x00\x00\x08"), 0x1),  # RST_STREAM on an idle stream
        (struct.pack(">L", 2 << 20)[1:] + b"\x00\x00\x00\x00\x00\x01", 0x6),  # frame over MAX_FRAME_SIZE
    ],
    ids=[
        "data-stream-0", "even-stream", "window-0", "window-overflow", "ping-size", "max-frame-size",
        "initial-window", "settings-size", "lone-continuation", "interleaved", "hpack", "push", "rst-idle",
        "oversize-frame",
    ],
)  # fmt: skip
def test_protocol_errors_goaway_and_the_server_goes_on(
    server: GrpcServerThread, frames: bytes, code: int
) -> None:
    raw = RawClient(server.port)
    raw.send(frames)
    raw.until_closed()
    assert raw.goaway is not None and raw.goaway[1] == code
    raw.close()
    assert_alive(server)


def test_garbage_never_kills_the_server(server: GrpcServerThread) -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        raw = RawClient(server.port)
        raw.send(rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes())
        raw.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):  # closed with unread data: also an answer
            raw.until_closed()
        raw.close()
    assert_alive(server)


def test_unknown_frame_types_and_priority_are_ignored(client: RawClient) -> None:
    client.send(frame(0x42, 0xFF, 0, b"whatever") + frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"))
    client.send(client.request(1, f"{SERVICE}/ModelInfer", infer_request()))
    (response,) = client.wait(1)
    assert response.status == 0 and output(response).tolist() == list(range(16))


def test_client_goaway_and_eof_still_answer_in_flight(server: GrpcServerThread) -> None:
    raw = RawClient(server.port)
    raw.send(raw.request(1, f"{SERVICE}/ModelInfer", infer_request()) + frame(GOAWAY, 0, 0, b"\x00" * 8))
    raw.sock.shutdown(socket.SHUT_WR)
    (response,) = raw.wait(1)
    assert response.status == 0
    raw.until_closed()
    raw.close()


# -- gRPC semantics ---------------------------------------------------------------------------------
def test_unknown_path_is_unimplemented_trailers_only(client: RawClient) -> None:
    client.send(client.request(1, f"{SERVICE}/NoSuchRpc", b""))
    (response,) = client.wait(1)
    assert response.headers[":status"] == "200" and response.status == 12 and not response.trailers
    assert response.headers["content-type"] == "application/grpc"


def test_wrong_content_type_is_415_and_get_is_405(client: RawClient) -> None:
    client.send(client.request(1, f"{SERVICE}/ServerLive", b"", ctype="application/json"))
    block = client.encoder.encode(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), ("content-type", "application/grpc")]
    )
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    first, second = client.wait(1, 3)
    assert first.headers[":status"] == "415" and second.headers[":status"] == "405"
    client.send(client.request(5, f"{SERVICE}/ServerLive", b""))
    (live,) = client.wait(5)
    assert live.status == 0 and live.messages == [b"\x08\x01"]


def test_message_split_over_many_data_frames(client: RawClient) -> None:
    body = grpc_message(infer_request())
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers_block(f"{SERVICE}/ModelInfer")))
    for i in range(0, len(body), 7):
        client.send(frame(DATA, 0, 1, body[i : i + 7]))
        time.sleep(0.001)
    client.send(frame(DATA, END_STREAM, 1))
    (response,) = client.wait(1)
    assert response.status == 0 and output(response).tolist() == list(range(16))


def test_padded_data_and_headers_with_priority(client: RawClient) -> None:
    block = client.headers_block(f"{SERVICE}/ModelInfer")
    payload = b"\x03" + b"\x00\x00\x00\x00\x10" + block + b"\x00\x00\x00"
    client.send(frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, payload))
    client.send(frame(DATA, END_STREAM | PADDED, 1, b"\x02" + grpc_message(infer_request()) + b"\x00\x00"))
    (response,) = client.wait(1)
    assert response.status == 0 and output(response).tolist() == list(range(16))


def test_header_block_with_continuation(client: RawClient) -> None:
    block = client.headers_block(f"{SERVICE}/ModelInfer", [("x-padding", "p" * 3000)])
    parts = [block[:10], block[10:1000], block[1000:]]
    client.send(frame(HEADERS, 0, 1, parts[0]) + frame(CONTINUATION, 0, 1, parts[1]))
    client.send(
        frame(CONTINUATION, END_HEADERS, 1, parts[2])
        + frame(DATA, END_STREAM, 1, grpc_message(infer_request()))
    )
    (response,) = client.wait(1)
    assert response.status == 0 and output(response).tolist() == list(range(16))


def test_several_messages_in_one_frame_on_a_stream(client: RawClient) -> None:
    def stream_request(request_id: str) -> bytes:
        request = service_pb2.ModelInferRequest.FromString(infer_request())
        request.id = request_id
        return grpc_message(request.SerializeToString())

    client.send(frame(HEADERS, END_HEADERS, 1, client.headers_block(f"{SERVICE}/ModelStreamInfer")))
    body = b"".join(stream_request(f"r{i}") for i in range(5))
    client.send(frame(DATA, 0, 1, body[:30]) + frame(DATA, END_STREAM, 1, body[30:]))
    (response,) = client.wait(1)
    assert response.status == 0
    ids = sorted(
        service_pb2.ModelStreamInferResponse.FromString(m).infer_response.id for m in response.messages
    )
    assert ids == [f"r{i}" for i in range(5)]


def test_many_concurrent_streams_on_one_connection(client: RawClient) -> None:
    sids = list(range(1, 400, 2))
    client.send(b"".join(client.request(sid, f"{SERVICE}/ModelInfer", infer_request()) for sid in sids))
    responses = client.wait(*sids)
    assert all(r.status == 0 and output(r).tolist() == list(range(16)) for r in responses)


def test_streams_over_the_limit_are_refused(
    server: GrpcServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_h2, "MAX_CONCURRENT_STREAMS", 3)
    model = server.registry.models["identity_fp32"]
    gate = asyncio.Event()
    server.run(_set(model, gate))
    raw = RawClient(server.port)
    try:
        raw.send(b"".join(raw.request(sid, f"{SERVICE}/ModelInfer", infer_request()) for sid in (1, 3, 5, 7)))
        (refused,) = raw.wait(7)
        assert refused.reset == 0x7  # REFUSED_STREAM
        server.loop.call_soon_threadsafe(gate.set)
        assert all(r.status == 0 for r in raw.wait(1, 3, 5))
    finally:
        server.run(_set(model, None))
        raw.close()


async def _set(model: Any, gate: asyncio.Event | None) -> None:
    model.gate = gate


def test_oversize_message_is_resource_exhausted() -> None:
    thread = GrpcServerThread(transport="h2", max_message_bytes=1 << 16).start()
    raw = RawClient(thread.port)
    try:
        big = infer_request("echo", np.zeros((1, 20_000), dtype=np.float32))
        raw.send(raw.request(1, f"{SERVICE}/ModelInfer", big))
        (response,) = raw.wait(1)
        assert response.status == 8
        assert "larger than max" in response.headers["grpc-message"]
        raw.send(raw.request(3, f"{SERVICE}/ModelInfer", infer_request()))  # the connection goes on
        assert raw.wait(3)[0].status == 0
    finally:
        raw.close()
        thread.stop()


def test_rst_stream_cancels_the_handler(server: GrpcServerThread) -> None:
    model = server.registry.models["identity_fp32"]
    gate = asyncio.Event()
    server.run(_set(model, gate))
    transport = server.handle._transport  # type: ignore[union-attr]
    raw = RawClient(server.port)
    try:
        model.last_request = None
        raw.send(raw.request(1, f"{SERVICE}/ModelInfer", infer_request()))
        deadline = time.monotonic() + 5
        while (model.last_request is None or not transport.tasks) and time.monotonic() < deadline:
            time.sleep(0.01)
        (task,) = list(transport.tasks)
        raw.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 0x8)))
        while not task.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert task.done() and not transport.tasks
        server.run(_set(model, None))
        raw.send(raw.request(3, f"{SERVICE}/ModelInfer", infer_request()))
        assert raw.wait(3)[0].status == 0
        assert 1 not in raw.done  # nothing was answered on the cancelled stream
    finally:
        server.run(_set(model, None))
        raw.close()


def test_grpc_timeout_is_deadline_exceeded(server: GrpcServerThread) -> None:
    model = server.registry.models["identity_fp32"]
    server.run(_set(model, asyncio.Event()))  # never set
    raw = RawClient(server.port)
    try:
        started = time.monotonic()
        raw.send(raw.request(1, f"{SERVICE}/ModelInfer", infer_request(), extra=[("grpc-timeout", "100m")]))
        (response,) = raw.wait(1)
        assert response.status == 4 and response.headers["grpc-message"] == "Deadline Exceeded"
        assert 0.09 < time.monotonic() - started < 3
    finally:
        server.run(_set(model, None))
        raw.close()
    transport = server.handle._transport  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while transport.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not transport.tasks  # the handler was cancelled


def test_compressed_messages(client: RawClient) -> None:
    body = grpc_message(gzip.compress(infer_request()), compressed=True)
    block = client.headers_block(f"{SERVICE}/ModelInfer", [("grpc-encoding", "gzip")])
    client.send(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, body))
    client.send(
        client.request(3, f"{SERVICE}/ModelInfer", infer_request(), extra=[("grpc-encoding", "snappy")])
    )
    # compressed flag without grpc-encoding
    client.send(frame(HEADERS, END_HEADERS, 5, client.headers_block(f"{SERVICE}/ModelInfer")))
    client.send(frame(DATA, END_STREAM, 5, grpc_message(b"xx", compressed=True)))
    gzipped, snappy, bad = client.wait(1, 3, 5)
    assert gzipped.status == 0 and output(gzipped).tolist() == list(range(16))
    assert snappy.status == 12 and "identity" in snappy.headers["grpc-accept-encoding"]
    assert bad.status == 13


def test_large_response_honours_a_small_client_window(server: GrpcServerThread) -> None:
    """10 MB back through a 64 KiB stream window and the default connection window: the server
    never sends more than granted, and goes on as the client grants more."""
    raw = RawClient(server.port, window=65535, auto_window=False)
    values = np.arange(2_500_000, dtype=np.float32).reshape(1, -1)
    try:
        body = grpc_message(infer_request("echo", values))
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.headers_block(f"{SERVICE}/ModelInfer")))
        for start in range(0, len(body), 16384):
            last = start + 16384 >= len(body)
            raw.send(frame(DATA, END_STREAM if last else 0, 1, body[start : start + 16384]))
        conn_window = stream_window = 65535
        while 1 not in raw.done:
            got = raw.read_frame()
            assert got is not None
            ftype, _, _, payload = got
            if ftype == DATA and payload:
                conn_window -= len(payload)
                stream_window -= len(payload)
                assert conn_window >= 0 and stream_window >= 0
                assert len(payload) <= 16384  # our MAX_FRAME_SIZE was the default
                if stream_window < 32768:  # the client reads slowly, in 32 KiB steps
                    step = struct.pack(">L", 32768)
                    raw.send(frame(WINDOW_UPDATE, 0, 1, step) + frame(WINDOW_UPDATE, 0, 0, step))
                    conn_window += 32768
                    stream_window += 32768
        (response,) = raw.wait(1)
        assert response.status == 0
        np.testing.assert_array_equal(output(response), values.ravel())
    finally:
        raw.close()


def test_hpack_cache_follows_the_dynamic_table(client: RawClient) -> None:
    """The same block bytes must be decoded again once the dynamic table changed: here a block
    naming the newest dynamic entry for ``:path`` first means ServerLive, later NoSuchRpc."""

    def literal_indexed(name_index: int, value: bytes) -> bytes:  # literal with incremental indexing
        return bytes((0x40 | name_index, len(value))) + value

    common = b"\x83\x86" + literal_indexed(31, b"application/grpc")  # POST, http, content-type
    client.send(frame(HEADERS, END_HEADERS, 1, common + literal_indexed(4, f"{SERVICE}/ServerLive".encode())))
    client.send(frame(DATA, END_STREAM, 1, grpc_message(b"")))
    # dynamic table now: 62 = :path ServerLive, 63 = content-type
    same = b"\x83\x86\xbf\xbe"  # POST, http, content-type (63), :path (62)
    client.send(frame(HEADERS, END_HEADERS, 3, same) + frame(DATA, END_STREAM, 3, grpc_message(b"")))
    client.send(frame(HEADERS, END_HEADERS, 5, same) + frame(DATA, END_STREAM, 5, grpc_message(b"")))
    first, second, third = client.wait(1, 3, 5)
    assert first.status == second.status == third.status == 0 and second.messages == [b"\x08\x01"]
    # a new :path entry (content-type is 63 until it is added): then 62 = NoSuchRpc,
    # 63 = ServerLive, 64 = content-type, and the same block bytes mean something else
    nosuch = literal_indexed(4, f"{SERVICE}/NoSuchRpc".encode())
    client.send(frame(HEADERS, END_HEADERS, 7, b"\x83\x86\xbf" + nosuch))
    client.send(frame(DATA, END_STREAM, 7, grpc_message(b"")))
    for sid, block in ((9, b"\x83\x86\xc0\xbe"), (11, b"\x83\x86\xc0\xbf")):
        client.send(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, grpc_message(b"")))
    unknown, unknown_again, live_again = client.wait(7, 9, 11)
    assert unknown.status == 12 and unknown_again.status == 12
    assert live_again.status == 0 and live_again.messages == [b"\x08\x01"]


def test_graceful_close_sends_goaway_and_finishes_in_flight() -> None:
    thread = GrpcServerThread(transport="h2").start()
    model = thread.registry.models["identity_fp32"]
    gate = asyncio.Event()
    thread.run(_set(model, gate))
    raw = RawClient(thread.port)
    try:
        raw.send(raw.request(1, f"{SERVICE}/ModelInfer", infer_request()))
        while model.last_request is None:
            time.sleep(0.01)
        closing = asyncio.run_coroutine_threadsafe(thread.handle.close(5.0), thread.loop)  # type: ignore[union-attr]
        while raw.goaway is None:
            assert raw.read_frame() is not None
        assert raw.goaway == (1, 0)  # last stream 1, NO_ERROR
        raw.send(raw.request(3, f"{SERVICE}/ModelInfer", infer_request()))  # too late: refused
        assert raw.wait(3)[0].reset == 0x7
        thread.loop.call_soon_threadsafe(gate.set)
        assert raw.wait(1)[0].status == 0
        raw.until_closed()
        closing.result(5)
    finally:
        raw.close()
        thread.handle = None
        thread.stop()


def test_percent_encoding() -> None:
    assert percent_encode("plain text: ok") == b"plain text: ok"
    assert percent_encode("50% ünï\n") == b"50%25 %C3%BCn%C3%AF%0A"


# -- real clients ------------------------------------------------------------------------------------
def test_grpc_aio_generic_calls_with_changing_metadata(server: GrpcServerThread) -> None:
    """grpc's own client (Huffman, dynamic table, custom metadata that keeps changing the table)."""

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.url) as channel:
            infer = channel.unary_unary(f"{SERVICE}/ModelInfer")
            live = channel.unary_unary(f"{SERVICE}/ServerLive")
            calls = []
            for i in range(300):
                metadata = (("x-request", f"value-{i % 37}"), ("x-fixed", "same"))
                calls.append(infer(infer_request(), metadata=metadata, timeout=30))
                calls.append(live(b"", metadata=metadata))
            results = await asyncio.gather(*calls)
            for i, result in enumerate(results):
                if i % 2:
                    assert result == b"\x08\x01"
                else:
                    assert service_pb2.ModelInferResponse.FromString(result).model_name == "identity_fp32"

    asyncio.run(main())


def test_tritonclient_aio_and_sync(server: GrpcServerThread) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as tc:
            tensor = aioclient.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.full((1, 16), 3, dtype=np.float32))
            results = await asyncio.gather(*(tc.infer("identity_fp32", [tensor]) for _ in range(100)))
            assert all(r.as_numpy("OUTPUT0").sum() == 48 for r in results)

    asyncio.run(main())
    assert_alive(server)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (Debian nghttp2-client)")
def test_h2load(server: GrpcServerThread, tmp_path: Any) -> None:
    body = tmp_path / "request.bin"
    body.write_bytes(grpc_message(infer_request()))
    out = subprocess.run(
        [
            "h2load", "-n", "2000", "-c", "4", "-m", "8", "-d", str(body), "-H", "content-type: application/grpc",
            "-H", "te: trailers", f"http://{server.url}{SERVICE}/ModelInfer",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "2000 succeeded, 0 failed, 0 errored" in out, out


def test_header_list_size_limits(server: GrpcServerThread) -> None:
    """Over the advertised MAX_HEADER_LIST_SIZE: the call is refused (RESOURCE_EXHAUSTED) and the
    connection goes on; far over it (the decoder's own limit): the connection ends."""
    raw = RawClient(server.port)
    try:
        big = [("x-big", "b" * (grpc_h2.MAX_HEADER_LIST + 10))]
        raw.send(raw.request(1, f"{SERVICE}/ServerLive", b"", extra=big))
        raw.send(raw.request(3, f"{SERVICE}/ServerLive", b""))
        refused, live = raw.wait(1, 3)
        assert refused.status == 8 and live.status == 0
        huge = [("x-huge", "h" * (2 * grpc_h2.MAX_HEADER_LIST + 10))]
        raw.send(raw.request(5, f"{SERVICE}/ServerLive", b"", extra=huge))
        raw.until_closed()
        assert raw.goaway is not None and raw.goaway[1] == 0xB  # ENHANCE_YOUR_CALM
    finally:
        raw.close()
    assert_alive(server)
