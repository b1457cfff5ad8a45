"""Transport ``h2``: gRPC over cleartext HTTP/2 as an ``asyncio.Protocol`` on the engine's loop.

Why: the ``core`` transport pays a thread hop (poller thread -> loop) and three completion
events per call; ``grpc.aio`` several. Here one ``data_received`` parses the frames of a burst
of calls, runs each unary handler eagerly (our inline-placed models finish without suspending,
so no task is created) and answers with one ``transport.write`` per burst: no grpcio server, no
thread, no completion queue — the same idea as our HTTP/1.1 server (docs/http-stack.md).
Measurements: docs/grpc-stack.md.

Scope (RFC 9113, what gRPC clients use): h2c with prior knowledge (the client sends the
connection preface directly); SETTINGS both ways (their MAX_FRAME_SIZE, INITIAL_WINDOW_SIZE
honoured; we never index our header blocks, so their HEADER_TABLE_SIZE needs no action); PING;
flow control both ways (what we send waits for window; what we receive is topped up when half
the window is used, so clients never stall); HEADERS with CONTINUATION, padding and priority;
RST_STREAM; GOAWAY (graceful on close, with the right code on protocol errors); concurrency
limit (REFUSED_STREAM); unknown frame types ignored. No server push, no TLS (the engine's
gRPC port has none on any transport), no h2c upgrade from HTTP/1.1.

gRPC (doc/PROTOCOL-HTTP2.md of grpc/grpc): POST only (else 405), ``content-type:
application/grpc*`` (else 415), ``grpc-timeout`` (DEADLINE_EXCEEDED), ``grpc-encoding``
identity/gzip/deflate (others UNIMPLEMENTED with ``grpc-accept-encoding``), length-prefixed
messages across/within DATA frames, the receive size limit (RESOURCE_EXHAUSTED), trailers-only
answers for errors, ``grpc-message`` percent-encoded.

HPACK decoding uses the ``hpack`` package (Huffman, dynamic table). It is slow, so decoded
header blocks are cached per connection by their bytes, only while the dynamic table is exactly
as it was when they were decoded and only for blocks whose decoding did not change it: gRPC
clients send the same all-indexed block for every call after the first. Our own header blocks
are precomputed literals without indexing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Coroutine, Generator, Mapping
from typing import Any

import grpc
from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

from elastiserve.engine.frontends.grpc_transport import (
    ChannelOptions,
    Handler,
    StreamHandler,
    StreamInbox,
    status_of,
)

log = logging.getLogger("elastiserve.engine.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
# flags
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = (1 << 31) - 1
MAX_CONCURRENT_STREAMS = 1024
RECV_FRAME_SIZE = 1 << 20  # the largest frame we accept (advertised)
STREAM_WINDOW = 1 << 22  # receive window per stream (advertised) ...
CONNECTION_WINDOW = 1 << 24  # ... and per connection (raised by a WINDOW_UPDATE at start)
MAX_HEADER_LIST = 1 << 16  # advertised; over it a call is refused, over twice it the connection
MAX_HEADER_BLOCK = 1 << 18  # encoded header block incl. CONTINUATIONs: more is a flood
_LINGER = 1.0  # seconds a connection that failed keeps reading (and discarding) before it closes
_CACHE_BLOCKS = 256  # decoded header blocks kept per connection ...
_CACHE_BLOCK_BYTES = 1024  # ... if no larger than this (an indexed gRPC block is ~10-40 bytes)

_FRAME = struct.Struct(">HBBBL")  # length (high 16 bits, low 8 bits), type, flags, stream id
_MSG = struct.Struct(">BL")  # gRPC message prefix: compressed flag, length
_U32 = struct.Struct(">L")

_OK = grpc.StatusCode.OK.value[0]
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_RESOURCE = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]

_ACCEPT_ENCODING = b"identity,deflate,gzip"
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


# -- HPACK encoding (ours: literals without indexing, precomputed where constant) ------------------
def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as "literal without indexing, new name", no Huffman: nothing to track."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _status_block(status: int) -> bytes:
    return b"\x88" if status == 200 else _literal(b":status", str(status).encode())


def percent_encode(message: str) -> bytes:
    """``grpc-message`` encoding: UTF-8, bytes outside 0x20-0x7E and ``%`` as ``%XX``."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


