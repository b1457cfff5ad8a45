"""A small HTTP/1.1 server: an ``asyncio.Protocol`` over ``httptools``' request parser.

Why not an ASGI server: the engine's infer path is a few dozen microseconds of real work, and
building ASGI scope dicts, receive/send coroutines and header lists per request costs about as
much again (numbers in ``docs/http-stack.md``). This module keeps only what the KServe v2
frontend and the metrics port need, and does it correctly:

* keep-alive, HTTP/1.0 (closes unless asked to keep alive), ``Connection: close``;
* pipelining: requests on one connection are answered strictly in order, one at a time;
  reading pauses while too many parsed requests wait;
* chunked request bodies (``httptools`` de-chunks), ``Expect: 100-continue``;
* a body limit: over ``max_body_bytes`` the request is answered 413, its body discarded,
  and the connection kept (closed instead when the client is waiting on ``100-continue``);
* malformed HTTP is answered 400 and the connection closed; a handler exception is answered
  500 with a JSON error body, never a traceback, and the connection keeps serving;
* write back-pressure: no further request on a connection starts while its transport is
  paused for writing;
* graceful close: stop accepting, close idle keep-alive connections, let in-flight requests
  finish (then close their connections), abort what is left after a timeout.

A handler is a plain callable ``handler(request) -> Response | Awaitable[Response]``; cheap
routes answer synchronously (no task is created), slow ones return a coroutine that runs as
one task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools
import orjson

logger = logging.getLogger(__name__)

__all__ = [
    "HttpRequest",
    "HttpServerHandle",
    "Response",
    "StreamingResponse",
    "error_response",
    "json_response",
    "start_plain_http_server",
    "start_server",
]

_REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    417: "Expectation Failed",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
_STATUS_LINES: dict[int, bytes] = {
    code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()
}

CONTENT_TYPE_JSON = b"content-type: application/json\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A queue item asking the connection to write an interim ``100 Continue``.
_SEND_CONTINUE = object()
# Parsed requests allowed to wait on one connection before reading pauses.
_MAX_PIPELINED = 32
# Bodies at least this large are written without first being joined to the head.
_JOIN_LIMIT = 16 * 1024


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} Status {status}\r\n".encode()
    return line


class HttpRequest:
    """One parsed request. Header names are lower-case bytes; ``body`` is the whole body."""

    __slots__ = ("answer", "body", "headers", "http_version", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[bytes, bytes],
        body: bytes,
        keep_alive: bool,
        http_version: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http_version = http_version
        # Set by the connection when the request is answered without the handler (413).
        self.answer: Response | None = None


class Response:
    """A response: ``headers`` are raw ``b"name: value\\r\\n"`` lines (content-length is added),
    ``body`` is one bytes-like object or a list of them (written without joining when large)."""

    __slots__ = ("body", "close", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes | bytearray | memoryview | list[Any] = b"",
        headers: bytes = b"",
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.close = close


class StreamingResponse:
    """A response written as it is produced, with chunked transfer encoding (server-sent events).

    ``body`` is an async iterator of byte chunks. The head goes out with the first chunk (or at
    the end if there is none), so the iterator may still set ``status`` and ``headers`` before
    yielding it. When the client goes away, the writer is cancelled and ``body.aclose()`` runs:
    that is where the work behind the stream learns to stop. Other requests pipelined on the
    connection wait until the stream ends."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: AsyncIterator[bytes], status: int = 200, headers: bytes = b"") -> None:
        self.body = body
        self.status = status
        self.headers = headers


def json_response(status: int, obj: Any, headers: bytes = b"") -> Response:
    """A JSON body (numpy arrays and scalars allowed, as registries may hand them over)."""
    return Response(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), CONTENT_TYPE_JSON + headers)


def error_response(status: int, message: str, headers: bytes = b"", close: bool = False) -> Response:
    """Triton's error body: ``{"error": "<message>"}``."""
    return Response(status, orjson.dumps({"error": message}), CONTENT_TYPE_JSON + headers, close)


_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}

Handler = Callable[[HttpRequest], "Response | Awaitable[Response]"]


class _ServerState:
    """What all connections of one listening server share."""

    def __init__(self, handler: Handler, max_body_bytes: int) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.connections: set[_HttpProtocol] = set()
        self.closing = False
        self.all_closed: asyncio.Event | None = None


