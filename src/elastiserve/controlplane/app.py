"""The control plane process (``elastiserve up``): store, local runtime, reconciler, REST API, and
the gateway as a child process.

One process owns a state directory (a lock file says so) so that two control planes never drive
the same instances. The API runs under uvicorn in a thread; the main thread waits for
SIGINT/SIGTERM and supervises the gateway. Shutting down stops the control plane but leaves the
data path running, instances and gateway: the next ``elastiserve up`` on the same state directory
adopts them, so requests keep flowing across a control-plane restart (``--stop-instances`` drains
the instances and stops the gateway instead).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from elastiserve.controlplane.api import create_app, serve_in_thread
from elastiserve.controlplane.reconciler import Reconciler
from elastiserve.controlplane.runtimes.base import InstanceNotFound, Resources
from elastiserve.controlplane.runtimes.local import LocalRuntime
from elastiserve.controlplane.store import (
    ADMIN_TOKEN_FILE,
    Store,
    ensure_state_dir,
    load_or_create_admin_token,
)
from elastiserve.errors import ConfigError

log = logging.getLogger("elastiserve.controlplane")

ENDPOINT_FILE = "endpoint"  # read by the CLI (cli/services.py) to find a local control plane
LOCK_FILE = "control-plane.lock"
GATEWAY_PID_FILE = "gateway.pid"
GATEWAY_MODULE = "elastiserve.gateway"
DEFAULT_PORT = 8470
DEFAULT_GATEWAY_PORT = 8480


@dataclass
class PlatformOptions:
    """``elastiserve up``'s options."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    instance_host: str = "127.0.0.1"  # where instances listen and what discovery publishes
    gateway_port: int | None = DEFAULT_GATEWAY_PORT  # None: no gateway
    gateway_grpc_port: int | None = None  # the gateway's gRPC proxy; None: off
    stop_instances: bool = False
    capacity: Resources | None = None  # None: this machine
    drain_delay: float = 2.0
    period: float = 1.0


def _connect_host(host: str) -> str:
    """Where a client on this machine connects for a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def _url(host: str, port: int) -> str:
    host = _connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(host: str, port: int, what: str) -> None:
    """A clear error now instead of uvicorn's traceback later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{what} port {host}:{port} is not free ({exc.strerror or exc})") from None


def gateway_available() -> bool:
    """The gateway is another engineer's module: ``up`` runs without it if it is missing."""
    try:
        return importlib.util.find_spec(f"{GATEWAY_MODULE}.__main__") is not None
    except (ImportError, ValueError):
        return False


