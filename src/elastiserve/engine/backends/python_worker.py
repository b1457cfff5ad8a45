"""What runs a Triton ``model.py``: in the engine process, or in a worker process.

:class:`ModelRunner` loads ``model.py`` and turns our :class:`~elastiserve.types.InferRequest`
objects into ``pb_utils`` objects and back; the python backend uses it directly for in-process
instances, and this module's ``main`` (``python -m elastiserve.engine.backends.python_worker``)
hosts it in a worker process for process instances. :class:`Channel` is the IPC between the
two: pickle protocol 5 over a Unix socketpair, numpy buffers sent out of band straight from
and into array memory (see docs/python-backend.md for the measurements behind that choice).

The worker imports only the standard library, numpy and elastiserve's leaf modules, so it
starts fast and never imports protobuf or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import itertools
import logging
import os
import pickle
import re
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from elastiserve.engine.backends.base import ExecuteResult, to_output_tensor
from elastiserve.errors import (
    AlreadyExists,
    Cancelled,
    ElastiserveError,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unsupported,
)
from elastiserve.types import InferRequest, InferResponse, InferTensor, RequestedOutput, numpy_to_datatype

PB_UTILS_NAME = "triton_python_backend_utils"
COMPAT_DIR = Path(__file__).resolve().parent / "python_compat"

log = logging.getLogger("elastiserve.python_backend")


def install_pb_utils() -> ModuleType:
    """Make ``import triton_python_backend_utils`` return our module (one module object, so
    ``isinstance`` checks between model code and the backend agree)."""
    from elastiserve.engine.backends.python_compat import triton_python_backend_utils as pb

    existing = sys.modules.get(PB_UTILS_NAME)
    if existing is not None and existing is not pb:
        log.warning("replacing an already imported %s (%s) with elastiserve's", PB_UTILS_NAME, existing)
    sys.modules[PB_UTILS_NAME] = pb
    return pb


pb = install_pb_utils()


class UnknownError(ElastiserveError):
    """TritonError.UNKNOWN from a model (HTTP 400, gRPC UNKNOWN, as Triton maps it)."""

    code = "unknown"


_ERROR_BY_TRITON_CODE: dict[int, type[ElastiserveError]] = {
    pb.TritonError.UNKNOWN: UnknownError,
    pb.TritonError.INTERNAL: Internal,
    pb.TritonError.NOT_FOUND: NotFound,
    pb.TritonError.INVALID_ARG: InvalidArgument,
    pb.TritonError.UNAVAILABLE: Unavailable,
    pb.TritonError.UNSUPPORTED: Unsupported,
    pb.TritonError.ALREADY_EXISTS: AlreadyExists,
    pb.TritonError.CANCELLED: Cancelled,
}
_TRITON_CODE_BY_ERROR: dict[str, int] = {cls.code: code for code, cls in _ERROR_BY_TRITON_CODE.items()}

# Request parameters Triton consumes itself and never shows to the model in parameters().
_RESERVED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}
)


# -- conversions --------------------------------------------------------------------------------


def error_from_triton(error: Any) -> ElastiserveError:
    """A model's ``TritonError`` (or anything else it put in ``error=``) -> our error."""
    if isinstance(error, pb.TritonError):
        return _ERROR_BY_TRITON_CODE.get(int(error.code()), Internal)(str(error.message()))
    if isinstance(error, ElastiserveError):
        return error
    return Internal(str(error))


def error_to_triton(error: ElastiserveError) -> Any:
    return pb.TritonError(error.message, _TRITON_CODE_BY_ERROR.get(error.code, pb.TritonError.INTERNAL))


