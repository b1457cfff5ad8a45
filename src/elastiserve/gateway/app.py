"""The gateway's composition root and request path.

``/api/predict/<service>[/<path>]`` → checks (name, token, rate limit, queue size) → one
instance chosen by :mod:`~elastiserve.gateway.balancing` → the request forwarded on a kept-alive
connection (:mod:`~elastiserve.gateway.upstream`) → the instance's answer passed back. The
server side is the engine's own lean HTTP/1.1 server
(:mod:`elastiserve.engine.frontends.http_server`): same keep-alive, pipelining, body limit (413)
and error handling, without an ASGI layer on a path whose whole job is overhead.

Checks that need no I/O answer synchronously (the server then creates no task). A forwarded
request takes the fast path when an idle connection to the chosen instance is at hand: written
at once, answered through the connection's callback into one future. Everything else (opening a
connection, waiting for a new service's endpoints, every retry) runs in a coroutine.

Retry policy (``max_attempts`` tries in all, each on an instance not tried yet):

* the connection could not be opened → try another instance (nothing was sent);
* the instance answered 450 (queue full) or 503 (unavailable) → try another instance (the
  instance says the request did not run);
* the connection dropped after the request was sent → try another instance only when the
  request is idempotent (:func:`~elastiserve.gateway.routing.is_idempotent`), else 502;
* no answer within the timeout → 504, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson
from prometheus_client.core import CollectorRegistry

from elastiserve.client.aio import AsyncControlPlaneClient
from elastiserve.engine.frontends.http_server import (
    CONTENT_TYPE_JSON,
    HttpRequest,
    HttpServerHandle,
    Response,
    error_response,
    start_server,
)
from elastiserve.gateway import auth
from elastiserve.gateway.balancing import QUEUE_FULL, Instance
from elastiserve.gateway.discovery import Catalog
from elastiserve.gateway.routing import (
    PREDICT_PREFIX,
    RouteError,
    default_model_path,
    is_idempotent,
    split_predict_path,
)
from elastiserve.gateway.stats import CONTENT_TYPE_LATEST, GatewayCollector, render
from elastiserve.gateway.traffic import Group, Service, TrafficTable
from elastiserve.gateway.upstream import (
    BadResponse,
    ConnectFailed,
    ConnectionDropped,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    sweep_timeouts,
)

if TYPE_CHECKING:
    from elastiserve.gateway.grpc_proxy import GrpcProxy

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PORT", "Gateway", "GatewayOptions"]

DEFAULT_PORT: Final = 8480
#: EAS's status for "the service's request queue is full".
STATUS_QUEUE_FULL: Final = 450

# Request headers not forwarded: connection-level ones (the gateway↔instance connection has its
# own), the body length (recomputed), and credentials meant for the gateway.
_DROP_REQUEST_HEADERS: Final = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"content-length",
        b"authorization",
        b"proxy-authorization",
    }
)
_RETRY_STATUSES: Final = frozenset({STATUS_QUEUE_FULL, 503})
_JOIN_LIMIT: Final = 64 * 1024
_METRICS_HEADERS: Final = f"content-type: {CONTENT_TYPE_LATEST}\r\n".encode()
_RETRY_AFTER: Final = b"retry-after: 1\r\n"


class Refusal(NamedTuple):
    """A request the gateway answers itself: HTTP status, metrics reason, message, extra headers."""

    status: int
    reason: str
    message: str
    headers: bytes = b""


_UNAUTHORIZED: Final = Refusal(
    401,
    "unauthorized",
    "authorization required: send the service token in the Authorization header",
    b'www-authenticate: Bearer realm="elastiserve"\r\n',
)
_FORBIDDEN: Final = Refusal(403, "forbidden", "invalid token for this service")
_UNVERIFIABLE: Final = Refusal(
    503,
    "unverifiable_token",
    "the gateway cannot check this service's token (it was started without the control plane's admin token)",
)


@dataclass
class GatewayOptions:
    """Everything ``python -m elastiserve.gateway`` takes; also usable to embed a gateway."""

    control_plane: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_token: str | None = None
    max_body_bytes: int = 64 << 20
    request_timeout: float = 60.0
    connect_timeout: float = 2.0
    max_attempts: int = 3
    refresh_interval: float = 2.0
    long_poll: float = 30.0
    max_idle_per_instance: int = 64
    grpc_port: int | None = None


class Gateway:
    """``await Gateway(options).start()`` then ``await gateway.close()``; ``port`` is the bound port."""

    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.table = TrafficTable()
        self.busy: set[UpstreamConnection] = set()
        self.unrouted: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(lambda: list(self.table.services.values()), self.unrouted))
        self.catalog: Catalog | None = None
        self.server: HttpServerHandle | None = None
        self.grpc: GrpcProxy | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the gateway is not started"
        return self._loop

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    async def start(self) -> None:
        opts = self.options
        self._loop = asyncio.get_running_loop()
        _pass_futures_through(self._loop)
        client = AsyncControlPlaneClient(opts.control_plane, opts.admin_token or "")
        self.catalog = Catalog(
            client,
            self.table,
            self.busy,
            refresh_interval=opts.refresh_interval,
            long_poll=opts.long_poll,
            pool_options={"max_idle": opts.max_idle_per_instance, "connect_timeout": opts.connect_timeout},
        )
        await self.catalog.start()
        self.server = await start_server(
            self.handle, opts.host, opts.port, max_body_bytes=opts.max_body_bytes
        )
        self._sweeper = self._loop.call_later(0.25, self._sweep)
        if opts.grpc_port is not None:
            from elastiserve.gateway.grpc_proxy import start_grpc_proxy

            self.grpc = await start_grpc_proxy(self, opts.host, opts.grpc_port)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.grpc is not None:
            await self.grpc.close()
        if self.server is not None:
            await self.server.close(timeout=5.0)
        if self.catalog is not None:
            await self.catalog.close()

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        if self.busy:
            sweep_timeouts(self.busy, loop.time())
        self._sweeper = loop.call_later(0.25, self._sweep)

    # -- request path ----------------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> Response | Awaitable[Response]:
        """The HTTP server's handler: cheap answers synchronously, forwarding as a future or a coroutine."""
        path = request.path
        if path.startswith(PREDICT_PREFIX):
            start = time.perf_counter()
            try:
                name, rest = split_predict_path(path)
            except RouteError as exc:
                self._unrouted("bad_path")
                return error_response(exc.status, exc.message)
            target = self.table.resolve(name)
            if target is None:
                return self._unknown(request, name, rest, start)
            return self._route(request, target, rest, start)
        if path == "/metrics":
            return Response(200, render(self.registry), _METRICS_HEADERS)
        if path in ("/healthz", "/readyz"):
            loaded = self.table.loaded
            status = 200 if loaded or path == "/healthz" else 503
            body = {
                "status": "ok" if loaded else "waiting",
                "catalog_loaded": loaded,
                "services": len(self.table.services),
            }
            return Response(status, orjson.dumps(body), CONTENT_TYPE_JSON)
        self._unrouted("no_route")
        return error_response(404, f"no route {path[:200]!r} (use /api/predict/<service>/...)")

    def _unrouted(self, reason: str) -> None:
        self.unrouted[reason] = self.unrouted.get(reason, 0) + 1

    async def _unknown(self, request: HttpRequest, name: str, rest: str, start: float) -> Response:
        """A name the table does not hold: maybe created a moment ago, so read the list again."""
        assert self.catalog is not None
        await self.catalog.refresh_soon()
        target = self.table.resolve(name)
        if target is None:
            if not self.table.loaded:
                self._unrouted("catalog_unavailable")
                return error_response(
                    503, "the gateway cannot reach the control plane to look up services", _RETRY_AFTER
                )
            self._unrouted("unknown_service")
            return error_response(404, f"service '{name}' not found")
        result = self._route(request, target, rest, start)
        if isinstance(result, Response):
            return result
        return await result

    def admit(
        self, target: Service | Group, authorization: bytes | None
    ) -> tuple[Service | None, Refusal | None]:
        """The protocol-neutral checks (the gRPC proxy makes them too): group split, token,
        stopped service, rate limit. Gives the service that takes the request, or a refusal."""
        if target.__class__ is Group:
            group: Group = target  # type: ignore[assignment]
            expected = group.expected_tokens
            service = group.pick()
            if service is None:
                self._unrouted("empty_group")
                return None, Refusal(503, "empty_group", f"service group '{group.name}' has no members")
            service.stats.group_requests[group.name] = service.stats.group_requests.get(group.name, 0) + 1
        else:
            service = target  # type: ignore[assignment]
            expected = service.expected_tokens
            if service.config.token_hidden:
                return service, _UNVERIFIABLE
        if expected:
            verdict = auth.check(authorization, expected)
            if verdict:
                return service, _UNAUTHORIZED if verdict == auth.AUTH_REQUIRED else _FORBIDDEN
        config = service.config
        if not config.running:
            return service, Refusal(503, "stopped", f"service '{service.name}' is stopped")
        limiter = service.limiter
        if limiter is not None and not limiter.take():
            return service, Refusal(
                429,
                "rate_limited",
                f"rate limit of service '{service.name}' exceeded ({config.rate_limit} requests/s)",
                _RETRY_AFTER,
            )
        return service, None

    def _route(
        self, request: HttpRequest, target: Service | Group, rest: str, start: float
    ) -> Response | Awaitable[Response]:
        service, refusal = self.admit(target, request.headers.get(b"authorization"))
        if refusal is not None:
            if service is None:
                return error_response(refusal.status, refusal.message, refusal.headers)
            return self._refuse(
                service, refusal.status, refusal.reason, refusal.message, start, refusal.headers
            )
        assert service is not None
        if not rest:
            config = service.config
            if config.custom:
                rest = "/"
            else:
                model = config.default_model or service.default_model
                if model is None:
                    return self._proxy_default(request, service, start)
                mapped = default_model_path(request.method, model)
                if mapped is None:
                    return self._refuse(
                        service,
                        405,
                        "method",
                        f"method {request.method} not allowed on /api/predict/<service>",
                        start,
                    )
                rest = mapped
        return self._dispatch(request, service, rest, start)

    def _refuse(
        self, service: Service, status: int, reason: str, message: str, start: float, headers: bytes = b""
    ) -> Response:
        stats = service.stats
        stats.error(reason)
        stats.observe(status, time.perf_counter() - start)
        return error_response(status, message, headers)

    async def _proxy_default(self, request: HttpRequest, service: Service, start: float) -> Response:
        try:
            model = await self._default_model(service)
        except _NoDefault as exc:
            return self._refuse(service, exc.status, "no_default_model", exc.message, start)
        mapped = default_model_path(request.method, model)
        if mapped is None:
            return self._refuse(
                service,
                405,
                "method",
                f"method {request.method} not allowed on /api/predict/<service>",
                start,
            )
        result = self._dispatch(request, service, mapped, start)
        return result if isinstance(result, Response) else await result

    def _dispatch(
        self, request: HttpRequest, service: Service, path: str, start: float
    ) -> Response | Awaitable[Response]:
        """Forward ``request``: the fast path when an idle kept-alive connection is at hand
        (callbacks and one future, no task), else :meth:`_proxy`. Anything but a plain answer
        on the fast path (an error, 450/503) continues in :meth:`_forward`, which holds the
        whole retry policy."""
        inst = service.balancer.pick(None, service.config.max_queue_size)
        if inst is None or inst is QUEUE_FULL:
            return self._proxy(request, service, path, start)
        assert isinstance(inst, Instance)
        conn = inst.pool.take_idle()
        if conn is None:
            return self._proxy(request, service, path, start)
        loop = self._loop
        assert loop is not None
        line, headers, body = _encode(request, path)
        exchange = _Exchange(self, request, service, path, start, inst, conn, line, headers, body)
        service.stats.in_flight += 1
        inst.outstanding += 1
        inst.requests += 1
        host = inst.pool.host_header
        data: bytes | list[bytes] = (
            b"".join((line, host, headers, body)) if len(body) < _JOIN_LIMIT else [line, host, headers, body]
        )
        timeout = service.config.timeout or self.options.request_timeout
        conn.start(data, loop.time() + timeout, request.method == "HEAD", exchange.done)
        return exchange.out

    async def _proxy(self, request: HttpRequest, service: Service, path: str, start: float) -> Response:
        stats = service.stats
        stats.in_flight += 1
        try:
            status, response = await self._forward(service, request, path)
        finally:
            stats.in_flight -= 1
        stats.observe(status, time.perf_counter() - start)
        return response

    async def _resume(
        self, exchange: _Exchange, response: UpstreamResponse | None, error: UpstreamError | None
    ) -> Response:
        """The fast path's first attempt needs the retry policy: continue in :meth:`_forward`."""
        stats = exchange.service.stats
        try:
            status, reply = await self._forward(
                exchange.service, exchange.request, exchange.path, exchange, response, error
            )
        finally:
            stats.in_flight -= 1
        stats.observe(status, time.perf_counter() - exchange.start)
        return reply

    async def _forward(
        self,
        service: Service,
        request: HttpRequest,
        path: str,
        first: _Exchange | None = None,
        response: UpstreamResponse | None = None,
        error: UpstreamError | None = None,
    ) -> tuple[int, Response]:
        """Send ``request`` to an instance of ``service`` (retrying per the policy above).

        With ``first``, the first attempt was already made (by :meth:`_dispatch`) and its
        outcome is ``response`` or ``error``.
        """
        stats = service.stats
        balancer = service.balancer
        cap = service.config.max_queue_size
        conn: UpstreamConnection | None
        if first is None:
            inst = balancer.pick(None, cap)
            if inst is None and not service.endpoints_known.is_set():
                # A service seen for the first time: its endpoint list is on its way.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(service.endpoints_known.wait(), 2.0)
                inst = balancer.pick(None, cap)
            if inst is None:
                stats.error("no_instance")
                return 503, error_response(
                    503, f"service '{service.name}' has no ready instance", _RETRY_AFTER
                )
            if inst is QUEUE_FULL:
                stats.error("queue_full")
                return STATUS_QUEUE_FULL, error_response(
                    STATUS_QUEUE_FULL,
                    f"queue of service '{service.name}' is full ({cap} requests in flight per instance)",
                )
            assert isinstance(inst, Instance)
            line, headers, body = _encode(request, path)
            tried: list[Instance] = []
            attempts = 0
            pending = False  # no outcome yet: make an attempt
            conn, reused = None, False
        else:
            inst, conn, reused = first.inst, first.conn, True
            line, headers, body = first.line, first.headers, first.body
            tried, attempts, pending = [inst], 1, True
        method = request.method
        head_only = method == "HEAD"
        timeout = service.config.timeout or self.options.request_timeout
        loop = self._loop
        assert loop is not None
        while True:
            if not pending:
                attempts += 1
                tried.append(inst)
                host = inst.pool.host_header
                data: bytes | list[bytes] = (
                    b"".join((line, host, headers, body))
                    if len(body) < _JOIN_LIMIT
                    else [line, host, headers, body]
                )
                inst.outstanding += 1
                inst.requests += 1
                conn = inst.pool.take_idle()
                reused = conn is not None
                response, error = None, None
                try:
                    if conn is None:
                        conn = await inst.pool.connect()
                    response = await conn.send(data, loop.time() + timeout, head_only)
                except UpstreamError as exc:
                    error = exc
                finally:
                    inst.outstanding -= 1
            pending = False
            if response is not None:
                assert conn is not None
                inst.pool.release(conn, response.keep_alive)
                if inst.failures:
                    inst.mark_reachable()
                status = response.status
                if status in _RETRY_STATUSES and attempts < self.options.max_attempts:
                    nxt = balancer.pick(set(tried), cap)
                    if isinstance(nxt, Instance):
                        stats.retry(f"status_{status}")
                        inst = nxt
                        continue
                if status >= 500:
                    stats.error("upstream_5xx")
                return status, Response(status, response.body, response.headers)
            assert error is not None
            again_here = False  # may the same instance be tried again (on a fresh connection)?
            if isinstance(error, ConnectFailed):
                inst.mark_unreachable(time.monotonic())
                retryable, reason = True, "unreachable"
            elif not error.sent:
                retryable, reason, again_here = True, "stale", True
            elif isinstance(error, ConnectionDropped):
                retryable = is_idempotent(method, path, body, _json_header_length(request))
                reason, again_here = "dropped", reused  # a kept-alive connection may have gone stale
            elif isinstance(error, UpstreamTimeout):
                retryable, reason = False, "timeout"
            else:
                retryable, reason = False, "bad_response"
            if retryable and attempts < self.options.max_attempts:
                nxt = balancer.pick(set(tried), cap)
                if nxt is None and again_here:
                    nxt = inst
                if isinstance(nxt, Instance):
                    stats.retry(reason)
                    inst = nxt
                    continue
            stats.error(reason)
            return _failure(service, error, attempts)

    async def _default_model(self, service: Service) -> str:
        """The model ``/api/predict/<service>`` means when the spec names none: the only READY
        model in an instance's repository index, or the first READY one (the index is sorted)."""
        if service.default_model is not None:
            return service.default_model
        task = service.default_model_task
        if task is None or (task.done() and task.cancelled()):
            task = service.default_model_task = asyncio.create_task(self._fetch_default_model(service))
        return await asyncio.shield(task)

    async def _fetch_default_model(self, service: Service) -> str:
        fake = HttpRequest(
            "POST", "/v2/repository/index", "", {b"content-type": b"application/json"}, b"{}", True, "1.1"
        )
        status, response = await self._forward(service, fake, "/v2/repository/index")
        if status != 200:
            service.default_model_task = None
            raise _NoDefault(
                503 if status >= 500 else 404,
                f"service '{service.name}' has no default model: its repository index answered {status}; "
                "name the model in the path (/api/predict/<service>/v2/models/<model>/infer)",
            )
        try:
            index = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
            ready = [str(m["name"]) for m in index if isinstance(m, dict) and m.get("state") == "READY"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            ready = []
        if not ready:
            service.default_model_task = None
            raise _NoDefault(503, f"service '{service.name}' has no ready model to use as its default")
        service.default_model = ready[0]
        return ready[0]


def _pass_futures_through(loop: asyncio.AbstractEventLoop) -> None:
    """Let the HTTP server take a plain future from a handler.

    The engine's server runs any awaitable a handler returns with ``loop.create_task``; the
    fast path returns a future (resolved from the upstream connection's callback, no task).
    This task factory gives futures back unchanged and builds tasks for coroutines as usual.
    It goes once the server accepts futures itself (a three-line change, see docs/gateway.md).
    """
    previous = loop.get_task_factory()
    if getattr(previous, "_passes_futures", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if isinstance(coro, asyncio.Future):
            return coro
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    factory._passes_futures = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


def _encode(request: HttpRequest, path: str) -> tuple[bytes, bytes, bytes]:
    """The request line, the forwarded headers (ending the head) and the body; the ``host``
    line goes between the first two, per instance."""
    query = request.query
    target = f"{path}?{query}" if query else path
    line = b"%s %s HTTP/1.1\r\n" % (request.method.encode("latin-1"), target.encode("latin-1"))
    body = request.body
    parts = [b"%s: %s\r\n" % (k, v) for k, v in request.headers.items() if k not in _DROP_REQUEST_HEADERS]
    parts.append(b"content-length: %d\r\n\r\n" % len(body))
    return line, b"".join(parts), body


class _Exchange:
    """One request on the fast path: what :meth:`Gateway._forward` needs to take over."""

    __slots__ = (
        "body",
        "conn",
        "gateway",
        "headers",
        "inst",
        "line",
        "out",
        "path",
        "request",
        "service",
        "start",
    )

    def __init__(
        self,
        gateway: Gateway,
        request: HttpRequest,
        service: Service,
        path: str,
        start: float,
        inst: Instance,
        conn: UpstreamConnection,
        line: bytes,
        headers: bytes,
        body: bytes,
    ) -> None:
        self.gateway = gateway
        self.request = request
        self.service = service
        self.path = path
        self.start = start
        self.inst = inst
        self.conn = conn
        self.line = line
        self.headers = headers
        self.body = body
        self.out: asyncio.Future[Response] = gateway.loop.create_future()

    def done(self, response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        """The upstream callback (see :meth:`UpstreamConnection.start`)."""
        inst = self.inst
        inst.outstanding -= 1
        if response is not None and response.status not in _RETRY_STATUSES:
            inst.pool.release(self.conn, response.keep_alive)
            if inst.failures:
                inst.mark_reachable()
            status = response.status
            stats = self.service.stats
            stats.in_flight -= 1
            if status >= 500:
                stats.error("upstream_5xx")
            stats.observe(status, time.perf_counter() - self.start)
            if not self.out.done():
                self.out.set_result(Response(status, response.body, response.headers))
            return
        task = self.gateway.loop.create_task(self.gateway._resume(self, response, error))
        task.add_done_callback(self._chain)

    def _chain(self, task: asyncio.Future[Response]) -> None:
        out = self.out
        if out.done():
            return
        if task.cancelled():
            out.cancel()
        elif task.exception() is not None:
            out.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            out.set_result(task.result())


class _NoDefault(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_header_length(request: HttpRequest) -> int | None:
    value = request.headers.get(b"inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _failure(service: Service, error: UpstreamError, attempts: int) -> tuple[int, Response]:
    tries = f" ({attempts} attempt{'s' if attempts != 1 else ''})"
    if isinstance(error, ConnectFailed):
        return 503, error_response(
            503,
            f"no instance of service '{service.name}' could be reached{tries}: {error.message}",
            _RETRY_AFTER,
        )
    if isinstance(error, UpstreamTimeout):
        return 504, error_response(504, f"service '{service.name}' did not answer in time: {error.message}")
    if isinstance(error, BadResponse):
        return 502, error_response(502, f"service '{service.name}' sent a bad response: {error.message}")
    return 502, error_response(
        502,
        f"the instance of service '{service.name}' closed the connection before answering{tries}; "
        "the request was not retried because it may have run",
    )
