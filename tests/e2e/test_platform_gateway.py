"""Issue 3, acceptance 9, through the gateway: ``elastiserve up`` → ``create examples/service.json``
→ predict through the gateway with the service token → scale to 3 → predictions spread over the 3
→ rolling update under load with zero failed requests → kill -9 one instance under load → restart
the control plane under load → delete (processes gone, the gateway answers 404).

The load is a thread with httpx sending V2 JSON infer requests to the gateway; every answer that
is not a 200 with the right numbers is a failure.

The control-plane restart runs its load through ``up``'s own gateway: ``up`` leaves the gateway
(like the instances) running when it stops and the next ``up`` adopts it, so the gateway keeps
serving from what it last knew while the control plane is down (docs/gateway.md, *Staying in
step*) and the port never closes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from elastiserve.client.controlplane import ControlPlaneClient
from elastiserve.testing import RunningPlatform, free_port, running_platform, wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "triton_test"
INFER = f"/api/predict/{SERVICE}/v2/models/add_sub/infer"

pytestmark = pytest.mark.slow


def infer_body(value: float) -> dict[str, Any]:
    data = [value] * 16
    return {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": data},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": data},
        ]
    }


def check_answer(response: httpx.Response, value: float) -> str | None:
    """None when ``response`` is add_sub's right answer for ``value``, else what is wrong."""
    if response.status_code != 200:
        return f"{response.status_code}: {response.text[:300]}"
    try:
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    except (ValueError, KeyError, TypeError) as exc:
        return f"bad body ({exc}): {response.text[:300]}"
    if outputs.get("OUTPUT0") != [2 * value] * 16 or outputs.get("OUTPUT1") != [0.0] * 16:
        return f"wrong numbers: {response.text[:300]}"
    return None


class GatewayLoad:
    """One client thread sending add_sub requests through a gateway, back to back, until stopped
    (or ``max_seconds``). Records every failure (non-200, wrong numbers, transport errors)."""

    def __init__(self, gateway: str, token: str, max_seconds: float = 45.0) -> None:
        self.gateway = gateway
        self.token = token
        self.max_seconds = max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gateway-load")

    def __enter__(self) -> GatewayLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "load thread did not stop"

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        turn = 0
        with httpx.Client(
            base_url=self.gateway, headers={"Authorization": self.token}, timeout=httpx.Timeout(20.0)
        ) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                turn += 1
                value = float(turn % 7)
                try:
                    problem = check_answer(client.post(INFER, json=infer_body(value)), value)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is None:
                    self.ok += 1
                else:
                    self.failures.append(f"t={time.monotonic():.2f} {problem}")


@pytest.fixture(scope="module")
def gateway_grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def platform(example_repo: Path, gateway_grpc_port: int) -> Iterator[RunningPlatform]:
    # stop_instances=False: a restart of the control plane must leave instances running.
    with running_platform(
        stop_instances=False,
        drain_delay=1.0,
        timeout=60,
        extra_args=["--gateway-grpc-port", str(gateway_grpc_port)],
    ) as running:
        assert running.gateway_url, f"the gateway did not start\n{running.log()[-3000:]}"
        yield running


def instances(cp: ControlPlaneClient) -> list[dict[str, Any]]:
    return cp.list_instances(SERVICE)


def ready_count(cp: ControlPlaneClient) -> int:
    return len(cp.endpoints(SERVICE).endpoints)


def gateway_instance_counts(gateway: str, service: str = SERVICE) -> dict[str, float]:
    """``ip:port`` → requests the gateway sent there, from its ``/metrics``."""
    counts: dict[str, float] = {}
    prefix = "elastiserve_gateway_instance_requests_total{"
    for line in httpx.get(f"{gateway}/metrics", timeout=5).text.splitlines():
        if line.startswith(prefix) and f'service="{service}"' in line:
            labels, value = line[len(prefix) :].rsplit("} ", 1)
            instance = labels.split('instance="', 1)[1].split('"', 1)[0]
            counts[instance] = float(value)
    return counts


def gateway_knows(gateway: str, count: int, service: str = SERVICE) -> bool:
    needle = f'elastiserve_gateway_instances{{service="{service}"}} {float(count)}'
    return needle in httpx.get(f"{gateway}/metrics", timeout=5).text


