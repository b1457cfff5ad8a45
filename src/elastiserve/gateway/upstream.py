"""The gateway's HTTP/1.1 client side: keep-alive connections to one instance, over ``httptools``.

A general client (httpx, aiohttp) costs more per request than the whole engine spends on an
identity model, and the gateway needs only one thing from it: send a buffered request on a
kept-alive connection and get a buffered response back. So this is an ``asyncio.Protocol`` with
``httptools``' response parser and a LIFO pool of idle connections per instance (the most recent
connection is the one least likely to have been closed by the instance's idle timeout).

Failures are classified for the retry policy: :class:`ConnectFailed` means nothing was sent
(always safe to try another instance); :class:`ConnectionDropped` means the request may have
reached the instance (``partial`` tells whether any response bytes came back);
:class:`UpstreamTimeout` means the instance did not answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import httptools

__all__ = [
    "BadResponse",
    "ConnectFailed",
    "ConnectionDropped",
    "ConnectionPool",
    "StaleConnection",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
]

# Response headers that describe the instance↔gateway connection, not the response: never passed
# on (the gateway's server writes its own content-length and connection headers).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        b"proxy-authenticate",
    }
)


class UpstreamError(Exception):
    """A request to an instance failed; ``sent`` is False when it certainly never got there."""

    sent = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectFailed(UpstreamError):
    """No connection could be opened: the request was not sent."""

    sent = False


class StaleConnection(UpstreamError):
    """A kept-alive connection was found closed before anything was written on it."""

    sent = False


class ConnectionDropped(UpstreamError):
    """The connection closed before a whole response arrived."""

    def __init__(self, message: str, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


class UpstreamTimeout(UpstreamError):
    """No whole response within the request's deadline."""


class BadResponse(UpstreamError):
    """The instance answered something that is not HTTP/1.x."""


