"""Run requests on a model version's instances: direct scheduling and dynamic batching.

Where ``execute`` runs is chosen per model, by measurement: a model whose executions are short
(tiny models are overhead-bound) runs *inline* on the event loop, which avoids a thread hop
per request; a slow model, or one whose instances wait on another process, runs in a thread
per instance so the loop keeps serving health checks and other models. The choice is
re-evaluated continuously from a moving average of execution time (see docs/scheduling.md).

Dynamic batching follows Triton: requests queue; when an instance is free the oldest request
and every later request with the same non-batch shapes are taken, up to ``max_batch_size``
(cut to the largest ``preferred_batch_size`` that fits), waiting at most
``max_queue_delay_microseconds`` for a fuller batch. ``default_queue_policy`` bounds the queue
(``max_queue_size``) and the time a request may wait (``default_timeout_microseconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import TYPE_CHECKING

from elastiserve.engine.backends.base import ExecuteResult, ModelInstance
from elastiserve.errors import ElastiserveError, Internal, Unavailable
from elastiserve.types import InferRequest, InferResponse

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from elastiserve.engine.stats import ModelStats

log = logging.getLogger(__name__)

# Executions shorter than this on average run inline on the event loop.
INLINE_THRESHOLD_NS = 300_000
# Samples taken in a thread before a model may move inline.
INLINE_MIN_SAMPLES = 16
_EWMA_WEIGHT = 0.1
# Event-loop iterations without a new request after which a partial batch is dispatched.
_IDLE_ITERATIONS = 3


class Placement:
    """Decides inline vs thread for one model from a moving average of execution time."""

    def __init__(self, mode: str, instance_count: int) -> None:
        self.mode = mode  # "auto" | "inline" | "thread"
        self.ewma_ns = 0.0
        self.samples = 0
        self.executor = (
            None
            if mode == "inline"
            else ThreadPoolExecutor(max_workers=instance_count, thread_name_prefix="model")
        )

    @property
    def inline(self) -> bool:
        if self.mode != "auto":
            return self.mode == "inline"
        return self.samples >= INLINE_MIN_SAMPLES and self.ewma_ns < INLINE_THRESHOLD_NS

    def observe(self, ns: int) -> None:
        self.samples += 1
        self.ewma_ns = ns if self.samples == 1 else self.ewma_ns + _EWMA_WEIGHT * (ns - self.ewma_ns)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class _Pending:
    request: InferRequest
    future: asyncio.Future[InferResponse]
    enqueued_ns: int
    batch_size: int
    shape_key: tuple
    deadline_ns: int  # 0 = none


@dataclass(slots=True)
class _Outcome:
    results: ExecuteResult
    exec_ns: int = 0
    extra: dict = field(default_factory=dict)


def execute_on(instance: ModelInstance, requests: list[InferRequest]) -> tuple[ExecuteResult, int]:
    """``instance.execute(requests)`` that never raises: one result per request, and the time taken."""
    start = perf_counter_ns()
    try:
        results = instance.execute(requests)
    except ElastiserveError as exc:
        results = [exc] * len(requests)
    except Exception as exc:  # a backend bug must fail the requests, not the server
        log.exception("backend raised from execute")
        results = [Internal(f"model execution failed: {type(exc).__name__}: {exc}")] * len(requests)
    if len(results) != len(requests):
        err = Internal(f"model returned {len(results)} responses for {len(requests)} requests")
        results = [err] * len(requests)
    return results, perf_counter_ns() - start


class Scheduler:
    """Owns the instances of one model version and the queue in front of them."""

    def __init__(
        self,
        config: ModelConfig,
        instances: list[ModelInstance],
        stats: ModelStats,
        placement: str = "auto",
    ) -> None:
        self.config = config
        self.instances = instances
        self.stats = stats
        self.placement = Placement(placement, len(instances))
        self._idle: list[ModelInstance] = list(instances)
        self._waiters: deque[asyncio.Future[ModelInstance]] = deque()
        self._closed = False
        self.batching = config.max_batch_size > 0 and config.HasField("dynamic_batching")
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._arrivals = 0
        if self.batching:
            batching = config.dynamic_batching
            self.max_delay_ns = batching.max_queue_delay_microseconds * 1000
            self.preferred = sorted(batching.preferred_batch_size)
            policy = batching.default_queue_policy
            self.max_queue_size = policy.max_queue_size
            self.default_timeout_ns = policy.default_timeout_microseconds * 1000
            self.allow_timeout_override = policy.allow_timeout_override
            # "idle" (default): dispatch early once no request is on its way (docs/scheduling.md);
            # "delay": always wait the full max_queue_delay for a fuller batch, as Triton does.
            dispatch = config.parameters.get("batch_dispatch")
            self.dispatch_when_idle = dispatch is None or dispatch.string_value != "delay"

    # -- public ---------------------------------------------------------------------------------
    async def infer(self, request: InferRequest, batch_size: int) -> InferResponse:
        if self._closed:
            raise Unavailable(f"model '{request.model_name}' is unloading")
        start = perf_counter_ns()
        self.stats.pending += 1
        try:
            if self.batching:
                response = await self._enqueue(request, batch_size, start)
            else:
                response = await self._run_direct(request, batch_size, start)
        except ElastiserveError as exc:
            reason = "REJECTED" if isinstance(exc, Unavailable) else "BACKEND"
            self.stats.record_request(False, perf_counter_ns() - start, 0, reason)
            raise
        finally:
            self.stats.pending -= 1
        return response

    async def close(self) -> None:
        """Fail queued requests, wait for running executions, close instances."""
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model '{self.config.name}' was unloaded"))
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        for _ in range(len(self.instances) - len(self._idle)):
            await self._acquire()
        for instance in self.instances:
            try:
                await asyncio.to_thread(instance.close)
            except Exception:
                log.exception("closing an instance of model '%s' failed", self.config.name)
        self.placement.close()

    # -- direct scheduling --------------------------------------------------------------------------
    async def _run_direct(self, request: InferRequest, batch_size: int, start: int) -> InferResponse:
        instance = self._idle.pop() if self._idle else await self._acquire()
        queue_ns = perf_counter_ns() - start
        try:
            outcome = await self._execute(instance, [request])
        finally:
            self._release(instance)
        result = outcome[0][0]
        self.stats.record_execution(batch_size, 0, outcome[1], 0)
        if isinstance(result, ElastiserveError):
            raise result
        self.stats.record_request(True, perf_counter_ns() - start, queue_ns)
        return result

    async def _execute(
        self, instance: ModelInstance, requests: list[InferRequest]
    ) -> tuple[ExecuteResult, int]:
        placement = self.placement
        if placement.inline:
            results, ns = execute_on(instance, requests)
        else:
            loop = asyncio.get_running_loop()
            results, ns = await loop.run_in_executor(placement.executor, execute_on, instance, requests)
        placement.observe(ns // max(1, len(requests)) if len(requests) > 1 else ns)
        return results, ns

    # -- instance leases: the decoupled path (streaming.py) runs its executes itself ---------------
    @property
    def closed(self) -> bool:
        return self._closed

    def take_idle(self) -> ModelInstance | None:
        """An idle instance now, or None."""
        return self._idle.pop() if self._idle else None

    def wait_for_instance(self) -> asyncio.Future[ModelInstance]:
        """A future resolved with the next released instance. A caller that cancels it after it
        was resolved must :meth:`release` the instance it was handed."""
        waiter: asyncio.Future[ModelInstance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def release(self, instance: ModelInstance) -> None:
        """Give back an instance taken with :meth:`take_idle` or :meth:`wait_for_instance`."""
        self._release(instance)

    async def _acquire(self) -> ModelInstance:
        if self._idle:
            return self._idle.pop()
        waiter: asyncio.Future[ModelInstance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def _release(self, instance: ModelInstance) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._idle.append(instance)
        if self._wakeup is not None:
            self._wakeup.set()

    # -- dynamic batching ---------------------------------------------------------------------------
    async def _enqueue(self, request: InferRequest, batch_size: int, start: int) -> InferResponse:
        if self.max_queue_size and len(self._queue) >= self.max_queue_size:
            raise Unavailable("Exceeds maximum queue size")
        timeout_ns = self.default_timeout_ns
        if self.allow_timeout_override and "timeout" in request.parameters:
            with contextlib.suppress(TypeError, ValueError):
                timeout_ns = int(request.parameters["timeout"]) * 1000
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        self._arrivals += 1
        shape_key = tuple((t.name, t.datatype, tuple(t.shape[1:])) for t in request.inputs)
        self._queue.append(
            _Pending(request, future, start, batch_size, shape_key, start + timeout_ns if timeout_ns else 0)
        )
        if self._batcher is None:
            self._wakeup = asyncio.Event()
            self._batcher = asyncio.create_task(self._batch_loop(), name=f"batcher-{self.config.name}")
        self._wakeup.set()  # type: ignore[union-attr]
        return await future

    def _expire(self, now: int) -> None:
        kept: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.deadline_ns and now > pending.deadline_ns:
                if not pending.future.done():
                    pending.future.set_exception(Unavailable("Request timeout expired"))
            else:
                kept.append(pending)
        self._queue = kept

    def _take_batch(self) -> list[_Pending]:
        """The oldest request plus later ones with the same shapes, up to max/preferred size."""
        first = self._queue[0]
        limit = self.config.max_batch_size
        chosen: list[_Pending] = []
        rest: deque[_Pending] = deque()
        total = 0
        for pending in self._queue:
            if pending.shape_key == first.shape_key and total + pending.batch_size <= limit:
                chosen.append(pending)
                total += pending.batch_size
            else:
                rest.append(pending)
        if self.preferred and total not in self.preferred:
            fitting = [p for p in self.preferred if p <= total]
            if fitting:
                target, kept, size = fitting[-1], [], 0
                for pending in chosen:
                    if size + pending.batch_size <= target:
                        kept.append(pending)
                        size += pending.batch_size
                    else:
                        rest.append(pending)
                chosen = kept
                rest = deque(sorted(rest, key=lambda p: p.enqueued_ns))
        self._queue = rest
        return chosen

    def _ready_to_dispatch(self, now: int) -> float:
        """0 when a batch should go now, else seconds to wait for a fuller batch."""
        if not self.max_delay_ns:
            return 0
        first = self._queue[0]
        total = sum(p.batch_size for p in self._queue if p.shape_key == first.shape_key)
        target = self.preferred[-1] if self.preferred else self.config.max_batch_size
        if total >= target or (self.preferred and total in self.preferred):
            return 0
        remaining = first.enqueued_ns + self.max_delay_ns - now
        return max(0.0, remaining / 1e9)

    async def _batch_loop(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        while not self._closed:
            if not self._queue or not self._idle:
                wakeup.clear()
                await wakeup.wait()
                continue
            now = perf_counter_ns()
            if self.default_timeout_ns or self.allow_timeout_override:
                self._expire(now)
                if not self._queue:
                    continue
            wait = self._ready_to_dispatch(now)
            if wait > 0 and self.dispatch_when_idle and await self._loop_went_idle():
                wait = 0
            if wait > 0:
                wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait)
                continue
            batch = [p for p in self._take_batch() if not p.future.done()]
            if not batch:
                continue
            instance = self._idle.pop()
            if self.placement.inline:
                self._run_batch(instance, batch, perf_counter_ns())
            else:
                task = asyncio.create_task(self._run_batch_async(instance, batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _loop_went_idle(self) -> bool:
        """True when a few loop iterations (each polls the sockets) brought no new request.

        Then nothing is on its way that could join the batch, and waiting out the rest of
        ``max_queue_delay_microseconds`` would only add latency: the delay is an upper bound.
        Under load requests keep arriving during each execution, so batches still fill."""
        before = self._arrivals
        for _ in range(_IDLE_ITERATIONS):
            await asyncio.sleep(0)
        return self._arrivals == before

    def _run_batch(self, instance: ModelInstance, batch: list[_Pending], started: int) -> None:
        try:
            results, ns = execute_on(instance, [p.request for p in batch])
            self.placement.observe(ns)
        finally:
            self._release(instance)
        self._finish(batch, results, ns, started)

    async def _run_batch_async(self, instance: ModelInstance, batch: list[_Pending]) -> None:
        started = perf_counter_ns()
        try:
            results, ns = await self._execute(instance, [p.request for p in batch])
        except BaseException as exc:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(Internal(f"model execution failed: {exc}"))
            raise
        finally:
            self._release(instance)
        self._finish(batch, results, ns, started)

    def _finish(self, batch: list[_Pending], results: ExecuteResult, ns: int, started: int) -> None:
        self.stats.record_execution(sum(p.batch_size for p in batch), 0, ns, 0)
        now = perf_counter_ns()
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, ElastiserveError):
                pending.future.set_exception(result)
            else:
                self.stats.record_request(True, now - pending.enqueued_ns, started - pending.enqueued_ns)
                pending.future.set_result(result)