def test_platform_through_gateway(platform: RunningPlatform) -> None:
    timings: dict[str, float] = {}
    cp = platform.client()
    gateway = platform.gateway_url
    assert gateway is not None

    # create with the CLI; the service token from desc --json (and the SDK)
    started = time.monotonic()
    platform.cli("create", str(ROOT / "examples" / "service.json"))
    desc = platform.cli("desc", SERVICE, "--json")
    token = json.loads(desc.stdout)["spec"]["token"]
    assert token and token == cp.get_service(SERVICE)["spec"]["token"]
    wait_until("first ready instance", lambda: ready_count(cp) == 1, timeout=60, platform=platform)

    # predict through the gateway (first answer may wait for the gateway's long-poll)
    def predicted() -> bool:
        response = httpx.post(f"{gateway}{INFER}", json=infer_body(1.5), headers={"Authorization": token})
        return check_answer(response, 1.5) is None

    wait_until("first predict through the gateway", predicted, timeout=30, platform=platform)
    timings["create -> first predict through the gateway"] = time.monotonic() - started
    assert httpx.post(f"{gateway}{INFER}", json=infer_body(1.0)).status_code == 401
    assert (
        httpx.post(f"{gateway}{INFER}", json=infer_body(1.0), headers={"Authorization": "x" * 12}).status_code
        == 403
    )

    # scale to 3 (not a rollout), then predictions through the gateway spread over all 3
    platform.cli("modify", SERVICE, "-Dmetadata.instance=3")
    wait_until("3 ready", lambda: ready_count(cp) == 3, timeout=60, platform=platform)
    wait_until("gateway sees 3", lambda: gateway_knows(gateway, 3), timeout=30, platform=platform)
    before = gateway_instance_counts(gateway)
    with httpx.Client(base_url=gateway, headers={"Authorization": token}, timeout=20) as client:
        for i in range(90):
            assert check_answer(client.post(INFER, json=infer_body(float(i % 5))), float(i % 5)) is None
    after = gateway_instance_counts(gateway)
    addresses = {f"{e['ip']}:{e['port']}" for e in cp.endpoints(SERVICE).endpoints}
    spread = {key: after.get(key, 0) - before.get(key, 0) for key in addresses}
    assert sum(spread.values()) == 90 and all(n > 0 for n in spread.values()), spread
    assert {r["version"] for r in instances(cp)} == {1}

    # rolling update under load through the gateway: zero failed requests
    old_pids = {r["pid"] for r in instances(cp)}
    with GatewayLoad(gateway, token) as load:
        wait_until("load running", lambda: load.ok > 20 or load.failures, platform=platform)
        started = time.monotonic()
        params = '-Dprocessor_params=["--model-repository=examples/models","--id=v2"]'
        platform.cli("modify", SERVICE, params, cwd=ROOT)
        wait_until(
            "rollout done",
            lambda: (
                (rs := instances(cp))
                and len(rs) == 3
                and all(r["version"] == 2 and r["ready"] for r in rs)
                and cp.get_service(SERVICE)["status"] == "Running"
            ),
            timeout=90,
            platform=platform,
        )
        timings["rolling update of 3 under load"] = time.monotonic() - started
        for pid in old_pids:  # the old ones drained and stopped while the load ran
            wait_until(f"old pid {pid} gone", lambda pid=pid: _gone(pid), timeout=20)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50, load.ok

    # kill -9 one instance under load: zero failed through the gateway, restarted once
    wait_until("gateway sees the 3 new", lambda: gateway_knows(gateway, 3), timeout=30)
    victim = instances(cp)[0]
    with GatewayLoad(gateway, token) as load:
        wait_until("load running", lambda: load.ok > 20 or load.failures, platform=platform)
        started = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        back = wait_until(
            "restart",
            lambda: [
                r for r in instances(cp) if r["id"] == victim["id"] and r["ready"] and r["restarts"] == 1
            ],
            timeout=60,
            platform=platform,
        )
        timings["kill -9 -> ready again"] = time.monotonic() - started
        ok_at_restart = load.ok
        wait_until("load after restart", lambda: load.ok > ok_at_restart + 20 or load.failures)
    assert load.failures == [], load.failures[:5]
    assert back[0]["pid"] != victim["pid"]
    assert "InstanceCrashed" in {e["kind"] for e in cp.events(SERVICE)}

    # restart the control plane under load: zero failed through up's own gateway, which is left
    # running by the old `up` and adopted by the new one (the data path never closes)
    wait_until("3 ready before restart", lambda: ready_count(cp) == 3, timeout=30)
    state_before = {(r["id"], r["pid"], r["restarts"], r["version"]) for r in instances(cp)}
    versions_before = cp.list_versions(SERVICE)
    assert len(versions_before) == 2, versions_before  # create + the rolling update (scaling is none)
    gateway = platform.gateway_url
    assert gateway is not None
    gateway_pid = int((platform.state_dir / "gateway.pid").read_text().split()[0])
    with GatewayLoad(gateway, token) as load:
        wait_until("load running", lambda: load.ok > 20 or load.failures, platform=platform)
        started = time.monotonic()
        platform.stop()
        assert all(not _gone(pid) for _, pid, _, _ in state_before)  # instances outlive `up`
        assert not _gone(gateway_pid)  # so does the gateway
        ok_while_down = load.ok
        wait_until("load while the control plane is down", lambda: load.ok > ok_while_down + 10)
        platform.start(timeout=60)
        timings["control plane restart"] = time.monotonic() - started
        cp = platform.client()
        wait_until("3 ready after restart", lambda: ready_count(cp) == 3, timeout=30, platform=platform)
        ok_after = load.ok
        wait_until("load after restart", lambda: load.ok > ok_after + 20 or load.failures)
    assert load.failures == [], load.failures[:5]
    # state intact: same instances (adopted, same pids), same versions and token, same gateway
    assert {(r["id"], r["pid"], r["restarts"], r["version"]) for r in instances(cp)} == state_before
    assert cp.list_versions(SERVICE) == versions_before
    assert cp.get_service(SERVICE)["spec"]["token"] == token
    assert int((platform.state_dir / "gateway.pid").read_text().split()[0]) == gateway_pid
    assert "adopted the running gateway" in platform.log()

    # delete: every process gone, the gateway answers 404 for the service
    pids = [r["pid"] for r in instances(cp)]
    started = time.monotonic()
    platform.cli("delete", SERVICE, "-y")
    wait_until(
        "service gone", lambda: SERVICE not in {s["name"] for s in cp.list_services()}, platform=platform
    )
    for pid in pids:
        wait_until(f"pid {pid} gone", lambda pid=pid: _gone(pid), timeout=20)
    wait_until(
        "gateway 404",
        lambda: (
            httpx.post(
                f"{gateway}{INFER}", json=infer_body(1.0), headers={"Authorization": token}
            ).status_code
            == 404
        ),
        timeout=30,
    )
    timings["delete -> gone (404)"] = time.monotonic() - started
    print("\n" + "\n".join(f"{name}: {seconds:.2f}s" for name, seconds in timings.items()))


