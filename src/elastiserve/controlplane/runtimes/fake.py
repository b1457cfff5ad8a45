"""An in-memory :class:`~elastiserve.controlplane.runtimes.base.Runtime` for tests and benchmarks.

No processes: instances are records whose phase moves on a clock, and tests steer them
(``crash``, ``set_ready``, ``fail_next_start``) to drive the reconciler through every path
without waiting for real engines. Resource accounting is real, so "does not fit → Pending" can
be tested too. ``calls`` records every start/stop for assertions.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from elastiserve.controlplane.runtimes.base import (
    Capacity,
    InstanceHandle,
    InstanceNotFound,
    InsufficientResources,
    LogChunk,
    ObservedInstance,
    Phase,
    Resources,
)
from elastiserve.controlplane.spec import ServiceSpec
from elastiserve.errors import AlreadyExists, ConfigError, ElastiserveError

DEFAULT_CAPACITY = Resources(cpu=1_000_000, gpu=1_000, memory=1_000_000_000)


@dataclass
class _Instance:
    observed: ObservedInstance
    ready_at: float
    group: str = ""
    stop_at: float | None = None
    ready_override: bool | None = None
    log: bytearray = field(default_factory=bytearray)


class FakeRuntime:
    """Instances that exist only in memory; thread-safe."""

    name = "fake"

    def __init__(
        self,
        capacity: Resources | Mapping[str, Resources] | None = None,
        *,
        ready_after: float = 0.0,
        stop_after: float = 0.0,
        address: str = "127.0.0.1",
        first_port: int = 20000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity is None:
            capacity = DEFAULT_CAPACITY
        self._groups: dict[str, Resources] = (
            {"": capacity} if isinstance(capacity, Resources) else dict(capacity)
        )
        self.ready_after = ready_after
        self.stop_after = stop_after
        self.address = address
        self._clock = clock
        self._ports = itertools.count(first_port)
        self._lock = threading.RLock()
        self._instances: dict[str, _Instance] = {}
        self._failures: list[ElastiserveError] = []
        self.calls: list[tuple[str, str]] = []  # ("start" | "stop", instance_id)
        self.forgotten: list[str] = []  # services whose leftovers the reconciler let go
        self.closed = False

    # -- Runtime protocol ----------------------------------------------------------------------

    def start_instance(
        self,
        spec: ServiceSpec,
        instance_id: str,
        *,
        version: int,
        env: Mapping[str, str] | None = None,
    ) -> InstanceHandle:
        with self._lock:
            self.calls.append(("start", instance_id))
            if self._failures:
                raise self._failures.pop(0)
            group = spec.metadata.resource
            if group not in self._groups:
                raise ConfigError(f"unknown resource group '{group}'")
            previous = self._instances.get(instance_id)
            restarts = 0
            if previous is not None:
                if previous.observed.phase not in (Phase.EXITED, Phase.FAILED):
                    raise AlreadyExists(f"instance '{instance_id}' is already running")
                restarts = previous.observed.restarts + 1
            need = Resources.of(spec)
            free = self._capacity_locked(group, exclude=instance_id).free
            if not need.fits_in(free):
                raise InsufficientResources(
                    f"insufficient resources in group '{group or 'default'}': {need.shortfall(free)}"
                )
            now = self._clock()
            port = next(self._ports)
            observed = ObservedInstance(
                instance_id=instance_id,
                service=spec.name,
                version=version,
                phase=Phase.STARTING,
                address=self.address,
                port=port,
                pid=None,
                started=time.time(),
                restarts=restarts,
                resources=need,
                ports={"http": port},
            )
            instance = _Instance(observed, ready_at=now + self.ready_after, group=group)
            instance.log += f"fake instance {instance_id} of {spec.name} v{version} started\n".encode()
            self._instances[instance_id] = instance
            return InstanceHandle(
                instance_id,
                spec.name,
                version,
                self.address,
                port,
                None,
                observed.started or 0.0,
                {"http": port},
            )

    def stop_instance(self, instance_id: str, grace: float) -> None:
        with self._lock:
            self.calls.append(("stop", instance_id))
            instance = self._instances.get(instance_id)
            if instance is None:
                raise InstanceNotFound(f"instance '{instance_id}' not found")
            if instance.observed.phase in (Phase.EXITED, Phase.FAILED):
                del self._instances[instance_id]
                return
            instance.stop_at = self._clock() + min(self.stop_after, grace)
            instance.observed.phase = Phase.TERMINATING
            instance.observed.ready = False

    def list_instances(self, service: str | None = None) -> list[ObservedInstance]:
        with self._lock:
            self._advance()
            return [
                replace(i.observed)
                for i in self._instances.values()
                if service is None or i.observed.service == service
            ]

    def instance_logs(self, instance_id: str, *, tail: int | None = None, offset: int = 0) -> LogChunk:
        with self._lock:
            instance = self._instances.get(instance_id)
            if instance is None:
                raise InstanceNotFound(f"no logs for instance '{instance_id}'")
            data = bytes(instance.log)
        if tail is not None:
            lines = data.splitlines(keepends=True)[-tail:] if tail > 0 else []
            return LogChunk(b"".join(lines).decode(errors="replace"), len(data))
        return LogChunk(data[offset:].decode(errors="replace"), len(data))

    def forget_service(self, service: str) -> None:
        self.forgotten.append(service)

    def capacity(self, resource_group: str = "") -> Capacity:
        with self._lock:
            if resource_group not in self._groups:
                raise ConfigError(f"unknown resource group '{resource_group}'")
            return self._capacity_locked(resource_group)

    def close(self) -> None:
        self.closed = True

    # -- test controls -------------------------------------------------------------------------

    def crash(self, instance_id: str, exit_code: int = 1, reason: str = "crashed") -> None:
        """Make an instance exit as if its process died."""
        with self._lock:
            observed = self._instances[instance_id].observed
            observed.phase, observed.ready = Phase.EXITED, False
            observed.exit_code, observed.reason = exit_code, reason
            self._instances[instance_id].log += f"exited with {exit_code}: {reason}\n".encode()

    def set_ready(self, instance_id: str, ready: bool | None) -> None:
        """Force readiness (``None`` returns to the clock-driven default)."""
        with self._lock:
            self._instances[instance_id].ready_override = ready

    def fail_next_start(self, error: ElastiserveError | str = "start failed") -> None:
        """The next ``start_instance`` raises this (a string becomes a ConfigError)."""
        with self._lock:
            self._failures.append(ConfigError(error) if isinstance(error, str) else error)

    def write_log(self, instance_id: str, text: str) -> None:
        with self._lock:
            self._instances[instance_id].log += text.encode()

    # -- internals -----------------------------------------------------------------------------

    def _advance(self) -> None:
        now = self._clock()
        for instance_id, instance in list(self._instances.items()):
            observed = instance.observed
            if (
                observed.phase == Phase.TERMINATING
                and instance.stop_at is not None
                and now >= instance.stop_at
            ):
                del self._instances[instance_id]
                continue
            if observed.phase == Phase.STARTING and now >= instance.ready_at:
                observed.phase = Phase.RUNNING
            if observed.phase == Phase.RUNNING:
                observed.ready = instance.ready_override if instance.ready_override is not None else True
            elif observed.phase == Phase.STARTING and instance.ready_override is not None:
                observed.ready = False

    def _capacity_locked(self, group: str, exclude: str | None = None) -> Capacity:
        allocated = Resources()
        for instance_id, instance in self._instances.items():
            if instance_id == exclude or instance.observed.phase in (Phase.EXITED, Phase.FAILED):
                continue
            if instance.group == group:
                allocated = allocated + instance.observed.resources
        return Capacity(group, self._groups[group], allocated)