class StateDirLock:
    """An exclusive ``flock`` on ``<state>/control-plane.lock`` for the process's lifetime."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the process's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise ConfigError(
                f"another control plane (pid {holder}) is running with state dir {self.path.parent}"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class GatewayProcess:
    """``python -m elastiserve.gateway`` as a child, restarted with backoff if it dies."""

    def __init__(
        self,
        control_plane: str,
        host: str,
        port: int,
        token_file: Path,
        log_path: Path,
        grpc_port: int | None = None,
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            GATEWAY_MODULE,
            "--control-plane",
            control_plane,
            "--host",
            host,
            "--port",
            str(port),
            "--admin-token-file",
            str(token_file),
        ]
        if grpc_port is not None:
            self.command += ["--grpc-port", str(grpc_port)]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        # A gateway the previous ``up`` left running, kept instead of a new child.
        self.adopted: psutil.Process | None = None
        self.restarts = 0
        self._next_start = 0.0
        self._started_at = 0.0

    def adopt(self) -> bool:
        """Keep the gateway a previous ``up`` on this state dir left running, when it runs with
        exactly this command (same ports, control plane and token file). One with other settings
        is stopped. True when adopted: the data path never closed across the restart."""
        try:
            pid_text, created_text = self.pid_path.read_text().split()
            pid, created = int(pid_text), float(created_text)
        except (OSError, ValueError):
            return False
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
                return False
            command = proc.cmdline()
        except psutil.Error:
            return False
        if GATEWAY_MODULE not in command:
            return False
        if command == self.command:
            self.adopted = proc
            self._started_at = time.monotonic()
            log.info("adopted the running gateway (pid %d)", pid)
            return True
        log.info("stopping the gateway left running with other settings (pid %d)", pid)
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            try:
                proc.wait(8)
            except psutil.TimeoutExpired:
                proc.kill()
        return False

    @property
    def pid(self) -> int | None:
        if self.adopted is not None:
            return self.adopted.pid
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        if self.adopted is not None:
            try:
                return self.adopted.is_running() and self.adopted.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def start(self) -> None:
        self.adopted = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # Own session: Ctrl-C in the terminal reaches only `up`, which stops the gateway itself.
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started_at = time.monotonic()
        self._write_pid()

    def _write_pid(self) -> None:
        """``<state>/gateway.pid`` (pid and start time): lets tests clean up after a killed ``up``."""
        assert self.process is not None
        try:
            created = psutil.Process(self.process.pid).create_time()
        except psutil.Error:
            return
        _write_atomic(self.pid_path, f"{self.process.pid} {created}\n")

    @property
    def pid_path(self) -> Path:
        return self.log_path.parent.parent / GATEWAY_PID_FILE

    def supervise(self) -> None:
        """Restart a gateway that exited (1 s, 2 s, 4 s ... 30 s; reset after a minute up)."""
        if (self.process is None and self.adopted is None) or self.running():
            return
        now = time.monotonic()
        if self._next_start == 0.0:
            if now - self._started_at > 60:
                self.restarts = 0
            delay = min(2.0**self.restarts, 30.0)
            log.warning(
                "gateway exited with code %s; restarting in %gs (log: %s)",
                self.exit_code(),
                delay,
                self.log_path,
            )
            self._next_start = now + delay
            return
        if now >= self._next_start:
            self.restarts += 1
            self._next_start = 0.0
            self.start()

    def stop(self, timeout: float = 8.0) -> None:
        if self.adopted is not None:
            with contextlib.suppress(psutil.Error):
                self.adopted.terminate()
                try:
                    self.adopted.wait(timeout)
                except psutil.TimeoutExpired:
                    self.adopted.kill()
            self.adopted = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def leave_running(self) -> None:
        """Let go of a running gateway (its pid file stays) so the next ``up`` adopts it."""
        if self.running():
            log.info("gateway left running (pid %s); the next `up` on this state dir adopts it", self.pid)
            if self.process is not None:
                self.process.returncode = 0  # not ours to reap any more: silences Popen's warning
        self.process = None
        self.adopted = None


class Platform:
    """Everything ``elastiserve up`` runs, with an explicit start/stop for tests and embedding."""

    def __init__(self, options: PlatformOptions) -> None:
        self.options = options
        self.state_dir = ensure_state_dir(options.state_dir)
        self.url = _url(options.host, options.port)
        self.gateway_url = (
            _url(options.host, options.gateway_port) if options.gateway_port is not None else None
        )
        self._lock = StateDirLock(self.state_dir)
        self._stack = contextlib.ExitStack()
        self.store: Store | None = None
        self.runtime: LocalRuntime | None = None
        self.reconciler: Reconciler | None = None
        self.gateway: GatewayProcess | None = None
        self.adopted = 0

    def start(self) -> None:
        options = self.options
        self._lock.acquire()
        try:
            if options.instance_host in ("", "0.0.0.0", "::"):
                raise ConfigError(
                    f"--instance-host {options.instance_host!r}: give the address clients connect to "
                    "(instances listen on it and discovery publishes it), not a wildcard"
                )
            check_port_free(options.host, options.port, "control plane")
            gateway = self._gateway_process() if options.gateway_port is not None else None
            if gateway is not None and not gateway.adopt():
                assert options.gateway_port is not None
                check_port_free(options.host, options.gateway_port, "gateway")
                if options.gateway_grpc_port is not None:
                    check_port_free(options.host, options.gateway_grpc_port, "gateway gRPC")
            self.store = Store.open(self.state_dir)
            admin_token = load_or_create_admin_token(self.state_dir)
            self.runtime = LocalRuntime(
                self.store, self.state_dir, capacity=options.capacity, host=options.instance_host
            )
            self.adopted = sum(1 for o in self.runtime.list_instances() if o.pid and o.phase != "Exited")
            self.reconciler = Reconciler(
                self.store, self.runtime, drain_delay=options.drain_delay, period=options.period
            )
            app = create_app(
                self.store,
                admin_token=admin_token,
                notifier=self.reconciler,
                runtime=self.runtime,
                gateway_url=self.gateway_url,
            )
            self.reconciler.start()
            self._stack.enter_context(serve_in_thread(app, options.host, options.port))
            _write_atomic(self.state_dir / ENDPOINT_FILE, self.url + "\n")
            if gateway is not None:
                self.gateway = gateway
                if gateway.adopted is None:
                    gateway.start()
            elif options.gateway_port is not None:
                log.warning(
                    "gateway not available (no %s.__main__ in this install): running without it",
                    GATEWAY_MODULE,
                )
                self.gateway_url = None
        except BaseException:
            self.stop()
            raise

    def _gateway_process(self) -> GatewayProcess | None:
        options = self.options
        if options.gateway_port is None or not gateway_available():
            return None
        return GatewayProcess(
            self.url,
            options.host,
            options.gateway_port,
            self.state_dir / ADMIN_TOKEN_FILE,
            self.state_dir / "logs" / "gateway.log",
            grpc_port=options.gateway_grpc_port,
        )

    def supervise(self) -> None:
        if self.gateway is not None:
            self.gateway.supervise()

    def stop(self) -> None:
        """Stop the API and the reconciler. Instances and the gateway (the data path) keep running
        and the next start adopts them, unless ``stop_instances``: then instances are drained and
        forgotten and the gateway stopped, so the next start begins clean."""
        if self.gateway is not None:
            if self.options.stop_instances:
                self.gateway.stop()
            else:
                self.gateway.leave_running()
            self.gateway = None
        self._stack.close()
        if self.reconciler is not None:
            self.reconciler.stop()
            self.reconciler = None
        if self.runtime is not None:
            if self.options.stop_instances:
                self._stop_instances()
            self.runtime.close()
            self.runtime = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._lock.release()

    def _stop_instances(self) -> None:
        assert self.runtime is not None and self.store is not None
        graces: dict[str, float] = {}
        for record in self.store.list_services():
            graces[record.name] = float(record.spec.metadata.eas.termination_grace_period)
        observed = self.runtime.list_instances()
        for obs in observed:
            with contextlib.suppress(InstanceNotFound):
                self.runtime.stop_instance(obs.instance_id, graces.get(obs.service, 10.0))
        self.runtime.stop_all(grace=None, wait=max([10.0, *graces.values()]) + 5)
        for row in self.store.list_instances():
            self.store.remove_instance(row.id)
            self.store.add_event(
                row.service, "InstanceStopped", f"instance {row.id} stopped (control plane shut down)"
            )
        log.info("stopped %d instance(s)", len(observed))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_platform(options: PlatformOptions, *, out: Any = None) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code (a second signal exits at once)."""
    out = out or sys.stdout
    platform = Platform(options)
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(130)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            platform.start()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # one line, not a traceback; details in the log at debug level
            log.debug("start failed", exc_info=True)
            print(f"error: cannot start the control plane: {exc}", file=sys.stderr)
            return 1
        runtime = platform.runtime
        assert runtime is not None
        total = runtime.total
        print(f"elastiserve control plane: {platform.url}  (state dir {platform.state_dir})", file=out)
        if platform.gateway_url:
            print(
                f"gateway: {platform.gateway_url}  (log {platform.state_dir / 'logs' / 'gateway.log'})",
                file=out,
            )
        print(f"admin token: {platform.state_dir / ADMIN_TOKEN_FILE}", file=out)
        print(
            f"runtime: local ({total.cpu:g} cpu, {total.memory} MB memory, {total.gpu} gpu); "
            f"{platform.adopted} running instance(s) adopted",
            file=out,
        )
        out.flush()
        while not stop.wait(0.5):
            platform.supervise()
        print("shutting down" + (" (stopping instances)" if options.stop_instances else ""), file=out)
        out.flush()
        return 0
    finally:
        platform.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
