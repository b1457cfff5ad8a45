"""FakeRuntime honours the Runtime protocol: phases, readiness, stop, restarts, capacity, logs."""

from __future__ import annotations

import pytest

from elastiserve.controlplane.runtimes.base import (
    InstanceNotFound,
    InsufficientResources,
    Phase,
    Resources,
    Runtime,
)
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.spec import parse_spec
from elastiserve.errors import AlreadyExists, ConfigError

SPEC = parse_spec(
    {"name": "svc", "processor": "onnx", "model_path": "/m", "metadata": {"cpu": 2, "memory": 1000}}
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_is_a_runtime() -> None:
    assert isinstance(FakeRuntime(), Runtime)


def test_lifecycle_with_a_clock() -> None:
    clock = Clock()
    rt = FakeRuntime(ready_after=1.0, stop_after=2.0, clock=clock)
    handle = rt.start_instance(SPEC, "svc-1", version=1)
    assert handle.address == "127.0.0.1" and handle.port > 0
    [obs] = rt.list_instances("svc")
    assert (obs.phase, obs.ready) == (Phase.STARTING, False)
    clock.now = 1.0
    [obs] = rt.list_instances()
    assert (obs.phase, obs.ready) == (Phase.RUNNING, True)
    rt.set_ready("svc-1", False)
    assert rt.list_instances()[0].ready is False
    rt.set_ready("svc-1", None)
    rt.stop_instance("svc-1", grace=10)
    assert rt.list_instances()[0].phase == Phase.TERMINATING
    clock.now = 3.0
    assert rt.list_instances() == []
    assert rt.calls == [("start", "svc-1"), ("stop", "svc-1")]
    with pytest.raises(InstanceNotFound):
        rt.stop_instance("svc-1", grace=1)


def test_crash_and_restart_counts() -> None:
    rt = FakeRuntime()
    rt.start_instance(SPEC, "svc-1", version=1)
    with pytest.raises(AlreadyExists):
        rt.start_instance(SPEC, "svc-1", version=1)
    rt.crash("svc-1", exit_code=137, reason="killed")
    [obs] = rt.list_instances()
    assert (obs.phase, obs.exit_code, obs.reason) == (Phase.EXITED, 137, "killed")
    rt.start_instance(SPEC, "svc-1", version=1)
    assert rt.list_instances()[0].restarts == 1


def test_capacity_and_pending() -> None:
    rt = FakeRuntime(Resources(cpu=5, gpu=0, memory=10_000))
    rt.start_instance(SPEC, "a", version=1)
    rt.start_instance(SPEC, "b", version=1)
    assert rt.capacity().free == Resources(cpu=1, gpu=0, memory=8000)
    with pytest.raises(InsufficientResources, match="needs 2 cpu, 1 free"):
        rt.start_instance(SPEC, "c", version=1)
    rt.crash("a")  # an exited instance holds nothing
    rt.start_instance(SPEC, "c", version=1)
    with pytest.raises(ConfigError, match="unknown resource group 'gpu-pool'"):
        rt.start_instance(
            parse_spec({**SPEC.to_dict(), "metadata": {"resource": "gpu-pool"}}), "d", version=1
        )


def test_injected_failures_and_logs() -> None:
    rt = FakeRuntime()
    rt.fail_next_start("model missing")
    with pytest.raises(ConfigError, match="model missing"):
        rt.start_instance(SPEC, "svc-1", version=1)
    rt.start_instance(SPEC, "svc-1", version=1)
    first = rt.instance_logs("svc-1")
    assert "started" in first.text
    rt.write_log("svc-1", "line 2\nline 3\n")
    assert rt.instance_logs("svc-1", offset=first.offset).text == "line 2\nline 3\n"
    assert rt.instance_logs("svc-1", tail=1).text == "line 3\n"
    with pytest.raises(InstanceNotFound):
        rt.instance_logs("nope")
