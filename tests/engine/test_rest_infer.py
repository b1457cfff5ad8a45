"""Inference over the REST frontend, driven by NVIDIA's tritonclient (sync and aio) and httpx."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from .rest_fake import FakeRegistry, ServerThread, make_dataplane


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    dataplane, _ = make_dataplane()
    srv = ServerThread(dataplane).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.url)
    yield c
    c.close()


def registry(server: ServerThread) -> FakeRegistry:
    return server.dataplane.registry  # type: ignore[return-value]


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_identity_fp32(client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool) -> None:
    x = np.random.default_rng(0).random((2, 16), dtype=np.float32)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)
    result = client.infer("identity_fp32", [_input("INPUT0", x, "FP32", binary_in)], outputs=[out])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    output = result.get_output("OUTPUT0")
    assert output["shape"] == [2, 16] and output["datatype"] == "FP32"
    if binary_out:
        assert output["parameters"] == {"binary_data_size": 128}
    else:
        assert len(output["data"]) == 32  # always a flat list


def test_add_sub_and_default_binary_outputs(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.float32)
    b = np.ones(16, dtype=np.float32)
    # No outputs requested: tritonclient sets binary_data_output, every output comes back binary.
    result = client.infer("add_sub", [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_request_id_and_response_parameters(
    server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    model = registry(server).models["identity_fp32"]
    model.response_parameters = {"sequence_end": True, "note": "hi", "n": 3}
    try:
        x = np.zeros((1, 16), dtype=np.float32)
        result = client.infer(
            "identity_fp32", [_input("INPUT0", x, "FP32")], request_id="req-42", parameters={"custom": 7}
        )
    finally:
        model.response_parameters = {}
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == "identity_fp32" and response["model_version"] == "1"
    assert response["parameters"] == {"sequence_end": True, "note": "hi", "n": 3}
    assert model.last_request is not None and model.last_request.parameters["custom"] == 7


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(client: httpclient.InferenceServerClient, binary: bool) -> None:
    words = np.array([b"hello", b"", "wörld".encode(), b"x" * 300], dtype=np.object_).reshape(2, 2)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer("echo", [_input("INPUT0", words, "BYTES", binary)], outputs=[out])
    got = result.as_numpy("OUTPUT0")
    assert got.shape == (2, 2)
    assert [v if isinstance(v, bytes) else v.encode() for v in got.reshape(-1)] == list(words.reshape(-1))


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("FP16", np.array([[0.5, -1.25, 65504.0]], dtype=np.float16)),
        ("BOOL", np.array([True, False, True])),
        ("INT64", np.array([[-(2**62), 0, 2**62]], dtype=np.int64)),
        ("UINT8", np.array([0, 7, 255], dtype=np.uint8)),
        ("FP64", np.array([1e-300, 3.5], dtype=np.float64)),
        ("INT8", np.array([-128, 127], dtype=np.int8)),
    ],
)
def test_datatypes_round_trip(
    client: httpclient.InferenceServerClient, datatype: str, array: np.ndarray, binary: bool
) -> None:
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer("echo", [_input("INPUT0", array, datatype, binary)], outputs=[out])
    got = result.as_numpy("OUTPUT0")
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


def test_classification_is_passed_through(
    server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    x = np.array([[0.1, 0.9, 0.3] + [0.0] * 13], dtype=np.float32)
    out = httpclient.InferRequestedOutput("OUTPUT0", class_count=2)
    result = client.infer("identity_fp32", [_input("INPUT0", x, "FP32")], outputs=[out])
    request = registry(server).models["identity_fp32"].last_request
    assert request is not None
    assert request.outputs[0].parameters["classification"] == 2
    assert request.outputs[0].parameters["class_count"] == 2
    labels = result.as_numpy("OUTPUT0")
    assert labels.shape == (1, 2)
    assert labels[0, 0].decode().endswith(":1") and labels[0, 1].decode().endswith(":2")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_response(client: httpclient.InferenceServerClient, algorithm: str) -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    result = client.infer(
        "identity_fp32",
        [_input("INPUT0", x, "FP32")],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def test_gzip_header_length_is_uncompressed(server: ServerThread) -> None:
    data = np.arange(16, dtype=np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 64},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    r = httpx.post(
        f"http://{server.url}/v2/models/identity_fp32/infer",
        content=head + data,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Accept-Encoding": "gzip;q=0.9, deflate;q=0.5",
        },
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    body = r.content  # httpx already decompressed it
    header_length = int(r.headers["inference-header-content-length"])
    response = json.loads(body[:header_length])
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 64
    assert body[header_length:] == data
    # Compressed by hand, both ways.
    raw = httpx.post(
        f"http://{server.url}/v2/models/identity_fp32/infer",
        content=gzip.compress(head + data),
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "gzip"},
    )
    assert raw.status_code == 200, raw.text
    raw = httpx.post(
        f"http://{server.url}/v2/models/identity_fp32/infer",
        content=zlib.compress(head + data),
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "deflate"},
    )
    assert raw.status_code == 200, raw.text


def test_raw_binary_request(server: ServerThread) -> None:
    """An infer body with no JSON header is the model's only input; outputs come back binary."""
    data = np.arange(16, dtype=np.float32)
    r = httpx.post(
        f"http://{server.url}/v2/models/identity_fp32/infer",
        content=data.tobytes(),
        headers={"Inference-Header-Content-Length": "0"},
    )
    assert r.status_code == 200, r.text
    header_length = int(r.headers["inference-header-content-length"])
    response = json.loads(r.content[:header_length])
    assert response["outputs"][0]["shape"] == [1, 16]
    assert np.frombuffer(r.content[header_length:], np.float32).tolist() == data.tolist()
    # A model with two inputs cannot take a raw request.
    r = httpx.post(
        f"http://{server.url}/v2/models/add_sub/infer",
        content=data.tobytes() * 2,
        headers={"Inference-Header-Content-Length": "0"},
    )
    assert r.status_code == 400 and "Raw request must only have 1 input" in r.json()["error"]