def to_pb_request(req: InferRequest, default_outputs: list[str]) -> Any:
    """Our request -> the ``pb_utils.InferenceRequest`` that ``execute`` sees."""
    params = req.parameters
    flags = 0
    correlation_id: int | str = 0
    custom = params
    if params:
        correlation_id = params.get("sequence_id", 0) or 0
        if params.get("sequence_start"):
            flags |= pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
        if params.get("sequence_end"):
            flags |= pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        if not _RESERVED_PARAMETERS.isdisjoint(params):
            custom = {k: v for k, v in params.items() if k not in _RESERVED_PARAMETERS}
    inputs = []
    for tensor in req.inputs:
        if tensor.data is None:
            raise InvalidArgument(f"input '{tensor.name}' has no data")
        inputs.append(pb.Tensor._request_input(tensor.name, tensor.data))
    return pb.InferenceRequest(
        request_id=req.id,
        correlation_id=correlation_id,
        inputs=inputs,
        requested_output_names=[o.name for o in req.outputs] if req.outputs else default_outputs,
        model_name=req.model_name,
        model_version=int(req.model_version) if req.model_version.isdigit() else -1,
        flags=flags,
        parameters=custom,
    )


def from_pb_response(
    response: Any, req: InferRequest, model_name: str, version: str
) -> InferResponse | ElastiserveError:
    """A ``pb_utils.InferenceResponse`` from ``execute`` -> our response or error for ``req``."""
    if not isinstance(response, pb.InferenceResponse):
        return Internal(
            f"model '{model_name}' execute() returned {type(response).__name__} for request "
            f"'{req.id}', expected pb_utils.InferenceResponse"
        )
    if response.has_error():
        return error_from_triton(response.error())
    outputs: list[InferTensor] = []
    for tensor in response.output_tensors():
        if not isinstance(tensor, pb.Tensor):
            return Internal(
                f"model '{model_name}' returned an output of type {type(tensor).__name__}, "
                "expected pb_utils.Tensor"
            )
        array = tensor.as_numpy()
        if array.dtype == np.object_:
            array = _bytes_elements(array)
        try:
            outputs.append(to_output_tensor(tensor.name(), array))
        except TypeError as exc:
            return Internal(f"model '{model_name}' output '{tensor.name()}': {exc}")
    params = response._parameters_dict() if response._parameters is not None else {}
    return InferResponse(model_name, version, outputs, id=req.id, parameters=params)


def _bytes_elements(array: np.ndarray) -> np.ndarray:
    """BYTES outputs hold ``bytes``; like Triton, encode ``str`` as UTF-8 and anything else as
    ``str(x)`` (numbers in an object array, for instance)."""
    flat = array.reshape(-1)
    if all(type(v) is bytes for v in flat):
        return array
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [
        v if isinstance(v, bytes) else (v if isinstance(v, str) else str(v)).encode("utf-8") for v in flat
    ]
    return out


def pb_request_to_infer_request(request: Any) -> InferRequest:
    """A BLS ``pb_utils.InferenceRequest`` -> our request for the dataplane."""
    inputs = []
    for tensor in request.inputs():
        array = tensor.as_numpy()
        inputs.append(InferTensor(tensor.name(), numpy_to_datatype(array.dtype), list(array.shape), array))
    params = request._parameters_dict()
    if request.correlation_id():
        params["sequence_id"] = request.correlation_id()
    if request.flags() & pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
        params["sequence_start"] = True
    if request.flags() & pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
        params["sequence_end"] = True
    version = request.model_version()
    return InferRequest(
        model_name=request.model_name(),
        inputs=inputs,
        model_version="" if version in (None, "", -1) else str(version),
        id=request.request_id(),
        outputs=[RequestedOutput(name) for name in request.requested_output_names()],
        parameters=params,
    )


def stream_item_to_pb_response(result: InferResponse | ElastiserveError | None) -> Any:
    """One response of a decoupled BLS call; the bare FINAL (None) is an empty response, as in
    Triton, whose iterator also ends with it when the model sent FINAL on its own."""
    return pb.InferenceResponse() if result is None else result_to_pb_response(result)


def result_to_pb_response(result: InferResponse | ElastiserveError) -> Any:
    """The dataplane's answer to a BLS request -> ``pb_utils.InferenceResponse``."""
    if isinstance(result, ElastiserveError):
        return pb.InferenceResponse(error=error_to_triton(result))
    tensors = [pb.Tensor(t.name, t.data) for t in result.outputs]
    return pb.InferenceResponse(output_tensors=tensors, parameters=result.parameters or None)


