"""Model warm-up: samples built from zero/random/file data, run on every instance before READY,
a failing sample fails the load with its name while other models keep loading."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import numpy as np
import pytest

from elastiserve.engine.config import parse_config_text
from elastiserve.engine.registry import LOADING, READY, UNAVAILABLE, ModelRegistry
from elastiserve.engine.repository import ModelRepository
from elastiserve.engine.warmup import build_requests
from elastiserve.errors import ConfigError

from .python_backend_support import ADD_SUB_MODEL, add_sub_config, write_model

WARMUP = """
model_warmup [
  {{ name: "{name}" batch_size: {batch} count: {count}
     inputs {{ key: "INPUT0" value: {{ data_type: TYPE_FP32 dims: [ 16 ] {data0} }} }}
     inputs {{ key: "INPUT1" value: {{ data_type: TYPE_FP32 dims: [ 16 ] {data1} }} }} }}
]
"""

# Appends one line per execute() to <repository>/<instance>.calls; sleeps when asked to.
RECORDING_MODEL = """
import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.path = os.path.join(args["model_repository"], args["model_instance_name"] + ".calls")
        self.sleep = float(args["model_config"] and __import__("json").loads(args["model_config"])
                           ["parameters"].get("sleep", {}).get("string_value", "0") or 0)

    def execute(self, requests):
        time.sleep(self.sleep)
        out = []
        for request in requests:
            in0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            with open(self.path, "a") as f:
                f.write(f"{request.request_id()} {in0.shape} {float(in0.sum())} {float(in1.sum())}\\n")
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", in0 + in1), pb_utils.Tensor("OUTPUT1", in0 - in1)
            ]))
        return out
"""


def warmup(name: str = "w", batch: int = 1, count: int = 0, data0: str = "zero_data: true",
           data1: str = "random_data: true") -> str:  # fmt: skip
    return WARMUP.format(name=name, batch=batch, count=count, data0=data0, data1=data1)


def test_requests_from_zero_random_and_file_data(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    np.arange(16, dtype=np.float32).tofile(tmp_path / "warmup" / "in0.bin")
    text = add_sub_config("m", extra=warmup(batch=3, count=2, data0='input_data_file: "in0.bin"'))
    ((name, repetitions, request),) = build_requests(parse_config_text(text, "m"), tmp_path, 1)
    assert (name, repetitions, request.id, request.model_version) == ("w", 2, "warmup_w", "1")
    in0, in1 = request.input("INPUT0"), request.input("INPUT1")
    assert in0 is not None and in1 is not None and in0.shape == [3, 16] and in1.shape == [3, 16]
    assert in0.data is not None and in1.data is not None
    np.testing.assert_array_equal(in0.data[2], np.arange(16, dtype=np.float32))
    assert in1.data.dtype == np.float32 and in1.data.any()


def test_bytes_input_file_uses_tritons_length_prefixed_layout(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    raw = b"".join(struct.pack("<I", len(v)) + v for v in (b"hello", b"", b"xyz"))
    (tmp_path / "warmup" / "s.bin").write_bytes(raw)
    text = """
name: "s" backend: "python" max_batch_size: 0
input [ { name: "IN" data_type: TYPE_STRING dims: [ 3 ] } ]
output [ { name: "OUT" data_type: TYPE_STRING dims: [ 3 ] } ]
model_warmup [ { name: "strings" inputs { key: "IN" value: {
  data_type: TYPE_STRING dims: [ 3 ] input_data_file: "s.bin" } } } ]
