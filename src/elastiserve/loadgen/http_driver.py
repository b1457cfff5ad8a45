"""HTTP/1.1 infer requests as raw asyncio protocols over keep-alive connections.

Why not httpx/aiohttp/tritonclient: each of those spends tens of microseconds of Python per
request, so a one-core generator saturates near 5k req/s and then measures itself. Here each
request is bytes built once (request line, headers, body), written with one ``transport.write``;
the answer is parsed only as far as needed: status code, ``Content-Length`` (or chunked
framing) and ``Connection: close``. The body is skipped, not decoded.

One :class:`HttpConnection` carries one request at a time (no pipelining: servers differ in how
they treat it, and a real client does not pipeline).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["HttpConnection", "HttpTarget", "build_requests", "connect_error_kind", "parse_http_url"]

_MAX_HEAD: Final = 64 * 1024


@dataclass(frozen=True)
class HttpTarget:
    """Where requests go: host, port and a path prefix (a gateway's ``/api/predict/<service>``)."""

    host: str
    port: int
    prefix: str = ""

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


def parse_http_url(url: str, default_port: int = 8000) -> HttpTarget:
    """``http://host:port/prefix``, ``host:port`` or ``host``; https is refused (raw TCP only)."""
    text = url if "://" in url else f"http://{url}"
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (only http:// for --protocol http)")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"bad port in URL {url!r}") from None
    return HttpTarget(parts.hostname, port, parts.path.rstrip("/"))


def build_requests(
    target: HttpTarget,
    path: str,
    bodies: list[tuple[bytes, int | None]],
    headers: list[tuple[str, str]],
    content_type: str,
) -> list[bytes]:
    """Whole HTTP/1.1 requests (head + body), one per body; ``int`` = binary header length."""
    requests = []
    for body, header_length in bodies:
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {target.hostport}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        if header_length is not None:
            lines.append(f"Inference-Header-Content-Length: {header_length}")
        lines += [f"{name}: {value}" for name, value in headers]
        requests.append(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return requests


def connect_error_kind(exc: BaseException) -> str:
    """A short, stable error kind for reports: 'connection refused', 'timeout', ..."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return "name resolution failed"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "host unreachable"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        return "no local port left"
    if isinstance(exc, ConnectionError):
        return "connection closed"
    return type(exc).__name__


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; :meth:`call` sends prepared bytes and returns an error kind or None."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.sent_at = 0.0  # perf_counter() of the request in flight, 0 when idle (for timeouts)
        self._buf = bytearray()
        self._waiter: asyncio.Future[str | None] | None = None
        self._need = -1  # bytes of the current response still to come; -1: head not parsed yet
        self._chunked = False
        self._status = 0
        self._close_after = False

    @classmethod
    async def open(cls, target: HttpTarget, timeout: float) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: cls(loop), target.host, target.port), timeout
        )
        return protocol

    # -- protocol callbacks -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(connect_error_kind(exc) if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._waiter is None:
            if len(buf) > _MAX_HEAD:
                self.abort("unexpected data")
            return
        while True:
            if self._need < 0 and not self._parse_head():
                return
            if self._chunked:
                if not self._parse_chunks():
                    return
            elif len(buf) < self._need:
                return
            else:
                del buf[: self._need]
            status = self._status
            self._need = -1
            if 100 <= status < 200:  # 100 Continue and friends: the real answer follows
                continue
            if self._close_after:
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
            self._finish(None if 200 <= status < 300 else f"http {status}")
            return

    # -- parsing ------------------------------------------------------------------------------------
    def _parse_head(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self.abort("bad response")
            return False
        head = bytes(buf[:end]).lower()
        del buf[: end + 4]
        try:
            self._status = int(head[9:12])
        except ValueError:
            self.abort("bad response")
            return False
        self._close_after = b"\nconnection: close" in head or head.startswith(b"http/1.0")
        self._chunked = b"\ntransfer-encoding: chunked" in head
        if self._chunked:
            self._need = 0
            return True
        at = head.find(b"\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r", at + 16)
            self._need = int(head[at + 16 : stop if stop >= 0 else len(head)])
        elif self._status in (204, 304) or self._status < 200:
            self._need = 0
        else:  # body until close: not a keep-alive answer; read what is here and reconnect
            self._need = 0
            self._close_after = True
        return True

    def _parse_chunks(self) -> bool:
        """Consume complete chunks; True once the terminating chunk and trailers are in."""
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    if buf[line_end : line_end + 4] == b"\r\n\r\n":
                        trailer_end = line_end
                    else:
                        return False
                del buf[: trailer_end + 4]
                return True
            if len(buf) < line_end + 2 + size + 2:
                return False
            del buf[: line_end + 2 + size + 2]

    # -- requests -----------------------------------------------------------------------------------
    def _finish(self, result: str | None) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.sent_at = 0.0
            if not waiter.done():
                waiter.set_result(result)

    def abort(self, kind: str) -> None:
        """Fail the request in flight with ``kind`` and drop the connection (timeouts, garbage)."""
        self.closed = True
        self._finish(kind)
        if self.transport is not None:
            self.transport.abort()

    def call(self, request: bytes, now: float) -> asyncio.Future[str | None]:
        """Send one request; the future gives None (2xx) or an error kind ('http 404', ...)."""
        waiter = self.loop.create_future()
        if self.closed or self.transport is None:
            self.closed = True
            waiter.set_result("connection closed")
            return waiter
        self._waiter = waiter
        self.sent_at = now
        self.transport.write(request)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
