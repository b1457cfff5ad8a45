"""The control plane's REST API (EAS-shaped ``/api/v2/services`` routes), built on FastAPI.

FastAPI because this is the control plane, not the inference path: a few requests a second,
where the OpenAPI document at ``/openapi.json`` and body validation with the very
:class:`~elastiserve.controlplane.spec.ServiceSpec` model matter more than microseconds.

Contract (docs/controlplane-api.md):

* Every error is ``{"error": "<one line>"}``; spec errors add ``"details": ["path: message", …]``.
  400 bad request (bad JSON, bad name, bad query), 401 no admin token, 403 wrong admin token,
  404 unknown service/version/instance, 409 exists or being deleted, 412 ``If-Match`` stale,
  413 body too large, 422 invalid spec, 503 no runtime for logs.
* Writes need ``Authorization: <admin token>`` (``Bearer <token>`` also accepted). Reads are open
  but service tokens are redacted unless the admin token is sent; logs need the admin token
  (they can carry request data).
* The API never touches processes: it writes the store and calls ``notifier.notify(name)`` so
  the reconciler acts at once instead of at its next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elastiserve import __version__
from elastiserve.controlplane.runtimes.base import InstanceNotFound, Runtime
from elastiserve.controlplane.spec import (
    REDACTED,
    ServiceSpec,
    SpecError,
    check_service_name,
    format_errors,
    spec_warnings,
)
from elastiserve.controlplane.store import (
    Conflict,
    InstanceRecord,
    PreconditionFailed,
    ServiceRecord,
    Store,
    VersionRecord,
)
from elastiserve.errors import (
    AlreadyExists,
    ElastiserveError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v2"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a spec is a few KB; inline model_config stays far below this
DEFAULT_MAX_WAIT = 60.0


class Notifier(Protocol):
    """What the API tells about changes: the reconciler implements it."""

    def notify(self, service: str | None = None) -> None: ...


class ApiError(StarletteHTTPException):
    """An error with our body shape; raised anywhere in a request (also from the body reader)."""

    def __init__(
        self,
        status: int,
        message: str,
        details: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message = message
        self.details = details


def error_body(message: str, details: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = details
    return body


def _status_of(exc: ElastiserveError) -> int:
    """The control plane's own status mapping (REST conventions, not Triton's engine mapping)."""
    if isinstance(exc, SpecError):
        return 422
    for kind, status in _STATUS_BY_CLASS:
        if isinstance(exc, kind):
            return status
    return 500


_STATUS_BY_CLASS: list[tuple[type[ElastiserveError], int]] = [
    (PreconditionFailed, 412),
    (Conflict, 409),
    (AlreadyExists, 409),
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (InvalidArgument, 400),
    (Unavailable, 503),
]


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes, by Content-Length up front or while streaming, so an
    oversize or endless body is never buffered whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await JSONResponse(error_body(self._message()), status_code=413)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ApiError(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body too large (limit {self.limit} bytes)"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def create_app(
    store: Store,
    *,
    admin_token: str,
    notifier: Notifier | None = None,
    runtime: Runtime | None = None,
    gateway_url: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_wait: float = DEFAULT_MAX_WAIT,
) -> FastAPI:
    """Build the control plane's ASGI app over ``store``.

    ``runtime`` is only used to read instance logs; ``gateway_url`` (when a gateway runs) makes
    ``desc`` show the service's endpoint.
    """
    if not admin_token:
        raise ValueError("admin_token must not be empty")
    expected = admin_token.encode()
    changes = _ChangeSignal(store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        changes.attach(asyncio.get_running_loop())
        try:
            yield
        finally:
            changes.detach()

    app = FastAPI(
        title="elastiserve control plane",
        version=__version__,
        description="EAS-style service management: create, modify, scale, roll back, observe.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.state.store = store
    app.state.release_waiters = changes.release  # serve_in_thread calls it before stopping
    app.state.notifier = notifier

    # -- errors ----------------------------------------------------------------------------------

    @app.exception_handler(ElastiserveError)
    async def _elastiserve_error(request: Request, exc: ElastiserveError) -> JSONResponse:
        details = exc.errors if isinstance(exc, SpecError) and len(exc.errors) > 1 else None
        return JSONResponse(error_body(exc.message, details), status_code=_status_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        details = exc.details if isinstance(exc, ApiError) else None
        message = exc.message if isinstance(exc, ApiError) else str(exc.detail)
        if exc.status_code == 404 and not isinstance(exc, ApiError):
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return JSONResponse(error_body(message, details), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            reason = (
                next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            )
            return JSONResponse(error_body(f"request body is not valid JSON: {reason}".rstrip(": ")), 400)
        body_errors = [e for e in errors if e.get("loc", ("",))[0] == "body"]
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in _NOT_AN_OBJECT for e in body_errors):
            return JSONResponse(error_body("request body must be a JSON object (a service spec)"), 400)
        if body_errors:
            lines = format_errors([{**e, "loc": tuple(e["loc"][1:])} for e in body_errors])
            if any(e.get("type") == "missing" and len(e.get("loc", ())) == 1 for e in body_errors):
                lines = ["request body required: a service spec (JSON object)"]
            return JSONResponse(error_body("; ".join(lines), lines if len(lines) > 1 else None), 422)
        lines = format_errors(errors, ())
        lines = [line.removeprefix("query.").removeprefix("path.").removeprefix("header.") for line in lines]
        return JSONResponse(error_body("; ".join(lines)), 400)

    # -- auth --------------------------------------------------------------------------------------

    def _presented(request: Request) -> bytes | None:
        value = request.headers.get("authorization")
        if value is None:
            return None
        value = value.strip()
        if value[:7].lower() == "bearer ":
            value = value[7:].strip()
        return value.encode()

    def admin_level(request: Request) -> bool:
        """False without a token; True with the admin token; 403 with any other token."""
        presented = _presented(request)
        if presented is None:
            return False
        if not hmac.compare_digest(presented, expected):
            raise ApiError(403, "invalid admin token")
        return True

    def require_admin(request: Request) -> None:
        if _presented(request) is None:
            raise ApiError(
                401, "admin token required (Authorization header)", headers={"WWW-Authenticate": "Bearer"}
            )
        admin_level(request)

    Admin = Depends(require_admin)

    def _name(name: str) -> str:
        check_service_name(name, error=lambda msg: ApiError(400, msg))
        return name

    def _notify(name: str | None) -> None:
        if notifier is None:
            return
        try:
            notifier.notify(name)
        except Exception:  # the write is durable; the reconciler's next tick picks it up anyway
            log.exception("notifier failed for %s", name)

    # -- views -------------------------------------------------------------------------------------

    def service_view(
        record: ServiceRecord, *, admin: bool, instances: list[InstanceRecord] | None = None
    ) -> dict[str, Any]:
        if instances is None:
            instances = store.list_instances(record.name)
        live = [i for i in instances if i.desired == "running"]
        return {
            "name": record.name,
            "status": record.status,
            "desired": record.desired,
            "message": record.message,
            "version": record.version,
            "latest_version": record.latest_version,
            "generation": record.generation,
            "created": _iso(record.created),
            "updated": _iso(record.updated),
            "endpoint": f"{gateway_url.rstrip('/')}/api/predict/{record.name}" if gateway_url else None,
            "instances": {
                "desired": record.spec.metadata.instance if record.desired == "running" else 0,
                "total": len(live),
                "ready": sum(1 for i in live if i.ready),
            },
            "spec": record.spec.to_dict() if admin else record.spec.redacted(),
        }

    def instance_view(inst: InstanceRecord) -> dict[str, Any]:
        return {
            "id": inst.id,
            "service": inst.service,
            "version": inst.version,
            "address": inst.address,
            "port": inst.port,
            "pid": inst.pid,
            "started": _iso(inst.started),
            "restarts": inst.restarts,
            "status": inst.status,
            "ready": inst.ready,
            "reason": inst.reason,
            "desired": inst.desired,
        }

    def version_view(v: VersionRecord, current: int, *, admin: bool) -> dict[str, Any]:
        return {
            "version": v.number,
            "created": _iso(v.created),
            "current": v.number == current,
            "spec": v.spec.to_dict() if admin else v.spec.redacted(),
        }

    def etag(record: ServiceRecord) -> str:
        return f'"{record.generation}"'

    def if_match_generation(value: str | None) -> int | None:
        if value is None or value.strip() == "*":
            return None
        try:
            return int(value.strip().removeprefix("W/").strip('"'))
        except ValueError:
            raise ApiError(400, f"If-Match: expected an ETag from GET, got {value!r}") from None

    # -- routes: services --------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(f"{API_PREFIX}/services", status_code=201, dependencies=[Admin], tags=["services"])
    def create_service(spec: ServiceSpec, response: Response) -> dict[str, Any]:
        """Create a service from an EAS-style spec (version 1); a token is generated if omitted."""
        if spec.token is None:
            spec.token = secrets.token_urlsafe(24)
        record = store.create_service(spec)
        _notify(record.name)
        response.headers["ETag"] = etag(record)
        response.headers["Location"] = f"{API_PREFIX}/services/{record.name}"
        return {**service_view(record, admin=True, instances=[]), "warnings": spec_warnings(spec)}

    def services_body(admin: bool) -> bytes:
        instances: dict[str, list[InstanceRecord]] = {}
        for inst in store.list_instances():
            instances.setdefault(inst.service, []).append(inst)
        views = [
            service_view(r, admin=admin, instances=instances.get(r.name, [])) for r in store.list_services()
        ]
        return json.dumps({"services": views}, sort_keys=True).encode()

    def body_etag(body: bytes) -> str:
        return f'"{hashlib.sha256(body).hexdigest()[:20]}"'

    async def watched(read: Callable[[], bytes], if_none_match: str | None, wait: float) -> Response:
        """A JSON body clients poll cheaply: 304 while its ETag is one they sent, and with
        ``wait`` the answer is held (at most ``max_wait``) until the body changes. Writes in this
        process wake the waiters at once; the 1 s cap re-reads for writers elsewhere; shutting
        down ends the wait (304) so the server stops at once."""
        body = await run_in_threadpool(read)
        tag = body_etag(body)
        known = _etags(if_none_match) if if_none_match is not None else set()
        if tag in known and wait > 0:
            deadline = time.monotonic() + min(wait, max_wait)
            while tag in known and not changes.closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await changes.wait(min(remaining, 1.0))
                except asyncio.CancelledError:
                    break
                if not changes.closing:
                    body = await run_in_threadpool(read)
                    tag = body_etag(body)
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if tag in known:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @app.get(f"{API_PREFIX}/services", tags=["services"])
    async def list_services(
        wait: Annotated[float, Query(ge=0, description="long-poll: seconds to wait for a change")] = 0.0,
        if_none_match: Annotated[str | None, Header()] = None,
        admin: bool = Depends(admin_level),
    ) -> Response:
        """Every service's view. Send the last ETag as ``If-None-Match``: 304 when nothing changed;
        with ``wait`` the call returns as soon as something does (or 304 after ``wait`` seconds).
        The gateway watches the list this way."""
        return await watched(lambda: services_body(admin), if_none_match, wait)

    @app.get(f"{API_PREFIX}/services/{{name}}", tags=["services"])
    def describe_service(name: str, response: Response, admin: bool = Depends(admin_level)) -> dict[str, Any]:
        record = store.get_service(_name(name))
        response.headers["ETag"] = etag(record)
        return service_view(record, admin=admin)

    @app.put(f"{API_PREFIX}/services/{{name}}", dependencies=[Admin], tags=["services"])
    def update_service(
        name: str,
        spec: ServiceSpec,
        response: Response,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Replace the spec. A change of ``metadata.instance`` alone scales (no new version);
        anything else records a new version and rolls it out. Omitting ``token`` keeps it."""
        _name(name)
        if spec.name != name:
            raise ApiError(
                400,
                f"name: '{spec.name}' does not match the service in the URL ('{name}'); "
                "services cannot be renamed",
            )
        expected_generation = if_match_generation(if_match)
        current = store.get_service(name)
        if spec.token is None or spec.token == REDACTED:
            spec.token = current.spec.token
        record, kind = store.update_service(spec, expect_generation=expected_generation)
        if kind != "unchanged":
            _notify(name)
        response.headers["ETag"] = etag(record)
        return {**service_view(record, admin=True), "change": kind, "warnings": spec_warnings(spec)}

    @app.delete(f"{API_PREFIX}/services/{{name}}", dependencies=[Admin], tags=["services"])
    def delete_service(name: str) -> JSONResponse:
        """Delete at once when no instance exists, else drain them first (202, status Deleting)."""
        result = store.delete_service(_name(name))
        _notify(name)
        status = 200 if result == "deleted" else 202
        return JSONResponse({"name": name, "result": result}, status_code=status)

    def _set_desired(name: str, desired: Literal["running", "stopped"]) -> JSONResponse:
        record = store.set_desired(_name(name), desired)
        _notify(name)
        return JSONResponse(service_view(record, admin=True), status_code=202)

    @app.post(f"{API_PREFIX}/services/{{name}}/start", dependencies=[Admin], tags=["services"])
    def start_service(name: str) -> JSONResponse:
        return _set_desired(name, "running")

    @app.post(f"{API_PREFIX}/services/{{name}}/stop", dependencies=[Admin], tags=["services"])
    def stop_service(name: str) -> JSONResponse:
        """Drain and stop every instance; the spec and versions stay."""
        return _set_desired(name, "stopped")

    # -- routes: versions --------------------------------------------------------------------------

    @app.get(f"{API_PREFIX}/services/{{name}}/versions", tags=["versions"])
    def list_versions(name: str, admin: bool = Depends(admin_level)) -> dict[str, Any]:
        record = store.get_service(_name(name))
        return {"versions": [version_view(v, record.version, admin=admin) for v in store.list_versions(name)]}

    @app.get(f"{API_PREFIX}/services/{{name}}/versions/{{number}}", tags=["versions"])
    def get_version(name: str, number: int, admin: bool = Depends(admin_level)) -> dict[str, Any]:
        record = store.get_service(_name(name))
        return version_view(store.get_version(name, number), record.version, admin=admin)

    @app.put(f"{API_PREFIX}/services/{{name}}/versions/{{number}}", dependencies=[Admin], tags=["versions"])
    def rollback(name: str, number: int, response: Response) -> dict[str, Any]:
        """Make version ``number`` current (rolled out like a modify; the instance count stays)."""
        record = store.rollback(_name(name), number)
        _notify(name)
        response.headers["ETag"] = etag(record)
        return service_view(record, admin=True)

    # -- routes: instances, events, logs -----------------------------------------------------------

    @app.get(f"{API_PREFIX}/services/{{name}}/instances", tags=["instances"])
    def list_instances(name: str) -> dict[str, Any]:
        store.get_service(_name(name))
        return {"instances": [instance_view(i) for i in store.list_instances(name)]}

    @app.delete(
        f"{API_PREFIX}/services/{{name}}/instances/{{instance_id}}", dependencies=[Admin], tags=["instances"]
    )
    def delete_instance(name: str, instance_id: str) -> JSONResponse:
        """``dw``: drain and delete one instance; the reconciler starts a replacement."""
        store.get_service(_name(name))
        inst = store.request_instance_delete(name, instance_id)
        _notify(name)
        return JSONResponse(instance_view(inst), status_code=202)

    @app.get(f"{API_PREFIX}/services/{{name}}/events", tags=["instances"])
    def list_events(
        name: str,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        since: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        store.get_service(_name(name))
        return {
            "events": [
                {"id": e.id, "time": _iso(e.time), "kind": e.kind, "message": e.message}
                for e in store.list_events(name, limit=limit, since=since)
            ]
        }

    @app.get(
        f"{API_PREFIX}/services/{{name}}/logs",
        dependencies=[Admin],
        tags=["instances"],
        response_class=PlainTextResponse,
    )
    async def logs(
        name: str,
        request: Request,
        instance: str | None = None,
        tail: Annotated[int, Query(ge=0, le=100000)] = 200,
        follow: bool = False,
    ) -> Response:
        """Instance output as text; all instances (lines prefixed ``[id]``) unless ``instance``;
        ``follow=true`` streams new output until the client goes away."""
        await run_in_threadpool(store.get_service, _name(name))
        if runtime is None:
            raise ApiError(503, "logs are not available: this control plane has no runtime attached")
        rt = runtime

        def targets() -> list[str]:
            ids = [i.id for i in store.list_instances(name)]
            if instance is not None:
                if instance not in ids:
                    raise NotFound(f"service '{name}' has no instance '{instance}'")
                return [instance]
            return ids

        ids = await run_in_threadpool(targets)
        prefix = instance is None
        offsets: dict[str, int] = {}

        def read_initial() -> str:
            parts = []
            for iid in ids:
                try:
                    chunk = rt.instance_logs(iid, tail=tail)
                except InstanceNotFound:
                    continue
                offsets[iid] = chunk.offset
                parts.append(_prefixed(chunk.text, iid if prefix else None))
            return "".join(parts)

        initial = await run_in_threadpool(read_initial)
        if not follow:
            return PlainTextResponse(initial)

        def read_new() -> str | None:
            if store.find_service(name) is None:
                return None
            parts = []
            for iid in targets() if instance is None else [instance]:
                try:
                    chunk = rt.instance_logs(iid, offset=offsets.get(iid, 0))
                except InstanceNotFound:
                    continue
                offsets[iid] = chunk.offset
                parts.append(_prefixed(chunk.text, iid if prefix else None))
            return "".join(parts)

        async def stream() -> AsyncIterator[bytes]:
            yield initial.encode()
            while not changes.closing and not await request.is_disconnected():
                await asyncio.sleep(0.5)
                text = await run_in_threadpool(read_new)
                if text is None:
                    return
                if text:
                    yield text.encode()

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    # -- route: discovery ----------------------------------------------------------------------------

    def endpoints_of(name: str) -> list[dict[str, Any]]:
        record = store.get_service(name)
        if record.desired != "running":
            return []
        eps: list[dict[str, Any]] = []
        for i in store.list_instances(name):
            if i.ready and i.desired == "running" and i.port:
                ep: dict[str, Any] = {"ip": i.address, "port": i.port, "weight": i.weight}
                if i.extra.get("grpc_port"):
                    ep["grpc_port"] = int(i.extra["grpc_port"])  # the engine's gRPC (gateway's proxy)
                eps.append(ep)
        return sorted(eps, key=lambda e: (e["ip"], e["port"]))

    @app.get(f"{API_PREFIX}/services/{{name}}/endpoints", tags=["discovery"])
    async def endpoints(
        name: str,
        wait: Annotated[float, Query(ge=0, description="long-poll: seconds to wait for a change")] = 0.0,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Ready instances ``{ip, port, weight}`` for direct connection. Send the last ETag as
        ``If-None-Match``: 304 when unchanged; with ``wait`` the call returns as soon as the set
        changes (or 304 after ``wait`` seconds)."""
        _name(name)

        def read() -> bytes:
            return json.dumps({"service": name, "endpoints": endpoints_of(name)}, sort_keys=True).encode()

        return await watched(read, if_none_match, wait)

    return app


_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")}


def _prefixed(text: str, instance_id: str | None) -> str:
    if not text or instance_id is None:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(f"[{instance_id}] {line}" for line in lines)


class _ChangeSignal:
    """Wakes long-polls when the store commits: the store calls back from any thread, this hops
    onto the event loop and releases every waiter."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._listener: Callable[[], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

        def on_change() -> None:
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(self._fire)

        self._listener = on_change
        self._store.add_listener(on_change)

    def detach(self) -> None:
        if self._listener is not None:
            self._store.remove_listener(self._listener)
            self._listener = None

    def _fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = asyncio.Event()

    closing = False

    def release(self) -> None:
        """Shutting down (from any thread): end every long-poll now, so the server stops at once
        instead of waiting out its graceful-shutdown timeout and cancelling them."""
        self.closing = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fire)

    async def wait(self, timeout: float) -> None:
        if self.closing:
            return
        if self._event is None:  # app used without lifespan (no listener): poll
            await asyncio.sleep(min(timeout, 0.1))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL (tests, embedded use)."""
    import threading

    import uvicorn

    if port is None:
        from elastiserve.testing import free_port

        port = free_port(host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"control-plane-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"control plane did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        release = getattr(getattr(app, "state", None), "release_waiters", None)
        if release is not None:
            release()
        server.should_exit = True
        thread.join(timeout=10)
