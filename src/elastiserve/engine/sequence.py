"""Triton's sequence batcher: stateful streams (audio chunks, sessions) on CPU model instances.

A request to a ``sequence_batching`` model carries a correlation ID (``sequence_id``) and the
``sequence_start`` / ``sequence_end`` flags. The first request of a sequence binds it to a
*slot* of one model instance; every later request of that sequence goes to the same slot, so
the same instance sees the whole stream in arrival order and can keep state per correlation
ID. Slots per instance: ``max_batch_size`` (at least 1) with the ``direct`` strategy,
``oldest.max_candidate_sequences`` with ``oldest``. A sequence that finds no free slot waits in
a backlog until one frees up (Triton's behaviour). The slot is released when the END request
is dispatched, or when the sequence was idle for ``max_sequence_idle_microseconds`` (default
1 s); after that the sequence must START again.

Control inputs (``control_input``: START, END, READY, CORRID) are not in the config's
``input`` list; they are injected into each request before the instance sees it, with the
configured datatype and Triton's shapes (``[1]``, or ``[1, 1]`` for batching models). Implicit
state (``state [...]``) is kept per slot: the state input is injected, the state output is taken
out of the response and fed back on the next request of the sequence.

Batching across sequences: each instance runs one batch at a time made of at most one request
per slot (the head of each slot's queue), so order within a sequence always holds. ``direct``
dispatches the ready heads at once (or waits up to ``max_queue_delay_microseconds`` for
``minimum_slot_utilization``); ``oldest`` takes the oldest heads up to ``max_batch_size``, cut
to a ``preferred_batch_size``, waiting up to its ``max_queue_delay_microseconds`` for a fuller
batch. There are no "not ready" filler requests: CPU backends take a list of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc.model_config_pb2 import DataType, ModelSequenceBatching

from elastiserve.engine.backends.base import ModelInstance
from elastiserve.engine.scheduler import Placement, execute_on
from elastiserve.errors import ConfigError, ElastiserveError, Internal, InvalidArgument, Unavailable
from elastiserve.types import (
    DATATYPE_TO_NUMPY,
    InferRequest,
    InferResponse,
    InferTensor,
    config_type_to_datatype,
    numpy_to_datatype,
)

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from elastiserve.engine.stats import ModelStats

log = logging.getLogger(__name__)

Control = ModelSequenceBatching.Control
START, READY, END, CORRID = (
    Control.CONTROL_SEQUENCE_START,
    Control.CONTROL_SEQUENCE_READY,
    Control.CONTROL_SEQUENCE_END,
    Control.CONTROL_SEQUENCE_CORRID,
)
_KIND_NAMES = {START: "START", READY: "READY", END: "END", CORRID: "CORRID"}
_CORRID_TYPES = (DataType.TYPE_UINT64, DataType.TYPE_INT64, DataType.TYPE_UINT32, DataType.TYPE_INT32)
# Triton's default when max_sequence_idle_microseconds is not set.
DEFAULT_IDLE_US = 1_000_000


@dataclass(slots=True)
class ControlTensor:
    """One control input: where to put which value for a request."""

    name: str
    kind: int
    datatype: str
    false_true: tuple[Any, Any] = (0, 1)


def parse_controls(config: ModelConfig) -> list[ControlTensor]:
    """The configured control inputs, validated the way Triton validates them at load."""
    prefix = f"model '{config.name}'"
    seen: dict[int, str] = {}
    controls: list[ControlTensor] = []
    for control_input in config.sequence_batching.control_input:
        if not control_input.name:
            raise ConfigError(f"{prefix}: sequence batching control input has no name")
        if len(control_input.control) != 1:
            raise ConfigError(
                f"{prefix}: sequence batching control input '{control_input.name}' must specify "
                f"exactly one control, got {len(control_input.control)}"
            )
        control = control_input.control[0]
        kind_name = _KIND_NAMES.get(control.kind, str(control.kind))
        if control.kind in seen:
            raise ConfigError(
                f"{prefix}: sequence batching specifies multiple CONTROL_SEQUENCE_{kind_name} tensors "
                f"('{seen[control.kind]}' and '{control_input.name}')"
            )
        seen[control.kind] = control_input.name
        if control.kind == CORRID:
            if control.data_type not in (*_CORRID_TYPES, DataType.TYPE_STRING):
                raise ConfigError(
                    f"{prefix}: sequence batching control 'CONTROL_SEQUENCE_CORRID' for "
                    f"'{control_input.name}' must specify data_type TYPE_UINT64, TYPE_INT64, TYPE_UINT32, "
                    "TYPE_INT32 or TYPE_STRING"
                )
            controls.append(
                ControlTensor(control_input.name, CORRID, config_type_to_datatype(control.data_type))
            )
            continue
        given = [
            (datatype, tuple(values))
            for datatype, values in (
                ("INT32", control.int32_false_true),
                ("FP32", control.fp32_false_true),
                ("BOOL", control.bool_false_true),
            )
            if values
        ]
        if len(given) != 1 or len(given[0][1]) != 2:
            raise ConfigError(
                f"{prefix}: sequence batching control 'CONTROL_SEQUENCE_{kind_name}' for "
                f"'{control_input.name}' must specify exactly 2 values in exactly one of "
                "'int32_false_true', 'fp32_false_true' or 'bool_false_true'"
            )
        datatype, values = given[0]
        controls.append(ControlTensor(control_input.name, control.kind, datatype, (values[0], values[1])))
    return controls


def validate_sequence_config(config: ModelConfig, model_dir: Path) -> None:
    """Load-time checks of ``sequence_batching``, before any instance is created; ConfigError."""
    if not config.HasField("sequence_batching"):
        return
    parse_controls(config)
    _parse_states(config, model_dir)


@dataclass(slots=True)
class _StateSpec:
    input_name: str
    output_name: str
    initial: np.ndarray  # without the batch dimension


def _parse_states(config: ModelConfig, model_dir: Path | None) -> list[_StateSpec]:
    prefix = f"model '{config.name}'"
    specs = []
    for state in config.sequence_batching.state:
        if not state.input_name or not state.output_name:
            raise ConfigError(f"{prefix}: sequence batching state must name input_name and output_name")
        datatype = config_type_to_datatype(state.data_type)
        if datatype not in DATATYPE_TO_NUMPY or datatype == "BYTES":
            raise ConfigError(f"{prefix}: state '{state.input_name}' has unsupported data_type {datatype}")
        dtype = DATATYPE_TO_NUMPY[datatype]
        dims = [d if d > 0 else 1 for d in state.dims]
        initial = np.zeros(dims, dtype=dtype)
        for init in state.initial_state:
            init_dims = [d if d > 0 else 1 for d in init.dims] or dims
            if init.HasField("data_file"):
                base = (model_dir or Path(".")) / "initial_state"
                path = (base / init.data_file).resolve()
                if not str(path).startswith(str(base.resolve()) + "/") or not path.is_file():
                    raise ConfigError(f"{prefix}: initial state file '{init.data_file}' not found in {base}")
                raw = path.read_bytes()
                need = int(np.prod(init_dims)) * dtype.itemsize
                if len(raw) < need:
                    raise ConfigError(
                        f"{prefix}: initial state file '{init.data_file}' has {len(raw)} bytes, "
                        f"state '{state.input_name}' needs {need}"
                    )
                initial = np.frombuffer(raw[:need], dtype=dtype).reshape(init_dims).copy()
            else:
                initial = np.zeros(init_dims, dtype=dtype)
        specs.append(_StateSpec(state.input_name, state.output_name, initial))
    return specs


@dataclass(slots=True, eq=False)
class _Item:
    """A queued request of a sequence; ``request is None`` marks a slot release (idle timeout)."""

    request: InferRequest | None
    future: asyncio.Future[InferResponse] | None
    enqueued_ns: int
    start: bool = False
    end: bool = False
    corrid: Any = None
    corrid_value: Any = None  # what the CORRID control input carries


@dataclass(slots=True, eq=False)
class _Slot:
    lane: _Lane
    index: int
    queue: deque[_Item] = field(default_factory=deque)
    state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Lane:
    """One model instance, its slots and the task that runs its batches one after another."""

    instance: ModelInstance
    index: int
    slots: list[_Slot] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    busy: int = 0  # slots bound to a sequence


def _sequence_id(request: InferRequest) -> Any:
    params = request.parameters
    corrid = params.get("sequence_id") if params else None
    if corrid is None or isinstance(corrid, bool) or not isinstance(corrid, int | str):
        return None
    return corrid if corrid != 0 and corrid != "" else None


class SequenceScheduler:
    """Same interface as :class:`~elastiserve.engine.scheduler.Scheduler`: ``infer`` / ``close``."""

    def __init__(
        self,
        config: ModelConfig,
        instances: list[ModelInstance],
        stats: ModelStats,
        placement: str = "auto",
        model_dir: Path | None = None,
    ) -> None:
        validate_sequence_config(config, model_dir or Path("."))
        self.config = config
        self.name = config.name
        self.instances = instances
        self.stats = stats
        self.placement = Placement(placement, len(instances))
        sequence = config.sequence_batching
        self.max_idle_ns = (sequence.max_sequence_idle_microseconds or DEFAULT_IDLE_US) * 1000
        self.controls = parse_controls(config)
        self._corrid_control = next((c for c in self.controls if c.kind == CORRID), None)
        self.states = _parse_states(config, model_dir)
        self.batching = config.max_batch_size > 0
        self.max_batch = max(1, config.max_batch_size)
        self.oldest = sequence.HasField("oldest")
        self.preferred: list[int] = []
        self.min_utilization = 0.0
        if self.oldest:
            slots = sequence.oldest.max_candidate_sequences or self.max_batch
            self.delay_ns = sequence.oldest.max_queue_delay_microseconds * 1000
            self.preferred = sorted(p for p in sequence.oldest.preferred_batch_size if p <= self.max_batch)
        else:
            slots = self.max_batch
            self.delay_ns = sequence.direct.max_queue_delay_microseconds * 1000
            self.min_utilization = sequence.direct.minimum_slot_utilization
        self.lanes = [_Lane(instance, i) for i, instance in enumerate(instances)]
        for lane in self.lanes:
            lane.slots = [_Slot(lane, j) for j in range(slots)]
        self._free: list[_Slot] = [slot for lane in self.lanes for slot in lane.slots]
        self._bound: dict[Any, _Slot] = {}  # correlation ID -> its slot
        self._backlog_of: dict[Any, deque[_Item]] = {}  # correlation ID -> its backlog queue
        self._backlogs: deque[deque[_Item]] = deque()  # sequences waiting for a slot, oldest first
        self._last_seen: dict[Any, int] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._reaper_wakeup: asyncio.Event | None = None
        self._reaper_parked = False  # the reaper waits with no deadline (no live sequence)
        self._started = False
        self._closed = False

    # -- public ---------------------------------------------------------------------------------
    async def infer(self, request: InferRequest, batch_size: int) -> InferResponse:
        if self._closed:
            raise Unavailable(f"model '{request.model_name}' is unloading")
        start = perf_counter_ns()
        self.stats.pending += 1
        try:
            try:
                item = self._enqueue(request, batch_size, start)
            except ElastiserveError:
                self.stats.record_request(False, perf_counter_ns() - start, 0, "OTHER")
                raise
            assert item.future is not None
            try:
                return await item.future
            except ElastiserveError as exc:
                reason = "REJECTED" if isinstance(exc, Unavailable) else "BACKEND"
                self.stats.record_request(False, perf_counter_ns() - start, 0, reason)
                raise
        finally:
            self.stats.pending -= 1

    async def close(self) -> None:
        """Fail what is queued, let running batches finish, close the instances."""
        self._closed = True
        gone = Unavailable(f"model '{self.name}' was unloaded")
        queued = [item for lane in self.lanes for slot in lane.slots for item in slot.queue]
        queued += [item for backlog in self._backlogs for item in backlog]
        for item in queued:
            if item.future is not None and not item.future.done():
                item.future.set_exception(gone)
        for lane in self.lanes:
            for slot in lane.slots:
                slot.queue.clear()
            lane.wakeup.set()
        self._backlogs.clear()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        tasks = [lane.task for lane in self.lanes if lane.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for instance in self.instances:
            try:
                await asyncio.to_thread(instance.close)
            except Exception:
                log.exception("closing an instance of model '%s' failed", self.name)
        self.placement.close()

    # -- routing --------------------------------------------------------------------------------
    def _enqueue(self, request: InferRequest, batch_size: int, now: int) -> _Item:
        name = request.model_name or self.name
        if self.batching and batch_size > 1:
            raise InvalidArgument(
                f"inference request to model '{name}' must specify batch-size 1 due to requirements "
                "of sequence batcher"
            )
        corrid = _sequence_id(request)
        if corrid is None:
            raise InvalidArgument(
                f"inference request to model '{name}' must specify a non-zero or non-empty correlation ID"
            )
        params = request.parameters
        start, end = bool(params.get("sequence_start")), bool(params.get("sequence_end"))
        slot = self._bound.get(corrid)
        backlog = self._backlog_of.get(corrid)
        if not start and slot is None and backlog is None:
            raise InvalidArgument(
                f"inference request for sequence {corrid} to model '{name}' must specify the START flag "
                "on the first request of the sequence"
            )
        corrid_value = (
            self._corrid_value(self._corrid_control, corrid, name)
            if self._corrid_control is not None
            else None
        )
        self._ensure_started()
        item = _Item(
            request, asyncio.get_running_loop().create_future(), now, start, end, corrid, corrid_value
        )
        self._last_seen[corrid] = now
        if self._reaper_parked and self._reaper_wakeup is not None:
            # Only a parked reaper needs waking: a scheduled check stays valid (stamps only grow).
            self._reaper_parked = False
            self._reaper_wakeup.set()
        if start and (slot is not None or backlog is not None):
            log.warning(
                "sequence %s for model '%s' has a conflict. The previous sequence did not end before this "
                "sequence start. Previous sequence will be terminated early.",
                corrid,
                name,
            )
        if slot is not None:
            slot.queue.append(item)
            if end:
                del self._bound[corrid]
            slot.lane.wakeup.set()
        elif backlog is not None:
            backlog.append(item)
            if end:
                del self._backlog_of[corrid]
        else:
            free = self._take_free_slot()
            if free is not None:
                free.queue.append(item)
                if not end:
                    self._bound[corrid] = free
                free.lane.wakeup.set()
            else:
                queue = deque([item])
                self._backlogs.append(queue)
                if not end:
                    self._backlog_of[corrid] = queue
        if end and corrid not in self._bound and corrid not in self._backlog_of:
            self._last_seen.pop(corrid, None)
        return item

    def _take_free_slot(self) -> _Slot | None:
        """A free slot on the instance with the fewest bound sequences (spreads streams out)."""
        if not self._free:
            return None
        best = min(range(len(self._free)), key=lambda i: (self._free[i].lane.busy, i))
        slot = self._free.pop(best)
        slot.lane.busy += 1
        return slot

    def _release_slot(self, slot: _Slot) -> None:
        """The slot's sequence ended (or idled out): hand it to the oldest backlog, else free it."""
        slot.state = {}
        while self._backlogs:
            backlog = self._backlogs.popleft()
            if not backlog:
                continue
            slot.queue.extend(backlog)
            last = backlog[-1]
            if not last.end:
                self._backlog_of.pop(last.corrid, None)
                self._bound[last.corrid] = slot
            slot.lane.wakeup.set()
            return
        slot.lane.busy -= 1
        self._free.append(slot)

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        for lane in self.lanes:
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"sequence-{self.name}-{lane.index}")
        self._reaper_wakeup = asyncio.Event()
        self._reaper = asyncio.create_task(self._reap_forever(), name=f"sequence-reaper-{self.name}")

    # -- idle timeout ---------------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        wakeup = self._reaper_wakeup
        assert wakeup is not None
        while not self._closed:
            wait_ns = self._reap(perf_counter_ns())
            wakeup.clear()
            if wait_ns is None:
                self._reaper_parked = True
                await wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait_ns / 1e9)

    def _reap(self, now: int) -> int | None:
        """Release the slots of sequences idle too long; returns ns until the next check (None: none)."""
        next_ns: int | None = None
        for corrid, seen in list(self._last_seen.items()):
            remaining = seen + self.max_idle_ns - now
            if remaining > 0:
                next_ns = remaining if next_ns is None else min(next_ns, remaining)
                continue
            slot = self._bound.pop(corrid, None)
            if slot is not None:
                log.info("sequence %s of model '%s' exceeded the max sequence idle time", corrid, self.name)
                slot.queue.append(_Item(None, None, now))
                slot.lane.wakeup.set()
            elif corrid in self._backlog_of:
                # Still waiting for a slot: look again later, as Triton does.
                next_ns = min(next_ns or 50_000_000, 50_000_000)
                continue
            del self._last_seen[corrid]
        return next_ns

    # -- batches --------------------------------------------------------------------------------
    async def _run_lane(self, lane: _Lane) -> None:
        wakeup = lane.wakeup
        while not self._closed:
            ready: list[_Slot] = []
            for slot in lane.slots:
                while slot.queue and slot.queue[0].request is None:  # idle release marker
                    slot.queue.popleft()
                    self._release_slot(slot)
                if slot.queue:
                    ready.append(slot)
            if not ready:
                wakeup.clear()
                await wakeup.wait()
                continue
            wait_ns = self._batch_wait_ns(lane, ready, perf_counter_ns())
            if wait_ns > 0:
                wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait_ns / 1e9)
                continue
            chosen = self._choose(ready)
            batch: list[tuple[_Slot, _Item]] = []
            for slot in chosen:
                item = slot.queue.popleft()
                batch.append((slot, item))
            try:
                await self._run_batch(lane, batch)
            except Exception as exc:  # never let one batch kill the lane
                log.exception("sequence batch of model '%s' failed", self.name)
                for _, item in batch:
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(Internal(f"model execution failed: {exc}"))
            for slot, item in batch:
                if item.end:
                    self._release_slot(slot)

    def _choose(self, ready: list[_Slot]) -> list[_Slot]:
        if not self.oldest:
            return ready[: self.max_batch]
        chosen = sorted(ready, key=lambda s: s.queue[0].enqueued_ns)[: self.max_batch]
        if self.preferred and len(chosen) not in self.preferred:
            fitting = [p for p in self.preferred if p <= len(chosen)]
            if fitting:
                chosen = chosen[: fitting[-1]]
        return chosen

    def _batch_wait_ns(self, lane: _Lane, ready: list[_Slot], now: int) -> int:
        """0 when the batch should go now, else how long to wait for a fuller one."""
        if not self.delay_ns or self.max_batch == 1:
            return 0
        if self.oldest:
            target = self.preferred[-1] if self.preferred else self.max_batch
            if len(ready) >= target or len(ready) in self.preferred:
                return 0
        elif len(ready) >= self.min_utilization * len(lane.slots):
            return 0
        oldest = min(s.queue[0].enqueued_ns for s in ready)
        return max(0, oldest + self.delay_ns - now)

    def _prepare(self, slot: _Slot, item: _Item) -> InferRequest:
        """The request with control (and implicit state) inputs added, as the instance sees it."""
        request = item.request
        assert request is not None
        shape = [1, 1] if self.batching else [1]
        extra: list[InferTensor] = []
        for control in self.controls:
            if control.kind == CORRID:
                value = item.corrid_value
            else:
                flag = item.start if control.kind == START else item.end if control.kind == END else True
                value = control.false_true[1 if flag else 0]
            dtype = DATATYPE_TO_NUMPY[control.datatype]
            data = np.empty(shape, dtype=dtype)
            data.flat[0] = value
            extra.append(InferTensor(control.name, control.datatype, list(shape), data))
        if self.states:
            if item.start:
                slot.state = {}
            for spec in self.states:
                current = slot.state.get(spec.input_name)
                if current is None:
                    current = spec.initial[np.newaxis] if self.batching else spec.initial
                extra.append(
                    InferTensor(
                        spec.input_name, numpy_to_datatype(current.dtype), list(current.shape), current
                    )
                )
        if extra:
            request.inputs = [*request.inputs, *extra]
        return request

    @staticmethod
    def _corrid_value(control: ControlTensor, corrid: Any, model: str) -> Any:
        if control.datatype == "BYTES":
            return str(corrid).encode()
        if isinstance(corrid, str):
            try:
                return int(corrid)
            except ValueError:
                raise InvalidArgument(
                    f"sequence batching control '{control.name}' of model '{model}' is {control.datatype}; "
                    f"the string correlation ID '{corrid}' cannot be converted"
                ) from None
        return corrid

    async def _run_batch(self, lane: _Lane, batch: list[tuple[_Slot, _Item]]) -> None:
        started = perf_counter_ns()
        requests: list[InferRequest] = []
        runnable: list[tuple[_Slot, _Item]] = []
        for slot, item in batch:
            try:
                requests.append(self._prepare(slot, item))
                runnable.append((slot, item))
            except ElastiserveError as exc:
                if item.future is not None and not item.future.done():
                    item.future.set_exception(exc)
        if not requests:
            return
        placement = self.placement
        if placement.inline:
            results, ns = execute_on(lane.instance, requests)
        else:
            loop = asyncio.get_running_loop()
            results, ns = await loop.run_in_executor(placement.executor, execute_on, lane.instance, requests)
        placement.observe(ns // len(requests))
        self.stats.record_execution(len(requests), 0, ns, 0)
        now = perf_counter_ns()
        for (slot, item), result in zip(runnable, results, strict=True):
            if isinstance(result, InferResponse) and self.states:
                self._keep_state(slot, result)
            future = item.future
            if future is None or future.done():
                continue
            if isinstance(result, ElastiserveError):
                future.set_exception(result)
            else:
                self.stats.record_request(True, now - item.enqueued_ns, started - item.enqueued_ns)
                future.set_result(result)

    def _keep_state(self, slot: _Slot, response: InferResponse) -> None:
        outputs = {spec.output_name: spec for spec in self.states}
        kept = []
        for tensor in response.outputs:
            spec = outputs.get(tensor.name)
            if spec is None:
                kept.append(tensor)
            elif tensor.data is not None:
                slot.state[spec.input_name] = tensor.data
        response.outputs = kept
