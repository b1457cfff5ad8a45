"""Sequence batching: correlation IDs, slots bound to one instance, control inputs, idle timeout,
backlog, direct/oldest batching, implicit state; plus a Python-backend model through the registry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from elastiserve.engine.config import apply_defaults, parse_config_text
from elastiserve.engine.dataplane import DataPlane
from elastiserve.engine.model import ModelVersion
from elastiserve.engine.registry import ModelRegistry
from elastiserve.engine.repository import ModelRepository
from elastiserve.engine.sequence import SequenceScheduler, validate_sequence_config
from elastiserve.errors import ConfigError, ElastiserveError, InvalidArgument, Unavailable
from elastiserve.types import InferRequest, InferResponse, InferTensor

from .python_backend_support import ACCUMULATOR_MODEL as ACC_MODEL
from .python_backend_support import write_model

CONTROLS = """
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY fp32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
"""


def config_text(
    max_batch: int = 4, strategy: str = "", idle_us: int = 0, extra: str = "", controls: str = CONTROLS
) -> str:
    return f"""
name: "acc" backend: "python" max_batch_size: {max_batch}
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [
  {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "WHO" data_type: TYPE_STRING dims: [ 1 ] }}
]
sequence_batching {{
  {f"max_sequence_idle_microseconds: {idle_us}" if idle_us else ""}
  {strategy}
  {controls}
  {extra}
}}
"""


class Accumulator:
    """Sums INPUT per CORRID (START resets); records every batch it executes."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.sums: dict[Any, int] = {}
        self.batches: list[list[dict[str, np.ndarray]]] = []

    def execute(self, requests: list[InferRequest]) -> list[InferResponse | ElastiserveError]:
        seen = [{t.name: t.data for t in r.inputs if t.data is not None} for r in requests]
        self.batches.append(seen)
        if self.delay:
            import time

            time.sleep(self.delay)
        out: list[InferResponse | ElastiserveError] = []
        for tensors in seen:
            corrid = tensors["CORRID"].flat[0]
            if tensors["START"].flat[0]:
                self.sums[corrid] = 0
            self.sums[corrid] = self.sums.get(corrid, 0) + int(tensors["INPUT"].flat[0])
            value = np.array([[self.sums[corrid]]], np.int32)
            who = np.array([[self.name.encode()]], dtype=np.object_)
            out.append(
                InferResponse(
                    "acc",
                    "1",
                    [InferTensor("OUTPUT", "INT32", [1, 1], value), InferTensor("WHO", "BYTES", [1, 1], who)],
                )
            )
        return out

    def close(self) -> None:
        pass


def make(text: str, count: int = 1, delay: float = 0.0) -> tuple[ModelVersion, list[Accumulator]]:
    config = parse_config_text(text, "acc")
    apply_defaults(config, "acc")
    instances = [Accumulator(f"acc_{i}", delay) for i in range(count)]
    model = ModelVersion("acc", 1, config, Path("."), None)
    model.scheduler = SequenceScheduler(config, instances, model.stats, "inline")  # type: ignore[arg-type,assignment]
    return model, instances


def req(value: int, batch: bool = True, **params: Any) -> InferRequest:
    data = np.array([[value]] if batch else [value], np.int32)
    return InferRequest("acc", [InferTensor("INPUT", "INT32", list(data.shape), data)], parameters=params)


def total(response: InferResponse) -> int:
    return int(response.outputs[0].data.flat[0])  # type: ignore[union-attr]


async def infer_all(model: ModelVersion, *requests: InferRequest) -> list[InferResponse]:
    return list(await asyncio.gather(*(model.infer(r) for r in requests)))


