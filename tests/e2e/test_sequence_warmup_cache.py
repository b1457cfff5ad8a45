"""Sequence batching, model warm-up and the response cache in a real ``elastiserve serve`` process,
driven by NVIDIA's tritonclient over HTTP and gRPC."""

from __future__ import annotations

import subprocess
import sys
import threading
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

from ..engine.python_backend_support import ACCUMULATOR_MODEL as ACC_MODEL
from ..engine.python_backend_support import write_model

ACC_CONFIG = """
name: "acc" backend: "python" max_batch_size: 4
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "WHO" data_type: TYPE_STRING dims: [ 1 ] }
]
sequence_batching {
  max_sequence_idle_microseconds: 2000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

IO_CONFIG = """
name: "{name}" backend: "python" max_batch_size: 4
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "CALLS" data_type: TYPE_INT64 dims: [ 1 ] }}
]
{extra}
"""

# Doubles INPUT0, counts its executions; a warm-up request (id "warmup_…") sleeps 1 s.
COUNTING_MODEL = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.calls = 0

    def execute(self, requests):
        out = []
        for r in requests:
            if r.request_id().startswith("warmup"):
                time.sleep(1.0)
            self.calls += 1
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", x * 2),
                pb_utils.Tensor("CALLS", np.array([[self.calls]], np.int64)),
            ]))
        return out
"""

WARMUP = """
model_warmup [ {{ name: "{sample}" batch_size: 1
  inputs {{ key: "INPUT0" value: {{ data_type: TYPE_FP32 dims: [ 16 ] {data} }} }} }} ]
"""

