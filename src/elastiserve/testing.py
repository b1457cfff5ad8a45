"""Public test helpers: a real engine or a whole platform (``elastiserve up``) as subprocesses on
free loopback ports, and the in-memory :class:`FakeRuntime` for control-plane tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from elastiserve.controlplane.runtimes.fake import FakeRuntime as FakeRuntime
from elastiserve.controlplane.runtimes.local import free_port as free_port
from elastiserve.controlplane.runtimes.local import free_ports as free_ports

if TYPE_CHECKING:
    from elastiserve.client.controlplane import ControlPlaneClient




@dataclass
class RunningEngine:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http wants it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_http_ready(url: str, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before becoming ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def running_engine(
    *repositories: str | Path,
    args: list[str] | None = None,
    log_dir: Path | None = None,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[RunningEngine]:
    """Run ``elastiserve serve`` as a subprocess for the duration of the block, then stop it."""
    http_port, grpc_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "elastiserve", "serve"]
    command += [f"--model-repository={repo}" for repo in repositories]
    command += [
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        *(args or []),
    ]
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_path = log_dir / f"elastiserve-engine-{http_port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    engine = RunningEngine(process, http_port, grpc_port, metrics_port, log_path)
    try:
        if wait_ready:
            try:
                wait_http_ready(f"http://127.0.0.1:{http_port}/v2/health/live", process=process)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n--- engine log ---\n{engine.log()}") from exc
        yield engine
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the whole platform ------------------------------------------------------------------------------


@dataclass
class RunningPlatform:
    """``elastiserve up`` in a subprocess; :meth:`stop` and :meth:`start` restart it on the same
    ports and state directory (instances keep running in between and are adopted)."""

    state_dir: Path
    port: int
    gateway_port: int | None
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    admin_token: str = ""
    gateway_url: str | None = None
    starts: int = field(default=0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> ControlPlaneClient:
        from elastiserve.client.controlplane import ControlPlaneClient

        return ControlPlaneClient(self.endpoint, self.admin_token)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``elastiserve ARGS`` against this platform (endpoint and token from the state dir)."""
        result = subprocess.run(
            [sys.executable, "-m", "elastiserve", *args],
            cwd=cwd,
            env={**self.env, "ELASTISERVE_HOME": str(self.state_dir)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"elastiserve {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"==== start {self.starts}\n".encode())
            log_file.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "elastiserve", "up", *self.args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        try:
            wait_http_ready(f"{self.endpoint}/healthz", timeout=timeout, process=self.process)
            self.admin_token = (self.state_dir / "admin_token").read_text().strip()
            self.gateway_url = None
            if self.gateway_port is not None and "gateway not available" not in self.log():
                url = f"http://127.0.0.1:{self.gateway_port}"
                wait_http_ready(f"{url}/healthz", timeout=timeout, process=self.process)
                self.gateway_url = url
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"elastiserve up did not start: {exc}\n--- log ---\n{self.log()}") from exc

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (Ctrl-C's twin): a clean shutdown; SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextlib.contextmanager
def running_platform(
    state_dir: str | Path | None = None,
    *,
    gateway: bool = True,
    stop_instances: bool = True,
    cpus: float | None = 64,
    memory: int | None = 256_000,
    drain_delay: float = 1.0,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[RunningPlatform]:
    """``elastiserve up`` on free loopback ports with a temporary state dir (unless given).

    The default capacity is generous (64 cpu, 256 GB) so tests can run several instances on a small
    machine: test instances are mostly idle. On exit the platform is stopped with
    ``--stop-instances``, and anything a crashed ``up`` left behind (instances, gateway) is killed.
    """
    owned = state_dir is None
    root = Path(tempfile.mkdtemp(prefix="elastiserve-platform-")) if owned else Path(state_dir)  # type: ignore[arg-type]
    port, other = free_ports(2)
    gateway_port = other if gateway else None
    args = [
        "--state-dir",
        str(root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--drain-delay",
        str(drain_delay),
    ]
    args += ["--gateway-port", str(gateway_port)] if gateway_port is not None else ["--no-gateway"]
    if stop_instances:
        args.append("--stop-instances")
    if cpus is not None:
        args += ["--cpus", str(cpus)]
    if memory is not None:
        args += ["--memory", str(memory)]
    args += extra_args or []
    full_env = {**os.environ, **(env or {})}
    for name in ("ELASTISERVE_ENDPOINT", "ELASTISERVE_TOKEN"):
        full_env.pop(name, None)
    root.mkdir(parents=True, exist_ok=True)
    platform = RunningPlatform(
        state_dir=root,
        port=port,
        gateway_port=gateway_port,
        args=args,
        env=full_env,
        log_path=root / "up.log",
    )
    try:
        platform.start(timeout=timeout)
        yield platform
    finally:
        platform.stop()
        kill_leftovers(root)
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def kill_leftovers(state_dir: Path) -> list[int]:
    """SIGKILL the process groups of instances (and the gateway) recorded in ``state_dir`` that are
    still alive and provably ours (same start time); returns their pids. For test cleanup."""
    import psutil

    from elastiserve.controlplane.store import DB_FILE, Store

    found: list[tuple[int, float]] = []
    if (state_dir / DB_FILE).exists():
        with Store(state_dir / DB_FILE) as store:
            for data in store.list_runtime_records("local").values():
                if data.get("pid") and data.get("create_time") is not None:
                    found.append((int(data["pid"]), float(data["create_time"])))
    with contextlib.suppress(OSError, ValueError):
        pid, created = (state_dir / "gateway.pid").read_text().split()
        found.append((int(pid), float(created)))
    killed = []
    for pid, created in found:
        try:
            if abs(psutil.Process(pid).create_time() - created) > 0.05:
                continue
        except psutil.Error:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def wait_until(
    what: str,
    check: Callable[[], Any],
    timeout: float = 30.0,
    platform: RunningPlatform | None = None,
    log: Callable[[], str] | None = None,
) -> Any:
    """Call ``check`` every 50 ms until it returns something true (returned); an exception
    counts as "not yet". On timeout, an AssertionError names ``what``, the last result or
    exception, and the tail of the platform's (or ``log()``'s) log."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    text = platform.log() if platform is not None else log() if log is not None else ""
    extra = f"\n--- log ---\n{text[-4000:]}" if text else ""
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}{extra}")
