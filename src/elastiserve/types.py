"""Shared vocabulary: tensor datatypes and protocol-neutral inference requests/responses.

Frontends turn wire formats (KServe v2 JSON/binary, gRPC protobuf) into these objects, the
dataplane and backends only ever see these. BYTES tensors are numpy ``object`` arrays of
``bytes``, exactly as Triton's Python backend hands them to ``model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# KServe v2 datatype name -> numpy dtype (BYTES is an object array of bytes).
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}

# Size in bytes of one element, for the fixed-size types.
DATATYPE_SIZE: dict[str, int] = {k: v.itemsize for k, v in DATATYPE_TO_NUMPY.items() if k != "BYTES"}


def config_type_to_datatype(config_type: str | int) -> str:
    """``TYPE_FP32`` (or the enum number) -> ``FP32``; ``TYPE_STRING`` -> ``BYTES``."""
    if isinstance(config_type, int):
        from tritonclient.grpc import model_config_pb2

        config_type = model_config_pb2.DataType.Name(config_type)
    name = config_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def datatype_to_config_type(datatype: str) -> str:
    """``FP32`` -> ``TYPE_FP32``; ``BYTES`` -> ``TYPE_STRING``."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def numpy_to_datatype(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype; strings and bytes of any width are BYTES."""
    dtype = np.dtype(dtype)
    found = _NUMPY_TO_DATATYPE.get(dtype)
    if found is not None:
        return found
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    raise TypeError(f"numpy dtype {dtype} has no KServe v2 datatype")


def as_bytes_array(array: np.ndarray) -> np.ndarray:
    """Normalise a str/bytes/object array to an object array of ``bytes`` (Triton's BYTES form)."""
    if array.dtype == np.object_ and all(isinstance(v, bytes) for v in array.flat):
        return array
    out = np.empty(array.shape, dtype=np.object_)
    flat_out = out.reshape(-1)
    for i, value in enumerate(array.reshape(-1)):
        flat_out[i] = value.encode() if isinstance(value, str) else bytes(value)
    return out


@dataclass(slots=True)
class InferTensor:
    """One named tensor; ``data`` is a numpy array whose shape equals ``shape``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, with its per-output parameters
    (``binary_data``, ``classification``/``class_count``)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """A protocol-neutral inference request. ``model_version`` "" means the default policy."""

    model_name: str
    inputs: list[InferTensor]
    model_version: str = ""
    id: str = ""
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> InferTensor | None:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        return None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[InferTensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> InferTensor | None:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        return None
