"""Scheduling: direct runs, dynamic batching, queue policy, placement, validation."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from elastiserve.engine.config import apply_defaults, parse_config_text
from elastiserve.engine.model import ModelVersion
from elastiserve.engine.scheduler import INLINE_MIN_SAMPLES, Scheduler
from elastiserve.errors import ElastiserveError, InvalidArgument, Unavailable
from elastiserve.types import InferRequest, InferResponse, InferTensor, RequestedOutput

BASE = """
name: "m"
backend: "python"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


class Doubler:
    """A model instance that doubles IN and records the batches it was given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[list[list[int]]] = []
        self.threads: set[str] = set()

    def execute(self, requests: list[InferRequest]) -> list[InferResponse | ElastiserveError]:
        self.calls.append([r.inputs[0].shape for r in requests])
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        out = []
        for r in requests:
            data = r.inputs[0].data
            assert data is not None
            if data.size and data.flat[0] < 0:
                out.append(InvalidArgument("negative input"))
                continue
            out.append(
                InferResponse(r.model_name, "1", [InferTensor("OUT", "FP32", list(data.shape), data * 2)])
            )
        return out

    def close(self) -> None:
        pass


def make(config_text: str, instance: Doubler, placement: str = "auto") -> ModelVersion:
    config = parse_config_text(config_text, "m")
    apply_defaults(config, "m")
    model = ModelVersion("m", 1, config, Path("."), None)
    model.scheduler = Scheduler(config, [instance], model.stats, placement)
    return model


def request(values: list[float], batch: bool = True, name: str = "IN", dtype: str = "FP32") -> InferRequest:
    data = np.asarray([values] if batch else values, dtype=np.float32)
    return InferRequest("m", [InferTensor(name, dtype, list(data.shape), data)])


async def test_direct_infer_and_stats() -> None:
    instance = Doubler()
    model = make(BASE, instance)
    response = await model.infer(request([1, 2, 3]))
    np.testing.assert_array_equal(response.outputs[0].data, [[2, 4, 6]])
    stats = model.stats.as_dict()
    assert stats["inference_count"] == 1 and stats["inference_stats"]["success"]["count"] == 1
    with pytest.raises(InvalidArgument, match="negative"):
        await model.infer(request([-1.0]))
    assert model.stats.as_dict()["inference_stats"]["fail"]["count"] == 1


async def test_dynamic_batching_groups_requests_and_never_mixes_shapes() -> None:
    instance = Doubler(delay=0.02)
    model = make(BASE + "dynamic_batching { max_queue_delay_microseconds: 20000 }", instance, "thread")
    shapes = [[1.0, 2.0]] * 5 + [[1.0, 2.0, 3.0]] * 3
    results = await asyncio.gather(*(model.infer(request(v)) for v in shapes))
    for values, response in zip(shapes, results, strict=True):
        np.testing.assert_array_equal(response.outputs[0].data, [np.asarray(values) * 2])
    for call in instance.calls:
        assert len({tuple(shape[1:]) for shape in call}) == 1, f"mixed shapes in one batch: {call}"
    assert max(len(call) for call in instance.calls) > 1, "no batch was formed"
    assert sum(len(call) for call in instance.calls) == 8


async def test_batch_never_exceeds_max_batch_size() -> None:
    instance = Doubler(delay=0.01)
    model = make(BASE + "dynamic_batching { max_queue_delay_microseconds: 50000 }", instance, "thread")
    await asyncio.gather(*(model.infer(request([1.0])) for _ in range(20)))
    assert all(sum(s[0] for s in call) <= 8 for call in instance.calls)


async def test_preferred_batch_size_cuts_batches() -> None:
    instance = Doubler(delay=0.02)
    text = BASE + "dynamic_batching { preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 100000 }"
    model = make(text, instance, "thread")
    await asyncio.gather(*(model.infer(request([1.0])) for _ in range(6)))
    assert all(len(call) <= 2 for call in instance.calls)


async def test_queue_full_is_unavailable() -> None:
    instance = Doubler(delay=0.05)
    text = BASE + "dynamic_batching { default_queue_policy { max_queue_size: 2 } }"
    model = make(text.replace("max_batch_size: 8", "max_batch_size: 1"), instance, "thread")
    results = await asyncio.gather(*(model.infer(request([1.0])) for _ in range(8)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(isinstance(e, Unavailable) and "maximum queue size" in str(e) for e in errors)
    assert any(isinstance(r, InferResponse) for r in results)
    assert model.stats.failures_by_reason.get("REJECTED") == len(errors)


async def test_queue_timeout_rejects_waiting_requests() -> None:
    instance = Doubler(delay=0.1)
    text = BASE.replace("max_batch_size: 8", "max_batch_size: 1") + (
        "dynamic_batching { default_queue_policy { default_timeout_microseconds: 20000 } }"
    )
    model = make(text, instance, "thread")
    results = await asyncio.gather(*(model.infer(request([1.0])) for _ in range(4)), return_exceptions=True)
    assert any(isinstance(r, Unavailable) and "timeout" in str(r) for r in results)


async def test_slow_model_runs_off_the_event_loop() -> None:
    instance = Doubler(delay=0.002)
    model = make(BASE, instance)
    for _ in range(INLINE_MIN_SAMPLES + 4):
        await model.infer(request([1.0]))
    assert threading.main_thread().name not in instance.threads
    assert model.scheduler is not None and not model.scheduler.placement.inline


async def test_fast_model_moves_inline() -> None:
    instance = Doubler()
    model = make(BASE, instance)
    for _ in range(INLINE_MIN_SAMPLES + 4):
        await model.infer(request([1.0]))
    assert model.scheduler is not None and model.scheduler.placement.inline
    assert threading.current_thread().name in instance.threads


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request([1.0], name="NOPE"), "unexpected inference input 'NOPE'"),
        (request([1.0], dtype="INT32"), "data-type is 'INT32', but model 'm' expects 'FP32'"),
        (InferRequest("m", []), "missing required input"),
        (request([1.0] * 3, batch=False), "unexpected shape"),
    ],
)
async def test_validation_errors(req: InferRequest, message: str) -> None:
    model = make(BASE.replace("dims: [ -1 ]", "dims: [ 3 ]", 1), Doubler())
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("[", r"\[")):
        await model.infer(req)


async def test_batch_too_large() -> None:
    model = make(BASE, Doubler())
    data = np.zeros((9, 2), dtype=np.float32)
    with pytest.raises(InvalidArgument, match="batch-size must be <= 8"):
        await model.infer(InferRequest("m", [InferTensor("IN", "FP32", [9, 2], data)]))


async def test_requested_outputs_and_classification() -> None:
    model = make(BASE, Doubler())
    req = request([0.1, 0.9, 0.5])
    req.outputs = [RequestedOutput("OUT", {"classification": 2})]
    response = await model.infer(req)
    out = response.outputs[0]
    assert out.datatype == "BYTES" and out.shape == [1, 2]
    assert out.data is not None and out.data[0, 0].startswith(b"1.800000:1")
    bad = request([1.0])
    bad.outputs = [RequestedOutput("NOPE")]
    with pytest.raises(InvalidArgument, match="unexpected inference output 'NOPE'"):
        await model.infer(bad)


async def test_close_fails_queued_requests() -> None:
    instance = Doubler(delay=0.05)
    text = BASE.replace("max_batch_size: 8", "max_batch_size: 1") + "dynamic_batching { }"
    model = make(text, instance, "thread")
    assert model.scheduler is not None
    tasks = [asyncio.create_task(model.infer(request([1.0]))) for _ in range(4)]
    await asyncio.sleep(0.01)
    await model.scheduler.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(r, Unavailable) for r in results)


async def test_lone_request_is_dispatched_when_the_loop_goes_idle() -> None:
    model = make(BASE + "dynamic_batching { max_queue_delay_microseconds: 300000 }", Doubler())
    start = time.perf_counter()
    await model.infer(request([1.0]))
    assert time.perf_counter() - start < 0.15, "waited out the whole delay although nothing else was coming"


async def test_delay_dispatch_waits_for_a_fuller_batch_as_triton() -> None:
    text = BASE + (
        "dynamic_batching { max_queue_delay_microseconds: 200000 }\n"
        'parameters { key: "batch_dispatch" value { string_value: "delay" } }'
    )
    model = make(text, Doubler())
    start = time.perf_counter()
    await model.infer(request([1.0]))
    assert time.perf_counter() - start >= 0.19
