"""Python models in a real ``elastiserve serve`` process, driven by NVIDIA's tritonclient:
in-process and worker-process instances, BLS through the engine's dataplane, clean shutdown."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from elastiserve.testing import RunningEngine, running_engine

from .python_backend_support import ADD_SUB_MODEL, add_sub_config, write_model

PID_MODEL = """
import json
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            info = json.dumps({"pid": os.getpid(), "instance": self.args["model_instance_name"]})
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", x * 2),
                pb_utils.Tensor("OUTPUT1", np.array([[info.encode()]], dtype=np.object_)),
            ]))
        return out

    def finalize(self):
        name = "finalized-" + self.args["model_instance_name"]
        open(os.path.join(self.args["model_repository"], name), "w").close()
"""

PID_CONFIG = """
name: "workers" backend: "python" max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "OUTPUT1" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

BLS_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            answer = pb_utils.InferenceRequest(
                model_name="add_sub",
                inputs=[request.inputs()[0], pb_utils.Tensor("INPUT1", request.inputs()[1].as_numpy())],
                requested_output_names=["OUTPUT0"],
            ).exec()
            if answer.has_error():
                out.append(pb_utils.InferenceResponse(error=answer.error()))
                continue
            total = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", total), pb_utils.Tensor("OUTPUT1", total * 0)
            ]))
        return out
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pyrepo")
    write_model(root, "add_sub", ADD_SUB_MODEL)
    write_model(root, "workers", PID_MODEL, PID_CONFIG)
    write_model(root, "bls", BLS_MODEL, add_sub_config("bls"))
    process = 'parameters { key: "execution_mode" value { string_value: "process" } }'
    write_model(root, "bls_proc", BLS_MODEL, add_sub_config("bls_proc", extra=process))
    return root


@pytest.fixture(scope="module")
def engine(repo: Path) -> Iterator[RunningEngine]:
    with running_engine(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not client.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_server_ready(), server.log()
        yield server


def _inputs(a: float, b: float) -> list[httpclient.InferInput]:
    tensors = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = httpclient.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), value, np.float32))
        tensors.append(tensor)
    return tensors


def test_add_sub_and_bls_in_both_modes(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    result = client.infer("add_sub", _inputs(3, 1))
    assert result.as_numpy("OUTPUT1")[0, 0] == 2
    for model in ("bls", "bls_proc"):
        result = client.infer(model, _inputs(3, 1), request_id="outer")
        assert result.as_numpy("OUTPUT0")[0, 0] == 4, engine.log()
        assert result.get_response()["id"] == "outer"


def test_count_two_serves_from_two_worker_processes(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url, concurrency=4)
    x = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    seen = set()
    for _ in range(3):
        pending = [client.async_infer("workers", [x]) for _ in range(8)]
        for p in pending:
            result = p.get_result()
            assert result.as_numpy("OUTPUT0")[0, 0] == 2
            info = json.loads(result.as_numpy("OUTPUT1")[0, 0])
            seen.add((info["pid"], info["instance"]))
        if len(seen) == 2:
            break
    assert len({pid for pid, _ in seen}) == len(seen) and engine.process.pid not in {pid for pid, _ in seen}
    assert {name for _, name in seen} <= {"workers_0_0", "workers_0_1"}
    workers = psutil.Process(engine.process.pid).children()
    assert len([w for w in workers if "python_worker" in " ".join(w.cmdline())]) == 3  # workers x2, bls_proc


def test_shutdown_finalizes_and_stops_workers(repo: Path) -> None:
    with running_engine(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not client.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        children = psutil.Process(server.process.pid).children()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, server.log()
    assert {p.name for p in (repo / "workers").glob("finalized-*")} == {
        "finalized-workers_0_0",
        "finalized-workers_0_1",
    }, server.log()


def test_in_process_bls_keeps_working_after_many_requests(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    for _ in range(40):  # the scheduler may move a fast model inline after 16 executions
        assert client.infer("bls", _inputs(2, 2)).as_numpy("OUTPUT0")[0, 0] == 4
