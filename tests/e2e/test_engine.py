"""The real engine process driven by NVIDIA's tritonclient (http, grpc, and their aio variants)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from elastiserve.testing import RunningEngine, free_port, running_engine


@pytest.fixture(scope="module")
def engine(example_repo: Path) -> Iterator[RunningEngine]:
    with running_engine(example_repo) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not http.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.is_server_ready(), server.log()
        yield server


def fp32(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_health_and_metadata_over_http_and_grpc(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    meta = http.get_model_metadata("add_sub")
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}
    assert grpc.get_model_metadata("add_sub").inputs[0].name == "INPUT0"
    assert http.get_model_config("add_sub")["max_batch_size"] == 64
    assert grpc.get_model_config("add_sub").config.max_batch_size == 64
    assert http.is_model_ready("add_sub") and not http.is_model_ready("missing")
    assert grpc.is_model_ready("add_sub") and not grpc.is_model_ready("missing")


@pytest.mark.parametrize("binary", [True, False])
def test_add_sub_over_http(engine: RunningEngine, binary: bool) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    a, b = fp32((2, 16), 1), fp32((2, 16), 2)
    inputs = [
        httpclient.InferInput("INPUT0", [2, 16], "FP32"),
        httpclient.InferInput("INPUT1", [2, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("add_sub", inputs, outputs=outputs, request_id="r1")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert result.get_response()["id"] == "r1"


def test_add_sub_over_grpc(engine: RunningEngine) -> None:
    client = grpcclient.InferenceServerClient(engine.grpc_url)
    a, b = fp32((3, 16), 3), fp32((3, 16), 4)
    inputs = [
        grpcclient.InferInput("INPUT0", [3, 16], "FP32"),
        grpcclient.InferInput("INPUT1", [3, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


async def test_aio_clients(engine: RunningEngine) -> None:
    data = fp32((1, 16), 5)
    async with httpaio.InferenceServerClient(engine.http_url) as http:
        tensor = httpaio.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(data)
        result = await http.infer("identity_fp32", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    grpc = grpcaio.InferenceServerClient(engine.grpc_url)
    try:
        tensor = grpcaio.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(data)
        result = await grpc.infer("identity_fp32", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    finally:
        await grpc.close()


def test_errors_match_triton_and_server_keeps_serving(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match=r"unexpected shape for input 'INPUT0'"):
        client.infer("identity_fp32", [tensor])
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'missing' is not found"):
        client.infer("missing", [tensor])
    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        grpc.get_model_metadata("missing")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    response = httpx.post(f"http://{engine.http_url}/v2/models/identity_fp32/infer", content=b'{"inputs":')
    assert response.status_code == 400 and "error" in response.json()
    good = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    good.set_data_from_numpy(np.ones((1, 16), np.float32))
    assert client.infer("identity_fp32", [good]).as_numpy("OUTPUT0").sum() == 16


def test_statistics_and_metrics_count_requests(engine: RunningEngine) -> None:
    client = httpclient.InferenceServerClient(engine.http_url)
    before = client.get_inference_statistics("identity_fp32")["model_stats"][0]["inference_stats"]["success"][
        "count"
    ]
    good = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    good.set_data_from_numpy(np.ones((1, 16), np.float32))
    for _ in range(5):
        client.infer("identity_fp32", [good])
    stats = client.get_inference_statistics("identity_fp32")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == before + 5
    grpc_stats = grpcclient.InferenceServerClient(engine.grpc_url).get_inference_statistics("identity_fp32")
    assert grpc_stats.model_stats[0].inference_stats.success.count >= before + 5
    text = httpx.get(engine.metrics_url).text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith('nv_inference_request_success{model="identity_fp32",version="1"}')
    )
    assert float(line.split()[-1]) >= before + 5
    for name in (
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
        "nv_cpu_utilization",
        "process_resident_memory_bytes",
    ):
        assert name in text


def test_native_backends_match_the_frameworks(engine: RunningEngine, example_repo: Path) -> None:
    import joblib
    import onnxruntime

    client = httpclient.InferenceServerClient(engine.http_url)
    onnx_meta = client.get_model_metadata("simple_onnx")
    name, out_name = onnx_meta["inputs"][0]["name"], onnx_meta["outputs"][0]["name"]
    x = fp32((4, 16), 7)
    tensor = httpclient.InferInput(name, [4, 16], "FP32")
    tensor.set_data_from_numpy(x)
    served = client.infer("simple_onnx", [tensor]).as_numpy(out_name)
    session = onnxruntime.InferenceSession(str(example_repo / "simple_onnx" / "1" / "model.onnx"))
    np.testing.assert_allclose(served, session.run(None, {name: x})[0], rtol=1e-5)

    sk_meta = client.get_model_metadata("sklearn_iris")
    features = sk_meta["inputs"][0]["shape"][-1]
    x = fp32((3, features), 8)
    tensor = httpclient.InferInput(sk_meta["inputs"][0]["name"], [3, features], "FP32")
    tensor.set_data_from_numpy(x)
    served = client.infer("sklearn_iris", [tensor]).as_numpy(sk_meta["outputs"][0]["name"])
    model = joblib.load(example_repo / "sklearn_iris" / "1" / "model.joblib")
    np.testing.assert_allclose(served, model.predict_proba(x), rtol=1e-5)  # config: method predict_proba


def _copy_model(src: Path, dst_repo: Path, name: str) -> None:
    shutil.copytree(src / name, dst_repo / name, ignore=shutil.ignore_patterns("__pycache__"))


def test_bad_config_does_not_stop_other_models(tmp_path: Path, example_repo: Path) -> None:
    _copy_model(example_repo, tmp_path, "identity_fp32")
    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_sizee: 2\n')
    with running_engine(tmp_path) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 30
        while not client.is_model_ready("identity_fp32") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("identity_fp32")
        assert not client.is_server_ready()  # strict readiness, as Triton
        index = {row["name"]: row for row in client.get_model_repository_index()}
        assert index["broken"]["state"] == "UNAVAILABLE"
        assert "line 3" in index["broken"]["reason"] and "max_batch_sizee" in index["broken"]["reason"]
        assert "max_batch_sizee" in server.log()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastiserve",
            "serve",
            f"--model-repository={tmp_path}",
            "--exit-on-error=true",
            f"--http-port={free_port()}",
            f"--grpc-port={free_port()}",
            f"--metrics-port={free_port()}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "failed to load all models" in result.stderr


def test_explicit_mode_load_and_unload(tmp_path: Path, example_repo: Path) -> None:
    _copy_model(example_repo, tmp_path, "identity_fp32")
    _copy_model(example_repo, tmp_path, "add_sub")
    with running_engine(
        tmp_path, args=["--model-control-mode=explicit", "--load-model=identity_fp32"]
    ) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        deadline = time.monotonic() + 30
        while not http.is_model_ready("identity_fp32") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not http.is_model_ready("add_sub")
        http.load_model("add_sub")
        assert http.is_model_ready("add_sub")
        grpc.unload_model("add_sub")
        assert not grpc.is_model_ready("add_sub")
        grpc.load_model("add_sub")
        assert grpc.is_model_ready("add_sub")
        with pytest.raises(InferenceServerException, match="missing_model"):
            http.load_model("missing_model")


def test_poll_mode_picks_up_new_models(tmp_path: Path, example_repo: Path) -> None:
    _copy_model(example_repo, tmp_path, "identity_fp32")
    with running_engine(tmp_path, args=["--model-control-mode=poll", "--repository-poll-secs=0.5"]) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 30
        while not client.is_model_ready("identity_fp32") and time.monotonic() < deadline:
            time.sleep(0.1)
        _copy_model(example_repo, tmp_path, "add_sub")
        deadline = time.monotonic() + 30
        while not client.is_model_ready("add_sub") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.is_model_ready("add_sub")
        shutil.rmtree(tmp_path / "add_sub")
        deadline = time.monotonic() + 30
        while client.is_model_ready("add_sub") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.is_model_ready("add_sub")


def test_sigterm_drains_and_exits_zero(tmp_path: Path, example_repo: Path) -> None:
    _copy_model(example_repo, tmp_path, "identity_fp32")
    with running_engine(tmp_path) as server:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0


SLOW_MODEL = """
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(1.5)

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())]) for r in requests]
"""


def test_not_ready_until_initial_models_loaded(tmp_path: Path) -> None:
    model = tmp_path / "slow"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(SLOW_MODEL)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 4\n'
        'input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
    )
    with running_engine(tmp_path) as server:  # returns as soon as the server is live
        ready = httpx.get(f"http://{server.http_url}/v2/health/ready")
        assert ready.status_code == 400, "ready before the initial models were loaded"
        deadline = time.monotonic() + 30
        while httpx.get(f"http://{server.http_url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert httpclient.InferenceServerClient(server.http_url).is_model_ready("slow")
