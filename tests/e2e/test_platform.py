"""The platform end to end with real processes: ``elastiserve up`` → ``create examples/service.json``
→ direct requests with tritonclient → scale to 3 → rolling update under load with zero failed
requests → kill -9 → restart of the control plane (instances adopted, same pids) → delete.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from elastiserve.client.controlplane import ControlPlaneClient, ControlPlaneError
from elastiserve.testing import RunningPlatform, running_platform, wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "triton_test"

pytestmark = pytest.mark.slow


def add_sub_inputs(value: float) -> list[httpclient.InferInput]:
    data = np.full((1, 16), value, dtype=np.float32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "FP32"),
        httpclient.InferInput("INPUT1", [1, 16], "FP32"),
    ]
    for item in inputs:
        item.set_data_from_numpy(data)
    return inputs


class DirectLoad:
    """A client doing what the direct-connect SDK does: refresh the ready endpoints (every 100 ms)
    and send add_sub requests round-robin straight to the instances. Counts every failure."""

    def __init__(self, endpoint: str) -> None:
        self.cp = ControlPlaneClient(endpoint, timeout=2.0)
        self.ok = 0
        self.failures: list[str] = []
        self.by_port: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._clients: dict[tuple[str, int], httpclient.InferenceServerClient] = {}

    def __enter__(self) -> DirectLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for client in self._clients.values():
            client.close()
        self.cp.close()

    def _run(self) -> None:
        endpoints: list[tuple[str, int]] = []
        refreshed = 0.0
        turn = 0
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 0.1:
                # While the control plane restarts, keep using the last list, as the SDK does.
                with contextlib.suppress(ControlPlaneError):
                    endpoints = [(e["ip"], e["port"]) for e in self.cp.endpoints(SERVICE).endpoints]
                refreshed = time.monotonic()
                for gone in set(self._clients) - set(endpoints):
                    self._clients.pop(gone).close()
            if not endpoints:
                time.sleep(0.01)
                continue
            target = endpoints[turn % len(endpoints)]
            turn += 1
            client = self._clients.get(target)
            if client is None:
                client = self._clients[target] = httpclient.InferenceServerClient(
                    f"{target[0]}:{target[1]}", connection_timeout=5, network_timeout=10
                )
            try:
                result = client.infer("add_sub", add_sub_inputs(float(turn % 7)))
                assert np.allclose(result.as_numpy("OUTPUT0"), 2 * (turn % 7))
                self.ok += 1
                self.by_port[target[1]] = self.by_port.get(target[1], 0) + 1
            except Exception as exc:
                self.failures.append(f"{target}: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def platform(example_repo: Path) -> Iterator[RunningPlatform]:
    # stop_instances=False: a restart of the control plane must leave instances running.
    with running_platform(stop_instances=False, drain_delay=1.0) as running:
        yield running


def instances(cp: ControlPlaneClient) -> list[dict[str, Any]]:
    return cp.list_instances(SERVICE)


def ready_count(cp: ControlPlaneClient) -> int:
    return len(cp.endpoints(SERVICE).endpoints)


def test_platform_end_to_end(platform: RunningPlatform) -> None:
    timings: dict[str, float] = {}
    cp = platform.client()

    # create (the CLI resolves the spec's relative repository path against the spec file)
    started = time.monotonic()
    out = platform.cli("create", str(ROOT / "examples" / "service.json"))
    assert "created" in out.stdout
    eps = wait_until("first ready instance", lambda: cp.endpoints(SERVICE).endpoints, platform=platform)
    timings["create -> first ready (CLI create)"] = time.monotonic() - started
    stored = cp.get_service(SERVICE)["spec"]["processor_params"][0]
    assert stored == f"--model-repository={ROOT / 'examples' / 'models'}"

    # tritonclient straight to the instance's address from discovery
    [endpoint] = eps
    client = httpclient.InferenceServerClient(f"{endpoint['ip']}:{endpoint['port']}")
    assert client.is_server_ready()
    result = client.infer("add_sub", add_sub_inputs(1.5))
    assert np.allclose(result.as_numpy("OUTPUT0"), 3.0) and np.allclose(result.as_numpy("OUTPUT1"), 0.0)
    client.close()

    # scale to 3: no rollout, the first instance stays
    first_id = instances(cp)[0]["id"]
    started = time.monotonic()
    platform.cli("modify", SERVICE, "-Dmetadata.instance=3")
    wait_until("3 ready", lambda: ready_count(cp) == 3, platform=platform)
    timings["scale 1 -> 3"] = time.monotonic() - started
    rows = instances(cp)
    assert first_id in {r["id"] for r in rows} and {r["version"] for r in rows} == {1}

    # rolling update under direct load: zero failed requests
    old_pids = {r["pid"] for r in rows}
    with DirectLoad(platform.endpoint) as load:
        wait_until("load running", lambda: load.ok > 20)
        started = time.monotonic()
        params = '-Dprocessor_params=["--model-repository=examples/models","--id=v2"]'
        platform.cli("modify", SERVICE, params, cwd=ROOT)  # relative to the CLI's directory
        wait_until(
            "rollout done",
            lambda: (
                (rs := instances(cp))
                and len(rs) == 3
                and all(r["version"] == 2 and r["ready"] for r in rs)
                and cp.get_service(SERVICE)["status"] == "Running"
            ),
            timeout=60,
            platform=platform,
        )
        timings["rolling update of 3"] = time.monotonic() - started
        time.sleep(0.3)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 100
    new_rows = instances(cp)
    assert cp.get_service(SERVICE)["spec"]["processor_params"][0] == stored
    assert not old_pids & {r["pid"] for r in new_rows}
    for pid in old_pids:
        wait_until(f"old pid {pid} gone", lambda pid=pid: _gone(pid), timeout=15)
    events = [e["kind"] for e in cp.events(SERVICE, limit=1000)]
    assert {"RolloutStarted", "RolloutComplete", "InstanceDraining", "InstanceStopped"} <= set(events)

    # kill -9 one instance: restarted, restart counted
    victim = new_rows[0]
    os.kill(victim["pid"], signal.SIGKILL)
    started = time.monotonic()
    back = wait_until(
        "restart",
        lambda: [r for r in instances(cp) if r["id"] == victim["id"] and r["ready"] and r["restarts"] == 1],
        platform=platform,
    )
    timings["kill -9 -> ready again"] = time.monotonic() - started
    assert back[0]["pid"] != victim["pid"]
    assert "InstanceCrashed" in {e["kind"] for e in cp.events(SERVICE)}

    # restart the control plane under direct load: instances adopted, same pids, zero failures
    before = {(r["id"], r["pid"], r["restarts"]) for r in instances(cp)}
    wait_until("3 ready before restart", lambda: ready_count(cp) == 3)
    with DirectLoad(platform.endpoint) as load:
        wait_until("load running", lambda: load.ok > 20)
        started = time.monotonic()
        platform.stop()
        assert all(not _gone(pid) for _, pid, _ in before)  # the instances outlive the control plane
        platform.start()
        timings["control plane restart"] = time.monotonic() - started
        cp = platform.client()
        wait_until("3 ready after restart", lambda: ready_count(cp) == 3, platform=platform)
        time.sleep(0.5)
    assert load.failures == [], load.failures[:5]
    assert {(r["id"], r["pid"], r["restarts"]) for r in instances(cp)} == before
    assert [e["kind"] for e in cp.events(SERVICE, limit=1000)].count("InstanceAdopted") == 3

    # delete: drained, then every process is gone and the service with it
    pids = [r["pid"] for r in instances(cp)]
    started = time.monotonic()
    platform.cli("delete", SERVICE, "-y")
    wait_until(
        "service gone", lambda: SERVICE not in {s["name"] for s in cp.list_services()}, platform=platform
    )
    timings["delete -> gone"] = time.monotonic() - started
    for pid in pids:
        assert _gone(pid), pid
    print("\n" + "\n".join(f"{name}: {seconds:.2f}s" for name, seconds in timings.items()))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
