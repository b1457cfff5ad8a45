"""Ensembles in a real ``elastiserve serve`` process, driven by NVIDIA's tritonclient (HTTP and
gRPC): results, concurrency of independent steps, per-model statistics and metrics, errors
naming the failing step, bad configs, BLS into an ensemble, explicit load/unload."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from elastiserve.testing import RunningEngine, running_engine

from ..engine.ensemble_models import SLEEP, write, write_repo
from ..engine.python_backend_support import add_sub_config

# BLS into the ensemble "pipe"; OUTPUT1 carries the error message of a BLS call to a missing model.
BLS_TO_ENSEMBLE = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            answer = pb_utils.InferenceRequest(
                model_name="pipe", inputs=[pb_utils.Tensor("A", a), pb_utils.Tensor("B", b)],
                requested_output_names=["OUT"],
            ).exec()
            if answer.has_error():
                out.append(pb_utils.InferenceResponse(error=answer.error()))
                continue
            result = pb_utils.get_output_tensor_by_name(answer, "OUT").as_numpy()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", result), pb_utils.Tensor("OUTPUT1", result * 0)
            ]))
        return out
"""

BAD = {
    "bad_cycle": (
        'step [ { model_name: "scale" input_map { key: "X" value: "T" } output_map { key: "Y" value: "T2" } },'
        ' { model_name: "scale" input_map { key: "X" value: "T2" } output_map { key: "Y" value: "T" } },'
        ' { model_name: "scale" input_map { key: "X" value: "A" } output_map { key: "Y" value: "OUT" } } ]',
        "steps form a cycle",
    ),
    "bad_producer": (
        'step [ { model_name: "add_sub" input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }'
        ' output_map { key: "OUTPUT0" value: "OUT" } } ]',
        "input 'INPUT1' reads ensemble tensor 'B', which is neither an ensemble input nor produced by any step",
    ),
    "bad_model": (
        'step [ { model_name: "ghost" input_map { key: "X" value: "A" } output_map { key: "Y" value: "OUT" } } ]',
        "ensemble 'bad_model' contains models that are not available: ghost",
    ),
    "bad_twice": (
        'step [ { model_name: "scale" input_map { key: "X" value: "A" } output_map { key: "Y" value: "OUT" } },'
        ' { model_name: "scale" input_map { key: "X" value: "A" } output_map { key: "Y" value: "OUT" } } ]',
        "ensemble tensor 'OUT' is already produced by step 0 (model 'scale')",
    ),
    "bad_output": (
        'step [ { model_name: "scale" input_map { key: "X" value: "A" } output_map { key: "Y" value: "OUT" } } ]',
        "output 'MORE' for ensemble 'bad_output' is not written by any step",
    ),
}