_CONTENT_TYPE = _literal(b"content-type", b"application/grpc")
RESPONSE_HEADERS = b"\x88" + _CONTENT_TYPE
OK_TRAILERS = _literal(b"grpc-status", b"0")


def _status_fields(code: int, message: bytes) -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if message:
        block += _literal(b"grpc-message", message)
    return block


def trailers_only(code: int, message: bytes, extra: bytes = b"") -> bytes:
    """The header block of a Trailers-Only answer (errors): status, content-type and the status."""
    return RESPONSE_HEADERS + _status_fields(code, message) + extra


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _goaway(last_sid: int, code: int, debug: bytes = b"") -> bytes:
    return _frame(GOAWAY, 0, 0, _U32.pack(last_sid) + _U32.pack(code) + debug)


def _rst(sid: int, code: int) -> bytes:
    return _frame(RST_STREAM, 0, sid, _U32.pack(code))


def _window_update(sid: int, increment: int) -> bytes:
    return _frame(WINDOW_UPDATE, 0, sid, _U32.pack(increment))


_SERVER_PREFACE = _frame(
    SETTINGS,
    0,
    0,
    b"".join(
        struct.pack(">HL", key, value)
        for key, value in (
            (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
            (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (S_MAX_FRAME_SIZE, RECV_FRAME_SIZE),
            (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            (S_ENABLE_PUSH, 0),
        )
    ),
) + _window_update(0, CONNECTION_WINDOW - 65535)
_SETTINGS_ACK = _frame(SETTINGS, ACK, 0)
_HEADERS_FRAME_HEAD = _FRAME.pack(
    len(RESPONSE_HEADERS) >> 8, len(RESPONSE_HEADERS) & 0xFF, HEADERS, END_HEADERS, 0
)
# one unary OK answer: HEADERS, DATA (its header and the gRPC prefix), then the trailers frame
_UNARY_HEAD = struct.Struct(f">HBBBL{len(RESPONSE_HEADERS)}sHBBBLBL")
_UNARY_TAIL = struct.Struct(f">HBBBL{len(OK_TRAILERS)}s")


class _CountingTable(HeaderTable):
    """hpack's dynamic table with a version that moves on every change (the decode cache's key)."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @property  # type: ignore[override]
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class _ConnectionError(Exception):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# Route kinds (what a request's header block resolves to; cached with the block).
_UNARY, _STREAMING, _GRPC_ERROR, _HTTP_ERROR, _BAD = range(5)


class _Route:
    """What a header block asks for: a handler (with its encoding and deadline) or an answer."""

    __slots__ = ("block", "encoding", "handler", "kind", "timeout")

    def __init__(
        self,
        kind: int,
        handler: Any = None,
        block: bytes = b"",
        encoding: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        self.kind = kind
        self.handler = handler
        self.block = block  # the answer's header block, for the error kinds
        self.encoding = encoding
        self.timeout = timeout


class _Stream:
    """One HTTP/2 stream (one gRPC call)."""

    __slots__ = (
        "buf",
        "call",
        "headers_sent",
        "local_done",
        "pending",
        "pending_bytes",
        "received",
        "recv_used",
        "remote_closed",
        "route",
        "send_window",
        "sid",
        "task",
        "timer",
        "trailers",
    )

    def __init__(self, sid: int, route: _Route, send_window: int) -> None:
        self.sid = sid
        self.route = route
        self.send_window = send_window
        self.buf: bytearray | None = None  # a partial request message
        self.received = 0  # complete request messages
        self.recv_used = 0  # received DATA not yet given back with a WINDOW_UPDATE
        self.remote_closed = False
        self.local_done = False  # our END_STREAM is written (or the stream was reset)
        self.headers_sent = False
        self.pending: collections.deque[bytes | memoryview] = collections.deque()  # waits for window
        self.pending_bytes = 0
        self.trailers: bytes | None = None  # written once ``pending`` is empty
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.call: H2StreamCall | None = None


class _Resume:
    """Hands a coroutine that suspended while driven eagerly over to a Task: re-yields the
    future it is waiting on (the Task waits for it) and forwards every resume and throw."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, None, Any]:
        coro = self.coro
        yielded = self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:  # the Task was destroyed unfinished: close the handler too
                coro.close()
                raise
            except BaseException as exc:  # cancellation (or an error) thrown in by the Task
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class H2Transport:
    """gRPC over HTTP/2 served by an asyncio protocol on ``loop`` (same shape as ``CoreTransport``)."""

    eager = True  # drive unary handlers inline until they suspend (else: one task per call)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handlers: Mapping[str, Handler],
        unimplemented: Mapping[str, str],
        options: ChannelOptions,
        stream_handlers: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        routes: dict[bytes, tuple[int, Any]] = {}
        for path, message in unimplemented.items():
            routes[path.encode()] = (_GRPC_ERROR, trailers_only(_UNIMPLEMENTED, percent_encode(message)))
        for path, handler in handlers.items():
            routes[path.encode()] = (_UNARY, handler)
        for path, stream_handler in (stream_handlers or {}).items():
            routes[path.encode()] = (_STREAMING, stream_handler)
        self.routes = routes
        self.not_found = trailers_only(_UNIMPLEMENTED, b"Method not found!")
        settings = dict(options)
        limit = int(settings.get("grpc.max_receive_message_length", 4 << 20))
        self.max_receive = limit if limit >= 0 else 1 << 62
        self._sockets: list[socket.socket] = []
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[H2Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepting = False
        self._closing: asyncio.Task[None] | None = None

    def bind(self, address: str) -> int:
        """Bind (not yet listen) every address ``host:port`` resolves to; returns the port."""
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]")
        port = int(port_text)
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise OSError(f"failed to bind the gRPC server to {address}: {exc}") from None
        seen: set[tuple[Any, ...]] = set()
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            if port == 0 and self._sockets:  # the other addresses take the port the first one got
                sockaddr = (sockaddr[0], self._sockets[0].getsockname()[1], *sockaddr[2:])
            if (family, sockaddr[:2]) in seen:
                continue
            seen.add((family, sockaddr[:2]))
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self._sockets.append(sock)
        if not self._sockets:
            detail = f": {error.strerror}" if error is not None and error.strerror else ""
            raise OSError(
                f"failed to bind the gRPC server to {address} (address in use or not available){detail}"
            )
        return int(self._sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.accepting = True
        for sock in self._sockets:
            sock.listen(1024)
            sock.setblocking(False)
            server = await self._loop.create_server(lambda: H2Connection(self), sock=sock, backlog=1024)
            self._servers.append(server)

    async def close(self, grace: float | None) -> None:
        """Stop accepting; GOAWAY every connection; in-flight calls get ``grace`` seconds, then are
        cancelled (answered CANCELLED) and the connections closed."""
        if self._closing is None:
            self._closing = self._loop.create_task(self._close(grace))
        await asyncio.shield(self._closing)

    async def _close(self, grace: float | None) -> None:
        self.accepting = False
        for server in self._servers:
            server.close()
        for sock in self._sockets:
            if not self._servers:
                sock.close()
        for conn in list(self.connections):
            conn.drain()
        lost = [conn.lost for conn in self.connections]
        if lost:
            try:
                await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in lost)), grace)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.cancel_all()
                for task in list(self.tasks):
                    task.cancel()
                for _ in range(3):  # let the cancelled handlers answer CANCELLED, and flush
                    await asyncio.sleep(0)
                for conn in list(self.connections):
                    conn.close_now()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in lost)), 2.0)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)


