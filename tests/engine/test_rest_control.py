"""Health, metadata, configuration, statistics, repository, logging, trace and shared-memory
routes, driven by tritonclient.http (and httpx where the raw response matters)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from elastiserve.engine.frontends.rest import model_config_to_json

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


@pytest.fixture()
def registry(server: ServerThread) -> Iterator[FakeRegistry]:
    reg: FakeRegistry = server.dataplane.registry  # type: ignore[assignment]
    yield reg
    for model in reg.models.values():
        model.ready = True


def url(server: ServerThread, path: str) -> str:
    return f"http://{server.url}{path}"


def test_health(
    server: ServerThread, client: httpclient.InferenceServerClient, registry: FakeRegistry
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    r = httpx.get(url(server, "/v2/health/ready"))
    assert (r.status_code, r.content) == (200, b"")
    registry.models["echo"].ready = False
    r = httpx.get(url(server, "/v2/health/ready"))
    assert (r.status_code, r.content) == (400, b"")  # Triton: 400, empty body
    assert not client.is_server_ready()
    assert client.is_server_live()
    server.dataplane.shutting_down = True
    try:
        registry.models["echo"].ready = True
        assert not client.is_server_ready()
    finally:
        server.dataplane.shutting_down = False


def test_server_metadata(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata["name"] == "elastiserve"
    assert metadata["version"] == "2.51.0"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_ready(server: ServerThread, client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("add_sub", "1")
    assert metadata["inputs"][1] == {"name": "INPUT1", "datatype": "FP32", "shape": [16]}
    assert client.get_model_metadata("identity_fp32")["inputs"][0]["shape"] == [-1, 16]
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("add_sub", "2")
    assert not client.is_model_ready("nope")
    r = httpx.get(url(server, "/v2/models/nope/ready"))
    assert r.status_code == 400 and r.json() == {"error": "Model version not ready"}
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope'"):
        client.get_model_metadata("nope")
    r = httpx.get(url(server, "/v2/models/add_sub/versions/7"))
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


def test_model_config_json_like_triton(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("identity_fp32")
    assert config["name"] == "identity_fp32"
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"  # enums as names
    assert config["input"][0]["dims"] == [16]  # int64 as numbers, not "16"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100  # uint64
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["input"][0]["format"] == "FORMAT_NONE"  # defaults included
    assert config["input"][0]["allow_ragged_batch"] is False
    assert config["platform"] == "" and config["batch_input"] == [] and config["parameters"] == {}


def test_model_config_int64_in_nested_and_map_fields() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    config = text_format.Parse(
        """
        name: "m" max_batch_size: 8
        dynamic_batching {
          priority_queue_policy { key: 1 value { default_timeout_microseconds: 123 } }
          default_queue_policy { default_timeout_microseconds: 9000000000 }
        }
        model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value { dims: [ 2, 3 ] } } } ]
        input [ { name: "x" data_type: TYPE_INT64 dims: [ -1 ] reshape { shape: [ 1, -1 ] } } ]
        """,
        ModelConfig(),
    )
    out = model_config_to_json(config)
    batching = out["dynamic_batching"]
    assert batching["priority_queue_policy"]["1"]["default_timeout_microseconds"] == 123
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 9000000000
    sequence = text_format.Parse(
        "sequence_batching { max_sequence_idle_microseconds: 5000000 }", ModelConfig()
    )
    assert model_config_to_json(sequence)["sequence_batching"]["max_sequence_idle_microseconds"] == 5000000
    assert out["model_warmup"][0]["inputs"]["x"]["dims"] == [2, 3]
    assert out["input"][0]["dims"] == [-1]
    assert out["input"][0]["reshape"]["shape"] == [1, -1]
    json.dumps(out)


def test_statistics(server: ServerThread, client: httpclient.InferenceServerClient) -> None:
    stats = client.get_inference_statistics()
    assert {s["name"] for s in stats["model_stats"]} == {"identity_fp32", "add_sub", "echo", "bytes_in"}
    one = client.get_inference_statistics("add_sub", "1")
    assert [s["name"] for s in one["model_stats"]] == ["add_sub"]
    r = httpx.get(url(server, "/v2/models/add_sub/versions/1/stats"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


def test_repository_index(
    server: ServerThread, client: httpclient.InferenceServerClient, registry: FakeRegistry
) -> None:
    registry.models["echo"].ready = False
    index = client.get_model_repository_index()
    assert {m["name"]: m["state"] for m in index}["echo"] == "UNAVAILABLE"
    r = httpx.post(url(server, "/v2/repository/index"), json={"ready": True})
    assert r.status_code == 200 and "echo" not in {m["name"] for m in r.json()}
    r = httpx.post(url(server, "/v2/repository/index"), json={"ready": "yes"})
    assert r.status_code == 400 and "Unable to parse 'ready'" in r.json()["error"]
    r = httpx.post(url(server, "/v2/repository/myrepo/index"), content=b"")
    assert r.status_code == 200


def test_load_and_unload(
    server: ServerThread, client: httpclient.InferenceServerClient, registry: FakeRegistry
) -> None:
    config = json.dumps({"name": "add_sub", "max_batch_size": 4})
    client.load_model("add_sub", config=config, files={"file:1/model.py": b"\x00binary\xff"})
    name, got_config, files = registry.loads[-1]
    assert (name, got_config, files) == ("add_sub", config, {"file:1/model.py": b"\x00binary\xff"})
    client.load_model("echo")
    assert registry.loads[-1] == ("echo", None, None)
    with pytest.raises(InferenceServerException, match="failed to load 'missing'") as info:
        client.load_model("missing")
    assert info.value.status() == "400"

    client.unload_model("echo", unload_dependents=True)
    assert registry.unloads[-1] == ("echo", True)
    assert not client.is_model_ready("echo")
    client.unload_model("echo")
    assert registry.unloads[-1] == ("echo", False)

    r = httpx.post(url(server, "/v2/repository/models/echo/load"), json={"parameters": {"config": 5}})
    assert r.status_code == 400 and "Unable to parse load parameter 'config'" in r.json()["error"]
    r = httpx.post(url(server, "/v2/repository/models/echo/load"), json={"parameters": {"file:1/m": "!!"}})
    assert r.status_code == 400 and "Unable to decode base64" in r.json()["error"]
    r = httpx.post(
        url(server, "/v2/repository/models/echo/unload"), json={"parameters": {"unload_dependents": 1}}
    )
    assert r.status_code == 400 and "unload_dependents" in r.json()["error"]
    r = httpx.post(url(server, "/v2/repository/models/echo/load"), content=b"{oops")
    assert r.status_code == 400 and "failed to parse the model control request JSON" in r.json()["error"]
    r = httpx.post(url(server, "/v2/repository/myrepo/models/echo/load"))
    assert r.status_code == 501 and r.json() == {"error": "'repository_name' specification is not supported"}


def test_load_refused_outside_explicit_mode(
    client: httpclient.InferenceServerClient, registry: FakeRegistry
) -> None:
    registry.control_mode = "none"
    try:
        with pytest.raises(
            InferenceServerException, match="explicit model load / unload is not allowed"
        ) as info:
            client.load_model("echo")
        assert info.value.status() == "503"
    finally:
        registry.control_mode = "explicit"


def test_logging(server: ServerThread, client: httpclient.InferenceServerClient) -> None:
    settings = client.get_log_settings()
    assert settings == server.dataplane.log_settings
    updated = client.update_log_settings(
        {"log_verbose_level": 2, "log_info": False, "log_format": "ISO8601", "log_file": None, "unknown": 1}
    )
    assert updated["log_verbose_level"] == 2 and updated["log_info"] is False
    assert server.dataplane.log_settings["log_format"] == "ISO8601"
    for body, fragment in [
        ({"log_info": "no"}, "Unable to parse 'log_info'"),
        ({"log_verbose_level": -1}, "log_verbose_level"),
        ({"log_format": "fancy"}, "invalid argument for --log_format, got: fancy"),
    ]:
        r = httpx.post(url(server, "/v2/logging"), json=body)
        assert r.status_code == 400 and fragment in r.json()["error"]
    assert server.dataplane.log_settings["log_verbose_level"] == 2  # a bad update changes nothing
    client.update_log_settings({"log_verbose_level": 0, "log_info": True, "log_format": "default"})


def test_trace_settings(server: ServerThread, client: httpclient.InferenceServerClient) -> None:
    settings = client.get_trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_rate"] == "1000"
    updated = client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "5"})
    assert updated["trace_level"] == ["TIMESTAMPS"] and updated["trace_rate"] == "5"
    model = client.update_trace_settings("add_sub", {"trace_count": "10"})
    assert model["trace_count"] == "10" and model["trace_rate"] == "5"  # inherits the global ones
    assert client.get_trace_settings()["trace_count"] == "-1"
    cleared = client.update_trace_settings("add_sub", {"trace_count": None})
    assert cleared["trace_count"] == "-1"
    with pytest.raises(InferenceServerException, match="Request for unknown model : nope"):
        client.get_trace_settings("nope")
    r = httpx.post(url(server, "/v2/trace/setting"), json={"trace_rate": "fast"})
    assert r.status_code == 400 and "Unable to parse 'trace_rate', got: fast" in r.json()["error"]
    r = httpx.post(url(server, "/v2/trace/setting"), json={"trace_level": ["OFF", "TENSORS"]})
    assert r.status_code == 400 and "Expect only one trace level 'OFF'" in r.json()["error"]
    client.update_trace_settings(settings={"trace_level": None, "trace_rate": None})
    assert client.get_trace_settings()["trace_level"] == ["OFF"]


def test_shared_memory_is_not_supported_cleanly(
    server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    assert client.get_system_shared_memory_status() == []
    assert client.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException, match="shared memory is not supported") as info:
        client.register_system_shared_memory("r0", "/key", 64)
    assert info.value.status() == "501"
    with pytest.raises(InferenceServerException, match="GPUs not supported"):
        client.register_cuda_shared_memory("r1", b"aGFuZGxl", 0, 64)
    client.unregister_system_shared_memory()
    client.unregister_system_shared_memory("r0")
    client.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException, match="Unable to find system shared memory region: 'r0'"):
        client.get_system_shared_memory_status("r0")
    r = httpx.post(url(server, "/v2/systemsharedmemory/register"), json={})
    assert r.status_code == 400 and "'region name' is necessary" in r.json()["error"]


def test_generate_on_a_plain_model(server: ServerThread) -> None:
    a, b = list(range(16)), [1.0] * 16
    r = httpx.post(url(server, "/v2/models/add_sub/generate"), json={"INPUT0": a, "INPUT1": b})
    assert r.status_code == 200
    assert r.json() == {
        "OUTPUT0": [x + 1.0 for x in a],
        "OUTPUT1": [x - 1.0 for x in a],
        "model_name": "add_sub",
        "model_version": "1",
    }
    r = httpx.post(url(server, "/v2/models/add_sub/generate_stream"), json={"INPUT0": a, "INPUT1": b})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.text.startswith('data: {"OUTPUT0":[1.0,') and r.text.endswith("}\n\n")
    r = httpx.post(url(server, "/v2/models/add_sub/generate"), json={"INPUT0": [1, 2]})
    assert r.status_code == 400 and "do not fit shape [16]" in r.json()["error"]
    r = httpx.post(url(server, "/v2/models/add_sub/generate"), content=b"{bad")
    assert r.status_code == 400 and "failed to parse the request JSON buffer" in r.json()["error"]
