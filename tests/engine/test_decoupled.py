"""Decoupled Python models through the engine's dataplane (no network): response senders used from
threads the model starts, in-process (one instance) and in worker processes (two instances),
cancellation, Triton's rules for decoupled ``execute``, and :class:`ResponseStream` itself."""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from elastiserve.engine.backends.python_compat import triton_python_backend_utils as pb
from elastiserve.engine.dataplane import DataPlane
from elastiserve.engine.registry import ModelRegistry
from elastiserve.engine.repository import ModelRepository
from elastiserve.engine.streaming import DecoupledUnary, ResponseStream
from elastiserve.errors import ElastiserveError, InvalidArgument
from elastiserve.types import InferRequest, InferResponse, InferTensor

from .decoupled_models import write_decoupled_repo

# BLS from threads of a decoupled model in a worker process: both threads call "upper" at the
# same time, after execute returned (the worker's reader routes each answer to its caller).
BLS_MODEL = """
import threading
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            words = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].split()
            threading.Thread(target=self.run, args=(sender, words), daemon=True).start()
        return None

    def run(self, sender, words):
        answers = [None] * len(words)

        def call(i):
            answers[i] = pb_utils.InferenceRequest(
                model_name="upper",
                inputs=[pb_utils.Tensor("text_input", np.array([words[i]], dtype=np.object_))],
                requested_output_names=["text_output"],
            ).exec()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(words))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for answer in answers:
            if answer.has_error():
                sender.send(pb_utils.InferenceResponse(error=answer.error()))
            else:
                out = pb_utils.get_output_tensor_by_name(answer, "text_output").as_numpy()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", out)]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""

BLS_CONFIG = """
name: "bls_stream"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


# Decoupled BLS: exec(decoupled=True) on "repeat" (or async_exec), summing what streams back,
# optionally leaving the loop after STOP_AFTER responses (which must cancel the called request).
BLS_DECOUPLED_MODEL = """
import asyncio
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [self.one(request) for request in requests]

    def one(self, request):
        count = pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy().reshape(-1).astype(np.int32)
        stop_after = int(pb_utils.get_input_tensor_by_name(request, "STOP_AFTER").as_numpy().reshape(-1)[0])
        use_async = bool(pb_utils.get_input_tensor_by_name(request, "ASYNC").as_numpy().reshape(-1)[0])
        call = pb_utils.InferenceRequest(
            model_name="repeat",
            inputs=[
                pb_utils.Tensor("COUNT", count),
                pb_utils.Tensor("DELAY_MS", np.array([30 if stop_after else 0], np.int32)),
            ],
            requested_output_names=["OUT"],
            request_id="bls-" + request.request_id(),
        )
        if use_async:
            answers = asyncio.run(call.async_exec(decoupled=True))
        else:
            answers = call.exec(decoupled=True)
        values, empty = [], 0
        for answer in answers:
            if answer.has_error():
                return pb_utils.InferenceResponse(error=answer.error())
            if not answer.output_tensors():
                empty += 1
                continue
            values.append(int(pb_utils.get_output_tensor_by_name(answer, "OUT").as_numpy().reshape(-1)[0]))
            if stop_after and len(values) >= stop_after:
                break
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("VALUES", np.array(values, np.int32)),
            pb_utils.Tensor("EMPTY", np.array([empty], np.int32)),
        ])
"""

