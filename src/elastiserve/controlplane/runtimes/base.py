"""The ``Runtime`` protocol: the only way the control plane touches processes or clusters.

The reconciler is level-triggered: it asks a runtime what exists (:meth:`Runtime.list_instances`),
compares that with the store's desired state and calls :meth:`Runtime.start_instance` /
:meth:`Runtime.stop_instance` to close the gap. So a runtime keeps no desired state of its own;
it starts, stops, observes and reports. Every method is synchronous and quick (a start returns
once the process or actor is launched, not when it is ready; readiness shows up later in
``list_instances``), so the reconciler can drive many services from one thread.

Implementations: ``local`` (subprocesses on this machine), ``ray`` (detached actors), and
:class:`~elastiserve.controlplane.runtimes.fake.FakeRuntime` for tests and benchmarks.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from elastiserve.controlplane.spec import ServiceSpec
from elastiserve.errors import NotFound, Unavailable


class InsufficientResources(Unavailable):
    """The instance does not fit in its resource group now; the reconciler shows it as Pending with
    this message as the reason and tries again later."""


class InstanceNotFound(NotFound):
    """The runtime has no instance with that id (already gone, or never started)."""


class Phase(enum.StrEnum):
    """Lifecycle of an instance as a runtime observes it."""

    PENDING = "Pending"  # accepted but not launched (waiting for resources or a node)
    STARTING = "Starting"  # launched, not ready yet
    RUNNING = "Running"  # process alive (``ready`` says whether it passes its health check)
    TERMINATING = "Terminating"  # stop requested, draining until the grace period ends
    EXITED = "Exited"  # ended on its own (``exit_code``, ``reason``); not restarted by the runtime
    FAILED = "Failed"  # could not be started (bad command, missing model), see ``reason``


@dataclass(frozen=True)
class Resources:
    """CPU cores, GPUs and memory (MB): what an instance asks for and what a group has."""

    cpu: float = 0.0
    gpu: int = 0
    memory: int = 0

    @classmethod
    def of(cls, spec: ServiceSpec) -> Resources:
        """What one instance of ``spec`` needs (EAS ``metadata.cpu|gpu|memory``)."""
        return cls(cpu=float(spec.metadata.cpu), gpu=spec.metadata.gpu, memory=spec.metadata.memory)

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.gpu + other.gpu, self.memory + other.memory)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu - other.cpu, self.gpu - other.gpu, self.memory - other.memory)

    def fits_in(self, free: Resources) -> bool:
        return self.cpu <= free.cpu + 1e-9 and self.gpu <= free.gpu and self.memory <= free.memory

    def shortfall(self, free: Resources) -> str:
        """Why this does not fit in ``free``, for the Pending reason ("needs 4 cpu, 2 free")."""
        parts = []
        if self.cpu > free.cpu + 1e-9:
            parts.append(f"needs {self.cpu:g} cpu, {max(free.cpu, 0):g} free")
        if self.gpu > free.gpu:
            parts.append(f"needs {self.gpu} gpu, {max(free.gpu, 0)} free")
        if self.memory > free.memory:
            parts.append(f"needs {self.memory} MB memory, {max(free.memory, 0)} MB free")
        return "; ".join(parts)


@dataclass(frozen=True)
class Capacity:
    """A resource group's totals and what its instances hold now."""

    resource_group: str
    total: Resources
    allocated: Resources

    @property
    def free(self) -> Resources:
        return self.total - self.allocated


@dataclass(frozen=True)
class InstanceHandle:
    """What :meth:`Runtime.start_instance` returns: where the instance is and how to find it again."""

    instance_id: str
    service: str
    version: int
    address: str  # host or IP clients connect to
    port: int  # the HTTP port (engine's --http-port, or a custom container's port)
    pid: int | None = None
    started: float = 0.0
    ports: Mapping[str, int] = field(default_factory=dict)  # "http", "grpc", "metrics" when known
    log_path: str | None = None


@dataclass
class ObservedInstance:
    """One instance as the runtime sees it now (the reconciler's input)."""

    instance_id: str
    service: str
    version: int
    phase: Phase
    ready: bool = False
    address: str = ""
    port: int = 0
    pid: int | None = None
    started: float | None = None
    restarts: int = 0  # restarts done by the runtime itself (e.g. Ray restarting an actor)
    exit_code: int | None = None
    reason: str = ""
    resources: Resources = field(default_factory=Resources)
    cpu_percent: float | None = None
    memory_mb: float | None = None
    ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LogChunk:
    """Log text and the byte offset after it; pass ``offset`` back to read only what is new."""

    text: str
    offset: int


@runtime_checkable
class Runtime(Protocol):
    """Where instances run. Implementations must be thread-safe."""

    name: str

    def start_instance(
        self,
        spec: ServiceSpec,
        instance_id: str,
        *,
        version: int,
        env: Mapping[str, str] | None = None,
    ) -> InstanceHandle:
        """Launch one instance of ``spec`` (version ``version``) under ``instance_id``.

        Returns once launched. Raises :class:`InsufficientResources` if it does not fit in the
        spec's resource group, and a :class:`~elastiserve.errors.ConfigError` for a spec this
        runtime cannot run. Starting an id that is already running is an error; starting the id
        of an exited instance starts it again (a restart).
        """
        ...

    def stop_instance(self, instance_id: str, grace: float) -> None:
        """Ask the instance to stop (SIGTERM or equivalent) and kill it after ``grace`` seconds.

        Does not wait: the instance shows as TERMINATING, then leaves :meth:`list_instances`.
        Raises :class:`InstanceNotFound` for an unknown id.
        """
        ...

    def list_instances(self, service: str | None = None) -> list[ObservedInstance]:
        """Every instance this runtime knows, including ones started by an earlier control plane
        process (so a restarted control plane adopts them instead of starting duplicates)."""
        ...

    def instance_logs(self, instance_id: str, *, tail: int | None = None, offset: int = 0) -> LogChunk:
        """The instance's output from byte ``offset`` (or its last ``tail`` lines when given).
        Raises :class:`InstanceNotFound` when there is no log for that id."""
        ...

    def capacity(self, resource_group: str = "") -> Capacity:
        """Totals and allocations of a resource group ('' is the default group)."""
        ...

    def forget_service(self, service: str) -> None:
        """The service was deleted and its last instance is gone: drop what the runtime kept for
        it (log files), so nothing is left behind and a new service of that name starts clean."""
        ...

    def close(self) -> None:
        """Release runtime resources; leaves instances running (the next control plane adopts them)."""
        ...