def describe_exception(exc: BaseException, model_file: str) -> str:
    """``ValueError: bad input (model.py:12)``: the message plus where in model.py it came from."""
    text = exc.message() if isinstance(exc, pb.TritonModelException) else str(exc)
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == model_file]
    if frames:
        where = f" (at {Path(model_file).name}:{frames[-1].lineno} in {frames[-1].name})"
    return f"{type(exc).__name__}: {text}{where}"


# -- the model runner ---------------------------------------------------------------------------


@dataclass(slots=True)
class RunnerSpec:
    """Everything needed to load and run one instance; plain data, so it pickles to a worker."""

    model_name: str
    version: int
    model_file: str
    instance_name: str
    args: dict[str, str]  # initialize(args), Triton's keys
    output_names: list[str]  # requested outputs when a request names none (Triton's default)
    decoupled: bool = False  # model_transaction_policy { decoupled: true }: responses via senders


_module_ids = itertools.count()


def load_model_module(model_name: str, model_file: Path) -> ModuleType:
    """Import ``model.py`` as its own module, with its version and model dirs on ``sys.path``
    (as Triton's stub does, so sibling files import by bare name)."""
    install_pb_utils()
    for path in (str(model_file.parent), str(model_file.parent.parent)):
        if path not in sys.path:
            sys.path.append(path)
    safe = re.sub(r"\W", "_", model_name)
    module_name = f"_triton_model_{safe}_{model_file.parent.name}_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    if spec is None or spec.loader is None:
        raise Internal(f"cannot import {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses/pickle in model.py look their module up here
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise Internal(
            f"failed to load {model_file.name} of model '{model_name}': "
            f"{describe_exception(exc, str(model_file))}"
        ) from exc
    return module


class ModelRunner:
    """One ``TritonPythonModel`` object: initialize, execute (with the per-request error rules
    of Triton's Python backend), finalize. Not thread-safe: the owning instance serialises."""

    def __init__(self, spec: RunnerSpec, bridge: Any = None) -> None:
        self.spec = spec
        self.bridge = bridge  # BLS bridge bound to the calling thread; None: pb_utils' default
        self.version = str(spec.version)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.module = load_model_module(spec.model_name, Path(spec.model_file))
        model_class = getattr(self.module, "TritonPythonModel", None)
        if model_class is None:
            self._unload()
            raise Internal(
                f"{Path(spec.model_file).name} of model '{spec.model_name}' defines no TritonPythonModel"
            )
        try:
            self.model = model_class()
        except (Exception, SystemExit) as exc:
            self._unload()
            raise Internal(
                f"TritonPythonModel() of model '{spec.model_name}' failed: "
                f"{describe_exception(exc, spec.model_file)}"
            ) from exc

    def _call(self, fn: Any, *args: Any) -> Any:
        """Call a model method with this runner's BLS bridge bound; run coroutines to completion."""
        previous = pb._set_thread_bridge(self.bridge) if self.bridge is not None else None
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                result = self._loop.run_until_complete(result)
            return result
        finally:
            if self.bridge is not None:
                pb._set_thread_bridge(previous)

    def initialize(self) -> None:
        init = getattr(self.model, "initialize", None)
        if init is None:
            return
        try:
            self._call(init, dict(self.spec.args))
        except (Exception, SystemExit) as exc:  # sys.exit() in a model must not end the engine
            log.error("initialize() of %s failed", self.spec.instance_name, exc_info=True)
            raise Internal(
                f"Failed to initialize python model instance '{self.spec.instance_name}': "
                f"{describe_exception(exc, self.spec.model_file)}"
            ) from exc

    def execute(self, requests: list[InferRequest]) -> ExecuteResult:
        n = len(requests)
        try:
            pb_requests = [to_pb_request(req, self.spec.output_names) for req in requests]
        except ElastiserveError as exc:
            return [exc] * n
        try:
            responses = self._call(self.model.execute, pb_requests)
        except (Exception, SystemExit) as exc:
            log.warning("execute() of %s raised", self.spec.instance_name, exc_info=True)
            return [self._failure(describe_exception(exc, self.spec.model_file))] * n
        if not isinstance(responses, list | tuple):
            what = "None" if responses is None else type(responses).__name__
            return [self._failure(f"execute() must return a list of InferenceResponse, got {what}")] * n
        if len(responses) != n:
            return [
                self._failure(
                    "Number of InferenceResponse objects do not match number of InferenceRequest "
                    f"objects. InferenceRequest(s) size is:{n}, and InferenceResponse(s) size "
                    f"is:{len(responses)}"
                )
            ] * n
        name = self.spec.model_name
        return [from_pb_response(r, q, name, self.version) for r, q in zip(responses, requests, strict=True)]

    def execute_decoupled(self, requests: list[InferRequest], sinks: list[Any]) -> bool:
        """Decoupled ``execute``: each request gets a ``get_response_sender()`` that forwards to
        its sink (``sink.put(result_or_None, final)``, ``sink.cancelled``), from any thread, also
        after ``execute`` returned. ``execute`` must return None; if it raises or returns
        something else, requests whose sender is still open get that error as final response.
        Returns whether ``execute`` succeeded."""
        name = self.spec.model_name
        pb_requests = []
        senders = []
        for req, sink in zip(requests, sinks, strict=True):
            try:
                pb_request = to_pb_request(req, self.spec.output_names)
            except ElastiserveError as exc:
                sink.put(exc, True)
                continue
            sender = pb.InferenceResponseSender(_emitter(req, sink, name, self.version), _cancelled(sink))
            pb_request._response_sender = sender
            pb_requests.append(pb_request)
            senders.append(sender)
        if not pb_requests:
            return False
        instance = self.spec.instance_name
        try:
            returned = self._call(self.model.execute, pb_requests)
        except (Exception, SystemExit) as exc:
            log.warning("execute() of %s raised", instance, exc_info=True)
            error: ElastiserveError | None = self._failure(describe_exception(exc, self.spec.model_file))
        else:
            error = None
            if returned is not None:
                error = Internal(
                    f"Failed to process the request(s) for model '{instance}', message: Python model "
                    f"'{instance}' is using the decoupled mode and the execute function must return None."
                )
        if error is not None:
            for sender in senders:
                sender._fail(error)
        return error is None

    def _failure(self, message: str) -> Internal:
        return Internal(
            f"Failed to process the request(s) for model instance '{self.spec.instance_name}', "
            f"message: {message}"
        )

    def finalize(self) -> str | None:
        """Call ``finalize()``; returns an error description instead of raising (unload goes on)."""
        error = None
        fin = getattr(self.model, "finalize", None)
        if fin is not None:
            try:
                self._call(fin)
            except (Exception, SystemExit) as exc:
                log.error("finalize() of %s failed", self.spec.instance_name, exc_info=True)
                error = describe_exception(exc, self.spec.model_file)
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._unload()
        return error

    def _unload(self) -> None:
        sys.modules.pop(self.module.__name__, None)


def _emitter(req: InferRequest, sink: Any, model_name: str, version: str) -> Any:
    """``emit(pb_response_or_None, final)`` for a response sender: converts and hands to the sink."""

    def emit(response: Any, final: bool) -> None:
        sink.put(None if response is None else from_pb_response(response, req, model_name, version), final)

    return emit


def _cancelled(sink: Any) -> Any:
    return lambda: sink.cancelled


# -- IPC ----------------------------------------------------------------------------------------
# Requests and results cross the channel as plain tuples, with numpy data as (dtype, shape,
# bytes) or an out-of-band buffer: about 10x cheaper to pickle than the dataclasses and arrays
# themselves (~3 us instead of ~30 us per round trip for a small tensor).

_PackedArray = Any


def pack_array(array: np.ndarray) -> _PackedArray:
    if array.dtype == np.object_:
        return array  # BYTES: pickled as the object array it is
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    data = pickle.PickleBuffer(array) if array.nbytes >= _INBAND_LIMIT else array.tobytes()
    return (array.dtype.str, array.shape, data)


def unpack_array(packed: _PackedArray) -> np.ndarray:
    if isinstance(packed, np.ndarray):
        return packed
    dtype, shape, data = packed
    if isinstance(data, bytes):
        data = bytearray(data)  # writable, like the inputs Triton hands to execute()
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _pack_tensors(tensors: list[InferTensor]) -> list[tuple[Any, ...]]:
    return [
        (t.name, t.datatype, t.shape, None if t.data is None else pack_array(t.data), t.parameters or None)
        for t in tensors
    ]


def _unpack_tensors(packed: list[tuple[Any, ...]]) -> list[InferTensor]:
    return [
        InferTensor(name, datatype, shape, None if data is None else unpack_array(data), params or {})
        for name, datatype, shape, data, params in packed
    ]


def pack_requests(requests: list[InferRequest]) -> list[tuple[Any, ...]]:
    return [
        (
            r.model_name,
            r.model_version,
            r.id,
            _pack_tensors(r.inputs),
            [(o.name, o.parameters or None) for o in r.outputs],
            r.parameters or None,
        )
        for r in requests
    ]


def unpack_requests(packed: list[tuple[Any, ...]]) -> list[InferRequest]:
    return [
        InferRequest(
            model_name=name,
            inputs=_unpack_tensors(inputs),
            model_version=version,
            id=req_id,
            outputs=[RequestedOutput(o, p or {}) for o, p in outputs],
            parameters=params or {},
        )
        for name, version, req_id, inputs, outputs, params in packed
    ]


def pack_results(results: ExecuteResult) -> list[Any]:
    return [
        r
        if isinstance(r, ElastiserveError)
        else (r.model_name, r.model_version, r.id, _pack_tensors(r.outputs), r.parameters or None)
        for r in results
    ]


def unpack_results(packed: list[Any]) -> ExecuteResult:
    return [
        r
        if isinstance(r, ElastiserveError)
        else InferResponse(r[0], r[1], _unpack_tensors(r[3]), id=r[2], parameters=r[4] or {})
        for r in packed
    ]


_HEADER = struct.Struct("<QI")  # payload length, number of out-of-band buffers
_INBAND_LIMIT = 64 * 1024  # smaller buffers ride inside the pickle: one send instead of several
_SOCKET_BUFFER = 4 * 1024 * 1024


class ChannelClosed(EOFError):
    """The other end of a :class:`Channel` is gone (worker crash, or engine exit)."""


class Channel:
    """Length-prefixed pickle-5 messages over a stream socket.

    Large numpy buffers go out of band: sent from the array's own memory and received with
    ``recv_into`` into a fresh (writable) array, so a tensor is copied only by the kernel.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._poller: select.poll | None = None
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):  # best effort: fewer wake-ups for big tensors
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)

    def send(self, obj: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []

        def out_of_band(buf: pickle.PickleBuffer) -> bool:
            if buf.raw().nbytes < _INBAND_LIMIT:
                return True  # in-band
            buffers.append(buf)
            return False

        payload = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        raws = [b.raw() for b in buffers]
        head = _HEADER.pack(len(payload), len(raws))
        if raws:
            head += struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
        try:
            self.sock.sendall(head + payload)
            for raw in raws:
                self.sock.sendall(raw)
        except (BrokenPipeError, ConnectionError) as exc:
            raise ChannelClosed(str(exc)) from exc

    def _recv_into(self, view: memoryview) -> None:
        pos, total = 0, len(view)
        while pos < total:
            try:
                got = self.sock.recv_into(view[pos:])
            except ConnectionError as exc:
                raise ChannelClosed(str(exc)) from exc
            if got == 0:
                raise ChannelClosed("connection closed")
            pos += got

    def recv(self) -> Any:
        head = bytearray(_HEADER.size)
        self._recv_into(memoryview(head))
        length, count = _HEADER.unpack(head)
        sizes: tuple[int, ...] = ()
        if count:
            raw_sizes = bytearray(8 * count)
            self._recv_into(memoryview(raw_sizes))
            sizes = struct.unpack(f"<{count}Q", raw_sizes)
        payload = bytearray(length)
        self._recv_into(memoryview(payload))
        buffers = []
        for size in sizes:
            buf = np.empty(size, dtype=np.uint8)
            self._recv_into(memoryview(buf))
            buffers.append(buf)
        return pickle.loads(payload, buffers=buffers)

    def poll(self, timeout: float | None) -> bool:
        """True when a message (or EOF) is waiting. ``poll(2)``, not ``select``: engine fds
        can be numbered past select's 1024 limit."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(self._poller.poll(None if timeout is None else int(timeout * 1000)))

    def close(self) -> None:
        self.sock.close()


# -- the worker process -------------------------------------------------------------------------


class _IPCBridge:
    """BLS from a worker: the request goes to the engine over the channel, which runs it on the
    dataplane and answers. Calls are serialised (one channel); they happen inside execute()."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lock = threading.Lock()

    def infer(self, request: Any, timeout: float | None) -> Any:
        req = pb_request_to_infer_request(request)
        with self.lock:
            self.channel.send(("bls", req, timeout))
            _, result = self.channel.recv()
        return result_to_pb_response(result)

    async def async_infer(self, request: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.infer, request, None)

    def infer_decoupled(self, request: Any, timeout: float | None) -> Iterator[Any]:
        """All of the stream's responses come back in one message (not one by one)."""
        req = pb_request_to_infer_request(request)
        with self.lock:
            self.channel.send(("bls_stream", req, timeout))
            _, items = self.channel.recv()
        return iter([stream_item_to_pb_response(result) for result, _ in items])

    async def async_infer_decoupled(self, request: Any) -> Iterator[Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self.infer_decoupled, request, None)


class _IPCSink:
    """Worker side of a decoupled request's stream: each response goes to the engine at once,
    tagged with the request's token; ``cancelled`` is set when the engine says the client left."""

    __slots__ = ("cancelled_tokens", "send", "token")

    def __init__(self, send: Any, token: int, cancelled_tokens: set[int]) -> None:
        self.send = send
        self.token = token
        self.cancelled_tokens = cancelled_tokens

    @property
    def cancelled(self) -> bool:
        return self.token in self.cancelled_tokens

    def put(self, result: InferResponse | ElastiserveError | None, final: bool) -> None:
        packed = None if result is None else pack_results([result])[0]
        try:
            self.send(("response", self.token, packed, final, pb._METRICS.drain_ops()))
        except (pickle.PicklingError, TypeError, AttributeError, ValueError) as exc:
            failure = Internal(f"cannot send a response of request token {self.token}: {exc}")
            self.send(("response", self.token, failure, final, pb._METRICS.drain_ops()))
        if final:
            self.cancelled_tokens.discard(self.token)


class _DemuxIPCBridge:
    """BLS from any thread of a decoupled worker: calls are numbered and their answers routed
    back by the worker's reader (the main thread), so model threads may call BLS concurrently,
    also after ``execute`` returned."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.ids = itertools.count()
        self.pending: dict[int, list[Any]] = {}
        self.lock = threading.Lock()

    def _call(self, kind: str, request: Any, timeout: float | None) -> Any:
        req = pb_request_to_infer_request(request)
        call_id = next(self.ids)
        slot: list[Any] = [threading.Event(), None]
        with self.lock:
            self.pending[call_id] = slot
        self.send((kind, req, timeout, call_id))
        slot[0].wait()
        return slot[1]

    def infer(self, request: Any, timeout: float | None) -> Any:
        return result_to_pb_response(self._call("bls", request, timeout))

    async def async_infer(self, request: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.infer, request, None)

    def infer_decoupled(self, request: Any, timeout: float | None) -> Iterator[Any]:
        """All of the stream's responses come back in one message (not one by one)."""
        items = self._call("bls_stream", request, timeout)
        return iter([stream_item_to_pb_response(result) for result, _ in items])

    async def async_infer_decoupled(self, request: Any) -> Iterator[Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self.infer_decoupled, request, None)

    def deliver(self, call_id: int, result: Any) -> None:
        with self.lock:
            slot = self.pending.pop(call_id, None)
        if slot is not None:
            slot[1] = result
            slot[0].set()


def _serve_decoupled(channel: Channel, runner: ModelRunner) -> int:
    """The worker loop of a decoupled model. The main thread only reads the channel (so cancel
    notices and BLS answers arrive while ``execute`` runs); one thread runs ``execute`` and
    ``finalize`` in order; any thread may send (one lock keeps messages whole)."""
    import queue

    metrics = pb._METRICS
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            channel.send(message)

    cancelled: set[int] = set()
    bridge = _DemuxIPCBridge(send)
    pb._set_default_bridge(bridge)
    runner.bridge = bridge
    work: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def run_work() -> None:
        while True:
            item = work.get()
            if item[0] == "execute":
                _, packed, tokens = item
                sinks = [_IPCSink(send, token, cancelled) for token in tokens]
                ok = runner.execute_decoupled(unpack_requests(packed), sinks)
                send(("result", ok, metrics.drain_ops()))
            elif item[0] == "finalize":
                send(("finalized", runner.finalize(), metrics.drain_ops()))
                return

    threading.Thread(target=run_work, name="model-execute", daemon=True).start()
    while True:
        try:
            message = channel.recv()
        except ChannelClosed:
            return 0
        kind = message[0]
        if kind == "cancel":
            cancelled.add(message[1])
        elif kind == "bls_result":
            bridge.deliver(message[2], message[1])
        elif kind in ("execute", "finalize"):
            work.put(message)
        elif kind == "exit":
            return 0


def _watch_lifeline(fd: int, parent_pid: int) -> None:
    """Exit as soon as the engine is gone: EOF on the lifeline pipe (the engine holds the only
    write end), or, as a fallback, being re-parented."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        if poller.poll(1000) and os.read(fd, 1) == b"":
            os._exit(70)
        if os.getppid() != parent_pid:
            os._exit(70)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m elastiserve.engine.backends.python_worker SOCK_FD LIFELINE_FD PPID``."""
    argv = sys.argv[1:] if argv is None else argv
    sock_fd, lifeline_fd, parent_pid = (int(a) for a in argv[:3])
    os.set_inheritable(sock_fd, False)
    os.set_inheritable(lifeline_fd, False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the engine; it shuts us down
    threading.Thread(target=_watch_lifeline, args=(lifeline_fd, parent_pid), daemon=True).start()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [python worker %(process)d] %(message)s",
    )
    channel = Channel(socket.socket(fileno=sock_fd))
    _, spec = channel.recv()
    metrics = pb._METRICS
    metrics.record_ops = True
    pb._set_default_bridge(_IPCBridge(channel))
    try:
        runner = ModelRunner(spec)
        runner.initialize()
    except ElastiserveError as exc:
        channel.send(("init_error", exc.message, metrics.drain_ops()))
        return 1
    channel.send(("ready", None, metrics.drain_ops()))
    if spec.decoupled:
        return _serve_decoupled(channel, runner)
    while True:
        try:
            message = channel.recv()
        except ChannelClosed:
            return 0
        kind = message[0]
        if kind == "execute":
            result = runner.execute(unpack_requests(message[1]))
            try:
                channel.send(("result", pack_results(result), metrics.drain_ops()))
            except (pickle.PicklingError, TypeError, AttributeError, ValueError) as exc:
                failure = Internal(f"cannot send the results of model '{spec.model_name}': {exc}")
                channel.send(("result", [failure] * len(message[1]), metrics.drain_ops()))
        elif kind == "finalize":
            channel.send(("finalized", runner.finalize(), metrics.drain_ops()))
        elif kind == "exit":
            return 0


if __name__ == "__main__":
    # Run the copy imported under its real name, so pickled classes (RunnerSpec, UnknownError)
    # resolve to the same module on both sides of the channel.
    from elastiserve.engine.backends import python_worker as _worker

    sys.exit(_worker.main())