def test_grpc_through_the_gateway(platform: RunningPlatform, gateway_grpc_port: int) -> None:
    """A service with ``metadata.enable_grpc``: its endpoints publish each instance's gRPC port and
    tritonclient.grpc reaches it through the gateway's gRPC proxy (``up --gateway-grpc-port``)."""
    cp = platform.client()
    name = "grpc_test"
    spec = {
        "name": name,
        "processor": "triton",
        "processor_params": [f"--model-repository={ROOT / 'examples' / 'models'}"],
        "metadata": {"instance": 2, "cpu": 1, "memory": 1000, "enable_grpc": True},
    }
    token = cp.create_service(spec)["spec"]["token"]
    try:
        eps = wait_until(
            "2 ready",
            lambda: (e := cp.endpoints(name).endpoints) and len(e) == 2 and e,
            timeout=60,
            platform=platform,
        )
        assert all(isinstance(e.get("grpc_port"), int) and e["grpc_port"] != e["port"] for e in eps), eps
        gateway = platform.gateway_url
        assert gateway is not None
        wait_until("gateway sees 2", lambda: _warm_and_count(gateway, token, 2, name), timeout=30)
        before = gateway_instance_counts(gateway, name)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway_grpc_port}")
        try:
            headers = {"service": name, "authorization": token}
            assert client.is_server_ready(headers=headers)
            for i in range(20):
                data = np.full((1, 16), float(i), dtype=np.float32)
                inputs = [
                    grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                    grpcclient.InferInput("INPUT1", [1, 16], "FP32"),
                ]
                for item in inputs:
                    item.set_data_from_numpy(data)
                result = client.infer("add_sub", inputs, headers=headers)
                assert np.allclose(result.as_numpy("OUTPUT0"), 2 * i)
                assert np.allclose(result.as_numpy("OUTPUT1"), 0)
            with pytest.raises(InferenceServerException) as info:
                client.is_server_ready(headers={"service": name, "authorization": "y" * 12})
            assert str(info.value.status()) == "StatusCode.PERMISSION_DENIED"
        finally:
            client.close()
        after = gateway_instance_counts(gateway, name)
        spread = {key: after.get(key, 0) - before.get(key, 0) for key in after}
        assert len(spread) == 2 and all(n > 0 for n in spread.values()), spread
    finally:
        cp.delete_service(name)


def _warm_and_count(gateway: str, token: str, count: int, service: str = SERVICE) -> bool:
    # A request makes a fresh gateway read the service list at once.
    infer = f"/api/predict/{service}/v2/models/add_sub/infer"
    httpx.post(f"{gateway}{infer}", json=infer_body(1.0), headers={"Authorization": token}, timeout=10)
    return gateway_knows(gateway, count, service)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
