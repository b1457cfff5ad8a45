"""Decoupled models: zero or more responses per request, delivered as they are produced.

A :class:`ResponseStream` carries the responses of one request from whichever thread produces
them (the thread running ``execute``, threads the model starts, the reader thread of a worker
process) to the one consumer on the event loop (the gRPC ``ModelStreamInfer`` handler, HTTP
``generate_stream``). Producers only append to a deque and wake the loop once per burst, the
trick the gRPC core transport uses, so a model sending many small responses costs one
``call_soon_threadsafe`` per burst, not per response.

:func:`run_decoupled` is the scheduler's path for decoupled models. Triton's semantics: the
instance is busy only while ``execute`` runs (responses may keep coming after it returned),
``execute`` always runs in a thread (never inline on the loop: it may block on its own sends),
and a request whose client went away before an instance was free never executes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from elastiserve.errors import ElastiserveError, Internal, Unsupported
from elastiserve.types import InferRequest, InferResponse

if TYPE_CHECKING:
    from elastiserve.engine.backends.base import ModelInstance
    from elastiserve.engine.scheduler import Scheduler

log = logging.getLogger(__name__)

StreamResult = InferResponse | ElastiserveError | None  # None: a FINAL flag without a response
StreamItem = tuple[StreamResult, bool]  # (result, final)


class DecoupledUnary(Unsupported):
    """A unary infer (HTTP ``infer``, gRPC ``ModelInfer``, BLS ``exec()``) on a decoupled model.

    The frontends replace the message with Triton's own for their protocol."""

    GRPC_MESSAGE = "ModelInfer RPC doesn't support models with decoupled transaction policy"
    HTTP_MESSAGE = "HTTP end point doesn't support models with decoupled transaction policy"