async def test_interleaved_sequences_keep_their_sums_and_instance() -> None:
    model, _ = make(config_text(), count=2)
    first = await model.infer(req(1, sequence_id=11, sequence_start=True))
    second = await model.infer(req(100, sequence_id=22, sequence_start=True))
    who = {11: set(), 22: set()}  # type: dict[int, set[bytes]]
    sums = {11: total(first), 22: total(second)}
    for step in range(1, 6):
        for corrid, scale in ((11, 1), (22, 100)):
            response = await model.infer(req(scale * step, sequence_id=corrid, sequence_end=step == 5))
            sums[corrid] = total(response)
            who[corrid].add(response.outputs[1].data.flat[0])  # type: ignore[union-attr]
    assert sums == {11: 1 + 15, 22: 100 + 1500}
    assert len(who[11]) == 1 and len(who[22]) == 1 and who[11] != who[22]  # spread, each pinned
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_requests_of_a_sequence_run_in_arrival_order() -> None:
    model, _ = make(config_text(), count=2, delay=0.002)
    await model.infer(req(0, sequence_id="42", sequence_start=True))  # a numeric string id
    responses = await infer_all(model, *(req(1, sequence_id="42") for _ in range(20)))
    assert [total(r) for r in responses] == list(range(1, 21))
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_control_tensors_have_triton_types_and_shapes() -> None:
    model, (instance,) = make(config_text())
    await model.infer(req(5, sequence_id=7, sequence_start=True))
    await model.infer(req(5, sequence_id=7, sequence_end=True))
    first, last = instance.batches[0][0], instance.batches[1][0]
    assert first["START"].dtype == np.int32 and first["START"].shape == (1, 1) and first["START"][0, 0] == 1
    assert first["END"].dtype == np.bool_ and not first["END"][0, 0]
    assert first["READY"].dtype == np.float32 and first["READY"][0, 0] == 1.0
    assert first["CORRID"].dtype == np.uint64 and first["CORRID"][0, 0] == 7
    assert last["START"][0, 0] == 0 and last["END"][0, 0]
    await model.scheduler.close()  # type: ignore[union-attr]

    model, (instance,) = make(config_text(max_batch=0))
    await model.infer(req(5, batch=False, sequence_id=9, sequence_start=True, sequence_end=True))
    assert instance.batches[0][0]["START"].shape == (1,)
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_triton_errors_for_bad_sequence_requests() -> None:
    model, _ = make(config_text())
    with pytest.raises(InvalidArgument, match="must specify a non-zero or non-empty correlation ID"):
        await model.infer(req(1))
    with pytest.raises(InvalidArgument, match="must specify a non-zero or non-empty correlation ID"):
        await model.infer(req(1, sequence_id=0, sequence_start=True))
    with pytest.raises(
        InvalidArgument,
        match="inference request for sequence 5 to model 'acc' must specify the START flag on the first "
        "request of the sequence",
    ):
        await model.infer(req(1, sequence_id=5))
    batch2 = InferRequest(
        "acc",
        [InferTensor("INPUT", "INT32", [2, 1], np.zeros((2, 1), np.int32))],
        parameters={"sequence_id": 5, "sequence_start": True},
    )
    with pytest.raises(
        InvalidArgument, match="must specify batch-size 1 due to requirements of sequence batcher"
    ):
        await model.infer(batch2)
    assert model.stats.failures_by_reason == {"OTHER": 4}
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_idle_timeout_releases_the_slot() -> None:
    model, _ = make(config_text(max_batch=0, idle_us=100_000))
    await model.infer(req(1, batch=False, sequence_id=1, sequence_start=True))
    await asyncio.sleep(0.3)
    with pytest.raises(InvalidArgument, match="must specify the START flag"):
        await model.infer(req(1, batch=False, sequence_id=1))
    # The slot is free again: a new sequence gets it at once (one instance, one slot).
    response = await asyncio.wait_for(
        model.infer(req(4, batch=False, sequence_id=2, sequence_start=True)), timeout=2
    )
    assert total(response) == 4
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_sequences_without_a_free_slot_wait_in_the_backlog() -> None:
    model, _ = make(config_text(max_batch=0))  # one instance, one slot
    await model.infer(req(1, batch=False, sequence_id=1, sequence_start=True))
    waiting = asyncio.ensure_future(model.infer(req(10, batch=False, sequence_id=2, sequence_start=True)))
    more = asyncio.ensure_future(model.infer(req(5, batch=False, sequence_id=2)))
    await asyncio.sleep(0.05)
    assert not waiting.done() and not more.done()
    ended = await model.infer(req(2, batch=False, sequence_id=1, sequence_end=True))
    assert total(ended) == 3
    assert total(await asyncio.wait_for(waiting, 2)) == 10
    assert total(await asyncio.wait_for(more, 2)) == 15
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_start_on_a_live_sequence_restarts_it() -> None:
    model, _ = make(config_text())
    await model.infer(req(5, sequence_id=3, sequence_start=True))
    await model.infer(req(5, sequence_id=3))
    assert total(await model.infer(req(1, sequence_id=3, sequence_start=True))) == 1
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_string_correlation_ids() -> None:
    text = config_text().replace("data_type: TYPE_UINT64", "data_type: TYPE_STRING")
    model, (instance,) = make(text)
    await model.infer(req(2, sequence_id="stream-a", sequence_start=True))
    assert total(await model.infer(req(3, sequence_id="stream-a"))) == 5
    assert instance.batches[0][0]["CORRID"][0, 0] == b"stream-a"
    await model.scheduler.close()  # type: ignore[union-attr]
    model, _ = make(config_text())  # UINT64 CORRID: a non-numeric string id cannot be converted
    with pytest.raises(InvalidArgument, match="cannot be converted"):
        await model.infer(req(2, sequence_id="x", sequence_start=True))
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_oldest_strategy_batches_across_sequences() -> None:
    strategy = "oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 200000 }"
    model, (instance,) = make(config_text(strategy=strategy))
    starts = [req(i, sequence_id=i, sequence_start=True) for i in range(1, 5)]
    responses = await infer_all(model, *starts)
    assert [total(r) for r in responses] == [1, 2, 3, 4]
    assert [len(b) for b in instance.batches] == [4]
    assert model.stats.as_dict()["batch_stats"][0]["batch_size"] == 4
    # Two requests of one sequence never share a batch.
    responses = await infer_all(model, req(1, sequence_id=1), req(1, sequence_id=1), req(1, sequence_id=2))
    assert [total(r) for r in responses] == [2, 3, 3]
    assert all(len({int(t["CORRID"].flat[0]) for t in b}) == len(b) for b in instance.batches)
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_direct_strategy_batches_one_request_per_slot() -> None:
    strategy = "direct { max_queue_delay_microseconds: 200000 minimum_slot_utilization: 1.0 }"
    model, (instance,) = make(config_text(max_batch=2, strategy=strategy))
    responses = await infer_all(
        model, req(1, sequence_id=1, sequence_start=True), req(2, sequence_id=2, sequence_start=True)
    )
    assert [total(r) for r in responses] == [1, 2] and [len(b) for b in instance.batches] == [2]
    await model.scheduler.close()  # type: ignore[union-attr]