class H2Connection(asyncio.Protocol):
    """One client connection: frames in, frames out, handlers on this loop."""

    def __init__(self, server: H2Transport) -> None:
        self.server = server
        self.loop = server._loop
        self.routes = server.routes
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0  # highest stream id the client opened
        self.goaway_sid: int | None = None  # set once draining: the last stream we serve
        self.closed = False
        self.eof = False
        self._preface = False
        self._buf = bytearray()
        self._need = 0
        self._continuation: tuple[int, int, list[bytes], int] | None = None
        self._out: list[bytes | memoryview] = []
        self._receiving = False
        self._flush_scheduled = False
        self.decoder = Decoder(max_header_list_size=2 * MAX_HEADER_LIST)
        self.decoder.header_table = _CountingTable()
        self._cache: dict[bytes, _Route] = {}
        self.peer_max_frame = 16384
        self.peer_initial_window = 65535
        self.send_window = 65535
        self.recv_used = 0
        self._blocked: dict[int, _Stream] = {}  # streams whose data waits for window

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        if not self.server.accepting:
            self.goaway_sid = 0
        transport.write(_SERVER_PREFACE)  # type: ignore[attr-defined]
        if self.goaway_sid is not None:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_all()
        self.server.connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def eof_received(self) -> bool:
        """The client half-closed TCP: answer what is in flight, then close."""
        self.eof = True
        return not self.closed and bool(self.streams)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        self._receiving = True
        try:
            self._frames(data)
        except _ConnectionError as exc:
            self._connection_error(exc.code, str(exc))
        except Exception:  # a server bug: this connection ends, the server goes on
            log.exception("gRPC h2: failed to handle a frame")
            self._connection_error(INTERNAL_ERROR, "internal error")
        finally:
            self._receiving = False
        self._flush()

    # -- frames in -----------------------------------------------------------------------------
    def _frames(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        if not self._preface:
            if n < 24:
                if not PREFACE.startswith(data):
                    raise _ConnectionError(PROTOCOL_ERROR, "bad connection preface")
                self._buf += data
                self._need = 24
                return
            if data[:24] != PREFACE:
                raise _ConnectionError(PROTOCOL_ERROR, "bad connection preface")
            self._preface = True
            pos = 24
        unpack = _FRAME.unpack_from
        while not self.closed:
            if n - pos < 9:
                need = 9
                break
            high, low, ftype, flags, sid = unpack(data, pos)
            length = (high << 8) | low
            if length > RECV_FRAME_SIZE:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > n:
                need = 9 + length
                break
            payload = data[pos + 9 : end]
            pos = end
            sid &= 0x7FFFFFFF
            if self._continuation is not None and ftype != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "expected a CONTINUATION frame")
            if ftype == DATA:
                self._on_data(flags, sid, payload)
            elif ftype == HEADERS:
                self._on_headers(flags, sid, payload)
            elif ftype == WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif ftype == PING:
                self._on_ping(flags, sid, payload)
            elif ftype == SETTINGS:
                self._on_settings(flags, sid, payload)
            elif ftype == RST_STREAM:
                self._on_rst(sid, payload)
            elif ftype == CONTINUATION:
                self._on_continuation(flags, sid, payload)
            elif ftype == GOAWAY:
                self._on_goaway(sid)
            elif ftype == PRIORITY:
                if sid == 0:
                    raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            elif ftype == PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # unknown frame types are ignored (RFC 9113 §4.1)
        else:
            return
        if pos < n:
            self._buf += data[pos:] if pos else data
            self._need = need

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        end = len(payload)
        if flags & PADDED:
            if not payload:
                raise _ConnectionError(PROTOCOL_ERROR, "padded HEADERS without a pad length")
            start = 1
            end -= payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if end < start:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        block = payload[start:end] if start or end != len(payload) else payload
        if not flags & END_HEADERS:
            self._continuation = (sid, flags, [block], len(block))
            return
        self._on_header_block(sid, flags, block)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        pending = self._continuation
        if pending is None or pending[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION frame")
        first_sid, first_flags, parts, size = pending
        parts.append(payload)
        size += len(payload)
        if size > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._continuation = None
            self._on_header_block(sid, first_flags, b"".join(parts))
        else:
            self._continuation = (first_sid, first_flags, parts, size)

    def _decode(self, block: bytes) -> _Route:
        table: _CountingTable = self.decoder.header_table  # type: ignore[assignment]
        version = table.version
        try:
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header list too large") from None
        except (HPACKError, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        route = self._route(headers)
        cache = self._cache
        if table.version == version:
            if len(cache) >= _CACHE_BLOCKS:
                cache.clear()
            if _CACHE_BLOCKS and len(block) <= _CACHE_BLOCK_BYTES:
                cache[block] = route
        elif cache:
            cache.clear()  # the table moved: no cached block decodes the same any more
        return route

    def _route(self, headers: list[tuple[bytes, bytes]]) -> _Route:
        method = path = content_type = encoding = timeout = None
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name == b"grpc-timeout":
                timeout = value
        if method is None or path is None:
            return _Route(_BAD)
        if method != b"POST":
            return _Route(_HTTP_ERROR, block=_status_block(405))
        if content_type is None or not content_type.startswith(b"application/grpc"):
            return _Route(_HTTP_ERROR, block=_status_block(415))
        if size > MAX_HEADER_LIST:
            return _Route(_GRPC_ERROR, block=trailers_only(_RESOURCE, b"header list too large"))
        if encoding == b"identity":
            encoding = None
        elif encoding is not None and encoding not in (b"gzip", b"deflate"):
            message = percent_encode(f"Compression algorithm '{encoding.decode('latin-1')}' is not supported")
            extra = _literal(b"grpc-accept-encoding", _ACCEPT_ENCODING)
            return _Route(_GRPC_ERROR, block=trailers_only(_UNIMPLEMENTED, message, extra))
        seconds = None
        if timeout is not None and 2 <= len(timeout) <= 9 and timeout[:-1].isdigit():
            unit = _TIMEOUT_UNITS.get(timeout[-1:])
            if unit is not None:
                seconds = int(timeout[:-1]) * unit
        found = self.routes.get(path)
        if found is None:
            return _Route(_GRPC_ERROR, block=self.server.not_found)
        kind, target = found
        if kind == _GRPC_ERROR:
            return _Route(_GRPC_ERROR, block=target)
        return _Route(kind, target, encoding=encoding, timeout=seconds)

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        route = self._cache.get(block)
        if route is None:
            route = self._decode(block)  # always decoded, even when refused: HPACK state is shared
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: must end the stream
            if not flags & END_STREAM or stream.remote_closed:
                self._reset(stream, PROTOCOL_ERROR)
            else:
                stream.remote_closed = True
                self._remote_end(stream)
            return
        if sid & 1 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"stream {sid}: even stream id from a client")
        if sid <= self.last_sid:
            return  # a stream we already closed (reset): nothing to do
        self.last_sid = sid
        if self.goaway_sid is not None or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._out.append(_rst(sid, REFUSED_STREAM))
            return
        kind = route.kind
        if kind >= _GRPC_ERROR:
            if kind == _BAD:
                self._out.append(_rst(sid, PROTOCOL_ERROR))
                return
            self._write_headers(sid, route.block, END_STREAM)
            if not flags & END_STREAM:
                self._out.append(_rst(sid, NO_ERROR))  # we need nothing more of this request
            return
        stream = _Stream(sid, route, self.peer_initial_window)
        self.streams[sid] = stream
        if route.timeout is not None:
            stream.timer = self.loop.call_later(route.timeout, self._deadline, stream)
        if kind == _STREAMING:
            call = stream.call = H2StreamCall(self, stream)
            task = self.loop.create_task(self._serve_stream(stream, call, route.handler))
            self._track(stream, task)
        if flags & END_STREAM:
            stream.remote_closed = True
            self._remote_end(stream)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        self.recv_used += size
        if self.recv_used >= CONNECTION_WINDOW // 2:
            self._out.append(_window_update(0, self.recv_used))
            self.recv_used = 0
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # closed (we answered early or reset it): discarded, the window is given back
        if stream.remote_closed:
            self._reset(stream, STREAM_CLOSED)
            return
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA padding exceeds the frame")
            payload = payload[1 : size - payload[0]]
        end = flags & END_STREAM
        if end:
            stream.remote_closed = True
        else:
            stream.recv_used += size
            if stream.recv_used >= STREAM_WINDOW // 2:
                self._out.append(_window_update(sid, stream.recv_used))
                stream.recv_used = 0
        if payload:
            self._messages(stream, payload)
        if end and sid in self.streams:
            self._remote_end(stream)

    def _messages(self, stream: _Stream, data: bytes) -> None:
        """Split length-prefixed gRPC messages (any number per frame, any number of frames each)."""
        buf = stream.buf
        view: bytes | bytearray = data
        if buf:
            buf += data
            view = buf
        pos = 0
        n = len(view)
        limit = self.server.max_receive
        while n - pos >= 5:
            compressed, length = _MSG.unpack_from(view, pos)
            if length > limit:
                self._fail(stream, _RESOURCE, f"Received message larger than max ({length} vs. {limit})")
                return
            end = pos + 5 + length
            if end > n:
                break
            message = bytes(view[pos + 5 : end])
            pos = end
            if compressed:
                decompressed = self._decompress(stream, message)
                if decompressed is None:
                    return
                message = decompressed
            self._on_message(stream, message)
            if stream.local_done:
                return
        if pos == n:
            stream.buf = None
        elif buf:
            if pos:
                del buf[:pos]
        else:
            stream.buf = bytearray(view[pos:])

    def _decompress(self, stream: _Stream, message: bytes) -> bytes | None:
        encoding = stream.route.encoding
        if encoding is None:
            self._fail(stream, _INTERNAL, "Compressed message received without grpc-encoding")
            return None
        limit = self.server.max_receive
        decoder = zlib.decompressobj(31 if encoding == b"gzip" else 15)
        try:
            out = decoder.decompress(message, limit + 1)
        except zlib.error as exc:
            self._fail(stream, _INTERNAL, f"failed to decompress the request message: {exc}")
            return None
        if len(out) > limit:
            self._fail(
                stream, _RESOURCE, f"Received message larger than max (over {limit} bytes decompressed)"
            )
            return None
        return out

    def _on_message(self, stream: _Stream, message: bytes) -> None:
        stream.received += 1
        call = stream.call
        if call is not None:
            call._deliver(message)
            return
        if stream.received > 1:
            self._fail(stream, _UNIMPLEMENTED, "expected exactly one request message")
            return
        handler = stream.route.handler
        if not self.server.eager:
            self._track(stream, self.loop.create_task(self._serve_unary(stream, handler(message))))
            return
        coro = handler(message)
        ctx = contextvars.copy_context()
        try:
            yielded = ctx.run(coro.send, None)
        except StopIteration as stop:
            self._respond(stream, stop.value)
            return
        except BaseException as exc:
            self._respond_error(stream, exc)
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            return
        task = self.loop.create_task(self._serve_unary(stream, _Resume(coro, yielded)), context=ctx)
        self._track(stream, task)

    def _track(self, stream: _Stream, task: asyncio.Task[None]) -> None:
        stream.task = task
        tasks = self.server.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _remote_end(self, stream: _Stream) -> None:
        """The client half-closed the stream."""
        if stream.buf:
            self._fail(stream, _INTERNAL, "the request ended inside a message")
            return
        call = stream.call
        if call is not None:
            call._deliver(None)
        elif stream.received == 0:
            self._fail(stream, _UNIMPLEMENTED, "expected exactly one request message")
            return
        if stream.local_done:
            self._forget(stream)

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            for stream in list(self._blocked.values()):
                if self.send_window <= 0:
                    break
                self._pump(stream)
            return
        stream = self.streams.get(sid)
        if stream is None:
            return
        if increment == 0:
            self._reset(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        if stream.pending or stream.trailers is not None:
            self._pump(stream)

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PING of the wrong size")
        if not flags & ACK:
            self._out.append(_frame(PING, ACK, 0, payload))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                if delta:
                    for stream in self.streams.values():
                        stream.send_window += delta
                    if delta > 0:
                        for stream in list(self._blocked.values()):
                            self._pump(stream)
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise _ConnectionError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE: our blocks never use the dynamic table; the others limit the peer
        self._out.append(_SETTINGS_ACK)

    def _on_rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if sid > self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self.streams.get(sid)
        if stream is not None:
            stream.local_done = True
            self._forget(stream)
            self._cancel(stream)

    def _on_goaway(self, sid: int) -> None:
        if sid != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
        if self.goaway_sid is None:
            self.goaway_sid = self.last_sid  # no new streams; closed once the open ones are done

    # -- frames out ----------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out and not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self.goaway_sid is not None or self.eof:
            self._maybe_close()

    def _written(self) -> None:
        """Something was queued outside ``data_received``: flush once this loop iteration ends."""
        if not self._receiving and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _write_headers(self, sid: int, block: bytes, flags: int) -> None:
        limit = self.peer_max_frame
        if len(block) <= limit:
            self._out.append(_frame(HEADERS, flags | END_HEADERS, sid, block))
            return
        self._out.append(_frame(HEADERS, flags, sid, block[:limit]))
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            self._out.append(
                _frame(CONTINUATION, END_HEADERS if last else 0, sid, block[start : start + limit])
            )

    def _respond(self, stream: _Stream, payload: bytes) -> None:
        """A unary handler's answer: HEADERS, DATA and the OK trailers."""
        if stream.local_done or self.closed:
            return
        n = len(payload)
        size = n + 5
        sid = stream.sid
        if size <= self.send_window and size <= stream.send_window and size <= self.peer_max_frame:
            self.send_window -= size
            out = self._out
            out.append(
                _UNARY_HEAD.pack(
                    len(RESPONSE_HEADERS) >> 8,
                    len(RESPONSE_HEADERS) & 0xFF,
                    HEADERS,
                    END_HEADERS,
                    sid,
                    RESPONSE_HEADERS,
                    size >> 8,
                    size & 0xFF,
                    DATA,
                    0,
                    sid,
                    0,
                    n,
                )
            )
            out.append(payload)
            out.append(
                _UNARY_TAIL.pack(0, len(OK_TRAILERS), HEADERS, END_HEADERS | END_STREAM, sid, OK_TRAILERS)
            )
            self._done(stream)
            self._written()
            return
        self._send_message(stream, payload)
        self._finish(stream, OK_TRAILERS)

    def _send_message(self, stream: _Stream, payload: bytes) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self._out.append(_HEADERS_FRAME_HEAD[:5] + _U32.pack(stream.sid) + RESPONSE_HEADERS)
        n = len(payload)
        size = n + 5
        if (
            not stream.pending
            and size <= self.send_window
            and size <= stream.send_window
            and size <= self.peer_max_frame
        ):
            self.send_window -= size
            stream.send_window -= size
            self._out.append(
                _FRAME.pack(size >> 8, size & 0xFF, DATA, 0, stream.sid) + _MSG.pack(0, n) + payload
            )
        else:
            if n <= 65536:
                stream.pending.append(_MSG.pack(0, n) + payload)
            else:
                stream.pending.append(_MSG.pack(0, n))
                stream.pending.append(memoryview(payload))
            stream.pending_bytes += size
            self._pump(stream)
        self._written()

    def _finish(self, stream: _Stream, trailers: bytes) -> None:
        """End the response: trailers after whatever data still waits for window."""
        if stream.local_done or stream.trailers is not None or self.closed:
            return
        if not stream.headers_sent:
            stream.trailers = RESPONSE_HEADERS + trailers  # Trailers-Only
        else:
            stream.trailers = trailers
        self._pump(stream)
        self._written()

    def _pump(self, stream: _Stream) -> None:
        """Send as much of the stream's waiting data as the windows allow, then its trailers."""
        pending = stream.pending
        out = self._out
        sid = stream.sid
        while pending:
            room = min(self.send_window, stream.send_window, self.peer_max_frame, stream.pending_bytes)
            if room <= 0:
                self._blocked[sid] = stream
                return
            out.append(_FRAME.pack(room >> 8, room & 0xFF, DATA, 0, sid))
            left = room
            while left:
                chunk = pending[0]
                if len(chunk) <= left:
                    pending.popleft()
                    out.append(chunk)
                    left -= len(chunk)
                else:
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    out.append(view[:left])
                    pending[0] = view[left:]
                    left = 0
            self.send_window -= room
            stream.send_window -= room
            stream.pending_bytes -= room
        self._blocked.pop(sid, None)
        trailers = stream.trailers
        if trailers is not None and not stream.local_done:
            self._write_headers(sid, trailers, END_STREAM)
            self._done(stream)

    def _done(self, stream: _Stream) -> None:
        """Our END_STREAM is written: the stream is over once the client's side is too; if the
        client is still sending, tell it to stop (RST_STREAM NO_ERROR, as gRPC servers do)."""
        stream.local_done = True
        if not stream.remote_closed:
            self._out.append(_rst(stream.sid, NO_ERROR))
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.sid, None)
        self._blocked.pop(stream.sid, None)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if not self.streams and (self.goaway_sid is not None or self.eof):
            self._written()

    def _reset(self, stream: _Stream, code: int) -> None:
        """A stream error: RST_STREAM, and the handler is cancelled."""
        if not stream.local_done:
            self._out.append(_rst(stream.sid, code))
            self._written()
        stream.local_done = True
        stream.remote_closed = True
        self._forget(stream)
        self._cancel(stream)

    def _fail(self, stream: _Stream, code: int, message: str) -> None:
        """End a call with an error status now (trailers-only if nothing was sent yet)."""
        if stream.local_done:
            return
        stream.pending.clear()
        stream.pending_bytes = 0
        self._finish(stream, _status_fields(code, percent_encode(message)))
        self._cancel(stream)

    def _respond_error(self, stream: _Stream, exc: BaseException) -> None:
        if stream.local_done or self.closed:
            return
        code, details = status_of(exc)
        self._finish(stream, _status_fields(code.value[0], percent_encode(details)))

    def _cancel(self, stream: _Stream) -> None:
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        call = stream.call
        if call is not None:
            call._on_cancelled()
        task = stream.task
        if task is not None and not task.done() and call is None:
            task.cancel()

    def _deadline(self, stream: _Stream) -> None:
        stream.timer = None
        if stream.local_done:
            return
        self._fail(stream, _DEADLINE, "Deadline Exceeded")
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    async def _serve_unary(self, stream: _Stream, awaitable: Awaitable[bytes]) -> None:
        try:
            payload = await awaitable
        except BaseException as exc:
            self._respond_error(stream, exc)
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            return
        self._respond(stream, payload)

    async def _serve_stream(self, stream: _Stream, call: H2StreamCall, handler: StreamHandler) -> None:
        try:
            await handler(call)
        except BaseException as exc:
            call._drain()
            self._respond_error(stream, exc)
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            return
        call._drain()
        self._finish(stream, OK_TRAILERS)

    # -- connection lifecycle --------------------------------------------------------------------
    def _connection_error(self, code: int, message: str) -> None:
        log.debug("gRPC h2: connection error %d: %s", code, message)
        if self.closed or self.transport is None:
            return
        self._out.append(_goaway(self.last_sid, code, message.encode()[:256]))
        self._flush()
        self.closed = True
        self.cancel_all()
        # Lingering close: stop writing, discard what the client still sends for a moment, then
        # close; closing at once with unread data would reset the connection and lose the GOAWAY.
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(_LINGER, transport.close)
        else:
            transport.close()

    def drain(self) -> None:
        """Graceful close: GOAWAY (no new streams), close once the open ones are done."""
        if self.closed:
            return
        if self.goaway_sid is None or self.goaway_sid == 0:
            self.goaway_sid = self.last_sid
        self._out.append(_goaway(self.goaway_sid, NO_ERROR))
        self._written()
        if self._receiving is False:
            self._flush()

    def _maybe_close(self) -> None:
        if not self.streams and not self.closed and self.transport is not None:
            if self._out:
                self.transport.write(b"".join(self._out))
                self._out.clear()
            self.closed = True
            self.transport.close()

    def cancel_all(self) -> None:
        """The connection is gone (or the server gives up waiting): cancel every call."""
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for stream in streams:
            self._cancel(stream)

    def close_now(self) -> None:
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class H2StreamCall(StreamInbox):
    """:class:`~.grpc_transport.StreamCall` on the ``h2`` transport. ``write`` may be called from
    any thread: off the loop it queues under a lock and wakes the loop once per burst, so order is
    kept and the connection is only touched on its loop."""

    threadsafe = True

    def __init__(self, conn: H2Connection, stream: _Stream) -> None:
        super().__init__(conn.loop)
        self._conn = conn
        self._stream = stream
        self._loop_thread = conn.server._loop_thread
        self._lock = threading.Lock()
        self._outbox: collections.deque[bytes] = collections.deque()
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if self.cancelled or self._stream.trailers is not None or self._stream.local_done:
            return
        if threading.get_ident() == self._loop_thread:
            if not self._outbox:
                self._conn._send_message(self._stream, data)
            else:
                self._outbox.append(data)
            return
        with self._lock:
            self._outbox.append(data)
            busy = self._scheduled
            self._scheduled = True
        if busy:
            # A model thread sending a burst: let the loop (which writes) have the GIL now, so
            # responses leave as they are made (as on the core transport, docs/streaming.md).
            time.sleep(0)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._conn.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False
            items = list(self._outbox)
            self._outbox.clear()
        stream = self._stream
        for data in items:
            if self.cancelled or stream.local_done or stream.trailers is not None:
                return
            self._conn._send_message(stream, data)


__all__ = ["H2Transport", "percent_encode"]
