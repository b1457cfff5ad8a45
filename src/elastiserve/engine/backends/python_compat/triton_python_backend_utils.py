"""``triton_python_backend_utils`` (``pb_utils``) for model code written for Triton's Python backend.

Written from Triton's documented API so that an unmodified ``model.py`` runs on elastiserve:
tensors, requests, responses, errors, the ``ModelConfig`` helper of ``auto_complete_config``,
logging, custom metrics and BLS (``InferenceRequest(...).exec()``).

This module must stay importable on its own (it is imported by bare name in worker processes
and in subprocesses models start), so it depends only on the standard library and numpy. The
engine-side pieces (BLS transport, metric export) plug in through the private hooks at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import struct
import threading
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from enum import IntEnum
from typing import Any, Protocol

import numpy as np

# -- data types ---------------------------------------------------------------------------------

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# TRITONSERVER_DataType numbers (model_config.proto DataType), as Triton's helpers return them.
_TRITON_TYPE_TO_NUMPY: dict[int, Any] = {
    1: np.bool_,
    2: np.uint8,
    3: np.uint16,
    4: np.uint32,
    5: np.uint64,
    6: np.int8,
    7: np.int16,
    8: np.int32,
    9: np.int64,
    10: np.float16,
    11: np.float32,
    12: np.float64,
    13: np.object_,
}
_NUMPY_TO_TRITON_TYPE: dict[np.dtype, int] = {np.dtype(v): k for k, v in _TRITON_TYPE_TO_NUMPY.items()}
_TRITON_TYPE_NAMES = {
    1: "BOOL",
    2: "UINT8",
    3: "UINT16",
    4: "UINT32",
    5: "UINT64",
    6: "INT8",
    7: "INT16",
    8: "INT32",
    9: "INT64",
    10: "FP16",
    11: "FP32",
    12: "FP64",
    13: "BYTES",
}

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


def triton_string_to_numpy(triton_type_string: str) -> Any:
    """``"TYPE_FP32"`` -> ``np.float32`` (``TYPE_STRING`` -> ``np.object_``)."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> Any:
    """TRITONSERVER_DataType number -> numpy type; None when unknown (as Triton)."""
    return _TRITON_TYPE_TO_NUMPY.get(int(data_type))


def numpy_to_triton_type(data_type: Any) -> int | None:
    """numpy dtype/type -> TRITONSERVER_DataType number; bytes/str/object are BYTES (13)."""
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    found = _NUMPY_TO_TRITON_TYPE.get(dtype)
    if found is None and dtype.kind in ("S", "U", "O"):
        return 13
    return found


