"""KServe v2 / Triton ``inference.GRPCInferenceService`` over :class:`DataPlane`.

Messages are tritonclient's generated ``service_pb2`` classes (never hand-written protos);
the methods are served as raw bytes (no grpcio (de)serializers) so that ``ModelInfer`` parses
its request once, straight into numpy views (:mod:`.grpc_codec`). Behaviour and error
messages follow Triton's ``src/grpc/grpc_server.cc`` / ``infer_handler.cc``; every failure is an
:class:`~elastiserve.errors.ElastiserveError` mapped by its ``grpc_code_name``, so a bad
request gets a status and a message, never a traceback, and the server keeps serving.

The transport is chosen for speed: by default (``h2``, :mod:`.grpc_h2`) gRPC over HTTP/2 is
served by our own asyncio protocol, every handler running on the caller's event loop (the
dataplane's) with no grpcio server at all; ``core`` (gRPC's C core polled by one thread) and
``aio`` (``grpc.aio``) stay selectable (:mod:`.grpc_transport`, docs/grpc-stack.md).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as pb

from elastiserve.engine.dataplane import DataPlane
from elastiserve.engine.frontends.grpc_codec import decode_infer_request, encode_infer_response
from elastiserve.engine.frontends.grpc_h2 import H2Transport
from elastiserve.engine.frontends.grpc_transport import (
    AioTransport,
    CoreTransport,
    CoreUnavailable,
    Handler,
    StreamCall,
    grpc_address,
)
from elastiserve.engine.streaming import DecoupledUnary, ResponseStream
from elastiserve.errors import ElastiserveError, Internal, InvalidArgument, NotFound, Unsupported

log = logging.getLogger("elastiserve.engine.grpc")

SERVICE = "inference.GRPCInferenceService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
TRANSPORT_ENV = "ELASTISERVE_GRPC_TRANSPORT"
TRANSPORTS = ("h2", "core", "aio")
DEFAULT_TRANSPORT = "h2"  # docs/grpc-stack.md: chosen by benchmark

# Request parameter asking for an empty response that carries only the FINAL flag (tritonclient's
# ``enable_empty_final_response``); every streamed response says whether it is the final one.
_EMPTY_FINAL = "triton_enable_empty_final_response"
_FINAL_FLAG = "triton_final_response"
_SHM_UNSUPPORTED = "shared memory is not supported by this server; send tensors in the request"

_INT32_MAX = (1 << 31) - 1  # channel arguments are C ints

_DEFAULT_TRACE: dict[str, list[str]] = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
    "trace_mode": ["triton"],
}


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments for the server. Receives over ``max_message_bytes`` are refused by the
    core with RESOURCE_EXHAUSTED; sends are unlimited (a response may outgrow its request, and
    tritonclient accepts any size). No SO_REUSEPORT: a taken port must fail, as in Triton."""
    return [
        ("grpc.max_receive_message_length", min(int(max_message_bytes), _INT32_MAX)),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]


