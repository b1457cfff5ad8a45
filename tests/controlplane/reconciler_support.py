"""Helpers for reconciler tests: a manual clock shared by the FakeRuntime and the Reconciler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elastiserve.controlplane.reconciler import PassStats, Reconciler
from elastiserve.controlplane.runtimes.base import Phase
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.spec import ServiceSpec, parse_spec
from elastiserve.controlplane.store import InstanceRecord, Store


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_spec(name: str = "svc", instance: int = 1, **extra: Any) -> ServiceSpec:
    data: dict[str, Any] = {
        "name": name,
        "processor": "onnx",
        "model_path": "/models/m.onnx",
        "token": "tok-12345678",
        "metadata": {"instance": instance, "cpu": 1, "memory": 100},
    }
    for key, value in extra.items():
        if key == "metadata":
            data["metadata"].update(value)
        else:
            data[key] = value
    return parse_spec(data)


@dataclass
class Env:
    store: Store
    runtime: FakeRuntime
    rec: Reconciler
    clock: Clock

    def step(self, seconds: float = 0.0) -> PassStats:
        self.clock.advance(seconds)
        return self.rec.reconcile_once()

    def settle(self, passes: int = 10, seconds: float = 0.0) -> PassStats:
        stats = self.rec.reconcile_once()
        for _ in range(passes - 1):
            self.clock.advance(seconds)
            stats = self.rec.reconcile_once()
        return stats

    def rows(self, service: str = "svc") -> list[InstanceRecord]:
        return self.store.list_instances(service)

    def live(self, service: str = "svc") -> list[InstanceRecord]:
        return [r for r in self.rows(service) if r.desired == "running"]

    def endpoints(self, service: str = "svc") -> list[InstanceRecord]:
        """What discovery publishes: ready rows not being deleted."""
        return [r for r in self.rows(service) if r.ready and r.desired == "running"]

    def running(self, service: str | None = None) -> list[str]:
        """Runtime instances that are alive and not terminating."""
        return sorted(
            o.instance_id
            for o in self.runtime.list_instances(service)
            if o.phase in (Phase.STARTING, Phase.RUNNING)
        )

    def events(self, service: str = "svc") -> list[str]:
        return [e.kind for e in self.store.list_events(service, limit=10000)]

    def messages(self, service: str = "svc") -> list[str]:
        return [f"{e.kind}: {e.message}" for e in self.store.list_events(service, limit=10000)]

    def status(self, service: str = "svc") -> tuple[str, str]:
        record = self.store.get_service(service)
        return record.status, record.message