def serialize_byte_tensor(input_tensor: np.ndarray) -> Any:
    """Flatten a BYTES tensor to Triton's wire form: each element as <uint32 length><bytes>."""
    if input_tensor.size == 0:
        return ()
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts: list[bytes] = []
    for item in input_tensor.reshape(-1, order="C"):
        value = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(value)))
        parts.append(value)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    """Inverse of :func:`serialize_byte_tensor`: a 1-D object array of bytes."""
    items: list[bytes] = []
    view = memoryview(encoded_tensor)
    offset = 0
    while offset < len(view):
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        items.append(bytes(view[offset : offset + length]))
        offset += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def _bytes_object_array(array: np.ndarray) -> np.ndarray:
    """str/bytes arrays -> object array of bytes, the only BYTES form the engine passes around."""
    out = np.empty(array.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, value in enumerate(array.reshape(-1)):
        flat[i] = value.encode() if isinstance(value, str) else bytes(value)
    return out


# -- errors -------------------------------------------------------------------------------------


class _ErrorCode(IntEnum):
    """TRITONSERVER_Error_Code values."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7


class TritonError(Exception):
    """An error to put in an ``InferenceResponse`` (``code`` defaults to INTERNAL, as Triton).

    Triton's class is not an exception; subclassing ``Exception`` here only adds the ability to
    raise it, which Triton code never relies on either way.
    """

    UNKNOWN = _ErrorCode.UNKNOWN
    INTERNAL = _ErrorCode.INTERNAL
    NOT_FOUND = _ErrorCode.NOT_FOUND
    INVALID_ARG = _ErrorCode.INVALID_ARG
    UNAVAILABLE = _ErrorCode.UNAVAILABLE
    UNSUPPORTED = _ErrorCode.UNSUPPORTED
    ALREADY_EXISTS = _ErrorCode.ALREADY_EXISTS
    CANCELLED = _ErrorCode.CANCELLED

    def __init__(self, message: str, code: int = _ErrorCode.INTERNAL) -> None:
        super().__init__(message, code)
        self._message = message
        self._code = _ErrorCode(int(code))

    def message(self) -> str:
        return self._message

    def code(self) -> _ErrorCode:
        return self._code

    def __str__(self) -> str:
        return str(self._message)


class TritonModelException(Exception):
    """Raised by pb_utils on misuse, and by models to fail a whole ``execute`` call."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg

    def __str__(self) -> str:
        return str(self._msg)


# -- tensors ------------------------------------------------------------------------------------


class _DLPackCapsule:
    """Adapts a bare DLPack capsule to the ``__dlpack__`` protocol numpy.from_dlpack wants."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, **_: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


class Tensor:
    """A named tensor backed by a numpy array (host memory only on this backend)."""

    __slots__ = ("_array", "_name", "_private", "_triton_dtype")

    def __init__(self, name: str, numpy_array: Any, triton_dtype: int | None = None) -> None:
        array = numpy_array if isinstance(numpy_array, np.ndarray) else np.asarray(numpy_array)
        if array.dtype.kind in ("U", "S"):
            # Triton refuses np.str_ ("use np.object_"); converting is strictly more permissive.
            array = _bytes_object_array(array)
        elif array.dtype == np.void:
            raise TritonModelException(
                "Tensor dtype used for numpy_array is not supported by Python backend. "
                "Please use np.object_ instead."
            )
        if triton_dtype is not None:
            wanted = triton_to_numpy_type(triton_dtype)
            if wanted is not None and array.dtype != np.dtype(wanted):
                array = array.view(wanted)  # reinterpret the bytes, as Triton does
        self._name = name
        self._array = array
        self._triton_dtype = triton_dtype
        self._private = True

    @classmethod
    def _request_input(cls, name: str, array: np.ndarray) -> Tensor:
        """An input handed to ``execute``: it may be a read-only view over the request body."""
        tensor = cls(name, array)
        tensor._private = array.flags.writeable
        return tensor

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if not self._private:
            # Triton gives models writable inputs; ours may view an immutable request body, so a
            # model gets a private copy (made once, on first access) to write into.
            self._array = self._array.copy()
            self._private = True
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int:
        if self._triton_dtype is None:
            self._triton_dtype = numpy_to_triton_type(self._array.dtype) or 0
        return self._triton_dtype

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        """A DLPack capsule sharing this tensor's memory (not possible for BYTES)."""
        if self._array.dtype == np.object_:
            raise TritonModelException("DLPack does not support BYTES (TYPE_STRING) tensors")
        return self._array.__dlpack__()

    def __dlpack__(self, stream: Any = None, **kwargs: Any) -> Any:
        return self.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)

    @staticmethod
    def from_dlpack(name: str, dlpack: Any) -> Tensor:
        """From a DLPack capsule or any object with ``__dlpack__`` (a torch CPU tensor, ...)."""
        source = dlpack if hasattr(dlpack, "__dlpack__") else _DLPackCapsule(dlpack)
        try:
            array = np.from_dlpack(source)
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TritonModelException(f"Tensor.from_dlpack('{name}'): {exc}") from exc
        return Tensor(name, array)

    def __repr__(self) -> str:
        return f"Tensor(name={self._name!r}, shape={self.shape()}, dtype={self._array.dtype})"


# -- requests and responses ---------------------------------------------------------------------


def _json_parameters(parameters: Any) -> str:
    if parameters is None:
        return "{}"
    if isinstance(parameters, str):
        return parameters
    return json.dumps(parameters, default=str)


