"""``ModelInferRequest``/``ModelInferResponse`` <-> :mod:`elastiserve.types`: the gRPC hot path.

Kept apart from the RPC plumbing so it can be tested and profiled on its own. Raw tensors
become numpy views over the request's bytes (``np.frombuffer``, no copy, read-only); typed
``contents`` are accepted for every datatype that has a field (FP16 has none, so raw only).
Outputs always go back as ``raw_output_contents``: Triton does so and tritonclient expects it.
Error messages are Triton's own (``src/grpc/infer_handler.cc`` and the core's input checks),
so clients that match on them keep working.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from elastiserve.errors import InvalidArgument, Unsupported
from elastiserve.types import (
    DATATYPE_TO_NUMPY,
    InferRequest,
    InferResponse,
    InferTensor,
    RequestedOutput,
)

# Wire dtypes are little-endian whatever the host is (identical to native ones on x86/arm).
_WIRE_DTYPE: dict[str, np.dtype] = {
    name: (dt if name == "BYTES" else dt.newbyteorder("<")) for name, dt in DATATYPE_TO_NUMPY.items()
}
_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in _WIRE_DTYPE.items() if name != "BYTES"}
_U32 = struct.Struct("<I")
_INT64_MAX = (1 << 63) - 1

# Typed ``InferTensorContents`` fields, in the order Triton inspects them, with the datatype each
# one carries; INT8/INT16 (UINT8/UINT16) travel widened in int_contents (uint_contents).
_CONTENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("bool_contents", "BOOL"),
    ("int_contents", "INT32"),
    ("int64_contents", "INT64"),
    ("uint_contents", "UINT32"),
    ("uint64_contents", "UINT64"),
    ("fp32_contents", "FP32"),
    ("fp64_contents", "FP64"),
    ("bytes_contents", "BYTES"),
)
_NARROW = {
    "INT8": "int_contents",
    "INT16": "int_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
}

# Input/output parameters that ask for shared memory, which this server does not implement.
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

_parse_request = service_pb2.ModelInferRequest.FromString
_Response = service_pb2.ModelInferResponse


# -- parameters ------------------------------------------------------------------------------------
def parameters_to_dict(params: Mapping[str, Any], what: str = "parameter") -> dict[str, Any]:
    """An ``InferParameter`` map (or repository/log parameter map) to plain Python values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidArgument(f"{what} '{key}' has no value set")
        out[key] = getattr(param, kind)
    return out


def set_infer_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Fill an ``InferParameter`` map from Python values (bool before int: bool is an int)."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool | np.bool_):
            param.bool_param = bool(value)
        elif isinstance(value, int | np.integer):
            value = int(value)
            if value > _INT64_MAX:
                param.uint64_param = value
            else:
                param.int64_param = value
        elif isinstance(value, float | np.floating):
            param.double_param = float(value)
        elif isinstance(value, bytes):
            param.string_param = value.decode("utf-8", "replace")
        else:
            param.string_param = str(value)


def _request_parameters(params: Any) -> dict[str, Any]:
    """Request-level parameters, type-checked the way Triton's gRPC frontend checks them."""
    out = parameters_to_dict(params)
    for key, value in out.items():
        kind = params[key].WhichOneof("parameter_choice")
        if key == "sequence_id" and kind not in ("int64_param", "uint64_param", "string_param"):
            raise InvalidArgument(
                "invalid value type for 'sequence_id' parameter, expected int64_param or string_param."
            )
        if key in ("sequence_start", "sequence_end") and kind != "bool_param":
            raise InvalidArgument(f"invalid value type for '{key}' parameter, expected bool_param.")
        if key == "priority":
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidArgument(
                    "invalid value type for 'priority' parameter, expected int64_param or uint64_param."
                )
            if value < 0:
                raise InvalidArgument("invalid value for 'priority', expected value >= 0.")
        if key == "timeout" and kind != "int64_param":
            raise InvalidArgument("invalid value type for 'timeout' parameter, expected int64_param.")
    return out


