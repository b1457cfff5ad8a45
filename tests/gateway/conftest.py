"""A real gateway process in front of real engines, fed by a real control plane over HTTP.

The control plane runs in this process (uvicorn in a thread) over a :class:`Store` in a temp
directory; there is no reconciler, so tests write instance rows themselves, pointing at the
engines (or at fake instances, or at dead ports). Everything is started once per module and
every test deploys services with its own names.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from elastiserve.controlplane.api import create_app, serve_in_thread
from elastiserve.controlplane.spec import parse_spec
from elastiserve.controlplane.store import InstanceRecord, Store
from elastiserve.engine.frontends.http_server import HttpRequest, Response, start_server
from elastiserve.testing import RunningEngine, free_port, running_engine, wait_http_ready

ADMIN = "gateway-tests-admin-token"
MAX_BODY = 1 << 20
ENGINE_ARGS = ["--model-control-mode=explicit", "--load-model=identity_fp32", "--load-model=add_sub"]


@dataclass
class Platform:
    """What a test needs: the gateway URL, the engines, and a way to deploy services."""

    gateway: str
    control_plane: str
    store: Store
    engines: list[RunningEngine]
    gateway_log: Path
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def deploy(
        self,
        name: str,
        ports: list[int],
        *,
        token: str | None = None,
        labels: dict[str, str] | None = None,
        rpc: dict[str, Any] | None = None,
        wait: bool = True,
        **spec: Any,
    ) -> None:
        """Create service ``name`` with ready instances at ``127.0.0.1:<port>`` for each port."""
        body: dict[str, Any] = {
            "name": name,
            "processor": "triton",
            "processor_params": ["--model-repository=/unused"],
            "metadata": {"instance": len(ports), "rpc": rpc or {}},
            "labels": labels or {},
            **spec,
        }
        if token is not None:
            body["token"] = token
        self.store.create_service(parse_spec(body))
        self.set_instances(name, ports)
        if wait:
            self.wait_ready(name, token)

    def set_instances(self, name: str, ports: list[int]) -> None:
        """Make exactly these instances ready (rows for other ports are removed)."""
        for inst in self.store.list_instances(name):
            if inst.port not in ports:
                self.store.remove_instance(inst.id)
        existing = {i.port for i in self.store.list_instances(name)}
        for port in ports:
            if port in existing:
                continue
            self.store.upsert_instance(
                InstanceRecord(
                    id=f"{name}-{next(self._ids)}",
                    service=name,
                    version=1,
                    address="127.0.0.1",
                    port=port,
                    status="Running",
                    ready=True,
                    started=time.time(),
                )
            )

    def wait_ready(self, name: str, token: str | None = None, count: int | None = None) -> None:
        """Until the gateway lists ``count`` (default: all) instances of ``name`` in its metrics."""
        want = count if count is not None else len(self.store.list_instances(name))
        needle = f'elastiserve_gateway_instances{{service="{name}"}} {float(want)}'
        headers = {"Authorization": token} if token else {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # A request makes the gateway read the service list at once.
            httpx.get(f"{self.gateway}/api/predict/{name}/v2/health/live", headers=headers, timeout=5)
            if needle in httpx.get(f"{self.gateway}/metrics", timeout=5).text:
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"gateway never saw {want} instance(s) of {name}\n{self.gateway_log.read_text()[-3000:]}"
        )

    def metrics(self) -> str:
        return httpx.get(f"{self.gateway}/metrics", timeout=5).text

    def metric(self, line_prefix: str) -> float:
        """The value of the first metrics line starting with ``line_prefix`` (0 when absent)."""
        for line in self.metrics().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class FakeInstance:
    """An HTTP instance with scripted behaviour, on its own loop in a thread.

    Routes: ``/status/<code>`` answers that code; ``/slow?s=0.5`` sleeps first; anything else
    echoes the request as JSON (``instance``, ``method``, ``path``, ``query``, ``headers``,
    ``body_len``). ``hits`` counts requests per path. With ``status`` every request gets it.
    """

    def __init__(self, label: str, status: int | None = None) -> None:
        self.label = label
        self.status = status  # when set, every request is answered with it
        self.hits: dict[str, int] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"fake-{label}")
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.port
            self._ready.set()
            self._stop = asyncio.Event()
            await self._stop.wait()
            await self._server.close(1.0)

        self._loop.run_until_complete(main())

    def _handle(self, request: HttpRequest) -> Response | Any:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if self.status is not None or request.path.startswith("/status/"):
            code = self.status or int(request.path.rsplit("/", 1)[1])
            return Response(
                code,
                orjson.dumps({"error": f"{self.label} says {code}"}),
                b"content-type: application/json\r\n",
            )
        if request.path == "/slow":
            return self._slow(request)
        return self._echo(request)

    def _echo(self, request: HttpRequest) -> Response:
        body = {
            "instance": self.label,
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": {k.decode(): v.decode() for k, v in request.headers.items()},
            "body_len": len(request.body),
        }
        return Response(200, orjson.dumps(body), b"content-type: application/json\r\nx-fake: yes\r\n")

    async def _slow(self, request: HttpRequest) -> Response:
        seconds = float(dict(p.split("=") for p in request.query.split("&") if "=" in p).get("s", "0.5"))
        await asyncio.sleep(seconds)
        return self._echo(request)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


class DroppingInstance:
    """Accepts a connection, reads a request, closes without answering (a crash mid-request);
    with ``reply``, sends those bytes before closing (an HTTP/1.0 style server)."""

    def __init__(self, reply: bytes | None = None) -> None:
        import socket

        self.reply = reply
        self.accepted = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True, name="dropping-instance")
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    if conn.recv(65536):
                        self.accepted += 1
                        if self.reply is not None:
                            conn.sendall(self.reply)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def platform(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("gateway")
    store = Store.open(tmp / "state")
    # max_wait=1: long-polls held by the gateway end quickly when the control plane stops.
    app = create_app(store, admin_token=ADMIN, max_wait=1)
    token_file = tmp / "admin_token"
    token_file.write_text(ADMIN)
    with contextlib.ExitStack() as stack:
        engines = [
            stack.enter_context(running_engine(example_repo, args=ENGINE_ARGS, log_dir=tmp, wait_ready=False))
            for _ in range(2)
        ]
        cp_url = stack.enter_context(serve_in_thread(app))
        port = free_port()
        log_path = tmp / "gateway.log"
        log_file = stack.enter_context(open(log_path, "wb"))
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "elastiserve.gateway",
                "--control-plane",
                cp_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--admin-token-file",
                str(token_file),
                "--max-body-bytes",
                str(MAX_BODY),
                "--refresh-interval",
                "30",  # changes must arrive through the long-polls, not periodic reads
                "--connect-timeout",
                "0.5",
                "--log-level",
                "debug" if os.environ.get("GATEWAY_DEBUG") else "info",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        stack.callback(_stop, process)
        for engine in engines:
            wait_http_ready(f"http://{engine.http_url}/v2/health/ready", process=engine.process)
        try:
            wait_http_ready(f"http://127.0.0.1:{port}/readyz", timeout=20, process=process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{log_path.read_text()}") from exc
        yield Platform(f"http://127.0.0.1:{port}", cp_url, store, engines, log_path)
    store.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def fake_instances() -> Iterator[Callable[..., FakeInstance]]:
    made: list[FakeInstance] = []

    def make(label: str, status: int | None = None) -> FakeInstance:
        inst = FakeInstance(label, status)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.close()


@pytest.fixture
def dropping_instance() -> Iterator[DroppingInstance]:
    inst = DroppingInstance()
    yield inst
    inst.close()
