"""Workload building and wire forms, the HPACK bits and the Poisson schedule: no server needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from elastiserve.loadgen.grpc_driver import HpackDecoder, encode_request_headers, status_kind
from elastiserve.loadgen.http_driver import build_requests, parse_http_url
from elastiserve.loadgen.runner import poisson_schedule
from elastiserve.loadgen.workload import WorkloadError, build_workload, parse_shape_option

META = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 16]}],
}


def test_shape_option_forms() -> None:
    assert parse_shape_option("INPUT0:16").dims == (16,)
    spec = parse_shape_option("x:3x224x224:fp16")
    assert (spec.name, spec.dims, spec.datatype) == ("x", (3, 224, 224), "FP16")
    assert parse_shape_option("a:1,2").dims == (1, 2)
    for bad in ("INPUT0", ":16", "x:a,b", "x:16:WHAT", "x:-1"):
        with pytest.raises(WorkloadError):
            parse_shape_option(bad)


def test_metadata_shapes_batch_and_binary_body() -> None:
    workload = build_workload("identity_fp32", metadata=META, batch_size=4, input_data="zero")
    assert workload.batched and workload.outputs == ["OUTPUT0"]
    assert workload.variants[0]["INPUT0"].shape == (4, 16)
    ((body, header_length),) = workload.http_binary_bodies()
    header = json.loads(body[:header_length])
    assert header["inputs"][0]["shape"] == [4, 16]
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 4 * 16 * 4
    assert body[header_length:] == bytes(4 * 16 * 4)
    assert header["outputs"] == [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]


def test_json_body_and_grpc_message_round_trip() -> None:
    workload = build_workload(
        "m", metadata=None, shapes=[parse_shape_option("a:2:INT32"), parse_shape_option("b:3:BYTES")], seed=3
    )
    body = json.loads(workload.http_json_bodies()[0])
    assert [i["name"] for i in body["inputs"]] == ["a", "b"]
    assert body["inputs"][0]["shape"] == [1, 2] and len(body["inputs"][1]["data"]) == 3
    request = service_pb2.ModelInferRequest.FromString(workload.grpc_messages()[0])
    assert request.model_name == "m" and list(request.inputs[0].shape) == [1, 2]
    assert np.frombuffer(request.raw_input_contents[0], "<i4").tolist() == body["inputs"][0]["data"]


def test_data_file_variants(tmp_path) -> None:
    path = tmp_path / "data.json"
    path.write_text(
        json.dumps({"data": [{"INPUT0": list(range(16))}, {"INPUT0": {"content": [1] * 16, "shape": [16]}}]})
    )
    workload = build_workload("identity_fp32", metadata=META, input_data=str(path), batch_size=2)
    assert len(workload.variants) == 2
    assert workload.variants[0]["INPUT0"].shape == (2, 16)
    assert workload.variants[1]["INPUT0"][1].tolist() == [1.0] * 16
    path.write_text(json.dumps({"data": [{"INPUT0": [1, 2, 3]}]}))
    with pytest.raises(WorkloadError, match="do not fill"):
        build_workload("identity_fp32", metadata=META, input_data=str(path))
    with pytest.raises(WorkloadError, match="no such file"):
        build_workload("identity_fp32", metadata=META, input_data=str(tmp_path / "missing.json"))
    with pytest.raises(WorkloadError, match="--shape"):
        build_workload("identity_fp32", metadata=None)


def test_gateway_prefix_and_headers_in_request_bytes() -> None:
    target = parse_http_url("http://127.0.0.1:8480/api/predict/svc/")
    assert (target.port, target.prefix) == (8480, "/api/predict/svc")
    workload = build_workload("identity_fp32", metadata=META)
    (request,) = build_requests(
        target,
        workload.infer_path(target.prefix),
        [(b"{}", 2)],
        [("Authorization", "tok")],
        "application/octet-stream",
    )
    head = request.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /api/predict/svc/v2/models/identity_fp32/infer HTTP/1.1")
    assert "Authorization: tok" in head and "Inference-Header-Content-Length: 2" in head
    for bad in ("https://x", "ftp://x"):
        with pytest.raises(ValueError):
            parse_http_url(bad)


def test_hpack_request_blocks_decode_with_table_then_by_index() -> None:
    headers = encode_request_headers("127.0.0.1:9", [("Authorization", "tok")])
    decoder = HpackDecoder()
    first = decoder.decode(headers.first)
    assert first[":path"] == "/inference.GRPCInferenceService/ModelInfer"
    assert first["authorization"] == "tok" and first[":method"] == "POST"
    assert decoder.decode(headers.steady) == first  # indexes point at what `first` added
    assert HpackDecoder().decode(headers.literal) == first
    assert status_kind({"grpc-status": "0"}) is None
    assert status_kind({"grpc-status": "5"}) == "grpc NOT_FOUND"
    assert status_kind({":status": "503"}) == "http 503"


def test_poisson_schedule_rate_and_spread() -> None:
    times = poisson_schedule(1000.0, 10.0, np.random.default_rng(1))
    assert 9700 < times.size < 10300 and times[-1] < 10.0
    gaps = np.diff(times)
    assert abs(gaps.mean() - 0.001) < 0.00005
    assert 0.9 < gaps.std() / gaps.mean() < 1.1  # exponential: coefficient of variation 1
    assert poisson_schedule(0, 1, np.random.default_rng(0)).size == 0
