"""The local runtime: instances are subprocesses on this machine (the embedded default).

* **Engine instances** (processor ``triton`` and the shortcut processors) run
  ``python -m elastiserve serve`` with the spec's ``processor_params`` passed through as
  tritonserver flags, plus our own ``--http-port/--grpc-port/--metrics-port`` on free loopback
  ports and ``--*-address=127.0.0.1`` (ours come last and win; flags that would fight them are
  dropped with a note in the log). Shortcut processors (``onnx``, ``sklearn``, ``xgboost``,
  ``lightgbm``, ``pytorch``, ``python``) get a one-model Triton repository built in the
  instance's directory from ``model_path`` (symlinks, not copies). Readiness is the engine's
  ``/v2/health/ready``.
* **Remote locations** (``s3://``, ``oss://``, http(s) archives; docs/object-storage.md): for the
  ``triton`` processor a remote ``--model-repository``/``model_path`` is passed through to the
  engine, which syncs it itself with the credentials in the environment it inherits; a shortcut
  processor's ``model_path`` (and ``warm_up_data_path``) is fetched here first, before the
  runtime's lock is taken. Both use one repository cache (``$ELASTISERVE_CACHE_DIR``, else
  ``<state>/cache/repositories``, handed to instances as ``ELASTISERVE_CACHE_DIR``), so instances
  on this machine download a location once.
* **Custom instances** (``containers[0].command|script``) run through ``/bin/sh`` with the spec's
  ``env``. ``$PORT`` is a free port chosen per instance; a command that does not mention PORT
  listens on ``containers[0].port`` (so only one instance fits). Readiness is
  ``containers[0].readiness_check`` (``http_get`` path or ``tcp_socket``), a TCP connect by default.

Every instance is its own session and process group (``start_new_session``): Ctrl-C in the
control plane's terminal does not reach it, and a stop signals the whole group (SIGTERM, SIGKILL
after the grace period), so workers the engine started go too. Output goes to
``<state>/logs/<service>/<instance>.log``.

Adoption: pid, process start time (psutil ``create_time``), ports and log path are saved in the
store (``runtime_records``). A new ``LocalRuntime`` over the same store adopts every recorded
process that is still alive *and* has the recorded start time (so a reused pid is never
mistaken for ours) instead of starting a duplicate; one that died meanwhile is reported as
exited, and the reconciler restarts it.

Resource accounting: the default resource group ('') is this machine (logical CPUs, total
memory, ``/dev/nvidiaN`` GPUs) unless ``capacity`` overrides it; an instance that does not fit
raises :class:`InsufficientResources`. Accounting only: nothing is pinned or limited, except that
GPU instances get ``CUDA_VISIBLE_DEVICES`` for the GPUs they were given (and others none).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import glob
import http.client
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from elastiserve.controlplane.runtimes import pyreqs, warmup
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
from elastiserve.controlplane.spec import ServiceSpec, check_service_name
from elastiserve.controlplane.store import Store
from elastiserve.errors import AlreadyExists, ConfigError
from elastiserve.storage import CACHE_DIR_ENV, RepositoryCache, is_remote, parse_uri

log = logging.getLogger(__name__)

RUNTIME_NAME = "local"
ENGINE_READY_PATH = "/v2/health/ready"
#: Engine flags the runtime owns: a spec's own values are dropped (ours must win to be reachable).
MANAGED_FLAGS = (
    "--http-port",
    "--grpc-port",
    "--metrics-port",
    "--http-address",
    "--grpc-address",
    "--metrics-address",
    "--allow-http",
)
REPOSITORY_FLAGS = ("--model-repository", "--model-store")
_EXITED = (Phase.EXITED, Phase.FAILED)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# processor -> (backend, default file name, fil model_type or None)
SHORTCUTS: dict[str, tuple[str, str, str | None]] = {
    "onnx": ("onnxruntime", "model.onnx", None),
    "sklearn": ("sklearn", "model.joblib", None),
    "xgboost": ("fil", "xgboost.json", "xgboost_json"),
    "lightgbm": ("fil", "model.txt", "lightgbm"),
    "pytorch": ("pytorch", "model.pt", None),
    "python": ("python", "model.py", None),
}
_SUFFIXES = {
    "onnx": (".onnx",),
    "sklearn": (".joblib", ".pkl", ".pickle"),
    "xgboost": (".json", ".ubj", ".model", ".bst"),
    "lightgbm": (".txt", ".lgb", ".model"),
    "pytorch": (".pt", ".pth", ".torchscript"),
    "python": (".py",),
}


def machine_capacity() -> Resources:
    """This machine: the CPUs this process may use, total memory (MB), NVIDIA device files."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    memory = psutil.virtual_memory().total // (1024 * 1024)
    gpus = len(glob.glob("/dev/nvidia[0-9]*"))
    return Resources(cpu=float(cpus), gpu=gpus, memory=int(memory))


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: all held open at once while chosen (ports picked one after
    another can repeat, and a server given one port twice fails to start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def local_path(location: str, base: Path, what: str, cache: RepositoryCache | None = None) -> Path:
    """A local path from a spec location; a remote one (``s3://``, ``oss://``, an http(s) archive)
    is synced through ``cache`` and the local copy returned (without a cache: a clear error)."""
    match = _SCHEME.match(location)
    if match:
        scheme = match.group(1).lower()
        if scheme != "file":
            uri = parse_uri(location)  # a malformed or unknown URI: a ConfigError that names it, redacted
            if cache is None:
                raise ConfigError(f"{what} '{uri.redacted}': {scheme}:// cannot be used here")
            try:
                return cache.sync(uri).path
            except ConfigError as exc:
                raise ConfigError(f"{what} {exc}") from None
        location = location[len("file://") :]
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise ConfigError(f"{what} '{location}' does not exist (looked at {path})")
    return path.resolve()


def _flag_value(params: list[str], index: int) -> tuple[str, str | None, int]:
    """(flag, value, items used) for ``--flag=value`` or ``--flag value`` at ``index``."""
    item = params[index]
    if "=" in item:
        flag, value = item.split("=", 1)
        return flag, value, 1
    if index + 1 < len(params) and not params[index + 1].startswith("--"):
        return item, params[index + 1], 2
    return item, None, 1


@dataclass
class _Launch:
    """What to run for one instance (built by :meth:`LocalRuntime._prepare`)."""

    command: list[str]
    env: dict[str, str]
    cwd: Path
    port: int
    ports: dict[str, int]
    probe: dict[str, Any]
    kind: str
    notes: list[str] = field(default_factory=list)


@dataclass
class _Proc:
    """One instance as this runtime tracks it; :meth:`record` is what survives a restart."""

    instance_id: str
    service: str
    version: int
    kind: str
    address: str
    port: int
    ports: dict[str, int]
    pid: int | None
    create_time: float | None
    started: float
    log_path: str
    resources: Resources
    gpus: list[int]
    probe: dict[str, Any]
    phase: Phase = Phase.STARTING
    ready: bool = False
    exit_code: int | None = None
    reason: str = ""
    restarts: int = 0
    stop_deadline: float | None = None  # wall time to SIGKILL at
    popen: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    probe_failures: int = 0
    next_probe: float = 0.0
    probing: bool = False
    kill_reason: str = ""  # why the runtime killed it (reported instead of the last log line)
    cpu_percent: float | None = None
    memory_mb: float | None = None
    sampled: dict[int, psutil.Process] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "version": self.version,
            "kind": self.kind,
            "address": self.address,
            "port": self.port,
            "ports": self.ports,
            "pid": self.pid,
            "create_time": self.create_time,
            "started": self.started,
            "log_path": self.log_path,
            "resources": [self.resources.cpu, self.resources.gpu, self.resources.memory],
            "gpus": self.gpus,
            "probe": self.probe,
            "phase": self.phase.value,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "restarts": self.restarts,
            "stop_deadline": self.stop_deadline,
        }

    @classmethod
    def from_record(cls, instance_id: str, data: Mapping[str, Any]) -> _Proc:
        cpu, gpu, memory = data.get("resources") or [0.0, 0, 0]
        return cls(
            instance_id=instance_id,
            service=str(data["service"]),
            version=int(data["version"]),
            kind=str(data.get("kind", "engine")),
            address=str(data.get("address", "127.0.0.1")),
            port=int(data.get("port", 0)),
            ports={str(k): int(v) for k, v in (data.get("ports") or {}).items()},
            pid=data.get("pid"),
            create_time=data.get("create_time"),
            started=float(data.get("started") or 0.0),
            log_path=str(data.get("log_path", "")),
            resources=Resources(float(cpu), int(gpu), int(memory)),
            gpus=[int(g) for g in data.get("gpus") or []],
            probe=dict(data.get("probe") or {"type": "tcp"}),
            phase=Phase(data.get("phase", Phase.STARTING.value)),
            exit_code=data.get("exit_code"),
            reason=str(data.get("reason", "")),
            restarts=int(data.get("restarts", 0)),
            stop_deadline=data.get("stop_deadline"),
        )


