"""Decoupled models and streaming in a real ``elastiserve serve`` process: NVIDIA's tritonclient
over gRPC ``ModelStreamInfer`` (sync and aio clients, every gRPC transport) and Triton's HTTP
``generate`` / ``generate_stream`` extension; clients that go away cancel their requests."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from elastiserve.testing import RunningEngine, running_engine
from tests.engine.decoupled_models import write_decoupled_repo

TIMEOUT = 30.0


@pytest.fixture(scope="module", params=["h2", "core", "aio"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    repo = write_decoupled_repo(tmp_path_factory.mktemp(f"streaming-{request.param}"))
    env = {"ELASTISERVE_GRPC_TRANSPORT": request.param}
    with running_engine(repo, env=env) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not http.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.is_server_ready(), server.log()
        server.repo = repo  # type: ignore[attr-defined]
        yield server


def repeat_inputs(count: int, delay_ms: int = 0, error_at: int = -1) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in (("COUNT", count), ("DELAY_MS", delay_ms), ("ERROR_AT", error_at)):
        if name != "COUNT" and value in (0, -1):
            continue
        tensor = grpcclient.InferInput(name, [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], np.int32))
        inputs.append(tensor)
    return inputs


class Collector:
    """tritonclient's stream callback: results and errors in arrival order."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.items.put((result, error))

    def take(self, n: int) -> list[tuple[Any, Any]]:
        return [self.items.get(timeout=TIMEOUT) for _ in range(n)]


def describe(item: tuple[Any, Any]) -> tuple[str, Any, bool | None]:
    """(request id, OUT value or error message, triton_final_response)."""
    result, error = item
    if error is not None:
        return ("error", str(error.message() if hasattr(error, "message") else error), None)
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param
    value = int(result.as_numpy("OUT")[0]) if any(o.name == "OUT" for o in response.outputs) else None
    return (response.id, value, final)