class InferenceResponse:
    """The answer to one request: output tensors, or an error (``TritonError``)."""

    __slots__ = ("_error", "_output_tensors", "_parameters")

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        if output_tensors is None:
            output_tensors = []
        elif not isinstance(output_tensors, list | tuple):
            raise TritonModelException('"output_tensors" must be a list.')
        self._output_tensors = list(output_tensors)
        self._error = error
        self._parameters = parameters

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return _json_parameters(self._parameters)

    def _parameters_dict(self) -> dict[str, Any]:
        if self._parameters is None:
            return {}
        if isinstance(self._parameters, str):
            return json.loads(self._parameters) if self._parameters else {}
        return dict(self._parameters)


class InferenceResponseSender:
    """Sends a decoupled model's responses for one request, from any thread, at any time until
    the ``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` flag is sent (after which sending raises, as in
    Triton). The engine supplies ``emit(response_or_None, final)`` and ``cancelled()``."""

    __slots__ = ("_cancelled", "_closed", "_emit", "_lock")

    def __init__(self, emit: Any, cancelled: Any) -> None:
        self._emit = emit
        self._cancelled = cancelled
        self._closed = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if flags & ~TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise TritonModelException(f"Unable to send response. Unsupported response flags {flags}.")
        if response is None and not final:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is not equal to "
                "TRITONSERVER_RESPONSE_COMPLETE_FINAL."
            )
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(
                f"Unable to send response. Expected pb_utils.InferenceResponse, got {type(response).__name__}."
            )
        with self._lock:  # responses of one request keep their order across model threads
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            if final:
                self._closed = True
            self._emit(response, final)

    def is_cancelled(self) -> bool:
        return bool(self._cancelled())

    def _fail(self, error: Any) -> None:
        """Close with ``error`` as the final response unless the model already closed it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._emit(InferenceResponse(error=error), True)


class InferenceRequest:
    """A request: what ``execute`` receives, and what a model builds to call another model (BLS)."""

    __slots__ = (
        "_correlation_id",
        "_flags",
        "_inputs",
        "_model_name",
        "_model_version",
        "_parameters",
        "_request_id",
        "_requested_output_names",
        "_response_sender",
        "_timeout",
    )

    def __init__(
        self,
        request_id: str = "",
        correlation_id: int | str = 0,
        inputs: Sequence[Tensor] | None = None,
        requested_output_names: Sequence[str] | None = None,
        model_name: str = "",
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        parameters: dict[str, Any] | str | None = None,
        **_ignored: Any,  # preferred_memory, trace: accepted for compatibility, not used on CPU
    ) -> None:
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._inputs = list(inputs or [])
        self._requested_output_names = list(requested_output_names or [])
        self._model_name = model_name
        self._model_version = model_version
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters
        self._response_sender: InferenceResponseSender | None = None

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def timeout(self) -> int:
        return self._timeout

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def parameters(self) -> str:
        """The request's parameters as a JSON string, as Triton returns them."""
        return _json_parameters(self._parameters)

    def _parameters_dict(self) -> dict[str, Any]:
        if self._parameters is None:
            return {}
        if isinstance(self._parameters, str):
            return json.loads(self._parameters) if self._parameters else {}
        return dict(self._parameters)

    def is_cancelled(self) -> bool:
        """True once the client went away (decoupled models: stream closed or cancelled)."""
        sender = self._response_sender
        return sender is not None and sender.is_cancelled()

    def set_release_flags(self, flags: int) -> None:
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            raise TritonModelException("request rescheduling is not supported yet by elastiserve")

    def get_response_sender(self) -> InferenceResponseSender:
        """The sender of a decoupled model's responses for this request (zero or more, then FINAL)."""
        if self._response_sender is None:
            raise TritonModelException(
                "InferenceRequest.get_response_sender() is only available to decoupled models in "
                "elastiserve (model_transaction_policy { decoupled: true }); return the responses "
                "from execute() instead"
            )
        return self._response_sender

    def exec(self, decoupled: bool = False) -> Any:
        """BLS: run this request on another model of the same server and wait for the response.

        Errors come back inside the response (``has_error()``), as in Triton; ``timeout`` given
        to the constructor is in microseconds, as Triton's. With ``decoupled=True`` (a decoupled
        model, or any model) the result is an iterator of its responses as they come; the last
        one may be empty (the model sent the FINAL flag on its own). Leaving the loop early
        cancels the request.
        """
        timeout = self._timeout / 1e6 if self._timeout else None
        bridge = _bls_bridge(self)
        if decoupled:
            return bridge.infer_decoupled(self, timeout)
        return bridge.infer(self, timeout)

    def async_exec(self, decoupled: bool = False) -> Awaitable[Any]:
        """BLS from an ``async def execute``: ``response = await request.async_exec()``; with
        ``decoupled=True`` it resolves to an iterator of every response (collected first)."""
        bridge = _bls_bridge(self)
        if decoupled:
            return bridge.async_infer_decoupled(self)
        return bridge.async_infer(self)

    def __repr__(self) -> str:
        names = [t.name() for t in self._inputs]
        return f"InferenceRequest(model_name={self._model_name!r}, id={self._request_id!r}, inputs={names})"


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for props in model_config.get("input", []):
        if props.get("name") == name:
            return props
    return None


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for props in model_config.get("output", []):
        if props.get("name") == name:
            return props
    return None


