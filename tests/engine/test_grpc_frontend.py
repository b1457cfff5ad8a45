"""The gRPC frontend driven by the real ``tritonclient.grpc`` (sync), on every transport: every
RPC, every datatype, parameters, and every bad request (status code + message, then a good
request still works)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.engine.grpc_fake import GrpcServerThread


@pytest.fixture(scope="module", params=["h2", "core", "aio"])
def server(request: pytest.FixtureRequest) -> Iterator[GrpcServerThread]:
    thread = GrpcServerThread(transport=request.param).start()
    assert thread.handle is not None and thread.handle.transport == request.param
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server: GrpcServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: GrpcServerThread) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32_input(name: str = "INPUT0", array: np.ndarray | None = None) -> grpcclient.InferInput:
    array = np.arange(16, dtype=np.float32).reshape(1, 16) if array is None else array
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def assert_identity_works(client: grpcclient.InferenceServerClient) -> None:
    array = np.random.rand(1, 16).astype(np.float32)
    result = client.infer("identity_fp32", [fp32_input(array=array)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


def expect_error(
    client: grpcclient.InferenceServerClient, call: object, code: str, message: str
) -> InferenceServerException:
    """``call`` fails with gRPC status ``code`` and ``message`` in its details, no traceback,
    and the server still answers the next good request."""
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    assert info.value.status() == f"StatusCode.{code}", info.value
    assert message in info.value.message(), info.value.message()
    assert "Traceback" not in info.value.message()
    assert_identity_works(client)
    return info.value


# -- health and metadata ---------------------------------------------------------------------------
def test_health(client: grpcclient.InferenceServerClient, server: GrpcServerThread) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("identity_fp32")
    assert client.is_model_ready("identity_fp32", "1")
    # Unknown model or version: OK with ready=false, as Triton answers over gRPC.
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("identity_fp32", "7")
    with grpc.insecure_channel(server.url) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"") == b"\x08\x01"  # SERVING
        server.registry.models["add_sub"].ready = False
        try:
            assert check(b"") == b"\x08\x02"  # NOT_SERVING
            assert not client.is_server_ready()
        finally:
            server.registry.models["add_sub"].ready = True


def test_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "elastiserve" and meta["version"] == "2.51.0"
    assert "model_repository" in meta["extensions"]
    model = client.get_model_metadata("identity_fp32", as_json=True)
    assert model == {
        "name": "identity_fp32",
        "versions": ["1"],
        "platform": "python",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "16"]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": ["-1", "16"]}],
    }
    expect_error(
        client,
        lambda: client.get_model_metadata("missing"),
        "NOT_FOUND",
        "Request for unknown model: 'missing' is not found",
    )


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("add_sub").config
    assert config.name == "add_sub" and config.backend == "python"
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    as_json = client.get_model_config("identity_fp32", as_json=True)
    assert as_json["config"]["max_batch_size"] == 64
    expect_error(client, lambda: client.get_model_config("missing"), "NOT_FOUND", "unknown model")


def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("identity_fp32").model_stats[0].inference_count
    assert_identity_works(client)
    stats = client.get_inference_statistics("identity_fp32", as_json=True)["model_stats"][0]
    assert stats["name"] == "identity_fp32" and int(stats["inference_count"]) == before + 1
    assert int(stats["inference_stats"]["success"]["count"]) == before + 1
    assert stats["batch_stats"][0]["batch_size"] == "1"
    everything = client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} >= {"identity_fp32", "add_sub", "identity_bytes"}


# -- model repository --------------------------------------------------------------------------------
def test_repository_index_load_unload(
    client: grpcclient.InferenceServerClient, server: GrpcServerThread
) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "add_sub", "version": "1", "state": "READY"} in index
    client.unload_model("add_sub", unload_dependents=True)
    assert server.registry.unloads[-1] == ("add_sub", True)
    assert not client.is_model_ready("add_sub")
    ready = client.get_model_repository_index(as_json=True)["models"]
    assert "add_sub" not in [m["name"] for m in ready if m.get("state") == "READY"]
    config = json.dumps({"backend": "python", "max_batch_size": 8})
    client.load_model("add_sub", config=config, files={"file:1/model.py": b"print(1)"})
    assert server.registry.loads[-1] == ("add_sub", config, {"file:1/model.py": b"print(1)"})
    assert client.is_model_ready("add_sub")
    client.load_model("add_sub")
    assert server.registry.loads[-1] == ("add_sub", None, None)
    client.unload_model("add_sub")
    assert server.registry.unloads[-1] == ("add_sub", False)
    client.load_model("add_sub")
    expect_error(
        client,
        lambda: client.load_model("nope"),
        "INVALID_ARGUMENT",
        "failed to load 'nope', failed to poll from model repository",
    )


def test_repository_bad_requests(
    client: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    def call(rpc: str, msg: object) -> None:
        try:
            getattr(stub, rpc)(msg)
        except grpc.RpcError as err:
            raise InferenceServerException(err.details(), status=str(err.code())) from None

    load = service_pb2.RepositoryModelLoadRequest(model_name="add_sub")
    load.parameters["config"].bool_param = True
    expect_error(
        client,
        lambda: call("RepositoryModelLoad", load),
        "INVALID_ARGUMENT",
        "invalid value type for load parameter 'config', expected string_param.",
    )
    load = service_pb2.RepositoryModelLoadRequest(model_name="add_sub")
    load.parameters["file:1/model.py"].string_param = "x"
    expect_error(
        client, lambda: call("RepositoryModelLoad", load), "INVALID_ARGUMENT", "expected bytes_param"
    )
    load = service_pb2.RepositoryModelLoadRequest(model_name="add_sub")
    load.parameters["color"].string_param = "red"
    expect_error(
        client,
        lambda: call("RepositoryModelLoad", load),
        "INVALID_ARGUMENT",
        "unrecognized load parameter 'color'.",
    )
    unload = service_pb2.RepositoryModelUnloadRequest(model_name="add_sub")
    unload.parameters["unload_dependents"].string_param = "yes"
    expect_error(
        client, lambda: call("RepositoryModelUnload", unload), "INVALID_ARGUMENT", "expected bool_param"
    )
    for rpc, msg in (
        ("RepositoryIndex", service_pb2.RepositoryIndexRequest(repository_name="other")),
        ("RepositoryModelLoad", service_pb2.RepositoryModelLoadRequest(repository_name="o", model_name="m")),
        (
            "RepositoryModelUnload",
            service_pb2.RepositoryModelUnloadRequest(repository_name="o", model_name="m"),
        ),
    ):
        expect_error(
            client,
            lambda rpc=rpc, msg=msg: call(rpc, msg),
            "UNIMPLEMENTED",
            "'repository_name' specification is not supported",
        )


# -- logging, trace, shared memory ------------------------------------------------------------------
def test_log_settings(
    client: grpcclient.InferenceServerClient,
    server: GrpcServerThread,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    settings = client.get_log_settings(as_json=True)["settings"]
    assert settings["log_info"] == {"bool_param": True}
    assert settings["log_format"] == {"string_param": "default"}
    updated = client.update_log_settings({"log_verbose_level": 2, "log_info": False}, as_json=True)
    assert updated["settings"]["log_verbose_level"] == {"uint32_param": 2}
    assert server.dataplane.log_settings["log_info"] is False
    client.update_log_settings({"log_info": True, "log_verbose_level": 0})
    bad = service_pb2.LogSettingsRequest()
    bad.settings["log_info"].string_param = "yes"
    with pytest.raises(grpc.RpcError) as info:
        stub.LogSettings(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.details() == "expect boolean for 'log_info'"  # type: ignore[attr-defined]
    expect_error(
        client,
        lambda: client.update_log_settings({"log_format": "xml"}),
        "INVALID_ARGUMENT",
        "invalid argument for log_format, got: xml",
    )
    expect_error(
        client,
        lambda: client.update_log_settings({"log_file": "/tmp/x"}),
        "UNIMPLEMENTED",
        "log file location can not be updated through network protocol",
    )


def test_trace_settings(client: grpcclient.InferenceServerClient) -> None:
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"] == {"value": ["OFF"]} and settings["trace_rate"] == {"value": ["1000"]}
    client.update_trace_settings(settings={"trace_rate": "7", "trace_level": ["TIMESTAMPS"]})
    model = client.update_trace_settings("identity_fp32", {"trace_count": "5"}, as_json=True)["settings"]
    assert model["trace_count"] == {"value": ["5"]} and model["trace_rate"] == {"value": ["7"]}
    client.update_trace_settings("identity_fp32", {"trace_count": None})  # clear: back to global
    model = client.get_trace_settings("identity_fp32", as_json=True)["settings"]
    assert model["trace_count"] == {"value": ["-1"]}
    client.update_trace_settings(settings={"trace_rate": None, "trace_level": None})
    assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"] == {"value": ["1000"]}
    expect_error(
        client,
        lambda: client.get_trace_settings("missing"),
        "INVALID_ARGUMENT",
        "Request for unknown model : missing",
    )
    expect_error(
        client,
        lambda: client.update_trace_settings(settings={"trace_rate": "fast"}),
        "INVALID_ARGUMENT",
        "Unable to parse 'trace_rate', got: fast",
    )
    expect_error(
        client,
        lambda: client.update_trace_settings(settings={"trace_level": ["OFF", "TENSORS"]}),
        "INVALID_ARGUMENT",
        "Expect only one trace level 'OFF' is specified",
    )
    expect_error(
        client,
        lambda: client.update_trace_settings(settings={"trace_file": "x"}),
        "UNIMPLEMENTED",
        "trace file location can not be updated",
    )


def test_shared_memory_is_not_supported(client: grpcclient.InferenceServerClient) -> None:
    assert client.get_system_shared_memory_status(as_json=True) == {}
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory("r")
    expect_error(
        client,
        lambda: client.register_system_shared_memory("r", "/r", 64),
        "UNIMPLEMENTED",
        "failed to register system shared memory region: 'r', shared memory is not supported",
    )
    expect_error(
        client,
        lambda: client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 64),
        "INVALID_ARGUMENT",
        "GPUs not supported",
    )
    expect_error(
        client,
        lambda: client.get_system_shared_memory_status("r"),
        "NOT_FOUND",
        "Unable to find system shared memory region: 'r'",
    )


# -- inference ---------------------------------------------------------------------------------------
def test_infer_add_sub_with_id_outputs_and_parameters(client: grpcclient.InferenceServerClient) -> None:
    a = np.random.rand(1, 16).astype(np.float32)
    b = np.random.rand(1, 16).astype(np.float32)
    inputs = [fp32_input("INPUT0", a), fp32_input("INPUT1", b)]
    result = client.infer(
        "add_sub",
        inputs,
        model_version="1",
        request_id="req-7",
        outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
        parameters={"s": "x", "flag": True, "n": 3, "f": 1.5},
        priority=2,
        timeout=5000,
    )
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    response = result.get_response()
    assert response.id == "req-7" and response.model_name == "add_sub" and response.model_version == "1"
    params = response.parameters
    assert params["s"].string_param == "x" and params["flag"].bool_param and params["n"].int64_param == 3
    assert params["f"].double_param == 1.5 and params["priority"].int64_param == 2
    assert params["timeout"].int64_param == 5000
    both = client.infer("add_sub", inputs, sequence_id=9, sequence_start=True, sequence_end=True)
    np.testing.assert_allclose(both.as_numpy("OUTPUT0"), a + b)
    assert both.get_response().parameters["sequence_id"].int64_param == 9


def test_classification(client: grpcclient.InferenceServerClient, server: GrpcServerThread) -> None:
    array = np.array([[0.1, 0.9, 0.5] + [0.0] * 13], dtype=np.float32)
    result = client.infer(
        "identity_fp32", [fp32_input(array=array)], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", 2)]
    )
    assert result.as_numpy("OUTPUT0").tolist() == [[b"0.900000:1", b"0.500000:2"]]
    last = server.registry.models["identity_fp32"].last_request
    assert last is not None and last.outputs[0].parameters == {"class_count": 2}


NUMERIC = {
    "BOOL": np.array([[True, False]]),
    "INT8": np.array([[-128, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
    "UINT8": np.array([[0, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 2**64 - 1]], dtype=np.uint64),
    "FP16": np.array([[0.5, -65504.0]], dtype=np.float16),
    "FP32": np.array([[0.5, -3.4e38]], dtype=np.float32),
    "FP64": np.array([[0.5, -1e308]], dtype=np.float64),
    "BYTES": np.array([[b"", "ünï".encode()], [b"\x00", b"x" * 1000]], dtype=np.object_),
}


@pytest.mark.parametrize("datatype", list(NUMERIC))
def test_every_datatype_raw(client: grpcclient.InferenceServerClient, datatype: str) -> None:
    array = NUMERIC[datatype]
    tensor = grpcclient.InferInput("INPUT0", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer("echo", [tensor])
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == array.dtype and out.tolist() == array.tolist()


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


@pytest.mark.parametrize("datatype", list(CONTENT_FIELD))
def test_every_datatype_typed_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    """Typed ``contents`` in, raw ``raw_output_contents`` out (what Triton does)."""
    array = NUMERIC[datatype]
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, CONTENT_FIELD[datatype]).extend(array.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    assert len(response.raw_output_contents) == 1
    out = grpcclient.InferResult(response).as_numpy("OUTPUT0")
    assert out.dtype == array.dtype and out.tolist() == array.tolist()


def test_bytes_identity(client: grpcclient.InferenceServerClient) -> None:
    array = np.array(["a", "ünïcode", "", "x" * 70000], dtype=np.object_)
    tensor = grpcclient.InferInput("INPUT0", [4], "BYTES")
    tensor.set_data_from_numpy(array)
    out = client.infer("identity_bytes", [tensor]).as_numpy("OUTPUT0")
    assert out.tolist() == [s.encode() for s in array]


def test_gzip_compressed_request(client: grpcclient.InferenceServerClient) -> None:
    array = np.zeros((1, 16), dtype=np.float32)
    result = client.infer("identity_fp32", [fp32_input(array=array)], compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


# -- bad requests ------------------------------------------------------------------------------------
def _raw(model: str, datatype: str, shape: list[int], raw: bytes | None) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def _typed(model: str, datatype: str, field: str, values: list[object]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 16])
    getattr(tensor.contents, field).extend(values)
    return request


def _with_raw_and_contents() -> service_pb2.ModelInferRequest:
    request = _typed("identity_fp32", "FP32", "fp32_contents", [0.0] * 16)
    request.raw_input_contents.append(b"\0" * 64)
    return request


def _renamed(request: service_pb2.ModelInferRequest, name: str) -> service_pb2.ModelInferRequest:
    request.inputs[0].name = name
    return request


def _bad_param() -> service_pb2.ModelInferRequest:
    request = _raw("identity_fp32", "FP32", [1, 16], b"\0" * 64)
    request.parameters["sequence_id"].bool_param = True
    return request


BAD_INFER = [
    (
        "raw size",
        _raw("identity_fp32", "FP32", [1, 16], b"\0" * 60),
        "INVALID_ARGUMENT",
        "input byte size mismatch for input 'INPUT0' for model 'identity_fp32'. Expected 64, got 60",
    ),
    (
        "missing data",
        _raw("identity_fp32", "FP32", [1, 16], None),
        "INVALID_ARGUMENT",
        "unable to find data for input tensor 'INPUT0' for model 'identity_fp32' in request.",
    ),
    (
        "bad datatype name",
        _raw("identity_fp32", "FLOAT32", [1, 16], b"\0" * 64),
        "INVALID_ARGUMENT",
        "invalid datatype 'FLOAT32' for input 'INPUT0' for model 'identity_fp32'",
    ),
    (
        "negative dim",
        _raw("identity_fp32", "FP32", [-1, 16], b""),
        "INVALID_ARGUMENT",
        "invalid shape [-1, 16] for input 'INPUT0' for model 'identity_fp32'",
    ),
    (
        "raw and contents",
        _with_raw_and_contents(),
        "INVALID_ARGUMENT",
        "contents field must not be specified when using raw_input_contents for 'INPUT0'",
    ),
    (
        "typed wrong field",
        _typed("identity_fp32", "FP32", "int_contents", [1] * 16),
        "INVALID_ARGUMENT",
        "unexpected explicit tensor data for input tensor 'INPUT0' for model 'identity_fp32' of type "
        "'INT32', expected datatype 'FP32'",
    ),
    (
        "typed count",
        _typed("identity_fp32", "FP32", "fp32_contents", [1.0] * 15),
        "INVALID_ARGUMENT",
        "input byte size mismatch for input 'INPUT0' for model 'identity_fp32'. Expected 64, got 60",
    ),
    (
        "bytes malformed",
        _raw("identity_bytes", "BYTES", [2], b"\x03\0\0\0abc\x09\0\0\0x"),
        "INVALID_ARGUMENT",
        "incomplete string data for inference input 'INPUT0' for model 'identity_bytes', "
        "expecting string of length 9 but only 1 bytes available",
    ),
    (
        "bytes count",
        _raw("identity_bytes", "BYTES", [3], b"\x01\0\0\0a"),
        "INVALID_ARGUMENT",
        "expected 3 string elements for inference input 'INPUT0' for model 'identity_bytes', got 1",
    ),
    (
        "parameter type",
        _bad_param(),
        "INVALID_ARGUMENT",
        "invalid value type for 'sequence_id' parameter, expected int64_param or string_param.",
    ),
    # model-level mistakes: the dataplane's errors, mapped by their codes
    (
        "unknown input",
        _renamed(_raw("identity_fp32", "FP32", [1, 16], b"\0" * 64), "INPUTX"),
        "INVALID_ARGUMENT",
        "unexpected inference input 'INPUTX' for model 'identity_fp32'",
    ),
    (
        "wrong datatype",
        _raw("identity_fp32", "INT32", [1, 16], b"\0" * 64),
        "INVALID_ARGUMENT",
        "inference input 'INPUT0' data-type is 'INT32', but model 'identity_fp32' expects 'FP32'",
    ),
    (
        "wrong shape",
        _raw("identity_fp32", "FP32", [1, 8], b"\0" * 32),
        "INVALID_ARGUMENT",
        "unexpected shape for input 'INPUT0' for model 'identity_fp32'. Expected [-1, 16], got [1, 8]",
    ),
    (
        "unknown model",
        _raw("nobody", "FP32", [1, 16], b"\0" * 64),
        "NOT_FOUND",
        "Request for unknown model: 'nobody' is not found",
    ),
    (
        "model raises",
        _raw("broken", "FP32", [2], b"\0" * 8),
        "INTERNAL",
        "ZeroDivisionError: division by zero",
    ),
]


@pytest.mark.parametrize(("case", "request_msg", "code", "message"), BAD_INFER, ids=[b[0] for b in BAD_INFER])
def test_bad_infer_requests(
    client: grpcclient.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    case: str,
    request_msg: service_pb2.ModelInferRequest,
    code: str,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_msg)
    err = info.value
    assert err.code().name == code, err  # type: ignore[attr-defined]
    assert message in err.details(), err.details()  # type: ignore[attr-defined]
    assert "Traceback" not in err.details()  # type: ignore[attr-defined]
    assert_identity_works(client)


def test_bad_shape_from_tritonclient(client: grpcclient.InferenceServerClient) -> None:
    tensor = fp32_input()
    tensor.set_shape([1, 15])  # 64 bytes of data for a [1, 15] tensor
    expect_error(
        client,
        lambda: client.infer("identity_fp32", [tensor]),
        "INVALID_ARGUMENT",
        "input byte size mismatch for input 'INPUT0' for model 'identity_fp32'. Expected 60, got 64",
    )


def test_garbage_and_unknown_methods(
    client: grpcclient.InferenceServerClient, server: GrpcServerThread
) -> None:
    with grpc.insecure_channel(server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "failed to parse ModelInferRequest" in info.value.details()  # type: ignore[attr-defined]
        meta = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
        with pytest.raises(grpc.RpcError) as info:
            meta(b"\x0a\x05")  # a truncated field
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "failed to parse ModelMetadataRequest" in info.value.details()  # type: ignore[attr-defined]
        unknown = channel.unary_unary("/inference.GRPCInferenceService/NoSuchRpc")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert_identity_works(client)
