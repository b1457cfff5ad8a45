"""Closed-loop and open-loop runs: warm-up, a measured window, a bounded drain, then stop.

*Closed loop* (``concurrency``): N clients, each sends its next request when the last answered.
*Open loop* (``rate``): send times drawn up front from a Poisson process; each request's latency
is measured from its **scheduled** time, so when the server stalls, the requests that should
have gone out meanwhile carry the stall in their latency (no coordinated omission). When the
generator itself falls behind its schedule, the dispatch lag says so.

Requests *started* inside the measured window count (those that finish after it too: dropping
them would hide the tail). After the window, in-flight calls get ``timeout`` seconds, then the
connections are closed: every run ends by itself. Samples are raw (latencies in seconds, error
kinds) so that several worker processes can be merged before the percentiles are taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from elastiserve.loadgen.http_driver import connect_error_kind
from elastiserve.loadgen.targets import Target

__all__ = ["LevelSpec", "Progress", "Sample", "poisson_schedule", "run_level"]

Progress = Callable[[str, float, float, int, int], None]  # label, elapsed, total, done, errors


@dataclass(frozen=True)
class LevelSpec:
    """One measured point: a closed loop of ``concurrency`` clients or an open loop at ``rate``."""

    concurrency: int | None = None
    rate: float | None = None
    duration: float = 10.0
    warmup: float = 2.0
    connections: int | None = None  # gRPC: connections to spread calls on; HTTP open loop: pool cap
    timeout: float = 30.0
    seed: int = 0
    start_at: float | None = None  # time.time() to start at (worker processes start together)

    @property
    def label(self) -> str:
        return f"rate={self.rate:g}/s" if self.rate is not None else f"concurrency={self.concurrency}"


@dataclass
class Sample:
    """Raw outcome of one level in one process."""

    latencies: np.ndarray  # seconds, successful requests started in the window
    errors: Counter[str] = field(default_factory=Counter)
    duration: float = 0.0  # the measured window, seconds
    cpu_seconds: float = 0.0  # this process's CPU (all threads) over the window
    sent: int = 0  # requests started in the window
    lags: np.ndarray | None = None  # open loop: dispatch lag (s) behind the schedule
    scheduled: int = 0  # open loop: requests the schedule asked for in the window
    workers: int = 1

    @staticmethod
    def merge(samples: list[Sample]) -> Sample:
        errors: Counter[str] = Counter()
        for s in samples:
            errors.update(s.errors)
        lags = [s.lags for s in samples if s.lags is not None]
        return Sample(
            latencies=np.concatenate([s.latencies for s in samples]),
            errors=errors,
            duration=max(s.duration for s in samples),
            cpu_seconds=sum(s.cpu_seconds for s in samples),
            sent=sum(s.sent for s in samples),
            lags=np.concatenate(lags) if lags else None,
            scheduled=sum(s.scheduled for s in samples),
            workers=len(samples),
        )


def poisson_schedule(rate: float, span: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (s) of a Poisson process of ``rate``/s over ``[0, span)``."""
    if rate <= 0 or span <= 0:
        return np.empty(0)
    expected = rate * span
    count = int(expected + 8 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, count))
    while times[-1] < span:  # vanishingly rare; keeps the schedule exact
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, count))])
    return times[times < span]


class _Run:
    """State shared by the clients of one level."""

    def __init__(self, target: Target, spec: LevelSpec, progress: Progress | None) -> None:
        self.target = target
        self.spec = spec
        self.progress = progress
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.done = 0  # all completions, warm-up included (progress display)
        self.connections: list[Any] = []
        self.begin = 0.0
        self.measure_from = 0.0
        self.measure_to = 0.0
        self.cpu_start = 0.0
        self.cpu_end = 0.0

    async def clock_marks(self) -> None:
        if self.spec.start_at is not None:
            await asyncio.sleep(max(0.0, self.spec.start_at - time.time()))
        self.begin = time.perf_counter()
        self.measure_from = self.begin + self.spec.warmup
        self.measure_to = self.measure_from + self.spec.duration

    async def connect(self) -> Any | str:
        try:
            connection = await self.target.connect()
        except (TimeoutError, OSError) as exc:
            return connect_error_kind(exc)
        except Exception as exc:  # a protocol error while opening (bad preface, ...)
            return f"connect failed: {type(exc).__name__}"
        self.connections.append(connection)
        return connection

    def record(self, started: float, finished: float, kind: str | None) -> None:
        self.done += 1
        if started < self.measure_from or started >= self.measure_to:
            return
        if kind is None:
            self.latencies.append(finished - started)
        else:
            self.errors[kind] += 1

    async def watchdog(self) -> None:
        """Cut calls that outlive the timeout; read CPU at the window's edges; show progress."""
        timeout = self.spec.timeout
        perf = time.perf_counter
        next_progress = self.begin + 1.0
        while True:
            now = perf()
            if not self.cpu_start and now >= self.measure_from:
                self.cpu_start = time.process_time()
            if not self.cpu_end and now >= self.measure_to:
                self.cpu_end = time.process_time()
            for connection in list(self.connections):
                for handle, sent_at in self.target.in_flight(connection):
                    if sent_at and now - sent_at > timeout:
                        self.target.expire(connection, handle)
            if self.progress is not None and now >= next_progress:
                next_progress += 1.0
                total = self.spec.warmup + self.spec.duration
                self.progress(self.spec.label, now - self.begin, total, self.done, sum(self.errors.values()))
            await asyncio.sleep(min(0.1, max(timeout / 4, 0.01)))

    def sample(self) -> Sample:
        return Sample(
            latencies=np.asarray(self.latencies, dtype=np.float64),
            errors=self.errors,
            duration=self.spec.duration,
            cpu_seconds=max(0.0, (self.cpu_end or time.process_time()) - self.cpu_start),
            sent=self.sent,
            lags=np.asarray(self.lags, dtype=np.float64) if self.spec.rate is not None else None,
        )


