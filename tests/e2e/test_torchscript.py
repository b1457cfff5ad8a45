"""A TorchScript model (``pytorch_libtorch``) served by the real engine, driven by tritonclient.

torch is the ``elastiserve[torch]`` extra; CI installs it (``torch==2.13.0``, CPU build). Where it
is missing the module is skipped with the reason shown by ``pytest -rs``.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from elastiserve.testing import RunningEngine, running_engine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (pip install 'elastiserve[torch]')",
)

CONFIG = """
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  { name: "INPUT__0", data_type: TYPE_FP32, dims: [4] },
  { name: "INPUT__1", data_type: TYPE_FP32, dims: [4] }
]
output [
  { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [1] },
  { name: "OUTPUT__1", data_type: TYPE_FP32, dims: [4] }
]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [{ count: 2, kind: KIND_CPU }]
"""


def _write_repository(root: Path) -> Path:
    import torch

    class Net(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (a * b).sum(dim=1, keepdim=True), a - b

    model = root / "dot_diff"
    (model / "1").mkdir(parents=True)
    torch.jit.script(Net()).save(str(model / "1" / "model.pt"))
    (model / "config.pbtxt").write_text(CONFIG)
    # A second model whose file is not TorchScript: it must fail alone, with a clear reason.
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.pt").write_bytes(b"not a torchscript archive")
    (broken / "config.pbtxt").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    repo = _write_repository(tmp_path_factory.mktemp("torch-repo"))
    with running_engine(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not client.is_model_ready("dot_diff") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("dot_diff"), server.log()
        yield server


def _inputs(client_module: Any, a: np.ndarray, b: np.ndarray) -> list[Any]:
    """INPUT__0/INPUT__1 for tritonclient's http or grpc module."""
    inputs = [client_module.InferInput(f"INPUT__{i}", list(x.shape), "FP32") for i, x in enumerate((a, b))]
    for tensor, array in zip(inputs, (a, b), strict=True):
        tensor.set_data_from_numpy(array)
    return inputs


def _reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (a * b).sum(axis=1, keepdims=True), a - b


def test_torchscript_over_http_and_grpc(engine: RunningEngine) -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    want_dot, want_diff = _reference(a, b)

    http = httpclient.InferenceServerClient(engine.http_url)
    result = http.infer("dot_diff", _inputs(httpclient, a, b))
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), want_dot, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__1"), want_diff, rtol=1e-6)

    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    requested = [grpcclient.InferRequestedOutput("OUTPUT__1")]
    gresult = grpc.infer("dot_diff", _inputs(grpcclient, a, b), outputs=requested)
    np.testing.assert_allclose(gresult.as_numpy("OUTPUT__1"), want_diff, rtol=1e-6)
    assert gresult.as_numpy("OUTPUT__0") is None

    meta = http.get_model_metadata("dot_diff")
    assert meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"][0] == {"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 4]}


def test_concurrent_requests_are_batched_and_correct(engine: RunningEngine) -> None:
    def one(seed: int) -> None:
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((1, 4)).astype(np.float32)
        b = rng.standard_normal((1, 4)).astype(np.float32)
        client = httpclient.InferenceServerClient(engine.http_url)
        result = client.infer("dot_diff", _inputs(httpclient, a, b))
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), _reference(a, b)[0], rtol=1e-5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(64)))
    stats = httpclient.InferenceServerClient(engine.http_url).get_inference_statistics("dot_diff")
    model = stats["model_stats"][0]
    assert model["inference_count"] >= 64
    # Dynamic batching: fewer executions than requests is the usual outcome, never more.
    assert model["execution_count"] <= model["inference_count"]


def test_bad_input_and_broken_model(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    wrong = httpclient.InferInput("INPUT__0", [1, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 5), np.float32))
    other = httpclient.InferInput("INPUT__1", [1, 4], "FP32")
    other.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match="unexpected shape for input 'INPUT__0'"):
        http.infer("dot_diff", [wrong, other])
    assert not http.is_model_ready("broken")
    index = {row["name"]: row for row in http.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert index["broken"]["reason"], index["broken"]
    assert http.is_model_ready("dot_diff")
