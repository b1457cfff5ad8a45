"""gRPC ``ModelInfer`` calls: a lean HTTP/2 client of our own (default) and ``grpc.aio`` (fallback).

Why our own HTTP/2: a ``grpc.aio`` client spends several thread/loop hand-offs per call and
tops out near the servers it is meant to measure (docs/bench.md has the numbers). A unary gRPC
call is small on the wire: one HEADERS frame (pre-encoded once: HPACK literals, no Huffman, no
dynamic table), one DATA frame (the serialized ``ModelInferRequest`` with its 5-byte prefix,
also built once) and an answer of HEADERS, DATA, trailing HEADERS. This module writes those
frames and reads the answer's ``grpc-status`` only.

We tell the server our HPACK table size is 0, so its header blocks never depend on earlier ones
and the same bytes always mean the same headers: each distinct block is decoded once, then
looked up. Huffman-coded strings (grpc's C core sends none for these headers) decode with the
``hpack`` package when it is installed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from elastiserve.loadgen.http_driver import connect_error_kind

__all__ = ["GRPC_STATUS", "AioGrpcConnection", "GrpcTarget", "H2GrpcConnection", "parse_grpc_url"]

METHOD: Final = "/inference.GRPCInferenceService/ModelInfer"
GRPC_STATUS: Final = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]

_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = 0, 1, 3, 4, 5, 6, 7, 8, 9
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_OUR_STREAM_WINDOW: Final = 1 << 24
_OUR_CONN_WINDOW: Final = 1 << 30
_MAX_STREAM_ID: Final = (1 << 31) - 1


@dataclass(frozen=True)
class GrpcTarget:
    host: str
    port: int

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


def parse_grpc_url(url: str, default_port: int = 8001) -> GrpcTarget:
    """``host:port``, ``grpc://host:port`` or ``http://host:port`` (h2c, no TLS)."""
    text = url.split("://", 1)[1] if "://" in url else url
    if url.startswith(("https://", "grpcs://")):
        raise ValueError("TLS is not supported by the generator: use a plaintext gRPC port")
    text = text.split("/", 1)[0]
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"no host in gRPC URL {url!r}")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in gRPC URL {url!r}") from None
    return GrpcTarget(host, number)


# -- HPACK: just enough -------------------------------------------------------------------------------
_STATIC: Final = [
    ("", ""),
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
]


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(text: str) -> bytes:
    raw = text.encode("latin-1")
    return _hpack_int(len(raw), 7, 0) + raw


@dataclass(frozen=True)
class RequestHeaders:
    """The request's header blocks, built once per target.

    ``first`` adds our headers to the server's HPACK table (literal with incremental indexing),
    ``steady`` then names them by index: a few bytes per call, and the server's decoder reuses
    what it parsed once (literals every time cost grpc's C core measurably more). ``literal``
    (no indexing) is for a server that allows us no table.
    """

    first: bytes
    steady: bytes
    literal: bytes
    table_bytes: int  # what ``first`` adds to the server's table


def encode_request_headers(authority: str, metadata: list[tuple[str, str]]) -> RequestHeaders:
    fixed = bytes([0x83, 0x86])  # :method POST, :scheme http (static table)
    entries: list[tuple[int, str, str]] = [  # (static name index or 0, name, value)
        (4, ":path", METHOD),
        (1, ":authority", authority),
        (31, "content-type", "application/grpc"),
        (0, "te", "trailers"),
        (58, "user-agent", "elastiserve-bench"),
        *((0, name.lower(), value) for name, value in metadata),
    ]
    first, literal, steady = fixed, fixed, fixed
    for position, (index, name, value) in enumerate(entries):
        name_part = b"" if index else _hpack_str(name)
        first += _hpack_int(index, 6, 0x40) + name_part + _hpack_str(value)
        literal += _hpack_int(index, 4, 0) + name_part + _hpack_str(value)
        steady += _hpack_int(len(_STATIC) + len(entries) - 1 - position, 7, 0x80)
    table_bytes = sum(len(n) + len(v.encode("latin-1")) + 32 for _, n, v in entries)
    return RequestHeaders(first, steady, literal, table_bytes)


