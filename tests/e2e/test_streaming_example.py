"""The streaming example (examples/streaming): a decoupled model that classifies a signal chunk
by chunk through an ensemble (feature extractor → classifier) called with BLS, driven by the
example's own client over gRPC streaming and by ``generate_stream`` over HTTP."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import tritonclient.http as httpclient

from elastiserve.testing import RunningEngine, running_engine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "streaming"


def _client_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streaming_client", EXAMPLE / "client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine() -> Iterator[RunningEngine]:
    with running_engine(EXAMPLE / "models") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not client.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_server_ready(), server.log()
        yield server


def test_every_chunk_is_classified_and_answers_stream_in(engine: RunningEngine) -> None:
    client = _client_module()
    audio, truth = client.synthetic_recording(3.0)
    result = client.classify_stream(engine.grpc_url, audio, timeout=30)
    assert result.errors == []
    assert result.finished > 0, "no final response"
    assert [result.labels.get(i) for i in range(len(truth))] == truth
    # Streamed, not collected: answers arrive in order, the first well before the last.
    arrivals = [result.arrival[i] for i in range(len(truth))]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] < arrivals[-1] / 2, (arrivals[0], arrivals[-1])


def test_the_client_script_runs_and_checks_itself(engine: RunningEngine) -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLE / "client.py"), "--url", engine.grpc_url, "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "31/31 chunks answered, 0 wrong" in run.stdout


def test_the_pipeline_as_http_server_sent_events(engine: RunningEngine) -> None:
    client = _client_module()
    audio, truth = client.synthetic_recording(0.5)
    events = []
    with httpx.stream(
        "POST",
        f"http://{engine.http_url}/v2/models/stream_classifier/generate_stream",
        json={"AUDIO": audio.tolist()},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:") :]))
    assert [e.get("LABEL") for e in events] == truth, events[:3]
    assert [e.get("INDEX") for e in events] == list(range(len(truth)))
