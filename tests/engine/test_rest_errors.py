"""Bad requests: each answered with the right status and a clear ``{"error": ...}`` message,
never a traceback or a dropped connection, and the next good request on the same keep-alive
connection still works."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from .rest_fake import FakeRegistry, ServerThread, make_dataplane

DATA = np.arange(16, dtype=np.float32).tobytes()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    dataplane, _ = make_dataplane()
    srv = ServerThread(dataplane, max_body_bytes=4096).start()
    yield srv
    srv.stop()


@pytest.fixture()
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{server.url}", timeout=5) as c:
        yield c
    assert server.handle is not None


def binary_head(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    body.update(overrides)
    return json.dumps(body).encode()


def infer(
    http: httpx.Client,
    content: bytes,
    header_length: int | None = None,
    model: str = "identity_fp32",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = dict(headers or {})
    if header_length is not None:
        all_headers["Inference-Header-Content-Length"] = str(header_length)
    return http.post(f"/v2/models/{model}/infer", content=content, headers=all_headers)


def assert_good(http: httpx.Client) -> None:
    head = binary_head()
    r = infer(http, head + DATA, len(head))
    assert r.status_code == 200, r.text
    assert r.content.endswith(DATA)


def assert_error(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    assert fragment in body["error"], body["error"]
    assert "Traceback" not in body["error"]


JSON_CASES = [
    pytest.param(b"{not json", 400, "failed to parse the request JSON buffer", id="malformed-json"),
    pytest.param(b"[1, 2]", 400, "expected a JSON object", id="not-an-object"),
    pytest.param(b"{}", 400, "Unable to parse 'inputs'", id="no-inputs"),
    pytest.param(b'{"inputs": {}}', 400, "Unable to parse 'inputs'", id="inputs-not-array"),
    pytest.param(b'{"inputs": [5]}', 400, "each input must be a JSON object", id="input-not-object"),
    pytest.param(b'{"id": 5, "inputs": []}', 400, "Unable to parse 'id'", id="id-not-string"),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32"}]}',
        400,
        "Input must set only one of the following fields",
        id="no-data",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1],'
        b' "parameters": {"binary_data_size": 4}}]}',
        400,
        "But set 'data' 'binary_data_size'",
        id="data-and-binary",
    ),
    pytest.param(
        b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}',
        400,
        "Unable to parse 'name'",
        id="no-name",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "data": [1]}]}',
        400,
        "Unable to parse 'datatype'",
        id="no-datatype",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
        400,
        "Unable to parse 'shape'",
        id="negative-shape",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP99", "data": [1]}]}',
        400,
        "invalid datatype 'FP99' for input 'INPUT0'",
        id="bad-datatype",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1, 2, 3]}]}',
        400,
        "shape [1, 16] does not match the number of elements in 'data' (3 != 16)",
        id="shape-mismatch",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "INT32", "data": ["a", "b"]}]}',
        400,
        "Unable to parse 'data' of input 'INPUT0' as INT32",
        id="data-wrong-type",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3]]}]}',
        400,
        "Unable to parse 'data' of input 'INPUT0'",
        id="ragged-data",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "UINT8", "data": [300]}]}',
        400,
        "Unable to parse 'data' of input 'INPUT0' as UINT8",
        id="data-overflow",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "BYTES", "data": [1]}]}',
        400,
        "BYTES elements must be strings",
        id="bytes-not-strings",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": 1}]}',
        400,
        "expected an array",
        id="data-not-array",
    ),
    pytest.param(
        b'{"inputs": [], "parameters": {"triton_x": 1}}',
        400,
        "reserved for Triton usage",
        id="reserved-param",
    ),
    pytest.param(
        b'{"inputs": [], "parameters": {"binary_data_output": "yes"}}',
        400,
        "binary_data_output",
        id="bdo-not-bool",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1]}],'
        b' "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": 1}}]}',
        400,
        "Unable to parse 'binary_data' of output 'OUTPUT0'",
        id="binary-data-not-bool",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1]}],'
        b' "outputs": [{"name": "OUTPUT0", "parameters": {"classification": -1}}]}',
        400,
        "Unable to set 'classification'",
        id="classification-negative",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32",'
        b' "parameters": {"shared_memory_region": "r0", "shared_memory_byte_size": 4}}]}',
        400,
        "Unable to find shared memory region: 'r0'",
        id="shared-memory-input",
    ),
    pytest.param(
        b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP16", "data": [1]}]}',
        400,
        "(1 != 16)",
        id="fp16-json-mismatch",
    ),
]


@pytest.mark.parametrize(("content", "status", "fragment"), JSON_CASES)
def test_bad_json_requests(http: httpx.Client, content: bytes, status: int, fragment: str) -> None:
    assert_error(infer(http, content), status, fragment)
    assert_good(http)


def test_binary_size_larger_than_body(http: httpx.Client) -> None:
    head = binary_head()
    r = infer(http, head + DATA[:60], len(head))
    assert_error(
        r, 400, "unexpected size for input 'INPUT0', expecting 4 additional bytes for model 'identity_fp32'"
    )
    assert_good(http)


def test_binary_size_not_matching_shape(http: httpx.Client) -> None:
    head = binary_head(
        inputs=[
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 60}}
        ]
    )
    r = infer(http, head + DATA[:60], len(head))
    assert_error(
        r, 400, "input byte size mismatch for input 'INPUT0' for model 'identity_fp32'. Expected 64, got 60"
    )
    assert_good(http)


def test_extra_binary_data(http: httpx.Client) -> None:
    head = binary_head()
    r = infer(http, head + DATA + b"xx", len(head))
    assert_error(r, 400, "unexpected additional input data for model 'identity_fp32'")
    assert_good(http)


def test_binary_without_header_length(http: httpx.Client) -> None:
    head = binary_head()
    r = infer(http, head)  # binary_data_size but no Inference-Header-Content-Length
    assert_error(r, 400, "must specify valid 'Inference-Header-Content-Length'")
    assert_good(http)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("abc", "Unable to parse Inference-Header-Content-Length, got: abc"),
        ("-1", "inference header size should be in range (0, "),
        ("99999", "inference header size should be in range (0, "),
    ],
)
def test_bad_header_length(http: httpx.Client, value: str, fragment: str) -> None:
    head = binary_head()
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=head + DATA,
        headers={"Inference-Header-Content-Length": value},
    )
    assert_error(r, 400, fragment)
    assert_good(http)


def test_bytes_binary_truncated(http: httpx.Client) -> None:
    payload = b"\x05\x00\x00\x00abc"
    head = binary_head(
        inputs=[
            {
                "name": "INPUT0",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ]
    )
    r = infer(http, head + payload, len(head), model="echo")
    assert_error(r, 400, "binary BYTES data of input 'INPUT0' is truncated")
    payload = b"\x01\x00\x00\x00a\x01\x00\x00\x00b"  # two elements for a shape of one
    head = binary_head(
        inputs=[
            {
                "name": "INPUT0",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ]
    )
    r = infer(http, head + payload, len(head), model="echo")
    assert_error(r, 400, "unexpected number of string elements for input 'INPUT0'")
    assert_good(http)


def test_dataplane_errors_keep_their_status(http: httpx.Client) -> None:
    head = binary_head()
    assert_error(infer(http, head + DATA, len(head), model="nope"), 404, "Request for unknown model: 'nope'")
    bad_output = binary_head(outputs=[{"name": "NOPE"}])
    assert_error(infer(http, bad_output + DATA, len(bad_output)), 400, "unexpected inference output 'NOPE'")
    fp64 = binary_head(
        inputs=[
            {"name": "INPUT0", "shape": [1, 8], "datatype": "FP64", "parameters": {"binary_data_size": 64}}
        ]
    )
    assert_error(infer(http, fp64 + DATA, len(fp64)), 400, "data-type is 'FP64'")
    assert_good(http)


def test_model_failure_is_500_without_traceback(server: ServerThread, http: httpx.Client) -> None:
    registry: FakeRegistry = server.dataplane.registry  # type: ignore[assignment]
    model = registry.models["add_sub"]
    original = model.fn
    model.fn = lambda arrays: {"OUTPUT0": 1 // 0}
    try:
        head = binary_head(
            inputs=[
                {"name": n, "shape": [16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}
                for n in ("INPUT0", "INPUT1")
            ],
            outputs=[],
        )
        assert_error(
            infer(http, head + DATA * 2, len(head), model="add_sub"),
            500,
            "internal error: ZeroDivisionError: integer division or modulo by zero",
        )
    finally:
        model.fn = original
    assert_good(http)


def test_sync_route_failure_is_500(
    server: ServerThread, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str, version: str = "") -> dict[str, Any]:
        raise RuntimeError("metadata store fell over")

    monkeypatch.setattr(server.dataplane, "model_metadata", broken)
    assert_error(
        http.get("/v2/models/add_sub"), 500, "internal error: RuntimeError: metadata store fell over"
    )
    monkeypatch.undo()
    assert http.get("/v2/models/add_sub").status_code == 200
    assert_good(http)


def test_body_over_limit_is_413_and_connection_survives(http: httpx.Client) -> None:
    r = http.post("/v2/models/identity_fp32/infer", content=b"x" * 5000)
    assert_error(r, 413, "request body exceeds the limit of 4096 bytes")
    assert_good(http)
    # A chunked body (no Content-Length) that grows over the limit.
    r = http.post("/v2/models/identity_fp32/infer", content=iter([b"x" * 3000, b"y" * 3000]))
    assert_error(r, 413, "request body exceeds the limit of 4096 bytes")
    assert_good(http)


def test_decompressed_body_over_limit(http: httpx.Client) -> None:
    bomb = gzip.compress(b"\0" * 100_000)
    assert len(bomb) < 4096
    r = http.post("/v2/models/identity_fp32/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert_error(r, 413, "decompressed request body exceeds the limit of 4096 bytes")
    assert_good(http)


def test_bad_compression(http: httpx.Client) -> None:
    r = http.post("/v2/models/identity_fp32/infer", content=b"{}", headers={"Content-Encoding": "br"})
    assert_error(r, 501, "Unsupported compression type")
    assert r.headers["accept-encoding"] == "gzip, deflate"
    r = http.post("/v2/models/identity_fp32/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert_error(r, 400, "unable to decompress the gzip request body")
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=gzip.compress(b"{}")[:-6],
        headers={"Content-Encoding": "gzip"},
    )
    assert_error(r, 400, "truncated gzip request body")
    assert_good(http)


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v2/models/identity_fp32/infer", 405, "Method Not Allowed"),
        ("POST", "/v2/models/identity_fp32", 405, "Method Not Allowed"),
        ("POST", "/v2/models/identity_fp32/config", 405, "Method Not Allowed"),
        ("PUT", "/v2/logging", 405, "Method Not Allowed"),
        ("GET", "/v2/repository/index", 405, "Method Not Allowed"),
        ("GET", "/v2/repository/models/add_sub/load", 405, "Method Not Allowed"),
        ("DELETE", "/v2/trace/setting", 405, "Method Not Allowed"),
        ("POST", "/v2/models/stats", 405, "Method Not Allowed"),
        ("POST", "/v2/systemsharedmemory/status", 405, "Method Not Allowed"),
        ("GET", "/v2/cudasharedmemory/register", 405, "Method Not Allowed"),
        ("GET", "/v2/nothing", 404, "Not Found"),
        ("GET", "/", 404, "Not Found"),
        ("GET", "/v2/models/identity_fp32/versions/abc", 404, "Not Found"),
        ("GET", "/v2/models/identity_fp32/bogus", 404, "Not Found"),
        ("GET", "/v2/models/identity_fp32/", 404, "Not Found"),
        ("GET", "/v2/models/identity_fp32/versions/1/trace/setting", 404, "Not Found"),
        ("GET", "/v2/repository/models/x/frob", 404, "Not Found"),
        ("GET", "/v2/systemsharedmemory/region/r/frob", 404, "Not Found"),
    ],
)
def test_routes_and_methods(http: httpx.Client, method: str, path: str, status: int, message: str) -> None:
    r = http.request(method, path)
    assert r.status_code == status
    assert r.json() == {"error": message}
    assert_good(http)


def test_health_wrong_method(http: httpx.Client) -> None:
    r = http.post("/v2/health/live")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    assert_good(http)