def wait_for(path: Path, timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.parametrize("model", ["repeat", "repeat_procs"])
def test_grpc_stream_decoupled_responses(engine: RunningEngine, model: str) -> None:
    client = grpcclient.InferenceServerClient(engine.grpc_url)
    collect = Collector()
    client.start_stream(callback=collect)
    try:
        client.async_stream_infer(model, repeat_inputs(3), request_id="three", enable_empty_final_response=True)
        got = collect.take(4)
        assert [describe(i) for i in got] == [
            ("three", 0, False),
            ("three", 1, False),
            ("three", 2, False),
            ("three", None, True),
        ]
        final = got[-1][0].get_response()
        assert (final.model_name, final.model_version, len(final.outputs)) == (model, "", 0)
        assert got[0][0].get_response().model_version == "1"
        # Zero responses: only the empty final one, and only when asked for.
        client.async_stream_infer(model, repeat_inputs(0), request_id="zero", enable_empty_final_response=True)
        assert [describe(i) for i in collect.take(1)] == [("zero", None, True)]
        client.async_stream_infer(model, repeat_inputs(0), request_id="silent")
        client.async_stream_infer(model, repeat_inputs(1), request_id="one")
        assert [describe(i) for i in collect.take(1)] == [("one", 0, False)]
        # An error mid-stream travels as error_message and the request (and stream) go on.
        client.async_stream_infer(model, repeat_inputs(3, error_at=1), request_id="err")
        assert [describe(i) for i in collect.take(3)] == [
            ("err", 0, False),
            ("error", "failed at 1", None),
            ("err", 2, False),
        ]
        # Requests that fail before running, and a model breaking the decoupled rules.
        client.async_stream_infer("missing", repeat_inputs(1), request_id="x")
        client.async_stream_infer(model, repeat_inputs(-1), request_id="x")
        messages = sorted(describe(i)[1] for i in collect.take(2))
        assert messages[1] == "Request for unknown model: 'missing' is not found"
        assert messages[0] == (
            f"Failed to process the request(s) for model '{model}_0_0', message: Python model "
            f"'{model}_0_0' is using the decoupled mode and the execute function must return None."
        ) or "is using the decoupled mode and the execute function must return None." in messages[0]
    finally:
        client.stop_stream()
    assert collect.items.empty()


def test_grpc_stream_requests_run_concurrently_and_plain_models_work(engine: RunningEngine) -> None:
    client = grpcclient.InferenceServerClient(engine.grpc_url)
    collect = Collector()
    client.start_stream(callback=collect)
    try:
        client.async_stream_infer("repeat_procs", repeat_inputs(2, delay_ms=300), request_id="slow")
        client.async_stream_infer("repeat_procs", repeat_inputs(1), request_id="fast")
        assert describe(collect.take(1)[0]) == ("fast", 0, False)
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        client.async_stream_infer("upper", [text], request_id="plain")
        result, error = collect.take(1)[0]
        assert error is None
        assert result.get_response().id == "plain"
        assert result.get_response().parameters["triton_final_response"].bool_param is True
        assert result.as_numpy("text_output").tolist() == [b"HI"]
        assert sorted(describe(i)[1] for i in collect.take(2)) == [0, 1]
    finally:
        client.stop_stream()


def test_grpc_unary_infer_on_decoupled_model_is_refused(engine: RunningEngine) -> None:
    client = grpcclient.InferenceServerClient(engine.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("repeat", repeat_inputs(1))
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert info.value.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"
    http = httpclient.InferenceServerClient(engine.http_url)
    tensor = httpclient.InferInput("COUNT", [1], "INT32")
    tensor.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as info:
        http.infer("repeat", [tensor])
    assert info.value.status() == "501"
    assert info.value.message() == "HTTP end point doesn't support models with decoupled transaction policy"


async def test_grpc_aio_stream_infer(engine: RunningEngine) -> None:
    client = grpcaio.InferenceServerClient(engine.grpc_url)

    async def requests() -> Any:
        yield {"model_name": "repeat", "inputs": repeat_inputs(2), "request_id": "a"}
        yield {"model_name": "words", "inputs": [_text("x y")], "request_id": "w"}

    try:
        got: list[tuple[str, Any, bool]] = []
        async for result, error in client.stream_infer(requests(), stream_timeout=TIMEOUT):
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.id == "a":
                got.append(("a", int(result.as_numpy("OUT")[0]), final))
            else:
                got.append(("w", result.as_numpy("text_output")[0].decode(), final))
            if len(got) == 4:
                break
        assert sorted(x for x in got if x[0] == "a") == [("a", 0, False), ("a", 1, False)]
        assert [x for x in got if x[0] == "w"] == [("w", "x", False), ("w", "y", False)]
    finally:
        await client.close()


def _text(value: str) -> grpcaio.InferInput:
    tensor = grpcaio.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return tensor


@pytest.mark.parametrize("model", ["repeat", "repeat_procs"])
def test_grpc_client_going_away_cancels_the_request(engine: RunningEngine, model: str) -> None:
    repo: Path = engine.repo  # type: ignore[attr-defined]
    client = grpcclient.InferenceServerClient(engine.grpc_url)
    collect = Collector()
    client.start_stream(callback=collect)
    rid = f"gone-{model}"
    client.async_stream_infer(model, repeat_inputs(10_000, delay_ms=10), request_id=rid)
    assert describe(collect.take(1)[0])[:2] == (rid, 0)
    client.stop_stream(cancel_requests=True)
    sent_before_cancel = int(wait_for(repo / model / f"cancelled-{rid}"))
    assert 0 < sent_before_cancel < 10_000
    # The server keeps serving, on a new stream.
    client.start_stream(callback=collect)
    try:
        client.async_stream_infer(model, repeat_inputs(1), request_id="after")
        deadline = time.monotonic() + TIMEOUT
        while True:  # responses of the cancelled request may still be in flight: skip them
            item = describe(collect.items.get(timeout=TIMEOUT))
            if item[0] == "after" or time.monotonic() > deadline:
                break
        assert item == ("after", 0, False)
    finally:
        client.stop_stream()


# -- HTTP generate extension ----------------------------------------------------------------------


def test_http_generate(engine: RunningEngine) -> None:
    base = f"http://{engine.http_url}/v2/models"
    r = httpx.post(f"{base}/words/generate", json={"text_input": "single"}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"index": 0, "model_name": "words", "model_version": "1", "params": "{}", "text_output": "single"}
    # Inputs by name, shaped by the config; other keys and "parameters" become request parameters.
    body = {"text_input": ["abc"], "scale": [1.0, 2.5], "temperature": 0.5, "parameters": {"top_k": 3}}
    r = httpx.post(f"{base}/upper/versions/1/generate", json=body, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"model_name": "upper", "model_version": "1", "text_output": "ABC", "vec": [2.0, 5.0]}
    r = httpx.post(f"{base}/words/generate", json={"text_input": "a b", "k": 1}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {
        "error": "generate expects model to produce exactly 1 response, use generate stream for model "
        "that generates various number of responses"
    }
    r = httpx.post(f"{base}/repeat/generate", json={"COUNT": 0}, timeout=TIMEOUT)
    assert r.status_code == 200 and "exactly 1 response" in r.json()["error"]
    r = httpx.post(f"{base}/upper/generate", json={}, timeout=TIMEOUT)
    assert r.status_code == 400 and "missing required input(s) ['text_input']" in r.json()["error"]
    r = httpx.post(f"{base}/upper/generate", json={"text_input": 5}, timeout=TIMEOUT)
    assert r.status_code == 400 and "BYTES values must be JSON strings" in r.json()["error"]
    r = httpx.get(f"{base}/upper/generate", timeout=TIMEOUT)
    assert r.status_code == 405
    r = httpx.post(f"{base}/missing/generate", json={"a": 1}, timeout=TIMEOUT)
    assert r.status_code == 404


def _events(text: str) -> list[Any]:
    assert text.endswith("\n\n") or text == ""
    return [json.loads(chunk.removeprefix("data: ")) for chunk in text.split("\n\n") if chunk]


def test_http_generate_stream(engine: RunningEngine) -> None:
    base = f"http://{engine.http_url}/v2/models"
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{base}/words/generate_stream", json={"text_input": "hello big world", "temp": 1})
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["transfer-encoding"] == "chunked"
        events = _events(r.text)
        assert [e["text_output"] for e in events] == ["hello", "big", "world"]
        assert events[0] == {
            "index": 0,
            "model_name": "words",
            "model_version": "1",
            "params": '{"temp": 1}',
            "text_output": "hello",
        }
        r = client.post(f"{base}/repeat_procs/generate_stream", json={"COUNT": 3, "ERROR_AT": 1})
        assert r.status_code == 200
        assert _events(r.text) == [
            {"OUT": 0, "PID": _events(r.text)[0]["PID"], "model_name": "repeat_procs", "model_version": "1"},
            {"error": "failed at 1"},
            {"OUT": 2, "PID": _events(r.text)[0]["PID"], "model_name": "repeat_procs", "model_version": "1"},
        ]
        r = client.post(f"{base}/repeat/generate_stream", json={"COUNT": 0})
        assert (r.status_code, r.text) == (200, "")
        r = client.post(f"{base}/upper/generate_stream", json={"text_input": "plain"})
        assert _events(r.text) == [
            {"model_name": "upper", "model_version": "1", "text_output": "PLAIN", "vec": [2.0, 2.0]}
        ]
        r = client.post(f"{base}/upper/generate_stream", json={"scale": [1, 2]})
        assert r.status_code == 400 and "missing required input(s)" in r.json()["error"]
        # The connection stays usable after streams (keep-alive, chunked bodies ended properly).
        assert client.get(f"http://{engine.http_url}/v2/health/ready").status_code == 200


def test_http_events_arrive_as_they_are_sent(engine: RunningEngine) -> None:
    url = f"http://{engine.http_url}/v2/models/repeat/generate_stream"
    with httpx.stream("POST", url, json={"COUNT": 3, "DELAY_MS": 300}, timeout=TIMEOUT) as response:
        start = time.monotonic()
        first_at = None
        lines = []
        for line in response.iter_lines():
            if line:
                lines.append(line)
                first_at = first_at or time.monotonic() - start
        total = time.monotonic() - start
    assert len(lines) == 3
    assert first_at is not None and first_at < total - 0.3  # the first event did not wait for the last


@pytest.mark.parametrize("model", ["repeat", "repeat_procs"])
def test_http_client_going_away_cancels_the_request(engine: RunningEngine, model: str) -> None:
    repo: Path = engine.repo  # type: ignore[attr-defined]
    rid_marker = repo / model / "cancelled-"  # HTTP generate requests have no id
    marker_before = rid_marker.exists()
    body = json.dumps({"COUNT": 10_000, "DELAY_MS": 10}).encode()
    with socket.create_connection(("127.0.0.1", engine.http_port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /v2/models/%s/generate_stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (model.encode(), len(body), body)
        )
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the first event"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    if marker_before:
        rid_marker.unlink()
    sent_before_cancel = int(wait_for(rid_marker))
    assert 0 < sent_before_cancel < 10_000
    rid_marker.unlink()
    r = httpx.post(f"http://{engine.http_url}/v2/models/{model}/generate", json={"COUNT": 1}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["OUT"] == 0


def test_statistics_count_streamed_requests(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    before = http.get_inference_statistics("words")["model_stats"][0]["inference_stats"]["success"]["count"]
    for _ in range(3):
        httpx.post(f"http://{engine.http_url}/v2/models/words/generate_stream", json={"text_input": "a b"})
    stats = http.get_inference_statistics("words")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == before + 3
    assert stats["execution_count"] >= 3


async def test_many_concurrent_streams(engine: RunningEngine) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        url = f"http://{engine.http_url}/v2/models/repeat_procs/generate_stream"
        replies = await asyncio.gather(*(client.post(url, json={"COUNT": 5}) for _ in range(20)))
    for reply in replies:
        assert [e["OUT"] for e in _events(reply.text)] == [0, 1, 2, 3, 4]