def using_decoupled_model_transaction_policy(model_config: dict[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


# -- auto_complete_config helper ----------------------------------------------------------------


class ModelConfig:
    """The object ``auto_complete_config`` receives and returns; wraps the config as a dict
    (proto field names, as Triton's JSON) and enforces the same rules Triton does."""

    def __init__(self, model_config: str | dict[str, Any]) -> None:
        self._model_config: dict[str, Any] = (
            json.loads(model_config) if isinstance(model_config, str) else model_config
        )
        self._model_config.setdefault("input", [])
        self._model_config.setdefault("output", [])
        self._model_config.setdefault("max_batch_size", 0)
        self._model_config.setdefault("name", "")

    def as_dict(self) -> dict[str, Any]:
        return self._model_config

    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = int(self._model_config.get("max_batch_size", 0))
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config "
                f"function for model '{self._name()}' specified max_batch_size {max_batch_size}"
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._model_config:
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{other}', but auto-complete-config "
                    f"function for model '{self._name()}' tries to set scheduling_choice as "
                    "'dynamic_batching'"
                )
        self._model_config.setdefault("dynamic_batching", {})

    def _add_tensor(self, kind: str, tensor: dict[str, Any], allowed: tuple[str, ...]) -> None:
        name = tensor.get("name")
        extra = [key for key in tensor if key not in allowed]
        if extra:
            raise ValueError(
                f"{kind} '{name}' in auto-complete-config function for model '{self._name()}' "
                f"contains property other than {', '.join(repr(a) for a in allowed)}."
            )
        for required in ("name", "data_type", "dims"):
            if required not in tensor:
                where = f"{kind} '{name}'" if name else kind
                raise ValueError(
                    f"{where} in auto-complete-config function for model '{self._name()}' "
                    f"is missing '{required}' property."
                )
        dims = [int(d) for d in tensor["dims"]]
        for current in self._model_config[kind]:
            if current.get("name") != name:
                continue
            current_type = current.get("data_type", "TYPE_INVALID")
            if current_type != "TYPE_INVALID" and current_type != tensor["data_type"]:
                raise ValueError(
                    f"unable to load model '{self._name()}', configuration expects datatype "
                    f"{current_type} for {kind} '{name}', model provides {tensor['data_type']}"
                )
            current_dims = [int(d) for d in current.get("dims", [])]
            if current_dims and current_dims != dims:
                raise ValueError(
                    f"model '{self._name()}', tensor '{name}': the model expects dims {dims} "
                    f"but the model configuration specifies dims {current_dims}"
                )
            if "optional" in current and "optional" in tensor and current["optional"] != tensor["optional"]:
                raise ValueError(
                    f"model '{self._name()}', tensor '{name}': the model expects optional "
                    f"{tensor['optional']} but the model configuration specifies optional "
                    f"{current['optional']}"
                )
            current["data_type"] = tensor["data_type"]
            current["dims"] = dims
            if "optional" in tensor:
                current["optional"] = tensor["optional"]
            return
        self._model_config[kind].append({**tensor, "dims": dims})

    def add_input(self, input: dict[str, Any]) -> None:
        self._add_tensor("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict[str, Any]) -> None:
        self._add_tensor("output", output, ("name", "data_type", "dims"))

    def set_model_transaction_policy(self, transaction_policy_dict: dict[str, Any]) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(
                    f"model transaction property in auto-complete-config function for model "
                    f"'{self._name()}' contains property other than 'decoupled'."
                )
        policy = self._model_config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            wanted = bool(transaction_policy_dict["decoupled"])
            if "decoupled" in policy and bool(policy["decoupled"]) != wanted:
                raise ValueError(
                    f"trying to change decoupled property in auto-complete-config for model "
                    f"'{self._name()}', which is already set to '{policy['decoupled']}'."
                )
            policy["decoupled"] = wanted


# -- logging ------------------------------------------------------------------------------------

_model_log = logging.getLogger("elastiserve.python_model")


class LogLevel(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


_LOG_LEVELS = {
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.VERBOSE: logging.DEBUG,
}


class Logger:
    """Triton's model logger; goes to the ``elastiserve.python_model`` Python logger."""

    INFO = LogLevel.INFO
    WARNING = LogLevel.WARNING
    ERROR = LogLevel.ERROR
    VERBOSE = LogLevel.VERBOSE

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        _model_log.log(_LOG_LEVELS.get(LogLevel(int(level)), logging.INFO), message, stacklevel=3)

    @staticmethod
    def log_info(message: str) -> None:
        _model_log.info(message, stacklevel=2)

    @staticmethod
    def log_warn(message: str) -> None:
        _model_log.warning(message, stacklevel=2)

    @staticmethod
    def log_error(message: str) -> None:
        _model_log.error(message, stacklevel=2)

    @staticmethod
    def log_verbose(message: str) -> None:
        _model_log.debug(message, stacklevel=2)


# -- custom metrics -----------------------------------------------------------------------------

_LabelKey = tuple[tuple[str, str], ...]


class _Series:
    """One labelled series; histograms keep cumulative-ready bucket counts."""

    __slots__ = ("bucket_counts", "buckets", "count", "sum", "value")

    def __init__(self, buckets: list[float] | None) -> None:
        self.value = 0.0
        self.buckets = buckets
        self.bucket_counts = [0] * len(buckets) if buckets is not None else []
        self.sum = 0.0
        self.count = 0


class _Family:
    __slots__ = ("description", "kind", "name", "series")

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name = name
        self.description = description
        self.kind = kind
        self.series: dict[_LabelKey, _Series] = {}


class _MetricStore:
    """Process-wide custom metrics. Series with the same family and labels are shared, as in
    Triton. In a worker process every change is also logged as an operation so the engine can
    replay it into its own store (the one /metrics renders)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.families: dict[str, _Family] = {}
        self.record_ops = False
        self.ops: list[tuple[Any, ...]] = []

    # Operations are applied under the lock; ``_apply`` is shared by local calls and replay.
    def apply(self, op: tuple[Any, ...]) -> Any:
        with self.lock:
            result = self._apply(op)
            if self.record_ops:
                self.ops.append(op)
            return result

    def apply_ops(self, ops: Iterable[tuple[Any, ...]]) -> None:
        with self.lock:
            for op in ops:
                with contextlib.suppress(TritonModelException):  # the worker already reported it
                    self._apply(op)

    def drain_ops(self) -> list[tuple[Any, ...]]:
        with self.lock:
            ops, self.ops = self.ops, []
            return ops

    def _apply(self, op: tuple[Any, ...]) -> Any:
        kind_of_op, name = op[0], op[1]
        if kind_of_op == "family":
            _, _, description, kind = op
            family = self.families.get(name)
            if family is None:
                self.families[name] = _Family(name, description, kind)
            elif family.kind != kind:
                raise TritonModelException(f"metric family '{name}' already exists with a different kind")
            return None
        family = self.families[name]
        labels: _LabelKey = op[2]
        if kind_of_op == "metric":
            buckets = op[3]
            if labels not in family.series:
                family.series[labels] = _Series(buckets)
            return None
        series = family.series[labels]
        value = float(op[3])
        if kind_of_op == "increment":
            if family.kind == MetricFamily.COUNTER and value < 0:
                raise TritonModelException("Counter metrics cannot be decremented")
            series.value += value
        elif kind_of_op == "set":
            series.value = value
        elif kind_of_op == "observe":
            series.sum += value
            series.count += 1
            for i, bound in enumerate(series.buckets or []):
                if value <= bound:
                    series.bucket_counts[i] += 1  # per bucket; rendering makes it cumulative
                    break
        return None

    def value(self, name: str, labels: _LabelKey) -> float:
        with self.lock:
            return self.families[name].series[labels].value

    def collect(self) -> Iterator[Any]:
        """prometheus-client collector protocol: register this store in the engine's registry."""
        from prometheus_client.metrics_core import Metric as PromMetric

        with self.lock:
            families = [
                (f.name, f.description, f.kind, [(dict(k), _copy_series(v)) for k, v in f.series.items()])
                for f in self.families.values()
            ]
        for name, description, kind, series in families:
            typ = {MetricFamily.COUNTER: "counter", MetricFamily.GAUGE: "gauge"}.get(kind, "histogram")
            metric = PromMetric(name, description, typ)
            for labels, one in series:
                if kind != MetricFamily.HISTOGRAM:
                    metric.add_sample(name, labels, one.value)
                    continue
                cumulative = 0
                for bound, hits in zip(one.buckets or [], one.bucket_counts, strict=True):
                    cumulative += hits
                    metric.add_sample(f"{name}_bucket", {**labels, "le": _num(bound)}, cumulative)
                metric.add_sample(f"{name}_bucket", {**labels, "le": "+Inf"}, one.count)
                metric.add_sample(f"{name}_count", labels, one.count)
                metric.add_sample(f"{name}_sum", labels, one.sum)
            yield metric

    def render_text(self) -> str:
        """Prometheus text exposition with the exact names models gave (as Triton's /metrics)."""
        lines: list[str] = []
        with self.lock:
            for family in self.families.values():
                typ = {MetricFamily.COUNTER: "counter", MetricFamily.GAUGE: "gauge"}.get(
                    family.kind, "histogram"
                )
                lines.append(f"# HELP {family.name} {family.description}")
                lines.append(f"# TYPE {family.name} {typ}")
                for labels, series in family.series.items():
                    if family.kind != MetricFamily.HISTOGRAM:
                        lines.append(f"{family.name}{_label_text(labels)} {_num(series.value)}")
                        continue
                    cumulative = 0
                    for bound, hits in zip(series.buckets or [], series.bucket_counts, strict=True):
                        cumulative += hits
                        le = (*labels, ("le", _num(bound)))
                        lines.append(f"{family.name}_bucket{_label_text(le)} {cumulative}")
                    inf = (*labels, ("le", "+Inf"))
                    lines.append(f"{family.name}_bucket{_label_text(inf)} {series.count}")
                    lines.append(f"{family.name}_sum{_label_text(labels)} {_num(series.sum)}")
                    lines.append(f"{family.name}_count{_label_text(labels)} {series.count}")
        return "\n".join(lines) + ("\n" if lines else "")


def _copy_series(series: _Series) -> _Series:
    copy = _Series(series.buckets)
    copy.value, copy.sum, copy.count = series.value, series.sum, series.count
    copy.bucket_counts = list(series.bucket_counts)
    return copy


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label_text(labels: _LabelKey) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_METRICS = _MetricStore()


class Metric:
    """One labelled series of a :class:`MetricFamily` (create it with ``family.Metric(...)``)."""

    def __init__(self, family: MetricFamily, labels: dict[str, str] | None, buckets: list[float] | None):
        self._family = family
        self._labels: _LabelKey = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        if family.kind() == MetricFamily.HISTOGRAM:
            if buckets is None:
                raise TritonModelException("histogram metrics need 'buckets'")
            bounds = [float(b) for b in buckets]
            if any(nxt <= prev for prev, nxt in itertools.pairwise(bounds)):
                raise TritonModelException("histogram buckets must be in strictly increasing order")
            self._buckets: list[float] | None = bounds
        else:
            self._buckets = None
        _METRICS.apply(("metric", family.name(), self._labels, self._buckets))

    def _check(self, *, histogram: bool) -> None:
        if (self._family.kind() == MetricFamily.HISTOGRAM) != histogram:
            what = "observe() is only for histogram" if histogram else "this operation is not for histogram"
            raise TritonModelException(f"metric '{self._family.name()}': {what} metrics")

    def increment(self, value: float) -> None:
        self._check(histogram=False)
        _METRICS.apply(("increment", self._family.name(), self._labels, float(value)))

    def set(self, value: float) -> None:
        self._check(histogram=False)
        if self._family.kind() == MetricFamily.COUNTER:
            raise TritonModelException("Counter metrics cannot be set, only incremented")
        _METRICS.apply(("set", self._family.name(), self._labels, float(value)))

    def observe(self, value: float) -> None:
        self._check(histogram=True)
        _METRICS.apply(("observe", self._family.name(), self._labels, float(value)))

    def value(self) -> float:
        """This process's view of the value (worker processes see their own increments)."""
        self._check(histogram=False)
        return _METRICS.value(self._family.name(), self._labels)


class MetricFamily:
    """A custom metric family, exported on the engine's /metrics in Prometheus format.

    Families with the same name and kind are shared (Triton's rule); a different kind fails.
    """

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(f"unknown metric kind {kind!r}")
        self._name = name
        self._description = description
        self._kind = kind
        _METRICS.apply(("family", name, description, kind))

    def name(self) -> str:
        return self._name

    def kind(self) -> int:
        return self._kind

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Metric:
        return Metric(self, labels, buckets)


# -- engine hooks (private) ---------------------------------------------------------------------


class _BLSBridge(Protocol):
    """How ``InferenceRequest.exec`` reaches the engine; installed by the python backend."""

    def infer(self, request: InferenceRequest, timeout: float | None) -> InferenceResponse: ...

    def async_infer(self, request: InferenceRequest) -> Awaitable[InferenceResponse]: ...

    def infer_decoupled(
        self, request: InferenceRequest, timeout: float | None
    ) -> Iterator[InferenceResponse]: ...

    def async_infer_decoupled(self, request: InferenceRequest) -> Awaitable[Iterator[InferenceResponse]]: ...


_bridge_local = threading.local()
_default_bridge: _BLSBridge | None = None


def _set_default_bridge(bridge: _BLSBridge | None) -> None:
    """The bridge used by threads the model starts itself (one engine per process)."""
    global _default_bridge
    _default_bridge = bridge


def _set_thread_bridge(bridge: _BLSBridge | None) -> _BLSBridge | None:
    """Bind ``bridge`` to the current thread for the duration of a model call; returns the old one."""
    previous = getattr(_bridge_local, "bridge", None)
    _bridge_local.bridge = bridge
    return previous


def _bls_bridge(request: InferenceRequest) -> _BLSBridge:
    if not request.model_name():
        raise TritonModelException("BLS request needs model_name")
    bridge = getattr(_bridge_local, "bridge", None) or _default_bridge
    if bridge is None:
        raise TritonModelException(
            "BLS is not available here: InferenceRequest.exec() only works inside a model served by "
            "the elastiserve engine"
        )
    return bridge