class LocalRuntime:
    """Subprocess instances on this machine; thread-safe; adopts what an earlier one left running."""

    name = RUNTIME_NAME

    def __init__(
        self,
        store: Store,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        capacity: Resources | None = None,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        base_dir: str | os.PathLike[str] | None = None,
        tick: float = 0.05,
        starting_probe_interval: float = 0.1,
        running_probe_interval: float = 1.0,
        monitor: bool = True,
    ) -> None:
        self.store = store
        self.state_dir = Path(state_dir) if state_dir is not None else store.path.parent
        self.total = capacity or machine_capacity()
        self.host = host
        self.python = python
        self.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        self.cache = RepositoryCache(
            os.environ.get(CACHE_DIR_ENV) or self.state_dir / "cache" / "repositories"
        )
        self.tick = tick
        self.starting_probe_interval = starting_probe_interval
        self.running_probe_interval = running_probe_interval
        self._lock = threading.RLock()
        self._procs: dict[str, _Proc] = {}
        self._listeners: list[Callable[[], None]] = []
        self._probes = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="local-probe")
        self._stopping = threading.Event()
        self._last_sample = 0.0
        self._adopt()
        self._thread: threading.Thread | None = None
        if monitor:
            self._thread = threading.Thread(target=self._monitor, name="local-runtime", daemon=True)
            self._thread.start()

    # -- Runtime protocol ------------------------------------------------------------------------

    def start_instance(
        self,
        spec: ServiceSpec,
        instance_id: str,
        *,
        version: int,
        env: Mapping[str, str] | None = None,
    ) -> InstanceHandle:
        fetched = self._fetch_remote(spec)  # downloads can be long: never under the lock
        with self._lock:
            previous = self._procs.get(instance_id)
            restarts = 0
            if previous is not None:
                if previous.phase not in _EXITED:
                    raise AlreadyExists(f"instance '{instance_id}' is already running")
                restarts = previous.restarts + 1
            group = spec.metadata.resource
            if group:
                raise ConfigError(
                    f"metadata.resource: unknown resource group '{group}' (the local runtime has only "
                    "the default group, '')"
                )
            need = Resources.of(spec)
            free = self._capacity_locked(exclude=instance_id).free
            if not need.fits_in(free):
                raise InsufficientResources(
                    f"insufficient resources in group 'default': {need.shortfall(free)}"
                )
            gpus = self._allocate_gpus(need.gpu, exclude=instance_id)
            launch = self._prepare(spec, instance_id, version, dict(env or {}), gpus, fetched)
            launch.probe["startup_timeout"] = float(spec.runtime.startup_timeout)
            log_path = self.state_dir / "logs" / spec.name / f"{instance_id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log_file:
                stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
                header = (
                    f"==== {stamp} elastiserve: starting instance {instance_id} of {spec.name} "
                    f"(version {version}, restart {restarts}): {shlex.join(launch.command)}\n"
                )
                for note in launch.notes:
                    header += f"==== note: {note}\n"
                log_file.write(header.encode())
                log_file.flush()
                try:
                    popen = subprocess.Popen(
                        launch.command,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        cwd=launch.cwd,
                        env=launch.env,
                        start_new_session=True,
                        close_fds=True,
                    )
                except OSError as exc:
                    raise ConfigError(f"cannot run {launch.command[0]}: {exc.strerror or exc}") from None
            try:
                ps: psutil.Process | None = psutil.Process(popen.pid)
                create_time: float | None = ps.create_time() if ps is not None else None
            except psutil.Error:  # already gone: the monitor reports the exit
                ps, create_time = None, None
            proc = _Proc(
                instance_id=instance_id,
                service=spec.name,
                version=version,
                kind=launch.kind,
                address=self.host,
                port=launch.port,
                ports=launch.ports,
                pid=popen.pid,
                create_time=create_time,
                started=time.time(),
                log_path=str(log_path),
                resources=need,
                gpus=gpus,
                probe=launch.probe,
                restarts=restarts,
                popen=popen,
                ps=ps,
                next_probe=time.monotonic() + float(launch.probe.get("initial_delay", 0.0)),
            )
            self._procs[instance_id] = proc
            self._save(proc)
            return InstanceHandle(
                instance_id=instance_id,
                service=spec.name,
                version=version,
                address=self.host,
                port=launch.port,
                pid=popen.pid,
                started=proc.started,
                ports=dict(launch.ports),
                log_path=str(log_path),
            )

    def stop_instance(self, instance_id: str, grace: float) -> None:
        with self._lock:
            proc = self._procs.get(instance_id)
            if proc is None:
                raise InstanceNotFound(f"instance '{instance_id}' not found")
            if proc.phase in _EXITED:
                self._forget(proc)
                return
            deadline = time.time() + max(grace, 0.0)
            if proc.phase == Phase.TERMINATING:
                if proc.stop_deadline is None or deadline < proc.stop_deadline:
                    proc.stop_deadline = deadline
                    self._save(proc)
                return
            proc.phase, proc.ready, proc.stop_deadline = Phase.TERMINATING, False, deadline
            self._save(proc)
            self._signal(proc, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
        self._changed()

    def list_instances(self, service: str | None = None) -> list[ObservedInstance]:
        with self._lock:
            return [
                self._observed(p) for p in self._procs.values() if service is None or p.service == service
            ]

    def instance_logs(self, instance_id: str, *, tail: int | None = None, offset: int = 0) -> LogChunk:
        path = self._log_path(instance_id)
        if path is None:
            raise InstanceNotFound(f"no logs for instance '{instance_id}'")
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if tail is not None:
                    return LogChunk(_tail(fh, size, tail).decode(errors="replace"), size)
                fh.seek(min(offset, size))
                return LogChunk(fh.read(4 << 20).decode(errors="replace"), fh.tell())
        except FileNotFoundError:
            raise InstanceNotFound(f"no logs for instance '{instance_id}'") from None

    def forget_service(self, service: str) -> None:
        with self._lock:
            if any(p.service == service and p.phase not in _EXITED for p in self._procs.values()):
                return  # still running somewhere: keep its logs
        check_service_name(service)  # a file name below logs/: never a path
        shutil.rmtree(self.state_dir / "logs" / service, ignore_errors=True)

    def capacity(self, resource_group: str = "") -> Capacity:
        if resource_group:
            raise ConfigError(f"unknown resource group '{resource_group}'")
        with self._lock:
            return self._capacity_locked()

    def close(self) -> None:
        """Stop watching; every instance keeps running (the next LocalRuntime adopts it)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._probes.shutdown(wait=False, cancel_futures=True)

    # -- extras ----------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called (from the monitor thread) when an instance's phase or
        readiness changes: the reconciler uses it to react at once instead of at its next tick."""
        with self._lock:
            self._listeners.append(listener)

    def stop_all(self, grace: float | None = 10.0, wait: float = 30.0) -> None:
        """Stop every instance (``grace=None``: only wait for the stops already sent) and wait
        until they are gone (``up --stop-instances``, tests)."""
        if grace is not None:
            for observed in self.list_instances():
                with contextlib.suppress(InstanceNotFound):
                    self.stop_instance(observed.instance_id, grace)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self._check_all()
            with self._lock:
                if not any(p.phase == Phase.TERMINATING for p in self._procs.values()):
                    break
            time.sleep(0.05)

    # -- preparing a launch ----------------------------------------------------------------------

    def _fetch_remote(self, spec: ServiceSpec) -> dict[str, Path]:
        """Local copies of the remote locations this runtime reads itself: a shortcut processor's
        ``model_path`` and ``warm_up_data_path`` (a triton repository is the engine's to sync)."""
        wanted = [spec.warm_up_data_path] if spec.warm_up_data_path else []
        if spec.processor in SHORTCUTS and spec.model_path:
            wanted.append(spec.model_path)
        return {
            location: local_path(location, self.base_dir, what, self.cache)
            for location, what in (
                (loc, "model_path" if loc == spec.model_path else "warm_up_data_path") for loc in wanted
            )
            if is_remote(location)
        }

    def _prepare(
        self,
        spec: ServiceSpec,
        instance_id: str,
        version: int,
        env: dict[str, str],
        gpus: list[int],
        fetched: Mapping[str, Path] | None = None,
    ) -> _Launch:
        fetched = fetched or {}
        work = self.state_dir / "instances" / instance_id
        work.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        full_env.setdefault(CACHE_DIR_ENV, str(self.cache.root))
        full_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        launch = (
            self._prepare_custom(spec, instance_id, work, full_env)
            if spec.is_custom
            else self._prepare_engine(spec, work, full_env, fetched)
        )
        if spec.warm_up_data_path:
            source = spec.warm_up_data_path
            requests = warmup.load_warmup(
                fetched.get(source) or local_path(source, self.base_dir, "warm_up_data_path", self.cache),
                source,
            )
            warmup.save(requests, work / "warmup.json")
            launch.probe["warmup"] = str(work / "warmup.json")
        return launch

    def _prepare_engine(
        self, spec: ServiceSpec, work: Path, env: dict[str, str], fetched: Mapping[str, Path] | None = None
    ) -> _Launch:
        params: list[str] = []
        notes: list[str] = []
        repositories = 0
        given = list(spec.processor_params)
        i = 0
        while i < len(given):
            item = given[i]
            flag, value, used = _flag_value(given, i) if item.startswith("--") else (item, None, 1)
            if flag in MANAGED_FLAGS:
                if not (flag == "--allow-http" and (value or "true").lower() in ("true", "1", "yes", "on")):
                    notes.append(f"{' '.join(given[i : i + used])} ignored: the runtime sets {flag} itself")
            elif flag in REPOSITORY_FLAGS and value is not None:
                # A remote repository goes to the engine as it is: the engine syncs it (and polls it).
                path = (
                    parse_uri(value).raw
                    if is_remote(value)
                    else local_path(value, self.base_dir, "model repository")
                )
                params.append(f"{flag}={path}")
                repositories += 1
            else:
                params.extend(given[i : i + used])
            i += used
        if spec.processor in SHORTCUTS:
            source = (fetched or {}).get(spec.model_path or "")
            repo = build_repository(spec, work / "repository", self.base_dir, source, self.cache)
            params.append(f"--model-repository={repo}")
        elif repositories == 0:
            if spec.model_path is None:
                raise ConfigError("processor_params: the triton processor needs --model-repository=...")
            model_path = spec.model_path
            path = (
                parse_uri(model_path).raw
                if is_remote(model_path)
                else local_path(model_path, self.base_dir, "model_path")
            )
            params.append(f"--model-repository={path}")
        if not any(p.startswith("--exit-timeout-secs") for p in params):
            params.append(f"--exit-timeout-secs={spec.metadata.eas.termination_grace_period}")
        http, grpc, metrics = free_ports(3, self.host)
        command = [self.python, "-m", "elastiserve", "serve", *params]
        command += [
            "--allow-http=true",
            f"--http-address={self.host}",
            f"--http-port={http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={metrics}",
        ]
        return _Launch(
            command=command,
            env=env,
            cwd=work,
            port=http,
            ports={"http": http, "grpc": grpc, "metrics": metrics},
            probe={
                "type": "engine",
                "path": ENGINE_READY_PATH,
                "timeout": 1.0,
                "failures": 3,
                # In explicit mode only --load-model models load: unregistered ones are fine.
                "all_models": not any(p.startswith("--model-control-mode=explicit") for p in params),
            },
            kind="engine",
            notes=notes,
        )

    def _prepare_custom(
        self, spec: ServiceSpec, instance_id: str, work: Path, env: dict[str, str]
    ) -> _Launch:
        assert spec.containers
        container = spec.containers[0]
        text = container.command if container.command is not None else container.script or ""
        if "PORT" in text:
            port = free_port(self.host)
        else:
            assert container.port is not None
            port = container.port
            with self._lock:
                for other in self._procs.values():
                    if other.port == port and other.phase not in _EXITED and other.instance_id != instance_id:
                        raise ConfigError(
                            f"containers[0].port {port} is used by instance {other.instance_id}; "
                            "listen on $PORT to run several instances on one machine"
                        )
        env.update({item.name: item.value for item in container.env})
        env["PORT"] = str(port)
        env["HOST"] = self.host  # the address to listen on (what discovery publishes)
        if container.command is not None:
            command = ["/bin/sh", "-c", container.command]
        else:
            script = work / "script"
            script.write_text(container.script or "")
            script.chmod(0o700)
            command = [str(script)] if (container.script or "").startswith("#!") else ["/bin/sh", str(script)]
        requirements = container.prepare.pythonRequirements if container.prepare is not None else []
        if requirements:
            requirements_file = work / "requirements.txt"
            requirements_file.write_text("".join(f"{line}\n" for line in requirements))
            target = pyreqs.target_for(self.state_dir / "pyreqs", requirements)
            command = pyreqs.wrap(command, target, requirements_file)
        check = container.readiness_check
        probe: dict[str, Any] = {"type": "tcp", "timeout": 1.0, "failures": 3, "period": 1.0}
        if check is not None:
            probe.update(
                timeout=check.timeout_seconds,
                failures=check.failure_threshold,
                period=check.period_seconds,
                initial_delay=check.initial_delay_seconds,
            )
            target = check.http_get or check.tcp_socket
            if check.http_get is not None:
                probe.update(type="http", path=check.http_get.path)
            if target is not None and target.port is not None and target.port != container.port:
                probe["port"] = target.port
        return _Launch(
            command=command, env=env, cwd=work, port=port, ports={"http": port}, probe=probe, kind="custom"
        )

    # -- observing -------------------------------------------------------------------------------

    def _observed(self, proc: _Proc) -> ObservedInstance:
        return ObservedInstance(
            instance_id=proc.instance_id,
            service=proc.service,
            version=proc.version,
            phase=proc.phase,
            ready=proc.ready,
            address=proc.address,
            port=proc.port,
            pid=proc.pid,
            started=proc.started,
            restarts=proc.restarts,
            exit_code=proc.exit_code,
            reason=proc.reason,
            resources=proc.resources,
            cpu_percent=proc.cpu_percent,
            memory_mb=proc.memory_mb,
            ports=dict(proc.ports),
        )

    def _monitor(self) -> None:
        while not self._stopping.wait(self.tick):
            try:
                self._check_all()
                self._probe_due()
                self._sample()
            except Exception:  # the monitor must outlive any one bad instance
                log.exception("local runtime monitor failed")

    def _check_all(self) -> None:
        """Notice exits and enforce stop deadlines (cheap: poll() or a psutil check per process)."""
        changed = False
        with self._lock:
            procs = [p for p in self._procs.values() if p.phase not in _EXITED]
        for proc in procs:
            alive, code = self._alive(proc)
            with self._lock:
                if self._procs.get(proc.instance_id) is not proc or proc.phase in _EXITED:
                    continue
                if not alive:
                    self._signal_group_leftovers(proc)
                    if proc.phase == Phase.TERMINATING:
                        self._forget(proc)
                    else:
                        proc.phase, proc.ready, proc.exit_code = Phase.EXITED, False, code
                        # An error exit usually says why on its last line; a signal does not.
                        proc.reason = proc.kill_reason or (
                            self._last_log_line(proc) if code is None or code > 0 else ""
                        )
                        self._save(proc)
                    changed = True
                elif proc.phase == Phase.STARTING and not proc.kill_reason:
                    limit = float(proc.probe.get("startup_timeout", 0) or 0)
                    if limit and time.time() - proc.started > limit:
                        # Alive but never ready: it would hold its slot forever. Killed, it is
                        # restarted (with backoff, counted as a crash) like one that exited.
                        proc.kill_reason = f"not ready after {limit:g}s (runtime.startup_timeout)" + (
                            f"; last check: {proc.reason.removeprefix('not ready yet: ')}" if proc.reason else ""
                        )
                        log.warning("instance %s: %s; killing it", proc.instance_id, proc.kill_reason)
                        self._signal(proc, signal.SIGKILL)
                elif (
                    proc.phase == Phase.TERMINATING
                    and proc.stop_deadline is not None
                    and time.time() >= proc.stop_deadline
                ):
                    self._signal(proc, signal.SIGKILL)
        if changed:
            self._changed()

    def _alive(self, proc: _Proc) -> tuple[bool, int | None]:
        if proc.popen is not None:
            code = proc.popen.poll()
            return code is None, code
        if proc.ps is None:
            return False, None
        try:
            return proc.ps.is_running() and proc.ps.status() != psutil.STATUS_ZOMBIE, None
        except psutil.Error:
            return False, None

    def _probe_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                p
                for p in self._procs.values()
                if p.phase in (Phase.STARTING, Phase.RUNNING) and not p.probing and now >= p.next_probe
            ]
            for proc in due:
                proc.probing = True
        for proc in due:
            try:
                self._probes.submit(self._probe_and_record, proc)
            except RuntimeError:  # executor shut down: closing
                proc.probing = False

    def _probe_and_record(self, proc: _Proc) -> None:
        starting = proc.phase == Phase.STARTING
        ok, detail = probe(proc.address, proc.probe.get("port", proc.port), proc.probe, starting=starting)
        if ok and starting and proc.probe.get("warmup"):
            # Published only after its warm-up requests were answered (warm_up_data_path).
            try:
                requests = warmup.load_saved(Path(proc.probe["warmup"]))
            except (OSError, ValueError, TypeError) as exc:
                ok, detail = False, f"cannot read the warm-up requests: {exc}"
            else:
                ok, detail = warmup.run_warmup(proc.address, proc.port, requests)
                if ok:
                    log.info("instance %s: %d warm-up request(s) answered", proc.instance_id, len(requests))
        changed = False
        with self._lock:
            proc.probing = False
            if self._procs.get(proc.instance_id) is not proc or proc.phase not in (
                Phase.STARTING,
                Phase.RUNNING,
            ):
                return
            if ok:
                proc.probe_failures = 0
                if not proc.ready or proc.phase != Phase.RUNNING:
                    changed = True
                    if proc.phase == Phase.STARTING:
                        proc.phase = Phase.RUNNING
                        self._save(proc)
                proc.ready, proc.reason = True, ""
            else:
                proc.probe_failures += 1
                if proc.phase == Phase.STARTING:
                    proc.reason = f"not ready yet: {detail}"
                elif proc.probe_failures >= int(proc.probe.get("failures", 3)):
                    changed = changed or proc.ready
                    proc.ready = False
                    proc.reason = f"readiness check failed {proc.probe_failures} times: {detail}"
            interval = (
                self.starting_probe_interval
                if proc.phase == Phase.STARTING
                else float(proc.probe.get("period", self.running_probe_interval))
            )
            if not ok and proc.phase == Phase.RUNNING:
                interval = min(interval, 0.5)  # confirm a failure quickly
            proc.next_probe = time.monotonic() + interval
        if changed:
            self._changed()

    def _sample(self) -> None:
        """CPU and memory per instance every 2 s (for `w`, metrics and autoscaling later)."""
        now = time.monotonic()
        if now - self._last_sample < 2.0:
            return
        self._last_sample = now
        with self._lock:
            procs = [p for p in self._procs.values() if p.phase in (Phase.STARTING, Phase.RUNNING)]
        for proc in procs:
            if proc.ps is None:
                continue
            try:
                # Keep the same Process objects: cpu_percent() measures since the previous call.
                members = {proc.ps.pid: proc.ps}
                for child in proc.ps.children(recursive=True):
                    members[child.pid] = proc.sampled.get(child.pid, child)
                proc.sampled = members
                cpu = sum(m.cpu_percent(interval=None) for m in members.values())
                rss = sum(m.memory_info().rss for m in members.values())
            except psutil.Error:
                continue
            proc.cpu_percent, proc.memory_mb = cpu, rss / (1024 * 1024)

    # -- adoption --------------------------------------------------------------------------------

    def _adopt(self) -> None:
        """Take over the instances an earlier control plane left (see the module docstring)."""
        records = self.store.list_runtime_records(RUNTIME_NAME)
        adopted: list[_Proc] = []
        for instance_id, data in records.items():
            try:
                proc = _Proc.from_record(instance_id, data)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("dropping unreadable runtime record %s: %s", instance_id, exc)
                self.store.delete_runtime_record(RUNTIME_NAME, instance_id)
                continue
            if proc.phase not in _EXITED:
                proc.ps = _our_process(proc.pid, proc.create_time)
                if proc.ps is None:
                    if proc.phase == Phase.TERMINATING:
                        self.store.delete_runtime_record(RUNTIME_NAME, instance_id)
                        continue
                    proc.phase, proc.ready = Phase.EXITED, False
                    proc.reason = "process ended while the control plane was down"
                    self._save(proc)
                else:
                    adopted.append(proc)
                    log.info("adopted instance %s (pid %s)", instance_id, proc.pid)
            self._procs[instance_id] = proc
        # Probe adopted instances now, so the first pass does not see them as not ready.
        futures = {
            self._probes.submit(
                probe, p.address, p.probe.get("port", p.port), p.probe, starting=p.phase == Phase.STARTING
            ): p
            for p in adopted
            if p.phase != Phase.TERMINATING
        }
        for future, proc in futures.items():
            ok, detail = future.result()
            proc.ready = ok
            if ok:
                proc.phase = Phase.RUNNING
            proc.reason = "" if ok else f"not ready: {detail}"
            proc.next_probe = time.monotonic() + self.running_probe_interval

    # -- helpers ---------------------------------------------------------------------------------

    def _save(self, proc: _Proc) -> None:
        self.store.put_runtime_record(RUNTIME_NAME, proc.instance_id, proc.record())

    def _forget(self, proc: _Proc) -> None:
        """Drop an instance that has ended for good (its log file stays)."""
        self._procs.pop(proc.instance_id, None)
        self.store.delete_runtime_record(RUNTIME_NAME, proc.instance_id)
        shutil.rmtree(self.state_dir / "instances" / proc.instance_id, ignore_errors=True)

    def _signal(self, proc: _Proc, sig: signal.Signals) -> None:
        """Signal the instance's process group, but only while its leader is provably ours."""
        if proc.pid is None:
            return
        alive, _ = self._alive(proc)
        if not alive:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _signal_group_leftovers(self, proc: _Proc) -> None:
        """The leader just ended: kill what is left of its group (workers it did not stop)."""
        if proc.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _capacity_locked(self, exclude: str | None = None) -> Capacity:
        allocated = Resources()
        for proc in self._procs.values():
            if proc.instance_id != exclude and proc.phase not in _EXITED:
                allocated = allocated + proc.resources
        return Capacity("", self.total, allocated)

    def _allocate_gpus(self, count: int, exclude: str) -> list[int]:
        if count <= 0:
            return []
        taken = {
            g
            for p in self._procs.values()
            if p.instance_id != exclude and p.phase not in _EXITED
            for g in p.gpus
        }
        free = [g for g in range(self.total.gpu) if g not in taken]
        return free[:count]

    def _log_path(self, instance_id: str) -> Path | None:
        with self._lock:
            proc = self._procs.get(instance_id)
        if proc is not None and proc.log_path:
            return Path(proc.log_path)
        if "/" in instance_id or instance_id.startswith("."):
            return None
        found = sorted(glob.glob(str(self.state_dir / "logs" / "*" / f"{glob.escape(instance_id)}.log")))
        return Path(found[0]) if found else None

    def _last_log_line(self, proc: _Proc) -> str:
        try:
            with open(proc.log_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                text = _tail(fh, size, 5).decode(errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("====")]
        return lines[-1][:300] if lines else ""

    def _changed(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("runtime listener failed")


def _our_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The process ``pid`` if it is alive and started at ``create_time`` (so: the one we started)."""
    if not pid or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - float(create_time)) > 0.05:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def probe(address: str, port: int, spec: Mapping[str, Any], *, starting: bool = False) -> tuple[bool, str]:
    """One readiness check: HTTP GET ``path`` (2xx/3xx is ready) or a TCP connect.

    An engine that is still starting must also show its initial models loaded in the repository
    index: the engine answers ``/v2/health/ready`` with 200 in the instant between its HTTP
    server starting and its first model being registered (engine bug, reported), and an
    instance published then would fail its first requests.
    """
    timeout = float(spec.get("timeout", 1.0))
    if spec.get("type") in ("http", "engine"):
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            path = str(spec.get("path", "/"))
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if not 200 <= response.status < 400:
                return False, f"GET {path} answered {response.status}"
            if spec.get("type") == "engine" and starting:
                return _engine_models_loaded(conn, bool(spec.get("all_models", True)))
            return True, ""
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return False, _os_error(exc)
        finally:
            conn.close()
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, _os_error(exc)


def _engine_models_loaded(conn: http.client.HTTPConnection, all_models: bool) -> tuple[bool, str]:
    conn.request("POST", "/v2/repository/index", body=b"{}", headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        return False, f"repository index answered {response.status}"
    rows = json.loads(body)
    loading = [
        r.get("name") for r in rows if r.get("state") == "LOADING" or (all_models and not r.get("state"))
    ]
    if loading:
        return False, f"loading models: {', '.join(str(n) for n in loading[:5])}"
    return True, ""


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _tail(fh: Any, size: int, lines: int) -> bytes:
    """The last ``lines`` lines of an open binary file of ``size`` bytes."""
    if lines <= 0:
        return b""
    block, data = 8192, b""
    position = size
    while position > 0 and data.count(b"\n") <= lines:
        step = min(block, position)
        position -= step
        fh.seek(position)
        data = fh.read(step) + data
    return b"".join(data.splitlines(keepends=True)[-lines:])


# -- shortcut processors: a one-model repository from model_path --------------------------------------


def build_repository(
    spec: ServiceSpec,
    dest: Path,
    base: Path,
    source: Path | None = None,
    cache: RepositoryCache | None = None,
) -> Path:
    """Write ``dest/<model>/config.pbtxt`` + ``dest/<model>/1/<file>`` for a shortcut processor.

    The model is named after the service, so ``/api/predict/<service>`` finds it. ``model_path``
    may be the model file, a directory holding it (``model_entry`` names the file when the
    directory has several), or a ready Triton model directory (with ``config.pbtxt``), which is
    used as it is. Files are symlinked, not copied. A remote ``model_path`` is read from its local
    copy in the repository cache (``source`` when the caller fetched it already, else via ``cache``).
    """
    assert spec.processor in SHORTCUTS and spec.model_path is not None
    backend, default_file, model_type = SHORTCUTS[spec.processor]
    source = source or local_path(spec.model_path, base, "model_path", cache)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if source.is_dir() and (source / "config.pbtxt").is_file():
        # A remote copy's folder is the cache's 'current': the model is named after the URI instead.
        name = parse_uri(spec.model_path).basename if is_remote(spec.model_path) else source.name
        (dest / name).symlink_to(source, target_is_directory=True)
        return dest
    version_dir = dest / spec.name / "1"
    version_dir.mkdir(parents=True)
    if source.is_dir():
        entry = _entry_file(spec, source, default_file)
        if spec.processor == "python":  # a Python model may import its neighbours: link them all
            for item in source.iterdir():
                if item.name != entry.name and not item.name.startswith("."):
                    (version_dir / item.name).symlink_to(item)
    else:
        entry = source
    file_name = "model.py" if spec.processor == "python" else entry.name
    (version_dir / file_name).symlink_to(entry)
    if spec.processor == "xgboost":
        model_type = {".json": "xgboost_json", ".ubj": "xgboost_ubj"}.get(entry.suffix.lower(), "xgboost")
    (dest / spec.name / "config.pbtxt").write_text(
        _model_config(spec, backend, file_name if file_name != default_file else None, model_type)
    )
    return dest


def _entry_file(spec: ServiceSpec, directory: Path, default_file: str) -> Path:
    if spec.model_entry:
        entry = directory / spec.model_entry
        if not entry.is_file():
            raise ConfigError(f"model_entry '{spec.model_entry}' is not a file in {directory}")
        return entry
    if (directory / default_file).is_file():
        return directory / default_file
    suffixes = _SUFFIXES[spec.processor or ""]
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise ConfigError(
        f"model_path '{spec.model_path}': cannot tell which file is the model ({found}); set model_entry"
    )


def _model_config(spec: ServiceSpec, backend: str, file_name: str | None, model_type: str | None) -> str:
    """config.pbtxt text: the spec's ``model_config`` (pbtxt text or a JSON object in Triton's
    field names) with the name, backend, file name and FIL model type filled in."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    given = spec.triton_model_config
    try:
        if isinstance(given, str):
            text_format.Parse(given, config)
        elif isinstance(given, dict):
            json_format.ParseDict(given, config)
    except (text_format.ParseError, json_format.ParseError) as exc:
        raise ConfigError(f"model_config: {exc}") from None
    config.name = spec.name
    if not config.backend and not config.platform:
        config.backend = backend
    if file_name and not config.default_model_filename:
        config.default_model_filename = file_name
    if model_type and "model_type" not in config.parameters:
        config.parameters["model_type"].string_value = model_type
    return text_format.MessageToString(config)