class GrpcServerHandle:
    """A running gRPC frontend: ``port`` (the bound one, useful with port 0) and ``close``."""

    def __init__(
        self, transport: H2Transport | CoreTransport | AioTransport, port: int, transport_name: str
    ) -> None:
        self._transport = transport
        self.port = port
        self.transport = transport_name

    async def close(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; in-flight calls get ``grace`` seconds before being cancelled."""
        try:
            await self._transport.close(grace)
        finally:
            _RUNNING.discard(self)


# Servers run until closed even when the caller drops the handle (a grpc.aio server would
# otherwise shut itself down when garbage-collected, while the core one would keep running).
_RUNNING: set[GrpcServerHandle] = set()


async def start_grpc_server(
    dataplane: DataPlane,
    host: str,
    port: int,
    *,
    max_message_bytes: int = 64 << 20,
    transport: str | None = None,
) -> GrpcServerHandle:
    """Serve ``GRPCInferenceService`` on ``host:port`` (0 picks a free port) for ``dataplane``.

    Must be called from the dataplane's event loop: every RPC handler runs on it. ``transport``
    ("h2", "core" or "aio"; default from ``$ELASTISERVE_GRPC_TRANSPORT``, else
    ``DEFAULT_TRANSPORT``) exists for tests, benchmarks and as an escape hatch; "core" falls back
    to "aio" when grpcio's internals do not match.
    """
    loop = asyncio.get_running_loop()
    servicer = InferenceServicer(dataplane)
    handlers = servicer.handlers()
    stream_handlers = {f"/{SERVICE}/ModelStreamInfer": servicer.model_stream_infer}
    unimplemented: dict[str, str] = {}
    options = server_options(max_message_bytes)
    name = (transport or os.environ.get(TRANSPORT_ENV) or DEFAULT_TRANSPORT).lower()
    if name not in TRANSPORTS:
        raise ValueError(f"unknown gRPC transport {name!r}: expected one of {', '.join(TRANSPORTS)}")
    server: H2Transport | CoreTransport | AioTransport
    if name == "h2":
        server = H2Transport(loop, handlers, unimplemented, options, stream_handlers)
    elif name == "core":
        try:
            server = CoreTransport(loop, handlers, unimplemented, options, stream_handlers)
        except CoreUnavailable as exc:
            log.warning("gRPC core transport unavailable (%s); using grpc.aio", exc)
            name = "aio"
    if name == "aio":
        server = AioTransport(loop, handlers, unimplemented, options, stream_handlers)
    bound = server.bind(grpc_address(host, port))
    started = server.start()
    if started is not None:
        await started
    handle = GrpcServerHandle(server, bound, name)
    _RUNNING.add(handle)
    return handle


def _unary(request_type: type[Message], method: Callable[[Any], Any]) -> Handler:
    """Wrap ``method(request) -> response message`` (sync or async) as a bytes handler."""
    parse = request_type.FromString
    type_name = request_type.DESCRIPTOR.name
    is_async = inspect.iscoroutinefunction(method)

    async def handler(data: bytes) -> bytes:
        try:
            request = parse(data)
        except DecodeError as exc:
            raise InvalidArgument(f"failed to parse {type_name}: {exc}") from None
        response = await method(request) if is_async else method(request)
        return response.SerializeToString()

    return handler


class InferenceServicer:
    """The RPCs of ``GRPCInferenceService``; each returns a ``service_pb2`` response."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.trace = TraceSettings()

    def handlers(self) -> dict[str, Handler]:
        """Method path -> bytes handler, for every unary method of the service."""
        table: dict[str, tuple[type[Message], Callable[[Any], Any]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.repository_model_load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.repository_model_unload),
            "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest, self.system_shm_status),
            "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest, self.system_shm_register),
            "SystemSharedMemoryUnregister": (
                pb.SystemSharedMemoryUnregisterRequest,
                self.shm_unregister(pb.SystemSharedMemoryUnregisterResponse),
            ),
            "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest, self.cuda_shm_status),
            "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest, self.cuda_shm_register),
            "CudaSharedMemoryUnregister": (
                pb.CudaSharedMemoryUnregisterRequest,
                self.shm_unregister(pb.CudaSharedMemoryUnregisterResponse),
            ),
            "TraceSetting": (pb.TraceSettingRequest, self.trace_setting),
            "LogSettings": (pb.LogSettingsRequest, self.log_settings),
        }
        handlers = {f"/{SERVICE}/{name}": _unary(req, fn) for name, (req, fn) in table.items()}
        handlers[f"/{SERVICE}/ModelInfer"] = self.model_infer
        handlers[HEALTH_CHECK] = self.health_check
        return handlers

    # -- inference (bytes in, bytes out: the hot path) -------------------------------------------
    async def model_infer(self, data: bytes) -> bytes:
        request = decode_infer_request(data)
        try:
            response = await self.dataplane.infer(request)
        except DecoupledUnary:
            raise Unsupported(DecoupledUnary.GRPC_MESSAGE) from None
        return encode_infer_response(response)

    # -- streaming (ModelStreamInfer) ---------------------------------------------------------------
    async def model_stream_infer(self, call: StreamCall) -> None:
        """Triton's bidirectional stream: each request runs concurrently with the others; each of
        its responses is sent as it comes (any number for decoupled models, one otherwise), errors
        travel in ``error_message`` and the stream goes on. After the client half-closes, the call
        ends once every request has sent its final response; a client that cancels or goes away
        cancels the requests still running (``request.is_cancelled()`` in the model)."""
        streams: set[ResponseStream] = set()
        tasks: set[asyncio.Task[None]] = set()

        def cancel_all() -> None:
            for stream in list(streams):
                stream.cancel()

        call.add_cancel_callback(cancel_all)
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await call.read()
                if data is None:
                    break
                # Started right here (the model's thread gets it now); a task follows it to the end.
                started = self._start_one(call, data)
                if started is None:
                    continue
                streams.add(started[0])
                task = loop.create_task(self._finish_one(*started, streams))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks and not call.cancelled:
                await asyncio.wait(set(tasks))
        finally:
            if tasks:
                cancel_all()
                for task in tasks:
                    task.cancel()

    def _start_one(self, call: StreamCall, data: bytes) -> tuple[ResponseStream, Any] | None:
        """Decode and start one streamed request; its responses go to ``call`` through the
        returned sender. Requests that fail to start are answered with an error at once."""
        try:
            request = decode_infer_request(data)
            params = request.parameters
            empty_final = bool(params.pop(_EMPTY_FINAL, False)) if params else False
            stream = self.dataplane.infer_stream(request)
        except ElastiserveError as exc:
            call.write(_stream_error(exc.message))
            return None
        model_name, request_id = request.model_name, request.id

        def send(result: Any, final: bool) -> None:
            try:
                if result is None:
                    if empty_final:
                        call.write(_empty_final(model_name, request_id))
                elif isinstance(result, ElastiserveError):
                    call.write(_stream_error(result.message))
                else:
                    result.parameters[_FINAL_FLAG] = final
                    call.write(_stream_response(encode_infer_response(result)))
            except ElastiserveError as exc:
                call.write(_stream_error(exc.message))
            except Exception as exc:  # a server bug: this response fails, the stream goes on
                log.exception("ModelStreamInfer: encoding a response failed")
                call.write(_stream_error(f"{type(exc).__name__}: {exc}"))

        if getattr(call, "threadsafe", False):
            # Responses go on the wire from the thread that produced them: no hop to the loop on
            # the way out (measured: bench/streaming_vs_triton.py, docs/streaming.md).
            stream.deliver_directly(send)
        return stream, send

    @staticmethod
    async def _finish_one(stream: ResponseStream, send: Any, streams: set[ResponseStream]) -> None:
        try:
            async for result, final in stream:  # nothing to iterate when delivered directly
                send(result, final)
        finally:
            streams.discard(stream)

    # -- health and metadata -------------------------------------------------------------------
    def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        # An unknown model is OK with ready=false, as in Triton (HTTP answers 400 instead).
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    async def health_check(self, data: bytes) -> bytes:
        """``grpc.health.v1.Health/Check``, which Triton also serves (for Kubernetes gRPC probes).
        The response is one enum field (1: SERVING, 2: NOT_SERVING); grpcio-health-checking is
        not a dependency, so its two possible encodings are spelled out here."""
        return b"\x08\x01" if self.dataplane.ready() else b"\x08\x02"

    def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return _from_dict(self.dataplane.server_metadata(), pb.ServerMetadataResponse())

    def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        return _from_dict(
            self.dataplane.model_metadata(request.name, request.version), pb.ModelMetadataResponse()
        )

    def model_config(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(self.dataplane.model_config(request.name, request.version))
        return response

    def model_statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        return _from_dict(
            self.dataplane.model_statistics(request.name, request.version), pb.ModelStatisticsResponse()
        )

    # -- model repository ----------------------------------------------------------------------
    def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        _no_repository_name(request.repository_name)
        models = self.dataplane.repository_index(ready=request.ready)
        return _from_dict({"models": models}, pb.RepositoryIndexResponse())

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        _no_repository_name(request.repository_name)
        config: str | None = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            kind = param.WhichOneof("parameter_choice")
            if key == "config":
                if kind != "string_param":
                    raise InvalidArgument(
                        f"invalid value type for load parameter '{key}', expected string_param."
                    )
                config = param.string_param
            elif key.startswith("file:"):
                if kind != "bytes_param":
                    raise InvalidArgument(
                        f"invalid value type for load parameter '{key}', expected bytes_param."
                    )
                files[key] = param.bytes_param
            else:
                raise InvalidArgument(f"unrecognized load parameter '{key}'.")
        await self.dataplane.load_model(request.model_name, config=config, files=files or None)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        _no_repository_name(request.repository_name)
        unload_dependents = False
        param = request.parameters.get("unload_dependents")
        if param is not None:
            if param.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(
                    "invalid value type for 'unload_dependents' parameter, expected bool_param."
                )
            unload_dependents = param.bool_param
        await self.dataplane.unload_model(request.model_name, unload_dependents=unload_dependents)
        return pb.RepositoryModelUnloadResponse()

    # -- logging and trace ---------------------------------------------------------------------
    def log_settings(self, request: pb.LogSettingsRequest) -> pb.LogSettingsResponse:
        settings = self.dataplane.log_settings
        if request.settings:
            updates = _log_updates(request.settings)
            settings.update(updates)
        response = pb.LogSettingsResponse()
        for key, value in settings.items():
            target = response.settings[key]
            if isinstance(value, bool):
                target.bool_param = value
            elif isinstance(value, int):
                target.uint32_param = value
            else:
                target.string_param = str(value)
        return response

    def trace_setting(self, request: pb.TraceSettingRequest) -> pb.TraceSettingResponse:
        model = request.model_name
        if model and not self.dataplane.model_ready(model):
            raise InvalidArgument(f"Request for unknown model : {model}")
        if request.settings:
            self.trace.update(model, {key: list(value.value) for key, value in request.settings.items()})
        response = pb.TraceSettingResponse()
        for key, values in self.trace.get(model).items():
            response.settings[key].value.extend(values)
        return response

    # -- shared memory: not supported (the same answers as the REST frontend) ------------------
    def system_shm_status(
        self, request: pb.SystemSharedMemoryStatusRequest
    ) -> pb.SystemSharedMemoryStatusResponse:
        if request.name:
            raise NotFound(f"Unable to find system shared memory region: '{request.name}'")
        return pb.SystemSharedMemoryStatusResponse()

    def cuda_shm_status(self, request: pb.CudaSharedMemoryStatusRequest) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise NotFound(f"Unable to find cuda shared memory region: '{request.name}'")
        return pb.CudaSharedMemoryStatusResponse()

    def system_shm_register(self, request: pb.SystemSharedMemoryRegisterRequest) -> Message:
        raise Unsupported(
            f"failed to register system shared memory region: '{request.name}', {_SHM_UNSUPPORTED}"
        )

    def cuda_shm_register(self, request: pb.CudaSharedMemoryRegisterRequest) -> Message:
        raise InvalidArgument(
            f"failed to register CUDA shared memory region: '{request.name}', GPUs not supported"
        )

    @staticmethod
    def shm_unregister(response_type: type[Message]) -> Callable[[Any], Message]:
        """Unregistering succeeds: nothing is ever registered (tritonclient cleans up this way)."""
        return lambda request: response_type()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _stream_response(infer_response: bytes) -> bytes:
    """A ``ModelStreamInferResponse`` around an already serialized ``ModelInferResponse``
    (field 2, length-delimited): no second parse and serialize of the tensors."""
    return b"\x12" + _varint(len(infer_response)) + infer_response


def _stream_error(message: str) -> bytes:
    return pb.ModelStreamInferResponse(error_message=message).SerializeToString()


def _empty_final(model_name: str, request_id: str) -> bytes:
    """Triton's empty final response: no outputs, no model version, ``triton_final_response``."""
    response = pb.ModelInferResponse(model_name=model_name, id=request_id)
    response.parameters[_FINAL_FLAG].bool_param = True
    return _stream_response(response.SerializeToString())


def _no_repository_name(name: str) -> None:
    if name:
        raise Unsupported("'repository_name' specification is not supported")


def _from_dict(values: dict[str, Any], message: Message) -> Any:
    """Triton-JSON dicts from the dataplane into the matching message; keys the proto lacks are
    dropped (as Triton's frontend picks fields one by one)."""
    try:
        return json_format.ParseDict(values, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:  # the dataplane broke its promise: a server bug
        raise Internal(f"cannot encode {message.DESCRIPTOR.name}: {exc}") from None


def _log_updates(settings: Any) -> dict[str, Any]:
    """Validate a LogSettings request the way Triton's gRPC frontend does."""
    expected = {
        "log_info": ("bool_param", "boolean"),
        "log_warning": ("bool_param", "boolean"),
        "log_error": ("bool_param", "boolean"),
        "log_verbose_level": ("uint32_param", "int32"),
        "log_format": ("string_param", "string"),
    }
    updates: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "log_file":
            raise Unsupported("log file location can not be updated through network protocol")
        if key not in expected:
            continue  # Triton ignores settings it does not know
        kind, type_name = expected[key]
        if value.WhichOneof("parameter_choice") != kind:
            raise InvalidArgument(f"expect {type_name} for '{key}'")
        updates[key] = getattr(value, kind)
    fmt = updates.get("log_format")
    if fmt is not None and fmt not in ("default", "ISO8601"):
        raise InvalidArgument(f"invalid argument for log_format, got: {fmt}")
    return updates


class TraceSettings:
    """Triton's trace settings, global and per model (tracing itself is not implemented: the
    settings are stored and reported so tools that set them work)."""

    def __init__(self) -> None:
        self.global_settings: dict[str, list[str]] = {k: list(v) for k, v in _DEFAULT_TRACE.items()}
        self.model_settings: dict[str, dict[str, list[str]]] = {}

    def get(self, model: str = "") -> dict[str, list[str]]:
        settings = dict(self.global_settings)
        if model:
            settings.update(self.model_settings.get(model, {}))
        return settings

    def update(self, model: str, changes: dict[str, list[str]]) -> None:
        checked: dict[str, list[str] | None] = {}
        for key, values in changes.items():
            if key == "trace_file":
                raise Unsupported("trace file location can not be updated through network protocol")
            if key == "trace_level":
                checked[key] = self._levels(values) if values else None
            elif key in ("trace_rate", "trace_count", "log_frequency"):
                if len(values) > 1:
                    raise InvalidArgument(f"expect only 1 value for '{key}'")
                checked[key] = [self._number(key, values[0])] if values else None
        target = self.model_settings.setdefault(model, {}) if model else self.global_settings
        for key, new in checked.items():
            if new is not None:
                target[key] = new
            elif model:
                target.pop(key, None)  # cleared: back to the global value
            else:
                target[key] = list(_DEFAULT_TRACE[key])

    @staticmethod
    def _levels(values: list[str]) -> list[str]:
        if "OFF" in values:
            if len(values) != 1:
                raise InvalidArgument("Expect only one trace level 'OFF' is specified")
            return ["OFF"]
        levels = [v for v in ("TIMESTAMPS", "TENSORS") if v in values]
        return levels or ["OFF"]

    @staticmethod
    def _number(key: str, value: str) -> str:
        try:
            number = int(value)
        except ValueError:
            raise InvalidArgument(f"Unable to parse '{key}', got: {value}") from None
        low = -1 if key == "trace_count" else 0
        if number < low or number > 0xFFFFFFFF:
            raise InvalidArgument(f"Unable to parse '{key}', value is out of range, got: {value}")
        return str(number)


__all__ = [
    "GrpcServerHandle",
    "InferenceServicer",
    "server_options",
    "start_grpc_server",
]