class HpackDecoder:
    """HPACK decoder with a dynamic table; blocks that do not touch the table are cached by bytes."""

    def __init__(self) -> None:
        self.table: deque[tuple[str, str]] = deque()
        self.size = 0
        self.max_size = 4096
        self.cache: dict[bytes, dict[str, str]] = {}

    def decode(self, block: bytes) -> dict[str, str]:
        cached = self.cache.get(block)
        if cached is not None:
            return cached
        headers, stateless = self._decode(block)
        if stateless and len(self.cache) < 4096:
            self.cache[block] = headers
        return headers

    def _decode(self, data: bytes) -> tuple[dict[str, str], bool]:
        headers: dict[str, str] = {}
        pos, stateless = 0, True
        while pos < len(data):
            byte = data[pos]
            if byte & 0x80:  # indexed
                index, pos = self._int(data, pos, 7)
                stateless &= index < len(_STATIC)
                name, value = self._entry(index)
            elif byte & 0xE0 == 0x20:  # dynamic table size update
                size, pos = self._int(data, pos, 5)
                self.max_size = size
                self._evict()
                continue
            else:
                indexing = byte & 0xC0 == 0x40
                index, pos = self._int(data, pos, 6 if indexing else 4)
                if index:
                    stateless &= index < len(_STATIC)
                    name = self._entry(index)[0]
                else:
                    name, pos = self._str(data, pos)
                value, pos = self._str(data, pos)
                if indexing and self.max_size > 0:
                    stateless = False
                    self.table.appendleft((name, value))
                    self.size += len(name) + len(value) + 32
                    self._evict()
            headers[name] = value
        return headers, stateless

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def _entry(self, index: int) -> tuple[str, str]:
        if index < len(_STATIC):
            return _STATIC[index]
        return self.table[index - len(_STATIC)]

    @staticmethod
    def _int(data: bytes, pos: int, bits: int) -> tuple[int, int]:
        limit = (1 << bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _str(self, data: bytes, pos: int) -> tuple[str, int]:
        huffman = bool(data[pos] & 0x80)
        length, pos = self._int(data, pos, 7)
        raw = data[pos : pos + length]
        pos += length
        if not huffman:
            return raw.decode("latin-1"), pos
        try:
            from hpack.huffman_table import decode_huffman  # optional: servers seen here never need it
        except ImportError:
            return "?huffman", pos
        return decode_huffman(raw).decode("latin-1"), pos


def status_kind(headers: dict[str, str]) -> str | None:
    """None for grpc-status 0; else 'grpc NAME' (or the HTTP status when there is no grpc-status)."""
    status = headers.get("grpc-status")
    if status is None:
        http = headers.get(":status", "")
        return f"http {http}" if http and http != "200" else "grpc no status"
    if status == "0":
        return None
    try:
        return f"grpc {GRPC_STATUS[int(status)]}"
    except (ValueError, IndexError):
        return f"grpc status {status}"


# -- the connection -----------------------------------------------------------------------------------
class _Stream:
    __slots__ = ("future", "headers", "sent_at")

    def __init__(self, future: asyncio.Future[str | None], sent_at: float) -> None:
        self.future = future
        self.sent_at = sent_at
        self.headers: dict[str, str] | None = None


class H2GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection carrying any number of concurrent ``ModelInfer`` streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._buf = bytearray()
        self._decoder = HpackDecoder()
        self._header_sid = 0
        self._header_parts: list[bytes] = []
        self._header_end_stream = False
        self._recv_unacked = 0
        self._send_window = 65535
        self._peer_stream_window = 65535
        self._max_frame = 16384
        self._peer_table = 4096
        self._headers_sent = False
        self._blocked: deque[tuple[bytes, int, int]] = deque()  # (frames, data length, stream id)
        self._ready = loop.create_future()

    @classmethod
    async def open(cls, target: GrpcTarget, timeout: float) -> H2GrpcConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: cls(loop), target.host, target.port), timeout
        )
        await asyncio.wait_for(protocol._ready, timeout)  # the server's SETTINGS
        return protocol

    # -- framing ------------------------------------------------------------------------------------
    @staticmethod
    def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        settings = struct.pack(">HIHIHI", 1, 0, 2, 0, 4, _OUR_STREAM_WINDOW)  # table 0, no push, window
        transport.write(
            _PREFACE
            + self._frame(_SETTINGS, 0, 0, settings)
            + self._frame(_WINDOW, 0, 0, struct.pack(">I", _OUR_CONN_WINDOW - 65535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        kind = connect_error_kind(exc) if exc else "connection closed"
        if not self._ready.done():
            self._ready.set_exception(ConnectionResetError(kind))
        self._fail_all(kind)

    def _fail_all(self, kind: str, above: int = 0) -> None:
        for sid in [s for s in self.streams if s > above]:
            stream = self.streams.pop(sid)
            if not stream.future.done():
                stream.future.set_result(kind)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            end = pos + 9 + length
            if end > size:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9 : end])
            pos = end
            self._on_frame(kind, flags, sid, payload)
        del buf[:pos]

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == _DATA:
            self._recv_unacked += len(payload)
            if self._recv_unacked > _OUR_CONN_WINDOW // 2 and self.transport is not None:
                self.transport.write(self._frame(_WINDOW, 0, 0, struct.pack(">I", self._recv_unacked)))
                self._recv_unacked = 0
            if flags & _END_STREAM:
                self._complete(sid, None)
        elif kind in (_HEADERS, _CONT):
            if kind == _HEADERS:
                if flags & _PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & _PRIORITY:
                    payload = payload[5:]
                self._header_sid, self._header_parts = sid, [payload]
                self._header_end_stream = bool(flags & _END_STREAM)
            else:
                self._header_parts.append(payload)
            if flags & _END_HEADERS:
                self._on_headers(self._header_sid, b"".join(self._header_parts), self._header_end_stream)
        elif kind == _SETTINGS:
            if not flags & 1:
                self._on_settings(payload)
        elif kind == _WINDOW:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self._send_window += increment
                self._flush_blocked()
        elif kind == _PING:
            if not flags & 1 and self.transport is not None:
                self.transport.write(self._frame(_PING, 1, 0, payload))
        elif kind == _RST:
            code = int.from_bytes(payload[:4], "big")
            self._complete_kind(sid, f"grpc stream reset ({code})")
        elif kind == _GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.closed = True  # no new streams; those up to `last` may still finish
            self._fail_all("connection closed (GOAWAY)", above=last)

    def _on_settings(self, payload: bytes) -> None:
        for at in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, at)
            if key == 1:
                self._peer_table = value
            elif key == 4:
                self._peer_stream_window = value
            elif key == 5:
                self._max_frame = value
        if self.transport is not None:
            self.transport.write(self._frame(_SETTINGS, 1, 0, b""))
        if not self._ready.done():
            self._ready.set_result(None)

    def _on_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        headers = self._decoder.decode(block)
        stream = self.streams.get(sid)
        if stream is None:
            return
        if end_stream:  # trailers (or trailers-only): the call is over
            if stream.headers is not None and "grpc-status" not in headers:
                headers = {**stream.headers, **headers}
            self._complete_kind(sid, status_kind(headers))
        else:
            stream.headers = headers

    def _complete(self, sid: int, kind: str | None) -> None:
        """DATA with END_STREAM: a gRPC answer always ends with trailers, so this is an error."""
        self._complete_kind(sid, kind or "grpc no status")

    def _complete_kind(self, sid: int, kind: str | None) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None and not stream.future.done():
            stream.future.set_result(kind)
        if self.closed and not self.streams and self.transport is not None:
            self.transport.close()

    # -- calls --------------------------------------------------------------------------------------
    def call(self, headers: RequestHeaders, message: bytes, now: float) -> asyncio.Future[str | None]:
        """Start one call; ``message`` is the gRPC-framed (5-byte prefix) request."""
        future = self.loop.create_future()
        if self.closed or self.transport is None:
            self.closed = True
            future.set_result("connection closed")
            return future
        sid = self._next_id
        if sid >= _MAX_STREAM_ID:
            self.closed = True
            future.set_result("connection closed (stream ids used up)")
            return future
        if len(message) > self._peer_stream_window:
            future.set_result("request larger than the server's stream window (use --grpc-impl aio)")
            return future
        self._next_id = sid + 2
        self.streams[sid] = _Stream(future, now)
        if self._headers_sent:
            header_block = headers.steady
        elif headers.table_bytes <= self._peer_table:
            header_block, self._headers_sent = headers.first, True
        else:
            header_block = headers.literal
        sid_bytes = struct.pack(">I", sid)
        frames = [
            struct.pack(">I", len(header_block))[1:] + bytes([_HEADERS, _END_HEADERS]) + sid_bytes,
            header_block,
        ]
        step = self._max_frame
        for at in range(0, len(message), step):
            chunk = message[at : at + step]
            flags = _END_STREAM if at + step >= len(message) else 0
            frames += [struct.pack(">I", len(chunk))[1:] + bytes([_DATA, flags]) + sid_bytes, chunk]
        data = b"".join(frames)
        if self._blocked or len(message) > self._send_window:
            self._blocked.append((data, len(message), sid))
        else:
            self._send_window -= len(message)
            self.transport.write(data)
        return future

    def _flush_blocked(self) -> None:
        while self._blocked and self._blocked[0][1] <= self._send_window and self.transport is not None:
            data, length, _ = self._blocked.popleft()
            self._send_window -= length
            self.transport.write(data)

    def cancel(self, sid: int, kind: str) -> None:
        """Give up on one stream (timeout): RST_STREAM(CANCEL) and fail it with ``kind``."""
        if sid in self.streams and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._frame(_RST, 0, sid, struct.pack(">I", 8)))
        self._complete_kind(sid, kind)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def frame_message(message: bytes) -> bytes:
    """gRPC length-prefixed message: compressed flag 0 + big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class AioGrpcConnection:
    """The same calls through ``grpc.aio`` (one channel = one HTTP/2 connection): for cross-checks."""

    def __init__(self, target: GrpcTarget, metadata: list[tuple[str, str]]) -> None:
        from grpc import aio

        self.closed = False
        self.streams: dict[int, Any] = {}
        self._channel = aio.insecure_channel(target.hostport, options=[("grpc.use_local_subchannel_pool", 1)])
        self._call = self._channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        self._metadata = tuple((k.lower(), v) for k, v in metadata)

    @classmethod
    async def open(
        cls, target: GrpcTarget, metadata: list[tuple[str, str]], timeout: float
    ) -> AioGrpcConnection:
        connection = cls(target, metadata)
        await asyncio.wait_for(connection._channel.channel_ready(), timeout)
        return connection

    async def call(self, message: bytes, timeout: float) -> str | None:
        import grpc

        try:
            await self._call(message, metadata=self._metadata or None, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "timeout"
            return f"grpc {code.name}"
        return None

    def close(self) -> None:
        self.closed = True
        self._closing = asyncio.ensure_future(self._channel.close())  # kept: a dropped task may vanish