# -- request ---------------------------------------------------------------------------------------
def decode_infer_request(data: bytes) -> InferRequest:
    """Parse a serialized ``ModelInferRequest``; raises InvalidArgument for anything malformed."""
    try:
        msg = _parse_request(data)
    except DecodeError as exc:
        raise InvalidArgument(f"failed to parse ModelInferRequest: {exc}") from None
    return infer_request_from_proto(msg)


def infer_request_from_proto(msg: Any) -> InferRequest:
    """A parsed ``ModelInferRequest`` to an :class:`InferRequest` (numpy views over raw bytes)."""
    model = msg.model_name
    raw = msg.raw_input_contents
    n_raw = len(raw)
    raw_index = 0
    inputs: list[InferTensor] = []
    for tensor in msg.inputs:
        name = tensor.name
        datatype = tensor.datatype
        shape = list(tensor.shape)
        dtype = _WIRE_DTYPE.get(datatype)
        if dtype is None:
            raise InvalidArgument(
                f"invalid datatype '{datatype}' for input '{name}' for model '{model}', expected one of "
                + ", ".join(_WIRE_DTYPE)
            )
        for dim in shape:
            if dim < 0:
                raise InvalidArgument(
                    f"invalid shape {shape} for input '{name}' for model '{model}': "
                    "dimensions must not be negative"
                )
        params = parameters_to_dict(tensor.parameters) if tensor.parameters else {}
        if params and any(key in params for key in _SHM_KEYS):
            raise Unsupported(
                f"shared memory input '{name}' for model '{model}': "
                "this server does not support the shared memory extension"
            )
        if tensor.HasField("contents"):
            if n_raw:
                raise InvalidArgument(
                    "contents field must not be specified when using raw_input_contents for "
                    f"'{name}' for model '{model}'"
                )
            array = _from_contents(tensor.contents, datatype, shape, name, model)
        elif raw_index < n_raw:
            array = _from_raw(raw[raw_index], datatype, dtype, shape, name, model)
            raw_index += 1
        else:
            raise InvalidArgument(
                f"unable to find data for input tensor '{name}' for model '{model}' in request."
            )
        inputs.append(InferTensor(name, datatype, shape, array, params))
    outputs = [_requested_output(out) for out in msg.outputs] if msg.outputs else []
    return InferRequest(
        model_name=model,
        inputs=inputs,
        model_version=msg.model_version,
        id=msg.id,
        outputs=outputs,
        parameters=_request_parameters(msg.parameters) if msg.parameters else {},
    )


def _requested_output(out: Any) -> RequestedOutput:
    params = parameters_to_dict(out.parameters) if out.parameters else {}
    if params:
        if any(key in params for key in _SHM_KEYS):
            raise Unsupported(
                f"shared memory output '{out.name}': this server does not support the shared memory extension"
            )
        if "classification" in params:
            # The wire name is "classification" (an int64); the dataplane reads "class_count".
            classes = params.pop("classification")
            if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
                raise InvalidArgument(
                    f"Unable to set 'classification' of output '{out.name}': expected an unsigned integer"
                )
            params["class_count"] = classes
    return RequestedOutput(out.name, params)