class _HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: _ServerState) -> None:
        self._state = state
        self._handler = state.handler
        self._max_body = state.max_body_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Any] = deque()
        self._busy = False  # a request's handler is running
        self._closed = False
        self._write_paused = False
        self._read_paused = False
        self._stop_reading = False  # a fatal parse error was queued; ignore further bytes
        self._in_message = False
        self._current: HttpRequest | None = None
        self._task: asyncio.Task[Response] | None = None
        self._stream_task: asyncio.Task[bool] | None = None  # writing a StreamingResponse
        self._drain: asyncio.Future[None] | None = None  # a stream waiting for write space
        self.activity = 0  # bumped on every read; the idle sweep compares it
        self.swept_activity = -1
        # per-message state
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._queue.clear()
        if self._stream_task is not None:
            self._stream_task.cancel()  # the client went away mid-stream: stop the work behind it
        self._wake_drain()
        state = self._state
        state.connections.discard(self)
        if state.closing and not state.connections and state.all_closed is not None:
            state.all_closed.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        if not self._busy:
            self._next()

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        if self._stop_reading:
            return
        while True:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # "Upgrade: h2c" and the like: the request is answered as plain HTTP/1.1 (which
                # RFC 9110 allows); keep parsing what follows it.
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                data = data[offset:]
                if not data:
                    return
            except httptools.HttpParserError as exc:
                self._fatal(400, f"malformed HTTP request: {exc}")
                return

    def eof_received(self) -> bool | None:
        # The client finished sending; answer what was already parsed, then close.
        if self._busy or self._queue:
            self._queue.append(Response(0, close=True))  # status 0: just close after the rest
            return True
        return None

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        headers = self._headers
        length = headers.get(b"content-length")
        if length is not None:
            with contextlib.suppress(ValueError):  # httptools rejects a bad Content-Length itself
                self._too_large = int(length) > self._max_body
        expect = headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            if self._too_large:
                # The client waits before sending the body: answer now and close, since whether
                # it then sends the body anyway is unknowable.
                self._queue.append(self._too_large_response(close=True))
                self._stop_reading = True
                self._pump()
                return
            else:
                self._queue.append(_SEND_CONTINUE)
                self._pump()

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._too_large = True
            self._body = []
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._stop_reading:
            return
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        url = self._url
        query = ""
        sep = url.find(b"?")
        if sep >= 0:
            query = url[sep + 1 :].decode("latin-1")
            url = url[:sep]
        parser = self._parser
        method = parser.get_method()
        request = HttpRequest(
            _METHODS.get(method) or method.decode("latin-1"),
            url.decode("latin-1"),
            query,
            self._headers,
            body,
            parser.should_keep_alive(),
            parser.get_http_version(),
        )
        if self._too_large:
            request.answer = self._too_large_response(close=False)
        self._queue.append(request)
        self._pump()

    # -- request processing --------------------------------------------------------------------
    def _too_large_response(self, close: bool) -> Response:
        return error_response(413, f"request body exceeds the limit of {self._max_body} bytes", close=close)

    def _fatal(self, status: int, message: str) -> None:
        """Answer a request we cannot parse (after those before it), then close."""
        self._stop_reading = True
        self._queue.append(error_response(status, message, close=True))
        self._pump()

    def _pump(self) -> None:
        if not self._busy:
            self._next()
        if len(self._queue) > _MAX_PIPELINED and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _next(self) -> None:
        """Handle queued items in order until one has to wait."""
        queue = self._queue
        while queue and not self._busy and not self._write_paused and not self._closed:
            item = queue.popleft()
            if item.__class__ is HttpRequest:
                result = item.answer
                if result is None:
                    try:
                        result = self._handler(item)
                    except Exception as exc:
                        result = _internal_error(exc)
                if result.__class__ is Response:
                    self._send(item, result)  # type: ignore[arg-type]
                    continue
                if result.__class__ is StreamingResponse:
                    self._start_stream(item, result)  # type: ignore[arg-type]
                    continue
                try:
                    task = self._loop.create_task(result)  # type: ignore[arg-type]
                except TypeError:  # an awaitable that is not a coroutine, or not awaitable at all
                    try:
                        task = asyncio.ensure_future(result)  # type: ignore[arg-type]
                    except TypeError as exc:
                        self._send(item, _internal_error(exc))
                        continue
                self._busy = True
                self._current = item
                self._task = task
                task.add_done_callback(self._done)
            elif item is _SEND_CONTINUE:
                self._transport.write(_CONTINUE)  # type: ignore[union-attr]
            else:
                self._send(None, item)
        if self._read_paused and len(queue) <= _MAX_PIPELINED // 2 and not self._closed:
            self._read_paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]

    def _done(self, task: asyncio.Task[Response]) -> None:
        self._busy = False
        self._task = None
        request = self._current
        self._current = None
        if task.cancelled():
            response = error_response(503, "request cancelled: the server is shutting down")
        else:
            exc = task.exception()
            if exc is None:
                response = task.result()
                if response.__class__ is StreamingResponse and request is not None and not self._closed:
                    self._start_stream(request, response)  # type: ignore[arg-type]
                    return
                if response.__class__ is not Response:
                    response = _internal_error(TypeError(f"handler returned {type(response).__name__}"))
            else:
                response = _internal_error(exc)
        if not self._closed and request is not None:
            self._send(request, response)
            self._next()

    def _send(self, request: HttpRequest | None, response: Response) -> None:
        transport = self._transport
        if self._closed or transport is None:
            return
        if response.status == 0:  # the end-of-input marker
            self._closed = True
            transport.close()
            return
        keep_alive = (
            request is not None and request.keep_alive and not response.close and not self._state.closing
        )
        body = response.body
        if body.__class__ is list:
            length = 0
            for part in body:  # type: ignore[union-attr]
                length += len(part)
        else:
            length = len(body)  # type: ignore[arg-type]
        if keep_alive:
            conn = b"connection: keep-alive\r\n" if request.http_version == "1.0" else b""  # type: ignore[union-attr]
        else:
            conn = b"connection: close\r\n"
        head = b"%scontent-length: %d\r\n%s%s\r\n" % (
            _status_line(response.status),
            length,
            response.headers,
            conn,
        )
        if request is not None and request.method == "HEAD":
            transport.write(head)
        elif body.__class__ is list:
            if length < _JOIN_LIMIT:
                transport.write(b"".join([head, *body]))  # type: ignore[misc]
            else:
                transport.writelines([head, *body])  # type: ignore[misc]
        elif length < _JOIN_LIMIT:
            transport.write(head + body)  # type: ignore[operator]
        else:
            transport.writelines([head, body])  # type: ignore[list-item]
        if not keep_alive:
            self._closed = self._stop_reading = True
            self._queue.clear()
            transport.close()

    # -- streamed responses ----------------------------------------------------------------------
    def _start_stream(self, request: HttpRequest, response: StreamingResponse) -> None:
        self._busy = True
        self._current = request
        task = self._loop.create_task(self._write_stream(request, response))
        self._stream_task = task
        task.add_done_callback(self._stream_done)

    async def _write_stream(self, request: HttpRequest, response: StreamingResponse) -> bool:
        """Write ``response`` as it is produced; returns whether the connection stays open."""
        body = response.body
        chunked = request.http_version != "1.0"  # HTTP/1.0: no chunks, the end is the close
        keep_alive = chunked and request.keep_alive and not self._state.closing
        try:
            try:
                first = await anext(body, None)
            except Exception as exc:  # failed before anything was written: a normal error answer
                self._send(request, _internal_error(exc))
                return not self._closed
            head = b"%s%s%s%s\r\n" % (
                _status_line(response.status),
                response.headers,
                b"transfer-encoding: chunked\r\n" if chunked else b"",
                b"" if keep_alive else b"connection: close\r\n",
            )
            self._write(head)
            if first is not None:
                await self._write_chunk(first, chunked)
                async for chunk in body:
                    if self._closed:
                        return False
                    await self._write_chunk(chunk, chunked)
            if chunked:
                self._write(b"0\r\n\r\n")
            return keep_alive
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    def _write(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    async def _write_chunk(self, chunk: bytes, chunked: bool) -> None:
        if not chunk:
            return  # an empty chunk would end the body
        self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if self._write_paused and not self._closed:
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _stream_done(self, task: asyncio.Task[bool]) -> None:
        self._stream_task = None
        self._busy = False
        self._current = None
        keep = not task.cancelled() and task.exception() is None and task.result()
        if not task.cancelled() and task.exception() is not None:
            logger.error("HTTP streamed response failed", exc_info=task.exception())
        if not keep:
            # Mid-stream failure or no keep-alive: the only way to end the response is to close.
            if not self._closed and self._transport is not None:
                self._closed = self._stop_reading = True
                self._queue.clear()
                self._transport.close()
            return
        self._next()

    # -- server-side control ---------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue and not self._in_message

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection; a request still running is cancelled (the server is going away)."""
        if self._task is not None:
            self._task.cancel()
        if self._stream_task is not None:
            self._stream_task.cancel()
        if self._transport is not None:
            self._transport.abort()


def _internal_error(exc: BaseException) -> Response:
    logger.error("HTTP handler failed", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


class HttpServerHandle:
    """A listening server: ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self, server: asyncio.base_events.Server, state: _ServerState, keep_alive_timeout: float | None
    ) -> None:
        self._server = server
        self._state = state
        sockets = server.sockets or ()
        self.port: int = sockets[0].getsockname()[1] if sockets else 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._keep_alive_timeout = keep_alive_timeout
        if keep_alive_timeout:
            self._sweeper = asyncio.get_running_loop().call_later(keep_alive_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections that stayed idle for a whole sweep interval (cheaper than a timer
        per request: a request only bumps a counter)."""
        for conn in list(self._state.connections):
            if conn.idle and conn.activity == conn.swept_activity:
                conn.close()
            conn.swept_activity = conn.activity
        if self._keep_alive_timeout and not self._state.closing:
            self._sweeper = asyncio.get_running_loop().call_later(self._keep_alive_timeout, self._sweep)

    @property
    def connection_count(self) -> int:
        return len(self._state.connections)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, close idle keep-alive connections, let in-flight requests finish
        (their connections close after the response), abort whatever is left after ``timeout``."""
        state = self._state
        if self._sweeper is not None:
            self._sweeper.cancel()
        state.closing = True
        self._server.close()
        state.all_closed = asyncio.Event()
        for conn in list(state.connections):
            if conn.idle:
                conn.close()
        if state.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.all_closed.wait(), timeout)
        for conn in list(state.connections):
            conn.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body_bytes: int = 64 << 20,
    keep_alive_timeout: float | None = 300.0,
    backlog: int = 1024,
) -> HttpServerHandle:
    """Listen on ``host:port`` (0 picks a free port) and serve ``handler`` on the running loop.

    Run the loop on uvloop for speed (the engine's composition root does); plain asyncio works.
    """
    state = _ServerState(handler, max_body_bytes)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _HttpProtocol(state), host, port, reuse_address=True, backlog=backlog
    )
    return HttpServerHandle(server, state, keep_alive_timeout)


PlainRoute = Callable[[], "tuple[int, dict[str, str], bytes] | Awaitable[tuple[int, dict[str, str], bytes]]"]


async def start_plain_http_server(
    host: str,
    port: int,
    routes: dict[str, PlainRoute],
    *,
    max_body_bytes: int = 1 << 20,
) -> HttpServerHandle:
    """A tiny GET-only server (the metrics port): ``routes`` maps a path to a callable returning
    ``(status, headers, body)``; it may be sync or async. Unknown paths 404, other methods 405."""

    async def _await_route(result: Awaitable[tuple[int, dict[str, str], bytes]]) -> Response:
        return _plain_response(await result)

    def handler(request: HttpRequest) -> Response | Awaitable[Response]:
        route = routes.get(request.path)
        if route is None:
            return error_response(404, "Not Found")
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "Method Not Allowed")
        result = route()
        if inspect.isawaitable(result):
            return _await_route(result)
        return _plain_response(result)  # type: ignore[arg-type]

    return await start_server(handler, host, port, max_body_bytes=max_body_bytes)


def _plain_response(result: tuple[int, dict[str, str], bytes]) -> Response:
    status, headers, body = result
    raw = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
    return Response(status, body, raw)