# One cache entry of the "cached" model is ~300 bytes: three fit, the fourth evicts.
CACHE_BYTES = 1000


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "acc", ACC_MODEL, ACC_CONFIG)
    write_model(
        repo,
        "cached",
        COUNTING_MODEL,
        IO_CONFIG.format(name="cached", extra="response_cache { enable: true }"),
    )
    slow = WARMUP.format(sample="slow_sample", data="zero_data: true")
    write_model(repo, "slow_warm", COUNTING_MODEL, IO_CONFIG.format(name="slow_warm", extra=slow))
    bad = WARMUP.format(sample="from_file", data='input_data_file: "missing.bin"')
    write_model(repo, "bad_warm", COUNTING_MODEL, IO_CONFIG.format(name="bad_warm", extra=bad))
    args = [
        "--model-control-mode=explicit",
        "--load-model=acc",
        "--load-model=cached",
        "--load-model=bad_warm",
        f"--cache-config=local,size={CACHE_BYTES}",
    ]
    with running_engine(repo, args=args, log_dir=repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 60
        while not (client.is_model_ready("acc") and client.is_model_ready("cached")):
            assert time.monotonic() < deadline, server.log()
            assert server.process.poll() is None, server.log()
            time.sleep(0.1)
        yield server


def http_acc(client: httpclient.InferenceServerClient, value: int, **kwargs: object) -> tuple[int, str]:
    tensor = httpclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer("acc", [tensor], **kwargs)  # type: ignore[arg-type]
    return int(result.as_numpy("OUTPUT").flat[0]), result.as_numpy("WHO").flat[0].decode()


def grpc_acc(client: grpcclient.InferenceServerClient, value: int, **kwargs: object) -> tuple[int, str]:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer("acc", [tensor], **kwargs)  # type: ignore[arg-type]
    return int(result.as_numpy("OUTPUT").flat[0]), result.as_numpy("WHO").flat[0].decode()


def test_interleaved_sequences_over_http_and_grpc(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    a = [http_acc(http, 1, sequence_id=1001, sequence_start=True)]
    b = [grpc_acc(grpc, 100, sequence_id=1002, sequence_start=True)]
    for step in range(2, 6):
        a.append(http_acc(http, step, sequence_id=1001, sequence_end=step == 5))
        b.append(grpc_acc(grpc, 100 * step, sequence_id=1002, sequence_end=step == 5))
    assert [s for s, _ in a] == [1, 3, 6, 10, 15]
    assert [s for s, _ in b] == [100, 300, 600, 1000, 1500]
    who_a, who_b = {w for _, w in a}, {w for _, w in b}
    assert len(who_a) == 1 and len(who_b) == 1 and who_a != who_b  # pinned, and spread over instances
    assert http.get_server_metadata()["extensions"].count("sequence") == 1


def test_missing_sequence_id_and_start_errors(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    message = "inference request to model 'acc' must specify a non-zero or non-empty correlation ID"
    with pytest.raises(InferenceServerException, match=message):
        http_acc(http, 1)
    with pytest.raises(InferenceServerException, match=message) as info:
        grpc_acc(grpc, 1)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(
        InferenceServerException, match="for sequence 777 to model 'acc' must specify the START"
    ):
        http_acc(http, 1, sequence_id=777)


def test_idle_sequence_needs_start_again(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    assert http_acc(http, 5, sequence_id=3003, sequence_start=True)[0] == 5
    assert http_acc(http, 5, sequence_id=3003)[0] == 10
    time.sleep(2.6)  # max_sequence_idle_microseconds is 2 s
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        http_acc(http, 5, sequence_id=3003)
    assert http_acc(http, 7, sequence_id=3003, sequence_start=True, sequence_end=True)[0] == 7


def test_model_is_not_ready_until_warmup_ran(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    assert not http.is_model_ready("slow_warm")
    done = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            httpclient.InferenceServerClient(engine.http_url, network_timeout=60).load_model("slow_warm")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    thread = threading.Thread(target=load)
    thread.start()
    polls = 0
    while not done.is_set() and time.monotonic() - started < 0.8:
        response = httpx.get(f"http://{engine.http_url}/v2/models/slow_warm/ready", timeout=5)
        assert response.status_code != 200, "ready before the warm-up finished"
        polls += 1
        time.sleep(0.05)
    thread.join(30)
    assert not errors and done.is_set()
    assert polls > 3 and time.monotonic() - started >= 1.0
    assert http.is_model_ready("slow_warm")


def test_bad_warmup_file_fails_the_load_with_the_reason(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    index = {row["name"]: row for row in http.get_model_repository_index()}
    assert index["bad_warm"]["state"] == "UNAVAILABLE"
    assert "failed to run warmup sample 'from_file'" in index["bad_warm"]["reason"]
    assert "missing.bin" in index["bad_warm"]["reason"]
    with pytest.raises(InferenceServerException, match="failed to run warmup sample 'from_file'"):
        http.load_model("bad_warm")
    assert http.is_model_ready("acc") and http.is_model_ready("cached")


def cached_infer(client: httpclient.InferenceServerClient, value: float) -> tuple[np.ndarray, int]:
    tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), value, np.float32))
    result = client.infer("cached", [tensor])
    return result.as_numpy("OUTPUT0"), int(result.as_numpy("CALLS").flat[0])


def metric(engine: RunningEngine, name: str) -> float:
    text = httpx.get(engine.metrics_url, timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="cached",version="1"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for 'cached' not in /metrics")


def executions(client: httpclient.InferenceServerClient) -> int:
    return int(client.get_inference_statistics("cached")["model_stats"][0]["execution_count"])


def test_response_cache_hits_misses_and_eviction(engine: RunningEngine) -> None:
    http = httpclient.InferenceServerClient(engine.http_url)
    grpc = grpcclient.InferenceServerClient(engine.grpc_url)
    out, calls = cached_infer(http, 1.0)
    assert calls == 1 and out[0, 0] == 2.0
    out, calls = cached_infer(http, 1.0)  # a hit: the model is not called again
    assert calls == 1 and executions(http) == 1
    assert metric(engine, "nv_cache_num_hits_per_model") == 1
    assert metric(engine, "nv_cache_num_misses_per_model") == 1
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), 1.0, np.float32))
    assert int(grpc.infer("cached", [tensor]).as_numpy("CALLS").flat[0]) == 1  # the same entry over gRPC
    assert cached_infer(http, 2.0)[1] == 2  # a different input: a miss
    stats = grpc.get_inference_statistics("cached").model_stats[0].inference_stats
    assert stats.cache_hit.count == 2 and stats.cache_miss.count == 2
    # Three entries fit in the cache: two more inputs evict the least recently used (2.0).
    assert cached_infer(http, 3.0)[1] == 3
    assert cached_infer(http, 1.0)[1] == 1  # touch 1.0: now the most recently used
    assert cached_infer(http, 4.0)[1] == 4
    assert cached_infer(http, 1.0)[1] == 1  # still cached
    assert cached_infer(http, 2.0)[1] == 5  # evicted, so computed again
    assert metric(engine, "nv_cache_num_misses_per_model") == 5
    assert metric(engine, "nv_cache_hit_duration_per_model") >= 0


def test_bad_cache_config_is_a_startup_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastiserve",
            "serve",
            f"--model-repository={tmp_path}",
            "--cache-config=local,size=lots",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--cache-config=local,size=lots: size must be a positive number of bytes" in result.stderr


ONNX_SEQUENCE_CONFIG = """
backend: "onnxruntime"
max_batch_size: 4
input [ { name: "IN", data_type: TYPE_FP32, dims: [1] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [1] } ]
sequence_batching {
  control_input [
    { name: "START", control [ { kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1] } ] },
    { name: "END", control [ { kind: CONTROL_SEQUENCE_END, int32_false_true: [0, 1] } ] }
  ]
}
"""


def _onnx_sequence_model() -> bytes:
    """OUT = IN + 1000 * START + 100 * END: shows which control values the graph was fed."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["START"], ["s"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["END"], ["e"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s", "k1000"], ["s1"]),
        helper.make_node("Mul", ["e", "k100"], ["e1"]),
        helper.make_node("Add", ["IN", "s1"], ["a"]),
        helper.make_node("Add", ["a", "e1"], ["OUT"]),
    ]
    inputs = [
        helper.make_tensor_value_info("IN", TensorProto.FLOAT, ["b", 1]),
        helper.make_tensor_value_info("START", TensorProto.INT32, ["b", 1]),
        helper.make_tensor_value_info("END", TensorProto.INT32, ["b", 1]),
    ]
    constants = [
        helper.make_tensor("k1000", TensorProto.FLOAT, [], [1000.0]),
        helper.make_tensor("k100", TensorProto.FLOAT, [], [100.0]),
    ]
    graph = helper.make_graph(
        nodes, "seq", inputs, [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["b", 1])], constants
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("strict", [False, True])
def test_onnx_sequence_model_is_fed_the_control_inputs(tmp_path: Path, strict: bool) -> None:
    model = tmp_path / "seq_onnx"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(_onnx_sequence_model())
    (model / "config.pbtxt").write_text(ONNX_SEQUENCE_CONFIG)
    # A graph without the control inputs the config names fails alone, with the reason.
    broken = tmp_path / "seq_broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(_onnx_sequence_model())
    (broken / "config.pbtxt").write_text(ONNX_SEQUENCE_CONFIG.replace('name: "END"', 'name: "STOP"'))
    args = ["--strict-model-config=true"] if strict else []
    with running_engine(tmp_path, args=args) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 30
        while not client.is_model_ready("seq_onnx") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("seq_onnx"), server.log()
        # Clients send only IN: START/END are not inputs they must give.
        assert [i["name"] for i in client.get_model_metadata("seq_onnx")["inputs"]] == ["IN"]
        seen = []
        for value, start, end in ((0.0, True, False), (1.0, False, False), (2.0, False, True)):
            data = httpclient.InferInput("IN", [1, 1], "FP32")
            data.set_data_from_numpy(np.array([[value]], np.float32))
            result = client.infer("seq_onnx", [data], sequence_id=7, sequence_start=start, sequence_end=end)
            seen.append(float(result.as_numpy("OUT")[0, 0]))
        assert seen == [1000.0, 1.0, 102.0]
        index = {row["name"]: row for row in client.get_model_repository_index()}
        assert index["seq_broken"]["state"] == "UNAVAILABLE"
        assert "control or state input 'STOP' is not an input of the model" in index["seq_broken"]["reason"]