# -- closed loop ----------------------------------------------------------------------------------------
class _Slot:
    """A connection shared by some clients, reopened (once, by whoever notices) when it drops."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.connection: Any = None
        self.lock = asyncio.Lock()

    async def get(self) -> Any | str:
        async with self.lock:
            if self.connection is not None and not self.connection.closed:
                return self.connection
            result = await self.run.connect()
            if not isinstance(result, str):
                self.connection = result
            return result


async def _closed_client(run: _Run, slot: _Slot, first: int) -> None:
    perf = time.perf_counter
    target, index = run.target, first
    measure_from, measure_to = run.measure_from, run.measure_to
    latencies, errors = run.latencies, run.errors
    while True:
        started = perf()
        if started >= measure_to:
            return
        connection = slot.connection
        if connection is None or connection.closed:
            connection = await slot.get()
            if isinstance(connection, str):
                run.record(started, perf(), connection)
                await asyncio.sleep(0.02)  # a refused port must not spin the loop
                continue
        kind = await target.start(connection, index, started)
        index += 1
        run.done += 1
        if started >= measure_from:
            run.sent += 1
            if kind is None:
                latencies.append(perf() - started)
            else:
                errors[kind] += 1
                if connection.closed:
                    await asyncio.sleep(0.005)


async def _closed_loop(run: _Run) -> None:
    spec = run.spec
    concurrency = spec.concurrency or 1
    if run.target.multiplexed:
        count = max(1, min(concurrency, spec.connections or concurrency))
    else:
        count = concurrency
    slots = [_Slot(run) for _ in range(count)]
    await asyncio.gather(*(slot.get() for slot in slots))  # connect before the clock starts
    await run.clock_marks()
    watchdog = asyncio.ensure_future(run.watchdog())
    clients = [asyncio.ensure_future(_closed_client(run, slots[i % count], i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(max(0.0, run.measure_to - time.perf_counter()))
        _, pending = await asyncio.wait(clients, timeout=spec.timeout + 1.0)
        if pending:
            for connection in run.connections:
                connection.close()
            _, pending = await asyncio.wait(pending, timeout=2.0)
            for task in pending:
                task.cancel()
    finally:
        run.cpu_end = run.cpu_end or time.process_time()
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


# -- open loop ------------------------------------------------------------------------------------------
async def _open_loop(run: _Run) -> None:
    spec = run.spec
    assert spec.rate is not None
    target = run.target
    rng = np.random.default_rng(spec.seed)
    offsets = poisson_schedule(spec.rate, spec.warmup + spec.duration, rng).tolist()
    perf = time.perf_counter
    loop = asyncio.get_running_loop()
    multiplexed = target.multiplexed
    pool_cap = spec.connections or (16 if multiplexed else 512)
    idle: list[Any] = []
    queue: deque[tuple[int, float]] = deque()  # (index, scheduled) waiting for a free connection
    shared: list[Any] = []
    opening = 0
    in_flight = 0
    finished = loop.create_future()
    dispatching = True
    openers: set[asyncio.Future[None]] = set()

    if multiplexed:  # a fixed set of connections, calls round-robin over them
        opened = await asyncio.gather(*(run.connect() for _ in range(pool_cap)))
        shared = [c for c in opened if not isinstance(c, str)]
    else:  # warm a few keep-alive connections; more open on demand up to the cap
        opened = await asyncio.gather(*(run.connect() for _ in range(min(pool_cap, 8))))
        idle = [c for c in opened if not isinstance(c, str)]
    await run.clock_marks()
    base = run.begin
    measure_from, measure_to = run.measure_from, run.measure_to
    watchdog = asyncio.ensure_future(run.watchdog())

    def maybe_finished() -> None:
        if not dispatching and in_flight == 0 and not queue and opening == 0 and not finished.done():
            finished.set_result(None)

    def on_done(connection: Any, index: int, scheduled: float, future: asyncio.Future[str | None]) -> None:
        nonlocal in_flight
        in_flight -= 1
        try:
            kind = future.result()
        except Exception as exc:  # only grpc.aio tasks can raise here
            kind = connect_error_kind(exc)
        run.record(scheduled, perf(), kind)
        if not multiplexed and not connection.closed:
            if queue:
                nxt, when = queue.popleft()
                send(connection, nxt, when)
            else:
                idle.append(connection)
        elif not multiplexed and queue and opening + in_flight < pool_cap:
            open_then_send(*queue.popleft())
        maybe_finished()

    def send(connection: Any, index: int, scheduled: float) -> None:
        nonlocal in_flight
        in_flight += 1
        future = target.start(connection, index, perf())
        if scheduled >= measure_from and scheduled < measure_to:
            run.sent += 1
        future.add_done_callback(lambda f: on_done(connection, index, scheduled, f))

    async def opener(index: int, scheduled: float) -> None:
        nonlocal opening
        result = await run.connect()
        opening -= 1
        if isinstance(result, str):
            run.record(scheduled, perf(), result)
            maybe_finished()
            return
        send(result, index, scheduled)

    def open_then_send(index: int, scheduled: float) -> None:
        nonlocal opening
        opening += 1
        task = asyncio.ensure_future(opener(index, scheduled))
        openers.add(task)  # a task nobody references may be collected mid-flight
        task.add_done_callback(openers.discard)

    def fire(index: int, scheduled: float, now: float) -> None:
        if measure_from <= scheduled < measure_to:
            run.lags.append(now - scheduled)
        if multiplexed:
            live = [c for c in shared if not c.closed]
            if not live:
                run.record(scheduled, now, "connection closed")
                return
            send(live[index % len(live)], index, scheduled)
        elif idle:
            connection = idle.pop()
            if connection.closed:
                fire(index, scheduled, now)
                return
            send(connection, index, scheduled)
        elif opening + in_flight < pool_cap:
            open_then_send(index, scheduled)
        else:
            queue.append((index, scheduled))

    total = len(offsets)
    scheduled_in_window = 0
    index = 0
    try:
        while index < total:
            now = perf()
            elapsed = now - base
            while index < total and offsets[index] <= elapsed:
                scheduled = base + offsets[index]
                if scheduled >= measure_from:
                    scheduled_in_window += 1
                fire(index, scheduled, now)
                index += 1
            if index >= total:
                break
            gap = offsets[index] - (perf() - base)
            # uvloop timers tick in milliseconds: sleep most of a long gap, then yield until due
            await asyncio.sleep(gap - 0.0015 if gap > 0.002 else 0)
        dispatching = False
        maybe_finished()
        await asyncio.sleep(max(0.0, measure_to - perf()))
        try:
            await asyncio.wait_for(asyncio.shield(finished), spec.timeout + 1.0)
        except TimeoutError:
            for connection in run.connections:
                connection.close()
            for _, scheduled in queue:
                run.record(scheduled, perf(), "not sent (no free connection)")
            queue.clear()
    finally:
        run.cpu_end = run.cpu_end or time.process_time()
        for connection in run.connections:
            connection.close()
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    run.scheduled_in_window = scheduled_in_window  # type: ignore[attr-defined]


async def run_level_async(target: Target, spec: LevelSpec, progress: Progress | None = None) -> Sample:
    """Run one level on the current loop; connections are opened and closed here."""
    run = _Run(target, spec, progress)
    try:
        if spec.rate is not None:
            await _open_loop(run)
        else:
            await _closed_loop(run)
    finally:
        for connection in run.connections:
            connection.close()
        await asyncio.sleep(0)  # let transports close
    sample = run.sample()
    sample.scheduled = getattr(run, "scheduled_in_window", 0)
    return sample


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available: about a third less CPU per request than asyncio's default loop."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()


def run_level(target: Target, spec: LevelSpec, progress: Progress | None = None) -> Sample:
    loop = new_event_loop()
    try:
        return loop.run_until_complete(run_level_async(target, spec, progress))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
