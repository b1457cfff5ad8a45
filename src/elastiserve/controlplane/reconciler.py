"""The reconciler: makes what runs (the runtime) match what the store says should run.

Level-triggered, not edge-triggered: every pass reads the whole desired state (services in the
store) and the whole observed state (``runtime.list_instances()``) and closes the gap, so a
missed notification, a crash of the control plane or an instance dying while nobody watched is
repaired by the next pass rather than lost. Passes run when the API calls :meth:`notify` (at
once), when the runtime reports a change (if it can), and on a period (fast while something is in
motion, slow when all is steady).

Each service is reconciled inside its own ``try``: one bad service (a spec the runtime rejects,
a bug) is reported on that service and never stops the loop or the other services. A service's
changes are written in one store transaction after its runtime calls, so a pass over 100 steady
services writes nothing at all.

What a pass does for one service (``docs/platform.md`` has the story):

* mirror the runtime into the instance rows (address, pid, status, readiness, restarts);
* crashes: restart with exponential backoff (``backoff_base * 2**(failures-1)``, capped), count
  restarts; ``crash_loop_after`` failures in a row is a crash loop, shown on the instance and the
  service; with ``runtime.enable_crash_block`` the instance is left stopped for inspection;
* scale: start or drain instances to match ``metadata.instance`` (no rollout);
* release (rows of an older version exist): rolling update within ``max_surge`` extra and
  ``max_unavailable`` missing ready instances; new ones are ready before old ones go;
* removal (scale-in, rollout, ``dw``, stop, delete): the instance leaves discovery at once
  (``Draining``), keeps serving for ``drain_delay`` so clients and the gateway notice, then gets
  SIGTERM and ``eas.termination_grace_period`` seconds before it is killed; a deleted service is
  purged from the store once its last instance is gone;
* instances the runtime has but the store does not (orphans) are stopped;
* events for everything a user cares about (``elastiserve events``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from elastiserve.controlplane.runtimes.base import (
    InstanceNotFound,
    InsufficientResources,
    ObservedInstance,
    Phase,
    Runtime,
)
from elastiserve.controlplane.store import InstanceRecord, ServiceRecord, Store
from elastiserve.errors import AlreadyExists, ElastiserveError, NotFound

log = logging.getLogger(__name__)

#: Instance statuses that mean "exited; the reconciler decided what happens next".
CRASH_STATES = frozenset({"Restarting", "CrashLoopBackOff", "CrashBlocked", "Failed"})
#: Statuses in which an instance is on its way somewhere: the loop polls fast while one exists.
_MOVING = frozenset({"Starting", "Draining", "Terminating"})
_EXITED = (Phase.EXITED, Phase.FAILED)
_COMPARED = (
    "version",
    "address",
    "port",
    "pid",
    "started",
    "restarts",
    "status",
    "ready",
    "reason",
    "desired",
    "weight",
)
ORPHAN_GRACE = 10.0
STOP_RETRY = 5.0  # seconds before a stop the runtime seems to have lost is sent again


@dataclass
class PassStats:
    """What one pass did: the figures the loop-time benchmark and tests look at."""

    duration: float = 0.0
    services: int = 0
    instances: int = 0
    writes: int = 0
    errors: int = 0
    moving: bool = False  # something is starting, draining or waiting: poll fast
    next_due: float | None = None  # earliest timer (backoff, drain) on the reconciler's clock


@dataclass
class _Work:
    """One service's pass: rows as read, rows as changed, and what to write back."""

    name: str
    record: ServiceRecord | None
    rows: dict[str, InstanceRecord]
    original: dict[str, InstanceRecord]
    observed: dict[str, ObservedInstance]
    events: list[tuple[str, str]] = field(default_factory=list)
    new: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    status: tuple[str, str] | None = None
    purge: bool = False

    def event(self, kind: str, message: str) -> None:
        self.events.append((kind, message))


def _copy(row: InstanceRecord) -> InstanceRecord:
    return replace(row, extra=dict(row.extra))


