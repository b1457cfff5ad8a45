"""gRPC through the gateway: ``inference.GRPCInferenceService`` proxied on a port of its own.

``python -m elastiserve.gateway --grpc-port P`` adds a gRPC server that accepts every method of
KServe v2's ``inference.GRPCInferenceService`` as raw bytes (nothing is decoded: the gateway
reads only metadata) and forwards it to an instance of the service named by the ``service``
metadata key, with the same checks as HTTP: ``authorization`` metadata (the token), groups,
``rpc.rate_limit``, ``rpc.max_queue_size``, balancing and per-service statistics. A service
takes gRPC traffic only when its spec sets ``metadata.enable_grpc``.

The instance's gRPC port comes from the control plane's endpoint list: an endpoint
``{ip, port, weight, grpc_port}``; instances without ``grpc_port`` cannot take gRPC calls
(UNAVAILABLE, with that reason).

Status codes for the gateway's own refusals: no ``service`` key → INVALID_ARGUMENT; unknown
service → NOT_FOUND; no token → UNAUTHENTICATED; wrong token → PERMISSION_DENIED; gRPC not
enabled → UNIMPLEMENTED; rate limit or queue full → RESOURCE_EXHAUSTED; no instance →
UNAVAILABLE. Retries follow the HTTP policy: a failed connect is tried on another instance; an
UNAVAILABLE answer after the request may have been sent is retried only for idempotent methods
(reads, and ``ModelInfer`` without a ``sequence_id``). ``ModelStreamInfer`` streams are
forwarded to one instance and never retried.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import grpc
from grpc import aio

from elastiserve.gateway.balancing import QUEUE_FULL, Instance
from elastiserve.gateway.traffic import Service

if TYPE_CHECKING:
    from elastiserve.gateway.app import Gateway

__all__ = ["GrpcProxy", "start_grpc_proxy"]

PREFIX: Final = "/inference.GRPCInferenceService/"
STREAM_METHODS: Final = frozenset({"ModelStreamInfer"})
# Methods with effects: never sent twice when the first attempt may have arrived.
_NOT_IDEMPOTENT: Final = frozenset(
    {
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "TraceSetting",
        "LogSettings",
    }
)
# Metadata keys that are the gateway's (not forwarded) or belong to the HTTP/2 connection.
_DROP_METADATA: Final = frozenset({"service", "authorization", "user-agent", "te", "content-type"})
_STATUS_TO_CODE: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    450: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
_CODE_TO_STATUS: Final = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class GrpcProxy:
    """The gRPC server and one client channel per instance."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server: aio.Server | None = None
        self.port = 0
        self._channels: dict[tuple[str, int], aio.Channel] = {}

    async def start(self, host: str, port: int) -> None:
        limit = self.gateway.options.max_body_bytes
        self.server = aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)]
        )
        self.server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(2.0)
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()

    def _channel(self, inst: Instance) -> aio.Channel:
        assert inst.grpc_port is not None
        key = (inst.host, inst.grpc_port)
        channel = self._channels.get(key)
        if channel is None:
            channel = aio.insecure_channel(
                f"{inst.host}:{inst.grpc_port}",
                options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
            )
            self._channels[key] = channel
        return channel

    # -- admission ---------------------------------------------------------------------------------

    async def _admit(self, context: aio.ServicerContext) -> tuple[Service, list[tuple[str, str]]]:
        name: str | None = None
        token: bytes | None = None
        forward: list[tuple[str, str]] = []
        for key, value in context.invocation_metadata() or ():
            if key == "service":
                name = str(value)
            elif key == "authorization":
                token = value.encode() if isinstance(value, str) else bytes(value)
            elif key not in _DROP_METADATA and not key.startswith((":", "grpc-")):
                forward.append((key, value))
        if not name:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name the service in the 'service' metadata key", 400
            )
        gateway = self.gateway
        target = gateway.table.resolve(name)
        if target is None:
            assert gateway.catalog is not None
            await gateway.catalog.refresh_soon()
            target = gateway.table.resolve(name)
        if target is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"service '{name}' not found", 404)
        service, refusal = gateway.admit(target, token)
        if refusal is not None:
            code = _STATUS_TO_CODE.get(refusal.status, grpc.StatusCode.UNAVAILABLE)
            if service is not None:
                service.stats.error(refusal.reason)
            raise _Abort(code, refusal.message, refusal.status)
        assert service is not None
        if not service.config.enable_grpc:
            raise _Abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"service '{service.name}' does not accept gRPC (set metadata.enable_grpc)",
                501,
            )
        return service, forward

    def _pick(self, service: Service, tried: list[Instance]) -> Instance:
        choice = service.balancer.pick(set(tried) if tried else None, service.config.max_queue_size)
        if choice is QUEUE_FULL:
            service.stats.error("queue_full")
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue of service '{service.name}' is full", 450
            )
        if choice is None:
            service.stats.error("no_instance")
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"service '{service.name}' has no ready instance", 503)
        assert isinstance(choice, Instance)
        if choice.grpc_port is None:
            service.stats.error("no_grpc_port")
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"instances of service '{service.name}' publish no gRPC port",
                503,
            )
        return choice

    def _timeout(self, service: Service, context: aio.ServicerContext) -> float:
        timeout = service.config.timeout or self.gateway.options.request_timeout
        remaining = context.time_remaining()
        return min(timeout, remaining) if remaining is not None else timeout

    # -- calls ---------------------------------------------------------------------------------------

    async def unary(self, method: str, request: bytes, context: aio.ServicerContext) -> bytes:
        start = time.perf_counter()
        service: Service | None = None
        try:
            service, metadata = await self._admit(context)
            stats = service.stats
            stats.in_flight += 1
            try:
                reply = await self._call(service, method, request, metadata, context)
            finally:
                stats.in_flight -= 1
            stats.observe(200, time.perf_counter() - start)
            return reply
        except _Abort as exc:
            if service is not None:
                service.stats.observe(exc.status, time.perf_counter() - start)
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from None  # abort raises

    async def _call(
        self,
        service: Service,
        method: str,
        request: bytes,
        metadata: list[tuple[str, str]],
        context: aio.ServicerContext,
    ) -> bytes:
        short = method.removeprefix(PREFIX)
        idempotent = short not in _NOT_IDEMPOTENT and not (
            short == "ModelInfer" and b"sequence_id" in request
        )
        tried: list[Instance] = []
        attempts = 0
        while True:
            inst = self._pick(service, tried)
            tried.append(inst)
            attempts += 1
            inst.outstanding += 1
            inst.requests += 1
            try:
                call = self._channel(inst).unary_unary(method)
                return await call(request, metadata=metadata, timeout=self._timeout(service, context))
            except aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                never_sent = code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower()
                if never_sent:
                    inst.mark_unreachable(time.monotonic())
                retry = never_sent or (code == grpc.StatusCode.UNAVAILABLE and idempotent)
                if retry and attempts < self.gateway.options.max_attempts:
                    with contextlib.suppress(_Abort):
                        self._pick(service, tried)  # is there another instance?
                        service.stats.retry("unreachable" if never_sent else "unavailable")
                        continue
                status = _CODE_TO_STATUS.get(code, 500)
                if status >= 500:
                    service.stats.error("upstream_5xx" if not never_sent else "unreachable")
                raise _Abort(code, details, status) from None
            finally:
                inst.outstanding -= 1

    async def stream(
        self, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        service: Service | None = None
        try:
            service, metadata = await self._admit(context)
            inst = self._pick(service, [])
        except _Abort as exc:
            if service is not None:
                service.stats.observe(exc.status, time.perf_counter() - start)
            await context.abort(exc.code, exc.message)
            return
        stats = service.stats
        stats.in_flight += 1
        inst.outstanding += 1
        inst.requests += 1
        status = 200
        try:
            call = self._channel(inst).stream_stream(method)(requests, metadata=metadata)
            async for reply in call:
                yield reply
        except aio.AioRpcError as exc:
            status = _CODE_TO_STATUS.get(exc.code(), 500)
            await context.abort(exc.code(), exc.details() or "")
        finally:
            inst.outstanding -= 1
            stats.in_flight -= 1
            stats.observe(status, time.perf_counter() - start)


class _Handler(grpc.GenericRpcHandler):
    """Every ``inference.GRPCInferenceService`` method, as bytes in and bytes out."""

    def __init__(self, proxy: GrpcProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if not method.startswith(PREFIX):
            return None
        proxy = self._proxy
        # Coroutine functions (not functions returning coroutines): grpc.aio runs anything else
        # in a thread pool.
        if method.removeprefix(PREFIX) in STREAM_METHODS:

            async def stream(
                requests: AsyncIterator[bytes], context: aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                async for reply in proxy.stream(method, requests, context):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context: aio.ServicerContext) -> bytes:
            return await proxy.unary(method, request, context)

        return grpc.unary_unary_rpc_method_handler(unary)


async def start_grpc_proxy(gateway: Gateway, host: str, port: int) -> GrpcProxy:
    """Start the gRPC proxy of ``gateway`` on ``host:port`` (0 picks a port: see ``.port``)."""
    proxy = GrpcProxy(gateway)
    await proxy.start(host, port)
    return proxy
