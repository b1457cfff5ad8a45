"""A target = a server URL + protocol + the workload's prepared bytes: opens connections, starts calls.

The runner only knows :class:`Target`; the protocol details (HTTP/1.1 raw, gRPC over our HTTP/2
client or ``grpc.aio``) stay here. Model metadata, asked once before a run to learn input shapes,
also comes through here (a plain httpx GET or a grpc sync call: not on the hot path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from elastiserve.loadgen.grpc_driver import (
    AioGrpcConnection,
    H2GrpcConnection,
    encode_request_headers,
    frame_message,
    parse_grpc_url,
)
from elastiserve.loadgen.http_driver import HttpConnection, build_requests, parse_http_url
from elastiserve.loadgen.workload import Workload

__all__ = ["Connection", "Target", "TargetOptions", "fetch_metadata", "make_target"]


class Connection(Protocol):
    closed: bool

    def close(self) -> None: ...


@dataclass
class TargetOptions:
    """Everything about where and how requests go (not how many, nor when)."""

    url: str
    protocol: str = "http"  # http | grpc
    headers: list[tuple[str, str]] = field(default_factory=list)
    input_format: str = "binary"  # binary | json (HTTP only)
    grpc_impl: str = "raw"  # raw | aio
    timeout: float = 30.0


class Target:
    """Opens connections and starts one call on a connection; calls give None or an error kind."""

    multiplexed = False  # True: many calls in flight share one connection (gRPC)

    def __init__(self, options: TargetOptions, workload: Workload) -> None:
        self.options = options
        self.workload = workload

    async def connect(self) -> Any:
        raise NotImplementedError

    def start(self, connection: Any, index: int, now: float) -> Awaitable[str | None]:
        raise NotImplementedError

    def in_flight(self, connection: Any) -> list[tuple[Any, float]]:
        """(handle, sent_at) for the watchdog; handle goes back to :meth:`expire`."""
        return []

    def expire(self, connection: Any, handle: Any) -> None:
        """Give up on a call that outlived the timeout."""


class HttpTarget(Target):
    def __init__(self, options: TargetOptions, workload: Workload) -> None:
        super().__init__(options, workload)
        self.address = parse_http_url(options.url)
        path = workload.infer_path(self.address.prefix)
        if options.input_format == "json":
            bodies: list[tuple[bytes, int | None]] = [(b, None) for b in workload.http_json_bodies()]
            content_type = "application/json"
        else:
            bodies = [(b, n) for b, n in workload.http_binary_bodies()]
            content_type = "application/octet-stream"
        self.requests = build_requests(self.address, path, bodies, options.headers, content_type)
        self._count = len(self.requests)

    async def connect(self) -> HttpConnection:
        return await HttpConnection.open(self.address, self.options.timeout)

    def start(self, connection: HttpConnection, index: int, now: float) -> asyncio.Future[str | None]:
        return connection.call(self.requests[index % self._count], now)

    def in_flight(self, connection: HttpConnection) -> list[tuple[Any, float]]:
        return [(None, connection.sent_at)] if connection.sent_at else []

    def expire(self, connection: HttpConnection, handle: Any) -> None:
        connection.abort("timeout")


class RawGrpcTarget(Target):
    multiplexed = True

    def __init__(self, options: TargetOptions, workload: Workload) -> None:
        super().__init__(options, workload)
        self.address = parse_grpc_url(options.url)
        metadata = [(k.lower(), v) for k, v in options.headers]
        self.block = encode_request_headers(self.address.hostport, metadata)
        self.messages = [frame_message(m) for m in workload.grpc_messages()]
        self._count = len(self.messages)

    async def connect(self) -> H2GrpcConnection:
        return await H2GrpcConnection.open(self.address, self.options.timeout)

    def start(self, connection: H2GrpcConnection, index: int, now: float) -> asyncio.Future[str | None]:
        return connection.call(self.block, self.messages[index % self._count], now)

    def in_flight(self, connection: H2GrpcConnection) -> list[tuple[Any, float]]:
        return [(sid, stream.sent_at) for sid, stream in connection.streams.items()]

    def expire(self, connection: H2GrpcConnection, handle: Any) -> None:
        connection.cancel(handle, "timeout")


class AioGrpcTarget(Target):
    multiplexed = True

    def __init__(self, options: TargetOptions, workload: Workload) -> None:
        super().__init__(options, workload)
        self.address = parse_grpc_url(options.url)
        self.messages = workload.grpc_messages()
        self._count = len(self.messages)

    async def connect(self) -> AioGrpcConnection:
        return await AioGrpcConnection.open(self.address, self.options.headers, self.options.timeout)

    def start(self, connection: AioGrpcConnection, index: int, now: float) -> Awaitable[str | None]:
        return asyncio.ensure_future(
            connection.call(self.messages[index % self._count], self.options.timeout)
        )


def make_target(options: TargetOptions, workload: Workload) -> Target:
    if options.protocol == "http":
        return HttpTarget(options, workload)
    if options.protocol == "grpc":
        return (
            AioGrpcTarget(options, workload)
            if options.grpc_impl == "aio"
            else RawGrpcTarget(options, workload)
        )
    raise ValueError(f"unknown protocol {options.protocol!r}")


def fetch_metadata(options: TargetOptions, model: str, version: str = "") -> dict[str, Any] | None:
    """The model's v2 metadata (inputs, outputs), or None when the server does not give it.

    Raises ``ConnectionError`` when the server cannot be reached at all, so that a wrong URL is
    one clear message before the run instead of a run full of 'connection refused'.
    """
    if options.protocol == "http":
        import httpx

        address = parse_http_url(options.url)
        path = f"{address.prefix}/v2/models/{model}" + (f"/versions/{version}" if version else "")
        try:
            response = httpx.get(
                f"http://{address.hostport}{path}", headers=dict(options.headers), timeout=options.timeout
            )
        except httpx.HTTPError as exc:
            raise ConnectionError(f"cannot reach {address.hostport}: {exc}") from None
        if response.status_code != 200:
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    import grpc
    from google.protobuf.json_format import MessageToDict
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    address = parse_grpc_url(options.url)
    with grpc.insecure_channel(address.hostport) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            reply = stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=model, version=version),
                metadata=[(k.lower(), v) for k, v in options.headers] or None,
                timeout=options.timeout,
            )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ConnectionError(f"cannot reach {address.hostport}: {exc.details()}") from None
            return None
    if not isinstance(reply, service_pb2.ModelMetadataResponse):  # a server that answers OK with nothing
        return None
    meta = MessageToDict(reply, preserving_proto_field_name=True)
    for entry in meta.get("inputs", []) + meta.get("outputs", []):
        entry["shape"] = [int(d) for d in entry.get("shape", [])]
    return meta