class UpstreamResponse:
    """A buffered response: ``headers`` are raw ``name: value\\r\\n`` lines, hop-by-hop ones removed."""

    __slots__ = ("body", "headers", "keep_alive", "status")

    def __init__(self, status: int, headers: bytes, body: bytes, keep_alive: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


Callback = Callable[[UpstreamResponse | None, UpstreamError | None], None]


class UpstreamConnection(asyncio.Protocol):
    """One connection to an instance, carrying one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: Callback | None = None
        self._headers: list[bytes] = []
        self._body: list[bytes] = []
        self._got_bytes = False
        self._head_only = False
        self._until_close = False  # a response without length: its body ends when the connection does
        self._content_length: bytes | None = None
        self._chunked = False
        self.closed = False
        self.deadline = 0.0  # loop time after which the sweeper times the request out

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._until_close and self._waiter is not None:
            status = self._parser.get_status_code()
            self._resolve(UpstreamResponse(status, b"".join(self._headers), b"".join(self._body), False))
            return
        self._fail(ConnectionDropped("the instance closed the connection", partial=self._got_bytes))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (an instance's own timeout answer): this connection is done.
            self.close()
            return
        if not self._got_bytes and not self._head_only:
            # Most answers arrive whole in one read with a plain head: take them without the
            # parser's per-header callbacks. Anything unusual goes to httptools from the start.
            response = _whole_response(data)
            if response is not None:
                self._got_bytes = True
                self._resolve(response)
                return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed HTTP response from the instance: {exc}"))
            self.close()

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []
        self._until_close = False
        self._content_length = None
        self._chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower not in _HOP_BY_HOP:
            self._headers.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"content-length":
            self._content_length = value
        elif lower == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        parser = self._parser
        if self._content_length is None and not parser.should_keep_alive() and not self._chunked:
            status = parser.get_status_code()
            self._until_close = status >= 200 and status not in (204, 304)
        if self._head_only:
            # A HEAD answer has no body whatever its content-length says; the parser cannot be
            # told that, so finish here and never reuse this connection.
            status = self._parser.get_status_code()
            self._resolve(UpstreamResponse(status, b"".join(self._headers), b"", False))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:  # an interim 1xx: the real answer follows
            return
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._resolve(UpstreamResponse(status, b"".join(self._headers), body, parser.should_keep_alive()))

    # -- use ----------------------------------------------------------------------------------------
    def start(self, data: bytes | list[bytes], deadline: float, head_only: bool, callback: Callback) -> None:
        """Write one request; ``callback(response, None)`` or ``callback(None, error)`` follows
        exactly once, called from the event loop (inside this connection's callbacks: it must
        not raise). The gateway's fast path uses this to skip a future per request."""
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            callback(None, StaleConnection("the kept-alive connection to the instance was closed"))
            return
        self._waiter = callback
        self._got_bytes = False
        self._head_only = head_only
        self.deadline = deadline
        self._pool.busy.add(self)
        if data.__class__ is list:
            transport.writelines(data)  # type: ignore[arg-type]
        else:
            transport.write(data)  # type: ignore[arg-type]

    def send(
        self, data: bytes | list[bytes], deadline: float, head_only: bool = False
    ) -> asyncio.Future[UpstreamResponse]:
        """:meth:`start` as a future: its result is the response, or it raises :class:`UpstreamError`."""
        fut: asyncio.Future[UpstreamResponse] = self._pool.loop.create_future()

        def done(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(response)  # type: ignore[arg-type]

        self.start(data, deadline, head_only, done)
        return fut

    def _resolve(self, response: UpstreamResponse) -> None:
        waiter = self._waiter
        self._waiter = None
        self._pool.busy.discard(self)
        if waiter is not None:
            waiter(response, None)

    def _fail(self, exc: UpstreamError) -> None:
        waiter = self._waiter
        self._waiter = None
        self._pool.busy.discard(self)
        if waiter is not None:
            waiter(None, exc)

    def time_out(self) -> None:
        """Called by the sweeper: fail the request and drop the connection (its answer may still come)."""
        self._fail(UpstreamTimeout("the instance did not answer within the request timeout"))
        self.abort()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


def _whole_response(data: bytes) -> UpstreamResponse | None:
    """``data`` as one complete keep-alive response with a ``content-length`` body, or None when
    it is anything else (partial, chunked, 1xx/204/304, ``connection`` headers, stray CR/LF, more
    bytes than the body): those take the full parser, so this only ever speeds up the common case."""
    if not data.startswith(b"HTTP/1.1 "):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or data[12:13] not in (b" ", b"\r"):
        return None
    code = data[9:12]
    if not code.isdigit():
        return None
    status = int(code)
    if status < 200 or status == 204 or status == 304:
        return None
    head = data[:end]
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return None
    length = -1
    kept: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        colon = line.find(b":")
        if colon <= 0 or line[colon - 1 : colon] in (b" ", b"\t"):
            return None
        name = line[:colon].lower()
        if name == b"content-length":
            value = line[colon + 1 :].strip()
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name in _HOP_BY_HOP:
            return None
        else:
            kept.append(line[:colon] + b": " + line[colon + 1 :].strip() + b"\r\n")
    body = data[end + 4 :]
    if length != len(body):
        return None
    return UpstreamResponse(status, b"".join(kept), body, True)


class ConnectionPool:
    """Keep-alive connections to one ``host:port``: take an idle one or open a new one, give it
    back after a reusable response. ``busy`` is shared by every pool of a gateway so a single
    sweeper can time requests out."""

    def __init__(
        self,
        host: str,
        port: int,
        busy: set[UpstreamConnection],
        *,
        max_idle: int = 64,
        connect_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self.busy = busy
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[UpstreamConnection] = []
        self.closed = False
        # "Host" for requests to this instance, precomputed.
        self.host_header = f"host: {host}:{port}\r\n".encode("latin-1")

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a new connection; :class:`ConnectFailed` when the instance cannot be reached."""
        try:
            _, protocol = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectFailed(
                f"connecting to {self.host}:{self.port} timed out after {self.connect_timeout:g}s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {reason}") from None
        return protocol

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after its response; closed unless ``reusable`` and room is left."""
        if reusable and not conn.closed and not self.closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed by the instance leaves the idle list at once (not at next use)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close idle connections; connections in use close when their response is done."""
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def sweep_timeouts(busy: set[UpstreamConnection], now: float) -> int:
    """Time out every busy connection whose deadline passed; returns how many."""
    expired = [conn for conn in busy if conn.deadline <= now]
    for conn in expired:
        conn.time_out()
    return len(expired)