class ResponseStream:
    """The responses of one request: ``put`` from any thread, ``async for result, final in
    stream`` on the loop. Iteration ends after the final item, or at once when cancelled.

    ``cancel()`` (the client went away) makes ``cancelled`` true, which the model sees as
    ``request.is_cancelled()``, runs the cancel callbacks and drops later responses."""

    __slots__ = (
        "_callbacks",
        "_done",
        "_ended",
        "_items",
        "_loop",
        "_loop_thread",
        "_scheduled",
        "_sink",
        "_waiter",
        "cancelled",
        "transform",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        transform: Callable[[InferResponse], InferResponse] | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()  # created on the loop
        self._items: deque[StreamItem] = deque()
        self._scheduled = False
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the consumer saw the final item
        self._callbacks: list[Callable[[], None]] = []
        self._sink: Callable[[StreamResult, bool], None] | None = None
        self._ended = False  # direct delivery: the final item went to the sink
        self.cancelled = False
        self.transform = transform  # applied to each response (output shaping)

    # -- producers (any thread) -------------------------------------------------------------------
    def put(self, result: StreamResult, final: bool) -> None:
        if self.cancelled or self._ended:  # nothing goes out after the final item
            return
        sink = self._sink
        if sink is None:
            self._items.append((result, final))
        else:
            sink(self._shaped(result), final)
            if not final:
                return
            self._ended = True  # wake the consumer: iteration ends
        if not self._scheduled:
            self._scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._wake()
            else:
                # RuntimeError: the loop is closed, nobody is listening any more.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._wake)
        elif threading.get_ident() != self._loop_thread:
            # The loop has not taken the previous response yet: a model thread sending a burst
            # holds the GIL; hand it over so responses leave as they are produced.
            time.sleep(0)

    def _wake(self) -> None:
        self._scheduled = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- consumer (the loop) ----------------------------------------------------------------------
    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> StreamItem:
        while True:
            if self.cancelled or self._done:
                raise StopAsyncIteration
            if self._items:
                result, final = self._items.popleft()
                if final:
                    self._done = True
                return self._shaped(result), final
            if self._ended:
                self._done = True
                raise StopAsyncIteration
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _shaped(self, result: StreamResult) -> StreamResult:
        if result.__class__ is InferResponse and self.transform is not None:
            try:
                return self.transform(result)  # type: ignore[arg-type]
            except ElastiserveError as exc:
                return exc
        return result

    def deliver_directly(self, sink: Callable[[StreamResult, bool], None]) -> None:
        """From now on hand each item to ``sink(result, final)`` in the producer's thread, with
        no hop through the loop (a gRPC response goes on the wire from the model's thread);
        ``sink`` must be thread-safe and must not raise. Iterating the stream then yields
        nothing and ends after the final item (or on cancel)."""
        self._sink = sink
        while self._items:
            result, final = self._items.popleft()
            sink(self._shaped(result), final)
            if final:
                self._ended = True

    @property
    def finished(self) -> bool:
        return self._done

    def add_cancel_callback(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs once when the stream is cancelled: on the loop, or at once (in the
        calling thread) if it already was. Safe to call from any thread."""
        self._callbacks.append(callback)
        if self.cancelled:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks = self._callbacks
        while callbacks:
            try:
                callback = callbacks.pop(0)  # atomic: each callback runs exactly once
            except IndexError:
                return
            try:
                callback()
            except Exception:
                log.exception("a stream cancel callback failed")

    def cancel(self) -> None:
        """The consumer is gone: stop iterating, tell the model, free what the request holds."""
        if self.cancelled or self._done:
            return
        self.cancelled = True
        self._items.clear()
        self._wake()
        self._run_callbacks()

    async def collect(self) -> list[StreamItem]:
        """Every item until the final one (for clients that want all responses at once)."""
        return [item async for item in self]


def single_response(coro: Any) -> ResponseStream:
    """A stream with the one response (or error) of a non-decoupled model's ``infer``."""
    stream = ResponseStream()

    async def run() -> None:
        try:
            result: StreamResult = await coro
        except ElastiserveError as exc:
            result = exc
        except Exception as exc:  # a server bug: the request fails, the stream still ends
            log.exception("streamed inference failed")
            result = Internal(f"{type(exc).__name__}: {exc}")
        stream.put(result, True)

    task = asyncio.get_running_loop().create_task(run())
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return stream


_TASKS: set[asyncio.Task[None]] = set()


def start_decoupled(scheduler: Scheduler, request: InferRequest, batch_size: int, stream: ResponseStream) -> None:
    """Queue ``request`` for an instance of ``scheduler``'s model; responses go to ``stream``.

    With an instance idle, ``execute`` is handed to its thread right here rather than from a
    task's first step: one loop iteration less before the first response."""
    loop = asyncio.get_running_loop()
    scheduler.stats.pending += 1  # counted from now: run_decoupled takes it off when done
    started = None
    instance = scheduler.take_idle() if not stream.cancelled else None
    if instance is not None:
        future = loop.run_in_executor(scheduler.placement.executor, _call_decoupled, instance, request, stream)
        started = (instance, future)
    task = loop.create_task(run_decoupled(scheduler, request, batch_size, stream, started))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def run_decoupled(
    scheduler: Scheduler,
    request: InferRequest,
    batch_size: int,
    stream: ResponseStream,
    started: tuple[Any, asyncio.Future[tuple[bool, int]]] | None = None,
) -> None:
    start = perf_counter_ns()
    stats = scheduler.stats
    try:
        queue_ns = 0
        if started is not None:
            instance, future = started
        else:
            instance = await _acquire(scheduler, stream)
            if instance is None:  # cancelled while waiting: never executes
                stats.record_request(False, perf_counter_ns() - start, 0, "CANCELED")
                return
            queue_ns = perf_counter_ns() - start
            future = asyncio.get_running_loop().run_in_executor(
                scheduler.placement.executor, _call_decoupled, instance, request, stream
            )
        try:
            ok, ns = await future
        finally:
            scheduler.release(instance)
        stats.record_execution(batch_size, 0, ns, 0)
        stats.record_request(ok, perf_counter_ns() - start, queue_ns)
    except Exception as exc:  # a scheduler bug: fail the request, keep serving
        log.exception("decoupled execution failed")
        stream.put(Internal(f"model execution failed: {type(exc).__name__}: {exc}"), True)
    finally:
        stats.pending -= 1


async def _acquire(scheduler: Scheduler, stream: ResponseStream) -> ModelInstance | None:
    """An idle instance, or None when the stream is cancelled first (the wait is abandoned)."""
    if stream.cancelled:
        return None
    idle = scheduler.take_idle()
    if idle is not None:
        return idle
    waiter = scheduler.wait_for_instance()
    stream.add_cancel_callback(waiter.cancel)
    try:
        return await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():  # handed an instance just as it was cancelled
            scheduler.release(waiter.result())
        if stream.cancelled:
            return None
        raise


def _call_decoupled(instance: Any, request: InferRequest, stream: ResponseStream) -> tuple[bool, int]:
    """Run one decoupled ``execute`` in a worker thread; returns (succeeded, nanoseconds)."""
    start = perf_counter_ns()
    execute_decoupled = getattr(instance, "execute_decoupled", None)
    try:
        if execute_decoupled is not None:
            ok = bool(execute_decoupled([request], [stream]))
        else:  # a backend without decoupled support: its one result is the only response
            result = instance.execute([request])[0]
            ok = not isinstance(result, ElastiserveError)
            stream.put(result, True)
    except ElastiserveError as exc:
        ok = False
        stream.put(exc, True)
    except Exception as exc:  # a backend bug must fail the request, not the server
        log.exception("backend raised from a decoupled execute")
        ok = False
        stream.put(Internal(f"model execution failed: {type(exc).__name__}: {exc}"), True)
    return ok, perf_counter_ns() - start