BLS_DECOUPLED_CONFIG = """
name: "bls_decoupled"
backend: "python"
max_batch_size: 0
input [
  { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "STOP_AFTER" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "ASYNC" data_type: TYPE_BOOL dims: [ 1 ] }
]
output [
  { name: "VALUES" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "EMPTY" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { count: %d kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module", params=[1, 2], ids=["in_process", "process"])
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_decoupled_repo(tmp_path_factory.mktemp("decoupled"), repeat_instances=request.param)
    (path / "bls_stream" / "1").mkdir(parents=True)
    (path / "bls_stream" / "1" / "model.py").write_text(textwrap.dedent(BLS_MODEL))
    (path / "bls_stream" / "config.pbtxt").write_text(BLS_CONFIG)
    (path / "bls_decoupled" / "1").mkdir(parents=True)
    (path / "bls_decoupled" / "1" / "model.py").write_text(textwrap.dedent(BLS_DECOUPLED_MODEL))
    (path / "bls_decoupled" / "config.pbtxt").write_text(BLS_DECOUPLED_CONFIG % request.param)
    return path


@pytest.fixture
async def dataplane(repo: Path) -> AsyncIterator[DataPlane]:
    registry = ModelRegistry(ModelRepository([repo]))
    dataplane = DataPlane(registry)
    registry.server = dataplane
    assert await registry.load_initial([]) == []
    try:
        yield dataplane
    finally:
        await registry.close()


def repeat(count: int, delay_ms: int = 0, error_at: int = -1, rid: str = "r", model: str = "repeat") -> InferRequest:
    tensors = [InferTensor("COUNT", "INT32", [1], np.array([count], np.int32))]
    if delay_ms:
        tensors.append(InferTensor("DELAY_MS", "INT32", [1], np.array([delay_ms], np.int32)))
    if error_at >= 0:
        tensors.append(InferTensor("ERROR_AT", "INT32", [1], np.array([error_at], np.int32)))
    return InferRequest(model, tensors, id=rid)


def text(model: str, value: str, **parameters: Any) -> InferRequest:
    tensor = InferTensor("text_input", "BYTES", [1], np.array([value.encode()], dtype=np.object_))
    return InferRequest(model, [tensor], id="t", parameters=parameters)


async def settled(stats: Any) -> None:
    """Statistics are recorded when ``execute`` returns, which may be after the final response."""
    for _ in range(100):
        if stats.pending == 0:
            return
        await asyncio.sleep(0.01)


def summary(items: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """OUT values, error messages or None (a bare FINAL), with the final flags."""
    out = []
    for result, final in items:
        if isinstance(result, InferResponse):
            out.append((int(result.output("OUT").data[0]), final))  # type: ignore[union-attr]
        elif isinstance(result, ElastiserveError):
            out.append((result.message, final))
        else:
            out.append((None, final))
    return out


async def test_responses_from_model_threads(dataplane: DataPlane) -> None:
    items = await dataplane.infer_stream(repeat(3, rid="three")).collect()
    assert summary(items) == [(0, False), (1, False), (2, False), (None, True)]
    first = items[0][0]
    assert (first.model_name, first.model_version, first.id) == ("repeat", "1", "three")
    assert [t.name for t in first.outputs] == ["OUT", "PID"]
    assert summary(await dataplane.infer_stream(repeat(0)).collect()) == [(None, True)]
    assert summary(await dataplane.infer_stream(repeat(3, error_at=1)).collect()) == [
        (0, False),
        ("failed at 1", False),
        (2, False),
        (None, True),
    ]


async def test_worker_processes_send_from_their_own_pids(dataplane: DataPlane, repo: Path) -> None:
    import os

    items = await dataplane.infer_stream(repeat(2, model="repeat_procs")).collect()
    pids = {int(r.output("PID").data[0]) for r, _ in items if r is not None}  # type: ignore[union-attr]
    assert len(pids) == 1 and os.getpid() not in pids


async def test_decoupled_execute_rules(dataplane: DataPlane, repo: Path) -> None:
    [(error, final)] = await dataplane.infer_stream(repeat(-1)).collect()
    assert final and isinstance(error, ElastiserveError)
    instance = error.message.split("'")[1]
    assert instance in ("repeat_0_0", "repeat_0_1")
    assert error.message == (
        f"Failed to process the request(s) for model '{instance}', message: Python model '{instance}' "
        "is using the decoupled mode and the execute function must return None."
    )
    [(error, final)] = await dataplane.infer_stream(repeat(-2)).collect()
    assert final and isinstance(error, ElastiserveError)
    assert error.message.startswith("Failed to process the request(s) for model instance 'repeat_0_")
    assert "ValueError: repeat was asked to fail" in error.message
    # FINAL twice: the second send raises Triton's message; the client sees one bare FINAL.
    assert summary(await dataplane.infer_stream(repeat(-3, rid="twice")).collect()) == [(None, True)]
    marker = repo / "repeat" / "second-final-twice"
    for _ in range(250):  # the model thread writes it after the client saw FINAL: wait for its text
        if marker.exists() and marker.read_text():
            break
        await asyncio.sleep(0.02)
    assert marker.read_text() == "Unable to send response. Response sender has been closed."


async def test_unary_infer_is_refused_and_plain_models_stream(dataplane: DataPlane) -> None:
    with pytest.raises(DecoupledUnary, match="ModelInfer RPC doesn't support models with decoupled"):
        await dataplane.infer(repeat(1))
    [(response, final)] = await dataplane.infer_stream(text("upper", "abc")).collect()
    assert final and response.output("text_output").data.tolist() == [b"ABC"]  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match="unexpected shape for input 'COUNT'"):
        dataplane.infer_stream(InferRequest("repeat", [InferTensor("COUNT", "INT32", [2], np.zeros(2, np.int32))]))


async def test_async_execute_and_parameters(dataplane: DataPlane) -> None:
    items = await dataplane.infer_stream(text("words", "one two", temperature=0.5)).collect()
    words = [r.output("text_output").data[0] for r, _ in items if r is not None]  # type: ignore[union-attr]
    assert words == [b"one", b"two"]
    assert items[0][0].output("params").data[0] == b'{"temperature": 0.5}'  # type: ignore[union-attr]


async def test_instance_is_free_once_execute_returns(dataplane: DataPlane) -> None:
    """One instance: a long stream must not hold it, only its execute call does (Triton)."""
    slow = dataplane.infer_stream(repeat(4, delay_ms=150, rid="slow"))
    started = time.monotonic()
    quick = await dataplane.infer_stream(repeat(1, rid="quick")).collect()
    assert summary(quick) == [(0, False), (None, True)]
    assert time.monotonic() - started < 0.5
    assert len(await slow.collect()) == 5


async def test_cancel_reaches_the_model_and_frees_the_request(dataplane: DataPlane, repo: Path) -> None:
    for model in ("repeat", "repeat_procs"):
        stream = dataplane.infer_stream(repeat(10_000, delay_ms=5, rid="gone", model=model))
        seen = 0
        async for _result, _final in stream:
            seen += 1
            if seen == 3:
                stream.cancel()
        assert seen == 3 and stream.cancelled
        marker = repo / model / "cancelled-gone"
        for _ in range(200):
            if marker.exists():
                break
            await asyncio.sleep(0.02)
        assert 3 <= int(marker.read_text()) < 10_000
        marker.unlink()
        assert summary(await dataplane.infer_stream(repeat(1, model=model)).collect()) == [(0, False), (None, True)]


async def test_cancel_while_queued_never_executes(dataplane: DataPlane) -> None:
    model = dataplane.registry.get("repeat")
    scheduler = model.scheduler
    held = [scheduler._idle.pop() for _ in range(len(scheduler._idle))]  # every instance busy
    try:
        stream = dataplane.infer_stream(repeat(1, rid="queued"))
        await asyncio.sleep(0.05)
        before = model.stats.execution_count
        stream.cancel()
        await asyncio.sleep(0.05)
    finally:
        for instance in held:
            scheduler._release(instance)
    assert summary(await dataplane.infer_stream(repeat(1)).collect()) == [(0, False), (None, True)]
    await settled(model.stats)
    assert model.stats.execution_count == before + 1  # only the second request ran
    assert not scheduler._waiters or all(w.done() for w in scheduler._waiters)


async def test_statistics(dataplane: DataPlane) -> None:
    stats = dataplane.registry.get("words").stats
    success, executions = stats.success.count, stats.execution_count
    await dataplane.infer_stream(text("words", "a b c")).collect()
    await settled(stats)
    assert (stats.success.count, stats.execution_count) == (success + 1, executions + 1)
    assert stats.pending == 0


async def test_bls_from_threads_of_a_decoupled_worker(dataplane: DataPlane) -> None:
    items = await dataplane.infer_stream(text("bls_stream", "x y z")).collect()
    assert [r.output("text_output").data.tolist() for r, _ in items if r is not None] == [  # type: ignore[union-attr]
        [b"X"],
        [b"Y"],
        [b"Z"],
    ]


async def test_worker_death_ends_open_streams_and_restarts(dataplane: DataPlane) -> None:
    stream = dataplane.infer_stream(repeat(10_000, delay_ms=20, rid="long", model="repeat_procs"))
    await stream.__anext__()
    instances = dataplane.registry.get("repeat_procs").scheduler.instances
    doomed = await dataplane.infer_stream(repeat(-4, model="repeat_procs")).collect()
    assert doomed[-1][1] and "exited with code 3" in doomed[-1][0].message
    rest = await asyncio.wait_for(stream.collect(), 30)  # the long one may or may not have died
    assert rest[-1][1]
    for _ in range(3):  # the dead worker is restarted; requests work again
        assert summary(await dataplane.infer_stream(repeat(1, model="repeat_procs")).collect())[-1] == (None, True)
    assert sum(i.restarts for i in instances) >= 1 or all(i.pid for i in instances)


# -- ResponseStream and the pb_utils sender --------------------------------------------------------


async def test_response_stream_orders_puts_from_threads() -> None:
    stream = ResponseStream()
    response = InferResponse("m", "1", [])

    def produce() -> None:
        for _ in range(1000):
            stream.put(response, False)
        stream.put(None, True)

    threading.Thread(target=produce).start()
    items = await asyncio.wait_for(stream.collect(), 10)
    assert len(items) == 1001 and items[-1] == (None, True)
    assert stream.finished


async def test_response_stream_cancel() -> None:
    stream = ResponseStream()
    called: list[bool] = []
    stream.add_cancel_callback(lambda: called.append(True))
    stream.put(InferResponse("m", "1", []), False)
    stream.cancel()
    assert called == [True] and stream.cancelled
    assert await stream.collect() == []
    stream.put(None, True)  # dropped
    late: list[bool] = []
    stream.add_cancel_callback(lambda: late.append(True))
    assert late == [True]


def test_sender_rules() -> None:
    sent: list[tuple[Any, bool]] = []
    sender = pb.InferenceResponseSender(lambda r, f: sent.append((r, f)), lambda: False)
    with pytest.raises(pb.TritonModelException, match="must be provided"):
        sender.send()
    with pytest.raises(pb.TritonModelException, match=r"Expected pb_utils\.InferenceResponse"):
        sender.send("nope")  # type: ignore[arg-type]
    sender.send(pb.InferenceResponse([]))
    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    with pytest.raises(pb.TritonModelException, match="Response sender has been closed"):
        sender.send(pb.InferenceResponse([]))
    assert [f for _, f in sent] == [False, True]
    request = pb.InferenceRequest(model_name="m")
    assert not request.is_cancelled()
    with pytest.raises(pb.TritonModelException, match="only available to decoupled models"):
        request.get_response_sender()


def bls_decoupled(count: int, stop_after: int = 0, use_async: bool = False, rid: str = "b") -> InferRequest:
    tensors = [
        InferTensor("COUNT", "INT32", [1], np.array([count], np.int32)),
        InferTensor("STOP_AFTER", "INT32", [1], np.array([stop_after], np.int32)),
        InferTensor("ASYNC", "BOOL", [1], np.array([use_async], np.bool_)),
    ]
    return InferRequest("bls_decoupled", tensors, id=rid)


@pytest.mark.parametrize("use_async", [False, True], ids=["exec", "async_exec"])
async def test_decoupled_bls_iterates_every_response(dataplane: DataPlane, use_async: bool) -> None:
    response = await dataplane.infer(bls_decoupled(4, use_async=use_async))
    assert response.output("VALUES").data.tolist() == [0, 1, 2, 3]  # type: ignore[union-attr]
    # repeat sends FINAL on its own after the last value: Triton's iterator ends with an empty one.
    assert response.output("EMPTY").data.tolist() == [1]  # type: ignore[union-attr]
    # Errors come back as the response's error.
    with pytest.raises(ElastiserveError, match="repeat was asked to fail"):
        await dataplane.infer(bls_decoupled(-2, use_async=use_async))


async def test_leaving_a_decoupled_bls_loop_early_cancels_the_call(dataplane: DataPlane, repo: Path) -> None:
    response = await dataplane.infer(bls_decoupled(50, stop_after=2, rid="early"))
    assert response.output("VALUES").data.tolist() == [0, 1]  # type: ignore[union-attr]
    if (repo / "bls_decoupled" / "config.pbtxt").read_text().count("count: 1 "):
        # In-process, responses stream one by one: the called request sees is_cancelled().
        marker = repo / "repeat" / "cancelled-bls-early"
        for _ in range(250):
            if marker.exists():
                break
            await asyncio.sleep(0.02)
        assert marker.exists()