"""
    ((_, _, request),) = build_requests(parse_config_text(text, "s"), tmp_path, 1)
    assert request.inputs[0].shape == [3] and list(request.inputs[0].data) == [b"hello", b"", b"xyz"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (warmup(data0='input_data_file: "missing.bin"'), "failed to run warmup sample 'w'.*missing.bin"),
        (warmup(data0='input_data_file: "../config.pbtxt"'), "outside warmup/"),
        (warmup(data0=""), "must set one of zero_data, random_data, input_data_file"),
        (warmup(batch=100), "batch_size 100 exceeds max_batch_size 64"),
    ],
)
def test_invalid_samples(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_requests(parse_config_text(add_sub_config("m", extra=extra), "m"), tmp_path, 1)


def test_short_file_names_sizes(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "short.bin").write_bytes(b"\0" * 10)
    text = add_sub_config("m", extra=warmup(data0='input_data_file: "short.bin"'))
    with pytest.raises(
        ConfigError, match=r"expects 64 bytes, but the data provided from 'warmup/short\.bin' only has 10"
    ):
        build_requests(parse_config_text(text, "m"), tmp_path, 1)


def calls(repo: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines() for p in sorted(repo.rglob("*.calls"))}


async def test_warmup_runs_on_every_instance_before_ready(tmp_path: Path) -> None:
    extra = warmup(count=2) + 'parameters { key: "execution_mode" value { string_value: "in_process" } }'
    write_model(tmp_path, "warm", RECORDING_MODEL, add_sub_config("warm", count=2, extra=extra))
    registry = ModelRegistry(ModelRepository([str(tmp_path)]), control_mode="explicit")
    try:
        assert await registry.load_initial(["warm"]) == []
        recorded = calls(tmp_path)
        assert sorted(recorded) == ["warm_0_0", "warm_0_1"]
        for lines in recorded.values():
            assert len(lines) == 2 and all(line.startswith("warmup_w (1, 16) 0.0 ") for line in lines)
        assert registry.is_ready("warm")
        # Warm-up executions are not inference statistics.
        assert registry.statistics("warm")[0]["inference_stats"]["success"]["count"] == 0
    finally:
        await registry.close()


async def test_model_is_not_ready_while_warming_up(tmp_path: Path) -> None:
    extra = warmup() + 'parameters { key: "sleep" value { string_value: "0.5" } }'
    write_model(tmp_path, "slow", RECORDING_MODEL, add_sub_config("slow", extra=extra))
    registry = ModelRegistry(ModelRepository([str(tmp_path)]), control_mode="explicit")
    registry.loop = asyncio.get_running_loop()
    try:
        loading = asyncio.ensure_future(registry.load("slow"))
        await asyncio.sleep(0.2)
        assert registry.models["slow"].state == LOADING and not registry.is_ready("slow")
        await asyncio.wait_for(loading, 10)
        assert registry.models["slow"].state == READY and registry.is_ready("slow")
    finally:
        await registry.close()


FAILING_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("cannot warm up")) for _ in requests]
"""


async def test_failing_warmup_fails_the_load_and_others_serve(tmp_path: Path) -> None:
    write_model(tmp_path, "bad_file", ADD_SUB_MODEL, add_sub_config(
        "bad_file", extra=warmup(name="from_file", data0='input_data_file: "nope.bin"')))  # fmt: skip
    write_model(tmp_path, "bad_exec", FAILING_MODEL, add_sub_config("bad_exec", extra=warmup(name="boom")))
    write_model(tmp_path, "good", ADD_SUB_MODEL, add_sub_config("good", extra=warmup()))
    registry = ModelRegistry(ModelRepository([str(tmp_path)]), control_mode="explicit")
    try:
        failures = await registry.load_initial(["*"])
        assert len(failures) == 2
        bad_file, bad_exec = registry.models["bad_file"], registry.models["bad_exec"]
        assert bad_file.state == UNAVAILABLE and "failed to run warmup sample 'from_file'" in bad_file.reason
        assert "nope.bin" in bad_file.reason
        assert bad_exec.state == UNAVAILABLE
        assert (
            bad_exec.reason
            == "model 'bad_exec': failed to run warmup sample 'boom': instance 0: cannot warm up"
        )
        assert registry.is_ready("good")
    finally:
        await registry.close()