async def test_close_fails_queued_requests() -> None:
    model, _ = make(config_text(max_batch=0))
    await model.infer(req(1, batch=False, sequence_id=1, sequence_start=True))
    backlog = asyncio.ensure_future(model.infer(req(1, batch=False, sequence_id=2, sequence_start=True)))
    await asyncio.sleep(0.01)
    await model.scheduler.close()  # type: ignore[union-attr]
    with pytest.raises(Unavailable):
        await backlog
    with pytest.raises(Unavailable):
        await model.infer(req(1, batch=False, sequence_id=1))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'control_input [ { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 } ] } ]',
            "must specify data_type TYPE_UINT64",
        ),
        (
            'control_input [ { name: "S2" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] } ] } ]',
            "multiple CONTROL_SEQUENCE_START",
        ),
        (
            'control_input [ { name: "R2" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [1] } ] } ]',
            "exactly 2 values",
        ),
    ],
)
def test_config_errors(extra: str, message: str) -> None:
    text = config_text(extra=extra, controls="" if "S2" not in extra else CONTROLS)
    config = parse_config_text(text, "acc")
    with pytest.raises(ConfigError, match=message):
        validate_sequence_config(config, Path("."))


def test_control_inputs_listed_in_config_are_not_required_from_clients() -> None:
    text = config_text().replace(
        'input [ { name: "INPUT"',
        'input [ { name: "START" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "INPUT"',
    )
    config = parse_config_text(text, "acc")
    model = ModelVersion("acc", 1, config, Path("."), None)
    assert model.required_inputs == ["INPUT"]
    assert model.validate(req(1)) == 1


STATE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy()
            state = pb_utils.get_input_tensor_by_name(r, "STATE_IN").as_numpy()
            new = (state + x).astype(np.int32)
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", new), pb_utils.Tensor("STATE_OUT", new)
            ]))
        return out
"""


async def test_python_models_through_the_registry(tmp_path: Path) -> None:
    acc_config = config_text() + (
        "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
        'parameters { key: "execution_mode" value { string_value: "in_process" } }\n'
    )
    write_model(tmp_path, "acc", ACC_MODEL, acc_config)
    state_config = """
name: "stateful" backend: "python" max_batch_size: 2
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching {
  state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]
            initial_state { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "zero" } } ]
}
"""
    write_model(tmp_path, "stateful", STATE_MODEL, state_config)
    registry = ModelRegistry(ModelRepository([str(tmp_path)]), control_mode="explicit")
    dataplane = DataPlane(registry)
    assert await registry.load_initial(["acc", "stateful"]) == []
    try:
        a = [await dataplane.infer(req(1, sequence_id=1, sequence_start=True))]
        b = [await dataplane.infer(req(10, sequence_id=2, sequence_start=True))]
        for _ in range(3):
            a.append(await dataplane.infer(req(1, sequence_id=1)))
            b.append(await dataplane.infer(req(10, sequence_id=2)))
        assert [total(r) for r in a] == [1, 2, 3, 4] and [total(r) for r in b] == [10, 20, 30, 40]
        assert len({r.outputs[1].data.flat[0] for r in a}) == 1  # type: ignore[union-attr]
        assert len({r.outputs[1].data.flat[0] for r in a + b}) == 2  # type: ignore[union-attr]

        def sreq(value: int, **params: Any) -> InferRequest:
            request = req(value, **params)
            request.model_name = "stateful"
            return request

        results = [await dataplane.infer(sreq(v, sequence_id=5, sequence_start=v == 2)) for v in (2, 3, 4)]
        assert [total(r) for r in results] == [2, 5, 9]
        assert [o.name for o in results[0].outputs] == ["OUTPUT"]  # the state output stays inside
        assert total(await dataplane.infer(sreq(7, sequence_id=5, sequence_start=True))) == 7
    finally:
        await registry.close()
