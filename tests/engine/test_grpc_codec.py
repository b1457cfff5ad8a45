"""ModelInferRequest/Response <-> elastiserve.types, without a server (tritonclient builds the
requests, exactly as it would send them)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from elastiserve.engine.frontends.grpc_codec import (
    decode_infer_request,
    encode_infer_response,
    join_bytes,
    split_bytes,
)
from elastiserve.errors import InvalidArgument, Unsupported
from elastiserve.types import InferResponse, InferTensor

NUMERIC = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 1, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 2, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 3, 2**63 - 1]], dtype=np.int64),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1]], dtype=np.uint64),
    "FP16": np.array([[0.5, -1.25, 65504.0]], dtype=np.float16),
    "FP32": np.array([[0.5, -1.25, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[0.5, -1.25, 1e308]], dtype=np.float64),
}
STRINGS = np.array([[b"", "héllo".encode(), b"\x00\xff"], [b"a", b"bb", b"ccc"]], dtype=np.object_)


def request_bytes(
    inputs: list[grpcclient.InferInput],
    model: str = "m",
    outputs: list[grpcclient.InferRequestedOutput] | None = None,
    **kwargs: object,
) -> bytes:
    """What tritonclient.grpc puts on the wire for these arguments."""
    args = {
        "model_version": "",
        "request_id": "",
        "sequence_id": 0,
        "sequence_start": False,
        "sequence_end": False,
        "priority": 0,
        "timeout": None,
        "parameters": None,
    }
    args.update(kwargs)
    return _get_inference_request(
        model_name=model, inputs=inputs, outputs=outputs, **args
    ).SerializeToString()


CONTENT_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class TypedInput(grpcclient.InferInput):
    """tritonclient.grpc always sends raw tensors; other clients (and Triton's own tests) use the
    typed ``contents`` fields, which this builds."""

    def __init__(self, name: str, array: np.ndarray, datatype: str) -> None:
        super().__init__(name, list(array.shape), datatype)
        field = getattr(self._input.contents, CONTENT_FIELD[datatype])
        field.extend(array.reshape(-1).tolist())


def make_input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> grpcclient.InferInput:
    if not binary:
        return TypedInput(name, array, datatype)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("datatype", list(NUMERIC))
def test_raw_numeric_inputs_are_views_over_the_request(datatype: str) -> None:
    array = NUMERIC[datatype]
    request = decode_infer_request(request_bytes([make_input("X", array, datatype)]))
    tensor = request.inputs[0]
    assert (tensor.name, tensor.datatype, tensor.shape) == ("X", datatype, [1, 3])
    assert tensor.data is not None
    np.testing.assert_array_equal(tensor.data, array)
    assert tensor.data.dtype == array.dtype
    assert not tensor.data.flags.owndata  # np.frombuffer over the message's bytes


@pytest.mark.parametrize("datatype", [d for d in NUMERIC if d != "FP16"])
def test_typed_contents_for_every_datatype_with_a_field(datatype: str) -> None:
    array = NUMERIC[datatype]
    request = decode_infer_request(request_bytes([make_input("X", array, datatype, binary=False)]))
    tensor = request.inputs[0]
    assert tensor.data is not None
    np.testing.assert_array_equal(tensor.data, array)
    assert tensor.data.dtype == array.dtype and tensor.shape == [1, 3]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_inputs_raw_and_typed(binary: bool) -> None:
    request = decode_infer_request(request_bytes([make_input("S", STRINGS, "BYTES", binary)]))
    data = request.inputs[0].data
    assert data is not None and data.dtype == np.object_ and data.shape == (2, 3)
    assert data.tolist() == STRINGS.tolist()


def test_request_fields_parameters_and_outputs() -> None:
    outputs = [grpcclient.InferRequestedOutput("A"), grpcclient.InferRequestedOutput("B", class_count=3)]
    data = request_bytes(
        [make_input("X", NUMERIC["FP32"], "FP32")],
        model="mm",
        outputs=outputs,
        model_version="2",
        request_id="r-1",
        sequence_id=42,
        sequence_start=True,
        priority=3,
        timeout=1000,
        parameters={"s": "v", "b": True, "i": -5, "f": 0.25},
    )
    request = decode_infer_request(data)
    assert (request.model_name, request.model_version, request.id) == ("mm", "2", "r-1")
    assert request.parameters == {
        "sequence_id": 42,
        "sequence_start": True,
        "sequence_end": False,
        "priority": 3,
        "timeout": 1000,
        "s": "v",
        "b": True,
        "i": -5,
        "f": 0.25,
    }
    assert [(o.name, o.parameters) for o in request.outputs] == [("A", {}), ("B", {"class_count": 3})]


def test_empty_tensor_with_zero_dim() -> None:
    array = np.zeros((0, 4), dtype=np.float32)
    request = decode_infer_request(request_bytes([make_input("X", array, "FP32")]))
    assert request.inputs[0].data is not None and request.inputs[0].data.shape == (0, 4)


def _raw_request(datatype: str, shape: list[int], raw: bytes | None = None) -> service_pb2.ModelInferRequest:
    msg = service_pb2.ModelInferRequest(model_name="m")
    msg.inputs.add(name="X", datatype=datatype, shape=shape)
    if raw is not None:
        msg.raw_input_contents.append(raw)
    return msg


BAD_REQUESTS: list[tuple[str, service_pb2.ModelInferRequest, str]] = []


def _bad(case: str, msg: service_pb2.ModelInferRequest, error: str) -> None:
    BAD_REQUESTS.append((case, msg, error))


_bad(
    "raw size",
    _raw_request("FP32", [1, 4], b"\0" * 12),
    "input byte size mismatch for input 'X' for model 'm'. Expected 16, got 12",
)
_bad(
    "no data",
    _raw_request("FP32", [1, 4]),
    "unable to find data for input tensor 'X' for model 'm' in request.",
)
_bad("datatype", _raw_request("FLOAT", [1], b"\0" * 4), "invalid datatype 'FLOAT' for input 'X'")
_bad("negative dim", _raw_request("FP32", [-1, 4], b""), "invalid shape [-1, 4] for input 'X'")
_bad(
    "bytes count",
    _raw_request("BYTES", [3], b"\1\0\0\0a\1\0\0\0b"),
    "expected 3 string elements for inference input 'X' for model 'm', got 2",
)
_bad(
    "bytes too many",
    _raw_request("BYTES", [1], b"\1\0\0\0a\1\0\0\0b"),
    "unexpected number of string elements 2 for inference input 'X' for model 'm', expecting 1",
)
_bad(
    "bytes length",
    _raw_request("BYTES", [1], b"\1\0"),
    "incomplete string length indicator for inference input 'X' for model 'm'",
)
_bad(
    "bytes data",
    _raw_request("BYTES", [1], b"\5\0\0\0ab"),
    "incomplete string data for inference input 'X' for model 'm', expecting string of length 5",
)
_m = _raw_request("FP32", [2], b"\0" * 8)
_m.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
_bad("contents and raw", _m, "contents field must not be specified when using raw_input_contents for 'X'")
_m = _raw_request("INT32", [2])
_m.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
_bad("typed field", _m, "unexpected explicit tensor data for input tensor 'X' for model 'm' of type 'FP32'")
_m = _raw_request("FP16", [1])
_m.inputs[0].contents.fp32_contents.append(1.0)
_bad("fp16 typed", _m, "of type 'FP32', expected datatype 'FP16'")
_m = _raw_request("INT32", [2])
_m.inputs[0].contents.int_contents.extend([1, 2])
_m.inputs[0].contents.int64_contents.extend([1, 2])
_bad("two fields", _m, "binary data was already supplied")
_m = _raw_request("INT32", [3])
_m.inputs[0].contents.int_contents.extend([1, 2])
_bad("typed count", _m, "input byte size mismatch for input 'X' for model 'm'. Expected 12, got 8")
_m = _raw_request("FP32", [1], b"\0" * 4)
_m.parameters["sequence_start"].int64_param = 1
_bad("param type", _m, "invalid value type for 'sequence_start' parameter, expected bool_param.")
_m = _raw_request("FP32", [1], b"\0" * 4)
_m.parameters["empty"].CopyFrom(service_pb2.InferParameter())
_bad("param unset", _m, "parameter 'empty' has no value set")
_m = _raw_request("FP32", [1], b"\0" * 4)
_m.outputs.add(name="Y").parameters["classification"].string_param = "x"
_bad("classification", _m, "Unable to set 'classification' of output 'Y': expected an unsigned integer")


@pytest.mark.parametrize(("case", "msg", "error"), BAD_REQUESTS, ids=[c for c, _, _ in BAD_REQUESTS])
def test_malformed_requests_raise_invalid_argument(
    case: str, msg: service_pb2.ModelInferRequest, error: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_infer_request(msg.SerializeToString())
    assert error in str(info.value)


def test_not_a_protobuf_and_shared_memory() -> None:
    with pytest.raises(InvalidArgument, match="failed to parse ModelInferRequest"):
        decode_infer_request(b"\xff\xff\xff\xff")
    tensor = grpcclient.InferInput("X", [1], "FP32")
    tensor.set_shared_memory("region", 4)
    with pytest.raises(Unsupported, match="shared memory"):
        decode_infer_request(request_bytes([tensor]))


def test_bytes_layout_round_trip() -> None:
    flat = STRINGS.reshape(-1)
    packed = join_bytes(STRINGS)
    assert packed[:4] == b"\0\0\0\0" and packed[4:8] == len("héllo".encode()).to_bytes(4, "little")
    assert split_bytes(packed, flat.size, "x", "m").tolist() == flat.tolist()
    # str and numpy bytes elements are encoded as UTF-8 / taken as they are
    assert join_bytes(np.array(["é", np.bytes_(b"z")], dtype=np.object_)) == b"\2\0\0\0\xc3\xa9\1\0\0\0z"


def test_response_is_raw_and_parses_with_tritonclient() -> None:
    response = InferResponse(
        "m",
        "1",
        [
            InferTensor("F", "FP32", [2, 2], np.arange(4, dtype=np.float32).reshape(2, 2)),
            InferTensor("H", "FP16", [1], np.array([1.5], dtype=np.float16)),
            InferTensor("S", "BYTES", [2], np.array([b"x", "y"], dtype=np.object_), {"p": 1}),
            # a float64 array declared FP32 is converted, not sent with the wrong width
            InferTensor("C", "FP32", [2], np.array([1.0, 2.0])),
        ],
        id="abc",
        parameters={"flag": True, "n": 7, "big": 2**64 - 1, "x": 0.5, "s": "t"},
    )
    msg = service_pb2.ModelInferResponse.FromString(encode_infer_response(response))
    assert len(msg.raw_output_contents) == 4 and not msg.outputs[0].HasField("contents")
    result = grpcclient.InferResult(msg)
    np.testing.assert_array_equal(result.as_numpy("F"), np.arange(4, dtype=np.float32).reshape(2, 2))
    assert result.as_numpy("H").dtype == np.float16
    assert result.as_numpy("S").tolist() == [b"x", b"y"]
    np.testing.assert_array_equal(result.as_numpy("C"), np.array([1.0, 2.0], dtype=np.float32))
    assert msg.id == "abc" and msg.model_version == "1"
    params = msg.parameters
    assert params["flag"].bool_param and params["n"].int64_param == 7
    assert params["big"].uint64_param == 2**64 - 1 and params["x"].double_param == 0.5
    assert params["s"].string_param == "t" and msg.outputs[2].parameters["p"].int64_param == 1