def test_json_nested_data_and_flat_output(server: ServerThread) -> None:
    body = {
        "id": "nested",
        "inputs": [{"name": "INPUT0", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}],
        "outputs": [{"name": "OUTPUT0"}],
    }
    r = httpx.post(f"http://{server.url}/v2/models/echo/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "id": "nested",
        "model_name": "echo",
        "model_version": "1",
        "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]}],
    }


def test_binary_bytes_wire_format(server: ServerThread) -> None:
    elements = [b"ab", b"", b"\xff\x00"]
    payload = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = httpx.post(
        f"http://{server.url}/v2/models/echo/infer",
        content=head + payload,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 200, r.text
    header_length = int(r.headers["inference-header-content-length"])
    assert r.content[header_length:] == payload
    # Non-UTF-8 bytes cannot go out as JSON strings: a clear error, not mojibake.
    head2 = head.replace(b'"binary_data": true', b'"binary_data": false')
    r = httpx.post(
        f"http://{server.url}/v2/models/echo/infer",
        content=head2 + payload,
        headers={"Inference-Header-Content-Length": str(len(head2))},
    )
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]


def test_binary_inputs_are_views_over_the_body(
    server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    client.infer("identity_fp32", [_input("INPUT0", x, "FP32")])
    request = registry(server).models["identity_fp32"].last_request
    assert request is not None
    data = request.inputs[0].data
    assert data is not None and data.base is not None and not data.flags.owndata


async def test_aio_client(server: ServerThread) -> None:
    async with aioclient.InferenceServerClient(server.url) as c:
        assert await c.is_server_live() and await c.is_server_ready()
        assert await c.is_model_ready("add_sub")
        metadata = await c.get_model_metadata("add_sub")
        assert [i["name"] for i in metadata["inputs"]] == ["INPUT0", "INPUT1"]
        a = np.full(16, 2, dtype=np.float32)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = aioclient.InferInput(name, [16], "FP32")
            t.set_data_from_numpy(a)
            inputs.append(t)
        outputs = [
            aioclient.InferRequestedOutput("OUTPUT0"),
            aioclient.InferRequestedOutput("OUTPUT1", binary_data=False),
        ]
        result = await c.infer("add_sub", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a * 0)
        config = await c.get_model_config("add_sub")
        assert config["input"][0]["dims"] == [16]
        stats = await c.get_inference_statistics("add_sub")
        assert stats["model_stats"][0]["name"] == "add_sub"


def test_many_requests_keep_alive(client: httpclient.InferenceServerClient) -> None:
    x = np.ones((1, 16), dtype=np.float32)
    tensor = _input("INPUT0", x, "FP32")
    for _ in range(200):
        result = client.infer("identity_fp32", [tensor])
        assert result.as_numpy("OUTPUT0")[0, 0] == 1.0


def test_encode_odd_outputs() -> None:
    """Backends may hand back non-contiguous, big-endian or fixed-width-bytes arrays."""
    from elastiserve.engine.frontends.rest import encode_infer_response
    from elastiserve.types import InferResponse, InferTensor

    strided = np.arange(12, dtype=np.int32).reshape(3, 4)[:, 1]
    big_endian = np.arange(3, dtype=">f4")
    fixed = np.array([b"ab", b"c"], dtype="S2")
    response = InferResponse(
        "m",
        "1",
        [
            InferTensor("A", "INT32", [3], strided),
            InferTensor("B", "FP32", [3], big_endian),
            InferTensor("C", "BYTES", [2], fixed),
        ],
        parameters={"score": np.float32(0.5), "count": np.int64(2)},
    )
    body = encode_infer_response(response, False, None).body
    decoded = json.loads(body)
    assert [o["data"] for o in decoded["outputs"]] == [[1, 5, 9], [0.0, 1.0, 2.0], ["ab", "c"]]
    assert decoded["parameters"] == {"score": 0.5, "count": 2}
    binary = encode_infer_response(response, True, None)
    parts = binary.body
    assert isinstance(parts, list)
    assert bytes(parts[1]) == np.array([1, 5, 9], dtype="<i4").tobytes()
    assert bytes(parts[2]) == np.arange(3, dtype="<f4").tobytes()
    assert parts[3] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_versioned_and_percent_encoded_routes(
    server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    x = np.ones((1, 16), dtype=np.float32)
    result = client.infer("identity_fp32", [_input("INPUT0", x, "FP32")], model_version="1")
    assert result.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("identity_fp32", [_input("INPUT0", x, "FP32")], model_version="3")
    assert httpx.get(f"http://{server.url}/v2/models/identity%5Ffp32/ready").status_code == 200
    assert httpx.get(f"http://{server.url}/v2/models/identity_fp32/ready?x=1").status_code == 200