def _from_raw(
    buf: bytes, datatype: str, dtype: np.dtype, shape: list[int], name: str, model: str
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return split_bytes(buf, count, name, model).reshape(shape)
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise InvalidArgument(
            f"input byte size mismatch for input '{name}' for model '{model}'. "
            f"Expected {expected}, got {len(buf)}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _from_contents(contents: Any, datatype: str, shape: list[int], name: str, model: str) -> np.ndarray:
    present = [(field, carried) for field, carried in _CONTENT_FIELDS if len(getattr(contents, field))]
    count = math.prod(shape)
    if not present:
        if count:
            raise InvalidArgument(
                f"input byte size mismatch for input '{name}' for model '{model}'. "
                f"Expected {count * _ITEMSIZE.get(datatype, 0)}, got 0"
                if datatype != "BYTES"
                else f"expected {count} string elements for inference input '{name}' for model "
                f"'{model}', got 0"
            )
        return np.empty(shape, dtype=DATATYPE_TO_NUMPY[datatype])
    if len(present) > 1:
        raise InvalidArgument(
            f"unexpected explicit tensor data for input tensor '{name}' for model '{model}', "
            "binary data was already supplied."
        )
    field, carried = present[0]
    if datatype in _NARROW and _NARROW[datatype] == field:
        carried = datatype
    if carried != datatype:
        raise InvalidArgument(
            f"unexpected explicit tensor data for input tensor '{name}' for model '{model}' of type "
            f"'{carried}', expected datatype '{datatype}'"
        )
    values = getattr(contents, field)
    got = len(values)
    if datatype == "BYTES":
        if got != count:
            raise _string_count_error(count, got, name, model)
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    if got != count:
        size = _ITEMSIZE[datatype]
        raise InvalidArgument(
            f"input byte size mismatch for input '{name}' for model '{model}'. "
            f"Expected {count * size}, got {got * size}"
        )
    if datatype in _NARROW:
        # Like Triton: keep the low bytes of each widened element (little-endian truncation).
        wide = np.int32 if datatype.startswith("INT") else np.uint32
        return np.asarray(values, dtype=wide).astype(DATATYPE_TO_NUMPY[datatype]).reshape(shape)
    return np.asarray(values, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)


def _string_count_error(count: int, got: int, name: str, model: str) -> InvalidArgument:
    if got < count:
        return InvalidArgument(
            f"expected {count} string elements for inference input '{name}' for model '{model}', got {got}"
        )
    return InvalidArgument(
        f"unexpected number of string elements {got} for inference input '{name}' for model "
        f"'{model}', expecting {count}"
    )


def split_bytes(buf: bytes, count: int, name: str, model: str) -> np.ndarray:
    """Triton's raw BYTES layout (4-byte little-endian length, then the bytes, per element)
    to a flat object array of ``bytes``."""
    items: list[bytes] = []
    offset = 0
    size = len(buf)
    unpack = _U32.unpack_from
    while offset < size:
        if offset + 4 > size:
            raise InvalidArgument(
                f"incomplete string length indicator for inference input '{name}' for model '{model}', "
                f"expecting 4 bytes but only {size - offset} bytes available"
            )
        (length,) = unpack(buf, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise InvalidArgument(
                f"incomplete string data for inference input '{name}' for model '{model}', "
                f"expecting string of length {length} but only {size - offset} bytes available"
            )
        items.append(buf[offset:end])
        offset = end
    if len(items) != count:
        raise _string_count_error(count, len(items), name, model)
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def join_bytes(array: np.ndarray) -> bytes:
    """An array of bytes/str (any shape, C order) to Triton's raw BYTES layout."""
    pack = _U32.pack
    parts: list[bytes] = []
    for value in array.reshape(-1):
        if isinstance(value, bytes):
            item = value
        elif isinstance(value, str):
            item = value.encode()
        else:
            item = str(value).encode()
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


# -- response --------------------------------------------------------------------------------------
def encode_infer_response(response: InferResponse) -> bytes:
    """Serialize an :class:`InferResponse` as a ``ModelInferResponse`` with raw outputs."""
    msg = _Response(model_name=response.model_name, model_version=response.model_version, id=response.id)
    if response.parameters:
        set_infer_parameters(msg.parameters, response.parameters)
    outputs = msg.outputs
    raw = msg.raw_output_contents
    for tensor in response.outputs:
        array = tensor.data
        datatype = tensor.datatype
        if array is None:
            out = outputs.add(name=tensor.name, datatype=datatype, shape=tensor.shape)
            raw.append(b"")
        else:
            out = outputs.add(name=tensor.name, datatype=datatype, shape=array.shape)
            raw.append(tensor_bytes(array, datatype, tensor.name))
        if tensor.parameters:
            set_infer_parameters(out.parameters, tensor.parameters)
    return msg.SerializeToString()


def tensor_bytes(array: np.ndarray, datatype: str, name: str = "") -> bytes:
    """The raw little-endian bytes of an output tensor in its declared datatype."""
    if datatype == "BYTES":
        return join_bytes(array)
    dtype = _WIRE_DTYPE.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"output '{name}' has unknown datatype '{datatype}'")
    if array.dtype != dtype:
        array = array.astype(dtype)
    return array.tobytes()