def bad_config(name: str, steps: str) -> str:
    outputs = '{ name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] }'
    if name == "bad_output":
        outputs += ', { name: "MORE" data_type: TYPE_FP32 dims: [ 16 ] }'
    return (
        f'name: "{name}" platform: "ensemble" max_batch_size: 8\n'
        'input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        f"output [ {outputs} ]\n"
        f"ensemble_scheduling {{ {steps} }}\n"
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_repo(tmp_path_factory.mktemp("ensembles"))
    for name, (steps, _) in BAD.items():
        write(root, name, bad_config(name, steps))
    config = add_sub_config("bls_pipe").replace("max_batch_size: 64", "max_batch_size: 8")
    write(root, "bls_pipe", config, BLS_TO_ENSEMBLE)
    process = 'parameters { key: "execution_mode" value { string_value: "process" } }'
    write(
        root,
        "bls_pipe_workers",
        add_sub_config("bls_pipe_workers", count=2, extra=process).replace(
            "max_batch_size: 64", "max_batch_size: 8"
        ),
        BLS_TO_ENSEMBLE,
    )
    return root


@pytest.fixture(scope="module")
def engine(repo: Path) -> Iterator[RunningEngine]:
    with running_engine(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        # Plain models load first, ensembles after them: wait for the last of each kind.
        while time.monotonic() < deadline and not (
            client.is_model_ready("bls_pipe_workers") and client.is_model_ready("pipe")
        ):
            time.sleep(0.1)
        assert client.is_model_ready("pipe"), server.log()
        yield server


def http_inputs(
    a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("A", "B")
) -> list[httpclient.InferInput]:
    tensors = []
    for name, value in zip(names, (a, b), strict=True):
        tensor = httpclient.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def test_pipeline_over_http_and_grpc(engine: RunningEngine) -> None:
    a = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    http = httpclient.InferenceServerClient(engine.http_url)
    result = http.infer("pipe", http_inputs(a, b), request_id="e1")
    np.testing.assert_allclose(result.as_numpy("OUT"), (a + b) * 2, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("DIFF"), a - b, rtol=1e-6)
    assert result.get_response()["id"] == "e1" and result.get_response()["model_name"] == "pipe"
    only = http.infer("pipe", http_inputs(a, b), outputs=[httpclient.InferRequestedOutput("DIFF")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["DIFF"]

    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    inputs = []
    for name, value in (("A", a), ("B", b)):
        tensor = grpcclient.InferInput(name, [2, 16], "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = grpc.infer("pipe_latest", inputs)  # scale -1 = latest version (x10)
    np.testing.assert_allclose(result.as_numpy("OUT"), (a + b) * 10, rtol=1e-5)
    assert grpc.get_model_metadata("pipe").platform == "ensemble"
    assert grpc.get_model_config("pipe").config.ensemble_scheduling.step[1].model_version == 1
    assert http.is_model_ready("pipe") and grpc.is_model_ready("diamond")


def test_independent_branches_run_concurrently(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    a = np.ones((1, 16), np.float32)
    tensor = httpclient.InferInput("A", [1, 16], "FP32")
    tensor.set_data_from_numpy(a)
    client.infer("diamond", [tensor])  # warm
    start = time.perf_counter()
    result = client.infer("diamond", [tensor])
    elapsed = time.perf_counter() - start
    assert result.as_numpy("SUM")[0, 0] == 5 and result.as_numpy("DIFF")[0, 0] == -1
    assert elapsed < 2 * SLEEP * 0.9, f"two {SLEEP}s branches took {elapsed:.3f}s"


def test_step_failure_names_the_step(engine: RunningEngine) -> None:
    a, b = np.full((1, 16), -1000, np.float32), np.ones((1, 16), np.float32)
    with pytest.raises(InferenceServerException) as info:
        httpclient.InferenceServerClient(engine.http_url).infer("pipe", http_inputs(a, b))
    assert "in ensemble 'pipe', step 1 (model 'scale'): " in info.value.message()
    assert "scale refuses -999" in info.value.message()
    grpc_inputs = []
    for name, value in (("A", a), ("B", b)):
        tensor = grpcclient.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(value)
        grpc_inputs.append(tensor)
    with pytest.raises(InferenceServerException, match=r"in ensemble 'pipe', step 1 \(model 'scale'\)"):
        grpcclient.InferenceServerClient(engine.grpc_url).infer("pipe", grpc_inputs)


def test_statistics_and_metrics_per_composing_model(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    grpc = grpcclient.InferenceServerClient(engine.grpc_url)

    def success(model: str, version: str = "") -> int:
        return http.get_inference_statistics(model, version)["model_stats"][0]["inference_stats"]["success"][
            "count"
        ]

    before = {m: success(m) for m in ("pipe", "add_sub")}
    before_scale = success("scale", "1")
    ones = np.ones((1, 16), np.float32)
    for _ in range(3):
        http.infer("pipe", http_inputs(ones, ones))
    assert success("pipe") == before["pipe"] + 3
    assert success("add_sub") == before["add_sub"] + 3
    assert success("scale", "1") == before_scale + 3
    stats = grpc.get_inference_statistics("pipe").model_stats[0]
    assert stats.inference_stats.success.count == before["pipe"] + 3 and stats.execution_count >= 3
    text = httpx.get(engine.metrics_url).text
    for model in ("pipe", "add_sub", "scale"):
        line = next(
            line
            for line in text.splitlines()
            if line.startswith(f'nv_inference_request_success{{model="{model}",version="1"}}')
        )
        assert float(line.split()[-1]) >= 3


def test_bad_ensembles_are_unavailable_with_a_reason(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    index = {row["name"]: row for row in client.get_model_repository_index()}
    for name, (_, message) in BAD.items():
        assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert message in index[name]["reason"], index[name]
        assert not client.is_model_ready(name)
    assert index["pipe"]["state"] == "READY" and index["diamond"]["state"] == "READY"
    assert "ghost" not in index


@pytest.mark.parametrize("model", ["bls_pipe", "bls_pipe_workers"])
def test_bls_into_an_ensemble(engine: RunningEngine, model: str) -> None:
    client = httpclient.InferenceServerClient(engine.http_url, concurrency=4)
    pending = []
    for i in range(6):
        a = np.full((1, 16), i, np.float32)
        pending.append((i, client.async_infer(model, http_inputs(a, a, ("INPUT0", "INPUT1")))))
    for i, request in pending:
        assert request.get_result().as_numpy("OUTPUT0")[0, 0] == 4 * i, engine.log()


def ready_models(client: httpclient.InferenceServerClient) -> set[str]:
    return {row["name"] for row in client.get_model_repository_index() if row.get("state") == "READY"}


def test_explicit_mode_loads_and_unloads_composing_models(tmp_path: Path) -> None:
    write_repo(tmp_path)
    with running_engine(tmp_path, args=["--model-control-mode=explicit", "--load-model=pipe"]) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not client.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready_models(client) == {"pipe", "add_sub", "scale"}, server.log()
        client.unload_model("scale")
        index = {row["name"]: row for row in client.get_model_repository_index()}
        assert index["pipe"]["state"] == "UNAVAILABLE"
        assert index["pipe"]["reason"] == "ensemble 'pipe' contains models that are not available: scale"
        ones = np.ones((1, 16), np.float32)
        with pytest.raises(InferenceServerException, match="'pipe' has no available versions"):
            client.infer("pipe", http_inputs(ones, ones))
        client.load_model("scale")  # the ensemble comes back with its composing model
        assert client.infer("pipe", http_inputs(ones, ones)).as_numpy("OUT")[0, 0] == 4
        client.unload_model("pipe", unload_dependents=True)
        assert ready_models(client) == {"scale"}  # scale was loaded by name; add_sub only for the ensemble