def describe_exit(observed: ObservedInstance | None) -> str:
    """One line for reasons and events: "exited with code 1: ...", "killed by signal 9"."""
    if observed is None:
        return "instance disappeared from the runtime"
    if observed.phase == Phase.FAILED:
        return f"failed to start: {observed.reason or 'unknown error'}"
    code = observed.exit_code
    text = "exited" if code is None else f"exited with code {code}"
    if code is not None and code < 0:
        try:
            text = f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            text = f"killed by signal {-code}"
    if observed.reason and observed.reason not in text:
        text = f"{text}: {observed.reason}"
    return text


class Reconciler:
    """Drives a :class:`Runtime` from a :class:`Store`; also the API's ``notifier``.

    ``clock`` is wall time (timers are stored with instances so they survive a restart of the
    control plane); tests pass a fake clock and call :meth:`reconcile_once` directly.
    """

    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        *,
        period: float = 1.0,
        fast_period: float = 0.1,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        crash_loop_after: int = 3,
        stable_after: float = 30.0,
        drain_delay: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.period = period
        self.fast_period = fast_period
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.crash_loop_after = crash_loop_after
        self.stable_after = stable_after
        self.drain_delay = drain_delay
        self.clock = clock
        self.last_pass: PassStats | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass_lock = threading.Lock()
        self._passes = 0
        self._errors: dict[str, str] = {}
        self._rollouts: dict[str, int] = {}
        add_listener = getattr(runtime, "add_listener", None)
        if callable(add_listener):  # a runtime that reports changes wakes us at once
            add_listener(self.notify)

    # -- lifecycle -------------------------------------------------------------------------------

    def notify(self, service: str | None = None) -> None:
        """Something changed (a write through the API, or the runtime): run a pass soon."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Reconciler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                stats: PassStats | None = self.reconcile_once()
            except Exception:  # never let the loop die; the next pass retries
                log.exception("reconcile pass failed")
                stats = None
            timeout = self.period
            if stats is not None:
                if stats.moving:
                    timeout = self.fast_period
                if stats.next_due is not None:
                    timeout = min(timeout, max(0.0, stats.next_due - self.clock()))
            self._wake.wait(max(timeout, 0.005))

    # -- one pass ----------------------------------------------------------------------------------

    def reconcile_once(self) -> PassStats:
        """Reconcile every service once; returns what the pass did."""
        with self._pass_lock:
            started = time.perf_counter()
            stats = PassStats()
            first = self._passes == 0
            self._passes += 1
            try:
                observed = self.runtime.list_instances()
            except Exception as exc:
                log.error("runtime %s cannot list instances: %s", self.runtime.name, exc)
                stats.errors += 1
                stats.duration = time.perf_counter() - started
                self.last_pass = stats
                return stats
            by_service: dict[str, dict[str, ObservedInstance]] = {}
            for obs in observed:
                by_service.setdefault(obs.service, {})[obs.instance_id] = obs
            rows_by_service: dict[str, dict[str, InstanceRecord]] = {}
            for row in self.store.list_instances():
                rows_by_service.setdefault(row.service, {})[row.id] = row
            names = self.store.service_names()
            everything = sorted(set(names) | set(rows_by_service) | set(by_service))
            stats.services = len(names)
            for name in everything:
                rows = rows_by_service.get(name, {})
                stats.instances += len(rows)
                try:
                    self._reconcile_service(
                        name, name in names, rows, by_service.get(name, {}), stats, first=first
                    )
                    if self._errors.pop(name, None) is not None:
                        log.info("service %s reconciles again", name)
                except Exception as exc:
                    stats.errors += 1
                    self._report_error(name, exc)
            stats.duration = time.perf_counter() - started
            self.last_pass = stats
            return stats

    def _report_error(self, name: str, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ElastiserveError) else str(exc)
        if self._errors.get(name) == message:
            return
        self._errors[name] = message
        log.exception("reconciling service %s failed", name)
        with contextlib.suppress(Exception):
            if self.store.find_service(name) is not None:
                self.store.add_event(name, "ReconcileError", f"reconcile failed: {message}")
                self.store.set_status(name, "Failed", f"reconcile failed: {message}")

    def _reconcile_service(
        self,
        name: str,
        exists: bool,
        rows: Mapping[str, InstanceRecord],
        observed: dict[str, ObservedInstance],
        stats: PassStats,
        *,
        first: bool,
    ) -> None:
        record = self.store.get_service(name) if exists else None
        work = _Work(
            name=name,
            record=record,
            rows={k: _copy(v) for k, v in rows.items()},
            original=dict(rows),
            observed=observed,
        )
        now = self.clock()
        desired = record.desired if record is not None else "deleted"

        for row in list(work.rows.values()):
            self._observe(work, row, observed.get(row.id), now, first)

        if desired == "running" and record is not None:
            self._converge(work, record, now)
        else:
            why = "service stopped" if desired == "stopped" else "service deleted"
            for row in work.rows.values():
                if row.desired == "running":
                    self._mark_delete(work, row, why, now)

        grace = float(record.spec.metadata.eas.termination_grace_period) if record else ORPHAN_GRACE
        for row in list(work.rows.values()):
            if row.desired == "deleted":
                self._drain(work, row, observed.get(row.id), now, grace)

        for instance_id, obs in observed.items():
            if instance_id not in work.rows and instance_id not in work.removed:
                self._stop_orphan(work, obs, grace)

        if record is not None:
            work.status = self._service_status(work, record)
            if (
                desired == "deleted"
                and not work.rows
                and not any(o.phase not in _EXITED for i, o in observed.items() if i not in work.removed)
            ):
                work.purge = True

        self._timers(work, stats, now)
        stats.writes += self._write(work)

    # -- observing ---------------------------------------------------------------------------------

    def _observe(
        self, work: _Work, row: InstanceRecord, obs: ObservedInstance | None, now: float, first: bool
    ) -> None:
        """Mirror the runtime's view of one instance into its row; notice exits."""
        current = work.record.version if work.record is not None else None
        running = work.record is not None and work.record.desired == "running"
        if obs is None:
            if row.desired == "running" and row.extra.get("launched") and row.status not in CRASH_STATES:
                row.ready = False
                if running and row.version == current:
                    self._failed(work, row, describe_exit(None), now)
                else:
                    self._mark_delete(work, row, "instance disappeared", now)
            return
        row.address = obs.address or row.address
        row.port = obs.port or row.port
        grpc_port = obs.ports.get("grpc") if obs.ports else None
        if grpc_port and row.extra.get("grpc_port") != grpc_port:
            row.extra["grpc_port"] = int(grpc_port)  # published by the endpoints route
        elif not grpc_port and obs.ports and "grpc_port" in row.extra:
            row.extra.pop("grpc_port")
        row.pid = obs.pid
        row.started = obs.started if obs.started is not None else row.started
        row.restarts = max(row.restarts, obs.restarts)
        if first and row.extra.get("launched") and obs.phase not in _EXITED and row.desired == "running":
            pid = f" (pid {obs.pid})" if obs.pid else ""
            work.event(
                "InstanceAdopted",
                f"instance {row.id}{pid} adopted: still running after a control plane restart",
            )
        if obs.phase in _EXITED:
            # Pending here: the restart was refused for lack of resources; the exit is handled.
            if row.desired == "running" and row.status not in CRASH_STATES and row.status != "Pending":
                if running and row.version == current:
                    self._failed(work, row, describe_exit(obs), now)
                else:
                    self._mark_delete(work, row, describe_exit(obs), now)
            row.ready = False
            row.extra.pop("ready_since", None)
            return
        if row.desired == "deleted":
            row.ready = False
            return
        if obs.phase == Phase.TERMINATING:
            row.status, row.ready = "Terminating", False
            return
        if obs.phase == Phase.PENDING:
            row.status, row.ready, row.reason = "Pending", False, obs.reason or row.reason
            return
        if obs.phase == Phase.STARTING:
            row.status, row.ready = "Starting", False
            row.reason = obs.reason or ""
            return
        ready = bool(obs.ready)
        row.status = "Running"
        if ready and not row.ready:
            took = ""
            if row.extra.get("launched_at") is not None:
                took = f" after {max(0.0, now - float(row.extra['launched_at'])):.1f}s"
            work.event("InstanceReady", f"instance {row.id} ready at {row.address}:{row.port}{took}")
            row.extra["ready_since"] = now
            row.extra.pop("launched_at", None)
        elif not ready and row.ready:
            work.event(
                "InstanceNotReady", f"instance {row.id} not ready: {obs.reason or 'health check failed'}"
            )
            row.extra.pop("ready_since", None)
        row.ready = ready
        row.reason = "" if ready else (obs.reason or "not ready")

    def _failed(self, work: _Work, row: InstanceRecord, detail: str, now: float) -> None:
        """An instance of the current version exited or could not start: back off and restart, or
        call it a crash loop (and with ``enable_crash_block`` leave it stopped)."""
        failures = int(row.extra.get("failures", 0))
        ready_since = row.extra.pop("ready_since", None)
        if ready_since is not None and now - float(ready_since) >= self.stable_after:
            failures = 0  # it ran fine for a while: this is a fresh failure, not a loop
        failures += 1
        row.ready = False
        row.extra["failures"] = failures
        row.extra["last_exit"] = detail
        spec = work.record.spec if work.record is not None else None
        if failures >= self.crash_loop_after:
            if spec is not None and spec.runtime.enable_crash_block:
                row.status = "CrashBlocked"
                row.reason = (
                    f"crash loop ({failures} failures in a row): {detail}; left stopped "
                    "(runtime.enable_crash_block): `elastiserve dw` replaces it"
                )
                row.extra.pop("next_start", None)
                work.event("CrashBlocked", f"instance {row.id}: {row.reason}")
                return
            delay = self._backoff(failures)
            row.status = "CrashLoopBackOff"
            row.reason = f"crash loop ({failures} failures in a row): {detail}; restarting in {delay:g}s"
            row.extra["next_start"] = now + delay
            work.event("CrashLoop", f"instance {row.id}: {row.reason}")
            return
        delay = self._backoff(failures)
        row.status = "Restarting"
        row.reason = f"{detail}; restarting in {delay:g}s"
        row.extra["next_start"] = now + delay
        work.event("InstanceCrashed", f"instance {row.id} {detail}; restarting in {delay:g}s")

    def _backoff(self, failures: int) -> float:
        return float(min(self.backoff_base * 2 ** max(failures - 1, 0), self.backoff_max))

    # -- converging --------------------------------------------------------------------------------

    def _converge(self, work: _Work, record: ServiceRecord, now: float) -> None:
        """Scale and roll out: choose which instances to add and which to drain, then start."""
        spec = record.spec
        want = spec.metadata.instance
        live = [r for r in work.rows.values() if r.desired == "running"]
        self._adopt_unchanged(work, record, live)
        old = [r for r in live if r.version != record.version]
        cur = [r for r in live if r.version == record.version]
        if len(cur) > want:
            for row in self._victims(cur)[: len(cur) - want]:
                self._mark_delete(work, row, "scale-in", now)
            cur = [r for r in cur if r.desired == "running"]
        if not old:
            self._rollouts.pop(work.name, None)
            for _ in range(want - len(cur)):
                self._new_row(work, record, now)
        else:
            if self._rollouts.get(work.name) != record.version:
                self._rollouts[work.name] = record.version
                surge, unavailable = spec.metadata.rolling_strategy.resolve(want)
                work.event(
                    "RolloutStarted",
                    f"rolling out version {record.version} to {want} instance(s) "
                    f"(max_surge {surge}, max_unavailable {unavailable})",
                )
            self._roll(work, record, cur, old, now)
        for row in sorted(work.rows.values(), key=lambda r: r.id):
            if row.desired == "running" and row.version == record.version:
                self._maybe_start(work, record, row, now)

    def _adopt_unchanged(self, work: _Work, record: ServiceRecord, live: list[InstanceRecord]) -> None:
        """Rows of an older version whose instances the new version would make the same way (it
        changed only the token, labels, limits…) move to the new version in place: no rollout."""
        key = None
        for row in live:
            if row.version == record.version:
                continue
            if key is None:
                key = record.spec.instance_key()
            try:
                same = self.store.get_version(record.name, row.version).spec.instance_key() == key
            except NotFound:
                same = False
            if same:
                work.event(
                    "InstanceAdopted",
                    f"instance {row.id} kept for version {record.version} (version {row.version} "
                    "differs only in what instances do not use)",
                )
                row.version = record.version

    def _roll(
        self,
        work: _Work,
        record: ServiceRecord,
        cur: list[InstanceRecord],
        old: list[InstanceRecord],
        now: float,
    ) -> None:
        """One step of a rolling update (as Kubernetes' Deployment does it): add new instances up
        to ``want + surge`` in total; drain old ones only while ``want - unavailable`` instances
        stay ready. Old instances that are not ready cost no availability: they go first."""
        want = record.spec.metadata.instance
        surge, unavailable = record.spec.metadata.rolling_strategy.resolve(want)
        total = len(cur) + len(old)
        for _ in range(max(0, min(want - len(cur), want + surge - total))):
            self._new_row(work, record, now)
        ready = sum(1 for r in cur + old if r.ready)
        budget = ready - (want - unavailable)
        for row in sorted(old, key=lambda r: (r.ready, -(r.started or 0))):
            if not row.ready:
                self._mark_delete(work, row, f"replaced by version {record.version}", now)
            elif budget > 0:
                budget -= 1
                self._mark_delete(work, row, f"replaced by version {record.version}", now)

    @staticmethod
    def _victims(rows: list[InstanceRecord]) -> list[InstanceRecord]:
        """Scale-in order: never started, then not ready, then the newest ready ones."""

        def key(row: InstanceRecord) -> tuple[int, int, float]:
            launched = 1 if row.extra.get("launched") else 0
            return (launched, 1 if row.ready else 0, -(row.started or 0.0))

        return sorted(rows, key=key)

    def _new_row(self, work: _Work, record: ServiceRecord, now: float) -> InstanceRecord:
        instance_id = f"{record.name}-{record.version}-{secrets.token_hex(3)}"
        while instance_id in work.rows:
            instance_id = f"{record.name}-{record.version}-{secrets.token_hex(3)}"
        row = InstanceRecord(id=instance_id, service=record.name, version=record.version, status="Pending")
        work.rows[instance_id] = row
        work.new.add(instance_id)
        return row

    def _maybe_start(self, work: _Work, record: ServiceRecord, row: InstanceRecord, now: float) -> None:
        obs = work.observed.get(row.id)
        if obs is not None and obs.phase not in _EXITED:
            return
        if row.status in ("Starting", "Running", "Terminating", "CrashBlocked"):
            return
        due = row.extra.get("next_start")
        if due is not None and now < float(due):
            return
        restart = bool(row.extra.get("launched"))
        env = {
            "ELASTISERVE_SERVICE": record.name,
            "ELASTISERVE_INSTANCE": row.id,
            "ELASTISERVE_VERSION": str(row.version),
        }
        try:
            handle = self.runtime.start_instance(record.spec, row.id, version=row.version, env=env)
        except InsufficientResources as exc:
            if row.reason != str(exc) or row.status != "Pending":
                work.event("InstancePending", f"instance {row.id} pending: {exc}")
            row.status, row.reason = "Pending", str(exc)
            row.extra.pop("next_start", None)
            return
        except AlreadyExists:
            return  # the runtime has it running already: the next pass observes it
        except Exception as exc:
            if not isinstance(exc, ElastiserveError):
                log.exception("starting instance %s failed", row.id)
            detail = f"cannot start: {exc}"
            work.event("InstanceStartFailed", f"instance {row.id} {detail}")
            self._failed(work, row, detail, now)
            if row.status == "Restarting":
                row.status = "Failed"
            return
        row.address, row.port, row.pid = handle.address, handle.port, handle.pid
        row.started = handle.started or time.time()
        row.status, row.ready = "Starting", False
        previous = row.extra.pop("last_exit", None)
        row.extra.pop("next_start", None)
        row.extra["launched"] = True
        row.extra["launched_at"] = now
        if restart:
            row.restarts += 1
            cause = f" after: {previous}" if previous else ""
            work.event("InstanceRestarted", f"instance {row.id} restarted (restart {row.restarts}){cause}")
        else:
            work.event(
                "InstanceStarting",
                f"instance {row.id} (version {row.version}) starting at {handle.address}:{handle.port}",
            )
        row.reason = ""

    # -- draining ----------------------------------------------------------------------------------

    def _mark_delete(self, work: _Work, row: InstanceRecord, why: str, now: float) -> None:
        """Take an instance out of discovery now; :meth:`_drain` stops it after the drain delay."""
        was_ready = row.ready or row.extra.get("ready_since") is not None
        row.desired = "deleted"
        row.ready = False
        row.extra.pop("ready_since", None)
        row.extra["drain_at"] = now
        row.extra["drain_delay"] = self.drain_delay if was_ready else 0.0
        row.extra["drain_why"] = why
        if row.extra.get("launched"):
            row.status = "Draining"
            row.reason = why
            work.event("InstanceDraining", f"instance {row.id} draining ({why})")

    def _drain(
        self, work: _Work, row: InstanceRecord, obs: ObservedInstance | None, now: float, grace: float
    ) -> None:
        if "drain_at" not in row.extra:  # marked by the API (dw): start draining now
            self._mark_delete(work, row, "deleted by request", now)
        if obs is None or obs.phase in _EXITED:
            if obs is not None:
                with contextlib.suppress(InstanceNotFound):
                    self.runtime.stop_instance(row.id, 0.0)  # forget the exited instance
            del work.rows[row.id]
            work.removed.add(row.id)
            if row.extra.get("launched"):
                work.event("InstanceStopped", f"instance {row.id} stopped ({row.extra.get('drain_why', '')})")
            return
        sent = row.extra.get("stop_sent")
        if obs.phase == Phase.TERMINATING:
            if sent is None:  # already stopping (asked before a control plane restart)
                row.extra["stop_sent"] = now
            row.status = "Terminating"
            return
        if sent is not None and now - float(sent) < STOP_RETRY:
            return  # asked already; the runtime has not caught up yet
        delay = min(float(row.extra.get("drain_delay", 0.0)), grace)
        if now < float(row.extra["drain_at"]) + delay:
            row.status = "Draining"
            return
        try:
            self.runtime.stop_instance(row.id, grace)
        except InstanceNotFound:
            return
        if sent is None:
            work.event("InstanceTerminating", f"instance {row.id} stopping (grace {grace:g}s)")
        row.extra["stop_sent"] = now
        row.status = "Terminating"

    def _stop_orphan(self, work: _Work, obs: ObservedInstance, grace: float) -> None:
        """An instance the store does not know: left by a crash mid-pass, or a purged service."""
        if obs.phase == Phase.TERMINATING:
            return
        with contextlib.suppress(InstanceNotFound):
            self.runtime.stop_instance(obs.instance_id, 0.0 if obs.phase in _EXITED else grace)
        if obs.phase not in _EXITED:
            log.info("stopping orphan instance %s of %s", obs.instance_id, obs.service)
            if work.record is not None:
                work.event("OrphanStopped", f"instance {obs.instance_id} is not in the store: stopped")

    # -- status, timers, writes --------------------------------------------------------------------

    def _service_status(self, work: _Work, record: ServiceRecord) -> tuple[str, str]:
        rows = list(work.rows.values())
        if record.desired == "deleted":
            return "Deleting", f"draining {len(rows)} instance(s)" if rows else ""
        if record.desired == "stopped":
            if rows:
                return "Stopping", f"draining {len(rows)} instance(s)"
            if record.status != "Stopped":
                work.event("ServiceStopped", "all instances stopped")
            return "Stopped", ""
        want = record.spec.metadata.instance
        live = [r for r in rows if r.desired == "running"]
        cur = [r for r in live if r.version == record.version]
        old = [r for r in live if r.version != record.version]
        ready = sum(1 for r in cur if r.ready)
        failing = [r for r in live if r.status in ("CrashLoopBackOff", "CrashBlocked", "Failed")]
        pending = [r for r in cur if r.status == "Pending" and r.reason]
        if failing:
            first = failing[0]
            more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
            return "Failed", f"instance {first.id}: {first.reason}{more}"
        note = f"{ready}/{want} instances ready"
        if pending:
            note += f"; {len(pending)} pending: {pending[0].reason}"
        if old:
            return "Updating", f"rolling out version {record.version}: {len(cur)}/{want} updated, {note}"
        if ready >= want and len(cur) == want:
            if record.status != "Running":
                if record.status == "Updating":
                    work.event("RolloutComplete", f"version {record.version} rolled out ({want} instances)")
                work.event("ServiceRunning", f"{ready}/{want} instances ready")
            return "Running", ""
        if record.status in ("Creating", "Starting", "Updating"):
            return record.status, note
        return "Running", note

    def _timers(self, work: _Work, stats: PassStats, now: float) -> None:
        for row in work.rows.values():
            if row.status in _MOVING or (row.status == "Pending" and not row.reason):
                stats.moving = True
            due: float | None = None
            if row.extra.get("next_start") is not None and row.status in CRASH_STATES:
                due = float(row.extra["next_start"])
            elif row.status == "Draining" and "drain_at" in row.extra:
                due = float(row.extra["drain_at"]) + float(row.extra.get("drain_delay", 0.0))
            if due is not None:
                stats.next_due = due if stats.next_due is None else min(stats.next_due, due)

    def _write(self, work: _Work) -> int:
        """Apply a service's changes in one transaction; returns how many writes it made."""
        writes: list[Callable[[], Any]] = []
        store = self.store
        for instance_id in work.removed:
            if instance_id in work.original:
                writes.append(lambda i=instance_id: store.remove_instance(i))
        for instance_id, row in work.rows.items():
            if instance_id in work.new:
                writes.append(lambda r=row: store.upsert_instance(r))
                continue
            before = work.original.get(instance_id)
            if before is None:
                continue
            changes = {
                name: getattr(row, name) for name in _COMPARED if getattr(row, name) != getattr(before, name)
            }
            if row.extra != before.extra:
                changes["extra"] = row.extra
            if changes:
                writes.append(lambda i=instance_id, c=changes: self._update(i, c))
        for kind, message in work.events:
            writes.append(lambda k=kind, m=message: store.add_event(work.name, k, m))
        record = work.record
        if record is not None and work.status is not None and (record.status, record.message) != work.status:
            status, message = work.status
            writes.append(lambda: store.set_status(work.name, status, message))
        if work.purge:
            writes.append(lambda: store.purge_service(work.name))
            log.info("service %s deleted", work.name)
        if not writes:
            return 0
        with store.batch():
            for write in writes:
                write()
        if work.purge:
            try:
                self.runtime.forget_service(work.name)
            except Exception:  # leftovers on disk must not stop the loop
                log.exception("runtime could not forget service %s", work.name)
        return len(writes)

    def _update(self, instance_id: str, changes: dict[str, Any]) -> None:
        with contextlib.suppress(NotFound):  # removed meanwhile (the service was purged)
            self.store.update_instance(instance_id, **changes)
