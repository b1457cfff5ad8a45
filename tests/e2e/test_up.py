"""``elastiserve up`` as a process: one control plane per state dir, clear start errors, the
gateway child, Ctrl-C semantics (instances stay, or go with ``--stop-instances``)."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from elastiserve.controlplane.app import gateway_available
from elastiserve.testing import RunningPlatform, free_port, running_platform

pytestmark = pytest.mark.slow

WEB = {
    "name": "web",
    "containers": [
        {
            "command": f"exec {shlex.quote(sys.executable)} -m http.server $PORT --bind 127.0.0.1",
            "port": 8000,
            "readiness_check": {"http_get": {"path": "/"}},
        }
    ],
    "metadata": {"instance": 2, "cpu": 0.5, "memory": 100},
}


def up(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elastiserve", "up", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def deploy(platform: RunningPlatform, tmp_path: Path, spec: dict[str, Any] = WEB) -> list[dict[str, Any]]:
    path = tmp_path / "web.json"
    path.write_text(json.dumps(spec))
    platform.cli("create", str(path), "--wait", "--timeout", "30")
    cp = platform.client()
    rows = cp.list_instances(spec["name"])
    assert len(rows) == spec["metadata"]["instance"] and all(r["ready"] for r in rows)
    return rows


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_control_plane_per_state_dir_and_clear_port_errors(tmp_path: Path) -> None:
    with running_platform(gateway=False) as platform:
        result = up("--state-dir", str(platform.state_dir), "--port", str(free_port()), "--no-gateway")
        assert result.returncode == 1
        assert f"another control plane (pid {platform.process.pid})" in result.stderr  # type: ignore[union-attr]
        assert "Traceback" not in result.stderr
        assert (platform.state_dir / "endpoint").read_text().strip() == platform.endpoint
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = up("--state-dir", str(tmp_path / "s"), "--port", str(port), "--no-gateway")
    assert result.returncode == 1 and f"port 127.0.0.1:{port} is not free" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_instances_drains_on_shutdown(tmp_path: Path) -> None:
    with running_platform(gateway=False, stop_instances=True, state_dir=tmp_path / "state") as platform:
        rows = deploy(platform, tmp_path)
        assert platform.process is not None
        platform.process.send_signal(signal.SIGINT)  # Ctrl-C
        platform.process.wait(30)
        assert all(gone(r["pid"]) for r in rows)
        assert "shutting down (stopping instances)" in platform.log()
        # The next start begins clean: new instances, no crash noise.
        platform.start()
        cp = platform.client()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(cp.endpoints("web").endpoints) < 2:
            time.sleep(0.05)
        fresh = cp.list_instances("web")
        assert len(fresh) == 2 and not {r["id"] for r in rows} & {r["id"] for r in fresh}
        assert all(r["restarts"] == 0 for r in fresh)


def test_sigint_leaves_instances_running_for_the_next_up(tmp_path: Path) -> None:
    with running_platform(gateway=False, stop_instances=False) as platform:
        rows = deploy(platform, tmp_path)
        assert platform.process is not None
        platform.process.send_signal(signal.SIGINT)
        platform.process.wait(30)
        assert not any(gone(r["pid"]) for r in rows)
        for row in rows:  # still serving with nobody watching
            assert httpx.get(f"http://{row['address']}:{row['port']}/").status_code == 200
        platform.start()
        cp = platform.client()
        assert {(r["id"], r["pid"]) for r in cp.list_instances("web")} == {(r["id"], r["pid"]) for r in rows}
        platform.cli("delete", "web", "-y")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(gone(r["pid"]) for r in rows):
            time.sleep(0.05)
        assert all(gone(r["pid"]) for r in rows)


def test_crash_loop_is_reported_and_blocked(tmp_path: Path) -> None:
    spec = {
        "name": "bad",
        "containers": [{"command": "echo 'fatal: no config file' >&2; exit 3", "port": 8000}],
        "runtime": {"enable_crash_block": True},
        "metadata": {"instance": 1, "cpu": 0.5, "memory": 100},
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with running_platform(gateway=False) as platform:
        started = time.monotonic()
        result = platform.cli("create", str(path), "--wait", "--timeout", "30", check=False)
        assert result.returncode == 1, result
        assert "crash loop (3 failures in a row): exited with code 3: fatal: no config file" in result.stderr
        assert time.monotonic() - started < 15
        [row] = platform.client().list_instances("bad")
        assert row["status"] == "CrashBlocked" and row["restarts"] == 2
        table = platform.cli("w", "bad").stdout
        assert "CrashBlocked" in table
        logs = platform.cli("logs", "bad").stdout
        assert logs.splitlines().count(f"[{row['id']}] fatal: no config file") == 3  # kept for inspection


@pytest.mark.skipif(not gateway_available(), reason="the gateway module has not landed")
def test_up_runs_the_gateway_as_its_own_process(tmp_path: Path) -> None:
    with running_platform(gateway=True) as platform:
        assert platform.gateway_url is not None
        pid, _ = (platform.state_dir / "gateway.pid").read_text().split()
        gateway = psutil.Process(int(pid))
        assert "elastiserve.gateway" in " ".join(gateway.cmdline())
        assert httpx.get(f"{platform.gateway_url}/healthz").status_code == 200
        view = platform.client().get_service(deploy(platform, tmp_path)[0]["service"])
        assert view["endpoint"] == f"{platform.gateway_url}/api/predict/web"
        # Through the gateway, with the service token.
        token = view["spec"]["token"]
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline and status != 200:
            status = httpx.get(f"{view['endpoint']}/", headers={"Authorization": token}).status_code
            time.sleep(0.1)
        assert status == 200
        # A gateway that dies is restarted by `up`.
        gateway.kill()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{platform.gateway_url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        new_pid = int((platform.state_dir / "gateway.pid").read_text().split()[0])
        assert new_pid != gateway.pid
        platform.stop()
        assert gone(new_pid)


@pytest.mark.skipif(not gateway_available(), reason="the gateway module has not landed")
def test_gateway_outlives_up_and_is_adopted_unless_its_settings_changed(tmp_path: Path) -> None:
    with running_platform(gateway=True, stop_instances=False) as platform:
        first = int((platform.state_dir / "gateway.pid").read_text().split()[0])
        platform.stop()
        assert not gone(first)  # the data path stays up while the control plane is away
        assert httpx.get(f"{platform.gateway_url}/healthz").status_code == 200
        platform.start()
        assert int((platform.state_dir / "gateway.pid").read_text().split()[0]) == first
        assert "adopted the running gateway" in platform.log()
        # Other gateway settings: the old gateway is stopped and a new one started.
        platform.stop()
        grpc_port = free_port()
        platform.args += ["--gateway-grpc-port", str(grpc_port)]
        platform.start()
        second = int((platform.state_dir / "gateway.pid").read_text().split()[0])
        assert second != first
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not gone(first):
            time.sleep(0.05)
        assert gone(first)
        assert "stopping the gateway left running with other settings" in platform.log()
        # --stop-instances: a full shutdown, the gateway goes too.
        platform.stop()
        platform.args.append("--stop-instances")
        platform.start()
        assert int((platform.state_dir / "gateway.pid").read_text().split()[0]) == second
        platform.stop()
        assert gone(second)
        assert not (platform.state_dir / "gateway.pid").exists()


def test_instances_listen_on_and_publish_the_instance_host(tmp_path: Path, example_repo: Path) -> None:
    # Another loopback address stands for this machine's LAN address (tests use loopback only).
    host_web = {
        **WEB,
        "name": "hostweb",
        "containers": [
            {
                "command": f"exec {shlex.quote(sys.executable)} -m http.server $PORT --bind $HOST",
                "port": 8000,
                "readiness_check": {"http_get": {"path": "/"}},
            }
        ],
        "metadata": {"instance": 1, "cpu": 0.5, "memory": 100},
    }
    engine = {
        "name": "hostengine",
        "processor": "triton",
        "processor_params": [
            f"--model-repository={example_repo}",
            "--model-control-mode=explicit",
            "--load-model=add_sub",
        ],
        "metadata": {"instance": 1, "cpu": 1, "memory": 500},
    }
    with running_platform(gateway=False, extra_args=["--instance-host", "127.0.0.2"]) as platform:
        [web] = deploy(platform, tmp_path, host_web)
        [eng] = deploy(platform, tmp_path, engine)
        cp = platform.client()
        for row, name in ((web, "hostweb"), (eng, "hostengine")):
            assert row["address"] == "127.0.0.2"
            assert {(e["ip"], e["port"]) for e in cp.endpoints(name).endpoints} == {("127.0.0.2", row["port"])}
        assert httpx.get(f"http://127.0.0.2:{web['port']}/").status_code == 200
        assert httpx.get(f"http://127.0.0.2:{eng['port']}/v2/health/ready").status_code == 200
    # A wildcard cannot be published: a clear start error.
    result = up("--state-dir", str(tmp_path / "wild"), "--instance-host", "0.0.0.0", "--no-gateway")
    assert result.returncode == 1 and "give the address clients connect to" in result.stderr, result.stderr
