"""Triton's Python backend: runs an unmodified ``model.py`` (``class TritonPythonModel``).

Two execution modes, chosen per model (docs/python-backend.md has the measurements):

* ``in_process`` (default when the model has one instance): ``model.py`` is imported into the
  engine process and ``execute`` is a plain function call - no IPC, no stub process, which is
  where we beat Triton's per-model stub.
* ``process`` (default when ``instance_group`` asks for more than one instance): each instance
  is a worker process (``python -m elastiserve.engine.backends.python_worker``) that talks to
  the engine over a Unix socketpair. Pure-Python models hold the GIL, so this is the only way
  ``count: N`` gives N cores. A thread waiting on the socket releases the GIL, hence
  ``parallelism = "thread"``: the scheduler runs N such instances in N threads.

Override with ``parameters { key: "execution_mode" value { string_value: "process" } }``
(or ``"in_process"``, ``"auto"``). A worker that dies fails the requests it was running with a
clear error and is restarted; workers exit with the engine (a lifeline pipe they watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import elastiserve
from elastiserve.engine.backends.base import ExecuteResult, ModelContext, ModelInstance, Parallelism
from elastiserve.engine.backends.python_worker import (
    COMPAT_DIR,
    Channel,
    ChannelClosed,
    ModelRunner,
    RunnerSpec,
    describe_exception,
    load_model_module,
    pack_requests,
    pb,
    pb_request_to_infer_request,
    result_to_pb_response,
    stream_item_to_pb_response,
    unpack_results,
)
from elastiserve.errors import ConfigError, ElastiserveError, Internal, Unavailable
from elastiserve.types import InferRequest, InferResponse

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

# One response of a streamed request: a response, an error, or None for a bare FINAL; and final?
StreamItem = tuple[InferResponse | ElastiserveError | None, bool]

log = logging.getLogger("elastiserve.python_backend")

EXECUTION_MODE_PARAMETER = "execution_mode"
EXECUTION_MODES = ("auto", "in_process", "process")

# Subprocesses that models start themselves can `import triton_python_backend_utils` too.
if str(COMPAT_DIR) not in sys.path:
    sys.path.append(str(COMPAT_DIR))


# -- config helpers -----------------------------------------------------------------------------


def model_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The config as Triton serialises it for Python models: proto field names, every field
    printed, 64-bit integers as JSON numbers (protobuf would print them as strings)."""
    from google.protobuf import json_format

    data = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_to_numbers(config.DESCRIPTOR, data)
    return data


def model_config_json(config: ModelConfig) -> str:
    import json

    return json.dumps(model_config_dict(config))


def _int64_to_numbers(descriptor: Any, data: dict[str, Any]) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    int64_types = (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64)
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type == F.TYPE_MESSAGE:
            message = field.message_type
            if message.GetOptions().map_entry:
                value_field = message.fields_by_name["value"]
                if value_field.type == F.TYPE_MESSAGE:
                    for item in value.values():
                        _int64_to_numbers(value_field.message_type, item)
                elif value_field.type in int64_types:
                    data[field.name] = {k: int(v) for k, v in value.items()}
            elif field.is_repeated:
                for item in value:
                    _int64_to_numbers(message, item)
            else:
                _int64_to_numbers(message, value)
        elif field.type in int64_types:
            data[field.name] = [int(v) for v in value] if field.is_repeated else int(value)


def execution_mode(config: ModelConfig) -> str:
    """``in_process`` or ``process``: the config parameter if given, else by instance count."""
    mode = "auto"
    if EXECUTION_MODE_PARAMETER in config.parameters:
        mode = config.parameters[EXECUTION_MODE_PARAMETER].string_value.strip().lower() or "auto"
    if mode not in EXECUTION_MODES:
        raise ConfigError(
            f"model '{config.name}': parameter {EXECUTION_MODE_PARAMETER}='{mode}' is not one of "
            f"{', '.join(EXECUTION_MODES)}"
        )
    if mode != "auto":
        return mode
    total = sum(max(g.count, 1) * max(len(g.gpus), 1) for g in config.instance_group)
    return "process" if total > 1 else "in_process"


def _latest_version_dir(model_dir: Path) -> Path | None:
    versions = (
        [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(versions, key=lambda p: int(p.name)) if versions else None


# Custom metrics that models make with ``pb_utils.MetricFamily`` (all instances, both modes:
# workers replay their updates here). A prometheus-client collector:
# ``EngineMetrics.prometheus.register(CUSTOM_METRICS)``.
CUSTOM_METRICS = pb._METRICS


def custom_metrics_text() -> str:
    """The same metrics as Prometheus text with the exact names models gave (Triton's form)."""
    return CUSTOM_METRICS.render_text()


_BLS_CALL = re.compile(r"\.(?:async_)?exec\s*\(")


# -- BLS ----------------------------------------------------------------------------------------


class EngineBridge:
    """BLS into the engine: ``pb_utils.InferenceRequest.exec()`` -> ``DataPlane.infer`` on the
    engine's event loop. Process-mode instances relay their workers' BLS calls through it."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.server = server
        self.loop = loop

    def _unavailable(self) -> ElastiserveError | None:
        if self.server is None or self.loop is None:
            return Unavailable(
                "BLS is not available: the engine gave this model no dataplane and event loop "
                "(ModelContext.server / extra['loop'])"
            )
        if self.loop.is_closed():
            return Unavailable("BLS is not available: the engine's event loop is closed")
        return None

    def run(self, request: InferRequest, timeout: float | None) -> InferResponse | ElastiserveError:
        """Run ``request`` on the dataplane from a non-loop thread; errors are returned."""
        problem = self._unavailable()
        if problem is not None:
            return problem
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return Internal(
                "BLS exec() was called on the engine's event loop thread, where it would deadlock; "
                "python models that use BLS must be scheduled on a worker thread"
            )
        future = asyncio.run_coroutine_threadsafe(self.server.infer(request), self.loop)  # type: ignore[union-attr]
        try:
            return future.result(timeout)
        except ElastiserveError as exc:
            return exc
        except TimeoutError:
            future.cancel()
            return Unavailable(f"BLS request to model '{request.model_name}' timed out after {timeout}s")
        except Exception as exc:
            return Internal(
                f"BLS request to model '{request.model_name}' failed: {type(exc).__name__}: {exc}"
            )

    def infer(self, request: Any, timeout: float | None) -> Any:
        return result_to_pb_response(self.run(pb_request_to_infer_request(request), timeout))

    # -- decoupled BLS: exec(decoupled=True) ---------------------------------------------------------
    def run_stream(self, request: InferRequest, timeout: float | None) -> Iterator[StreamItem]:
        """``request``'s responses as they come, in the calling (model) thread, ending with the
        final one. ``timeout`` bounds the wait for each response. Leaving the loop early (or the
        generator being collected) cancels the request, as a client going away does."""
        problem = self._unavailable()
        if problem is None and _on_loop(self.loop):
            problem = Internal(
                "BLS exec(decoupled=True) was called on the engine's event loop thread, where it "
                "would deadlock; python models that use BLS must be scheduled on a worker thread"
            )
        if problem is not None:
            yield problem, True
            return
        items: queue.Queue[StreamItem] = queue.Queue()
        started: list[Any] = []

        def start() -> None:  # on the loop: streams are created and cancelled there
            try:
                stream = self.server.infer_stream(request)  # type: ignore[union-attr]
            except ElastiserveError as exc:
                items.put((exc, True))
                return
            except Exception as exc:  # a server bug: this BLS call fails, the model goes on
                log.exception("decoupled BLS failed to start")
                items.put((Internal(f"BLS request failed: {type(exc).__name__}: {exc}"), True))
                return
            started.append(stream)
            stream.deliver_directly(lambda result, final: items.put((result, final)))

        self.loop.call_soon_threadsafe(start)  # type: ignore[union-attr]
        done = False
        try:
            while not done:
                try:
                    result, done = items.get(timeout=timeout)
                except queue.Empty:
                    done = True
                    result = Unavailable(
                        f"BLS request to model '{request.model_name}' timed out after {timeout}s"
                    )
                yield result, done
        finally:
            if not done and started:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to cancel
                    self.loop.call_soon_threadsafe(started[0].cancel)  # type: ignore[union-attr]

    def collect_stream(self, request: InferRequest, timeout: float | None) -> list[StreamItem]:
        """Every response of ``request`` (worker processes get them in one message)."""
        return list(self.run_stream(request, timeout))

    def infer_decoupled(self, request: Any, timeout: float | None) -> Iterator[Any]:
        for result, _final in self.run_stream(pb_request_to_infer_request(request), timeout):
            yield stream_item_to_pb_response(result)

    async def async_infer_decoupled(self, request: Any) -> Iterator[Any]:
        req = pb_request_to_infer_request(request)
        problem = self._unavailable()
        if problem is not None:
            return iter([stream_item_to_pb_response(problem)])

        async def collect() -> list[StreamItem]:
            try:
                return await self.server.infer_stream(req).collect()  # type: ignore[union-attr]
            except ElastiserveError as exc:
                return [(exc, True)]

        if _on_loop(self.loop):
            items = await collect()
        else:
            future = asyncio.run_coroutine_threadsafe(collect(), self.loop)  # type: ignore[arg-type]
            items = await asyncio.wrap_future(future)
        return iter([stream_item_to_pb_response(result) for result, _ in items])

    async def async_infer(self, request: Any) -> Any:
        req = pb_request_to_infer_request(request)
        problem = self._unavailable()
        if problem is not None:
            return result_to_pb_response(problem)
        try:
            if asyncio.get_running_loop() is self.loop:
                result: InferResponse | ElastiserveError = await self.server.infer(req)
            else:
                future = asyncio.run_coroutine_threadsafe(self.server.infer(req), self.loop)  # type: ignore[union-attr]
                result = await asyncio.wrap_future(future)
        except ElastiserveError as exc:
            result = exc
        return result_to_pb_response(result)


def _on_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# -- in-process instances -----------------------------------------------------------------------

# BLS bridges of live in-process instances: the newest is pb_utils' default (used by threads
# models start). When the last instance closes there is none, so pb_utils says BLS is not
# available instead of calling into a server that is gone.
_LIVE_BRIDGES: list[EngineBridge] = []


def _open_default_bridge(bridge: EngineBridge) -> None:
    _LIVE_BRIDGES.append(bridge)
    pb._set_default_bridge(bridge)


def _close_default_bridge(bridge: EngineBridge) -> None:
    if bridge in _LIVE_BRIDGES:
        _LIVE_BRIDGES.remove(bridge)
        pb._set_default_bridge(_LIVE_BRIDGES[-1] if _LIVE_BRIDGES else None)


class InProcessInstance:
    """``model.py`` imported into the engine process; ``execute`` is a direct call."""

    execution_mode = "in_process"
    # GIL-bound: more threads do not make one of these faster (see module docstring).
    parallelism: Parallelism = "process"
    out_of_process = False

    def __init__(self, context: ModelContext, spec: RunnerSpec) -> None:
        self.name = spec.instance_name
        self._lock = threading.Lock()
        self._closed = False
        bridge = self._bridge = EngineBridge(context.server, context.extra.get("loop"))
        if context.server is not None:
            _open_default_bridge(bridge)  # for threads the model starts itself
        try:
            self.runner = ModelRunner(spec, bridge=bridge)
        except BaseException:
            _close_default_bridge(bridge)
            raise
        try:
            self.runner.initialize()
        except BaseException:
            self.runner._unload()
            _close_default_bridge(bridge)
            raise
        # Never run these on the event loop: BLS waits for the loop (deadlock), and an async
        # execute runs its own loop. Detected from the source, so it may err towards a thread.
        source = Path(spec.model_file).read_text(errors="replace")
        self.requires_thread = bool(_BLS_CALL.search(source)) or inspect.iscoroutinefunction(
            getattr(self.runner.model, "execute", None)
        )

    def execute(self, requests: list[InferRequest]) -> ExecuteResult:
        with self._lock:
            if self._closed:
                return [Unavailable(f"python model instance '{self.name}' is unloaded")] * len(requests)
            return self.runner.execute(requests)

    def execute_decoupled(self, requests: list[InferRequest], streams: list[Any]) -> bool:
        """Decoupled models: responses go to ``streams`` through the requests' response senders,
        from this thread or any the model starts; returns when ``execute`` returns."""
        with self._lock:
            if self._closed:
                for stream in streams:
                    stream.put(Unavailable(f"python model instance '{self.name}' is unloaded"), True)
                return False
            return self.runner.execute_decoupled(requests, streams)

    def close(self) -> None:
        """Calls the model's ``finalize()`` (errors are logged: unloading goes on)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            error = self.runner.finalize()
            _close_default_bridge(self._bridge)
        if error:
            log.warning("finalize() of python model instance '%s' failed: %s", self.name, error)


# -- process instances --------------------------------------------------------------------------


class WorkerDied(Exception):
    """The worker process exited or closed its end of the channel."""


def _worker_env() -> dict[str, str]:
    """The engine's environment, plus the compat dir and our package on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(COMPAT_DIR), str(Path(elastiserve.__file__).resolve().parent.parent)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"  # model prints reach the engine's log now, not at exit
    return env


class _Worker:
    """One worker process and its channel (engine side)."""

    def __init__(self, bridge: EngineBridge) -> None:
        self.bridge = bridge
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lifeline_read, self.lifeline = os.pipe()
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "elastiserve.engine.backends.python_worker",
                    str(child_sock.fileno()),
                    str(lifeline_read),
                    str(os.getpid()),
                ],
                pass_fds=(child_sock.fileno(), lifeline_read),
                env=_worker_env(),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent_sock.close()
            os.close(self.lifeline)
            raise
        finally:
            child_sock.close()
            os.close(lifeline_read)
        self.pid = self.process.pid
        self.channel = Channel(parent_sock)
        self._closed = False
        self._send_lock = threading.Lock()
        # Decoupled models: a reader thread owns the socket and queues replies here.
        self._replies: queue.SimpleQueue[Any] | None = None
        self._reader: threading.Thread | None = None

    def start(self, spec: RunnerSpec) -> None:
        """Load and initialize the model in the worker; raises Internal if that fails."""
        try:
            self.channel.send(("init", spec))
            kind, payload = self.wait_reply()
        except WorkerDied as exc:
            self.kill()
            raise Internal(f"python model instance '{spec.instance_name}' worker process {exc}") from exc
        if kind == "init_error":
            self.kill()
            raise Internal(str(payload))

    def send(self, message: tuple[Any, ...]) -> None:
        """Send one message (several threads may send when a reader thread is running)."""
        try:
            with self._send_lock:
                self.channel.send(message)
        except (ChannelClosed, OSError) as exc:
            raise WorkerDied(self.exit_description()) from exc

    def call(self, message: tuple[Any, ...], timeout: float | None = None) -> Any:
        self.send(message)
        return self.wait_reply(timeout)[1]

    def start_reader(self, on_response: Any, on_death: Any) -> None:
        """Decoupled models: a thread reads every message from now on. Streamed responses go to
        ``on_response(token, result, final)`` as they arrive (also between executes), BLS calls
        are relayed on their own threads, replies are queued for :meth:`wait_reply`;
        ``on_death(description)`` runs once if the worker goes away."""
        self._replies = queue.SimpleQueue()
        self._reader = threading.Thread(
            target=self._read_loop,
            args=(on_response, on_death),
            name=f"python-worker-{self.pid}",
            daemon=True,
        )
        self._reader.start()

    def _read_loop(self, on_response: Any, on_death: Any) -> None:
        replies = self._replies
        assert replies is not None
        try:
            while True:
                if not self.channel.poll(0.5):
                    if self.process.poll() is not None:
                        break
                    continue
                message = self.channel.recv()
                kind = message[0]
                if kind == "response":
                    _, token, packed, final, metric_ops = message
                    if metric_ops:
                        pb._METRICS.apply_ops(metric_ops)
                    result = None if packed is None else unpack_results([packed])[0]
                    on_response(token, result, final)
                elif kind in ("bls", "bls_stream"):
                    threading.Thread(target=self._relay_bls, args=(message,), daemon=True).start()
                else:
                    replies.put(message)
        except (ChannelClosed, OSError, EOFError):
            pass
        except Exception:
            log.exception("python worker %s: reading its messages failed", self.pid)
        description = f"(pid {self.pid}) closed its channel" if self._closed else self.exit_description()
        replies.put(WorkerDied(description))
        on_death(description)

    def _relay_bls(self, message: tuple[Any, ...]) -> None:
        kind, request, timeout, call_id = message
        run = self.bridge.collect_stream if kind == "bls_stream" else self.bridge.run
        result = run(request, timeout)
        with contextlib.suppress(WorkerDied):
            self.send(("bls_result", result, call_id))

    def wait_reply(self, timeout: float | None = None) -> tuple[str, Any]:
        """The worker's next reply, relaying its BLS calls meanwhile; WorkerDied if it exits."""
        if self._replies is not None:
            return self._queued_reply(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            if not self.channel.poll(wait):
                # Silence: still working, or dead while a child of it keeps the socket open.
                if self.process.poll() is not None:
                    raise WorkerDied(self.exit_description())
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no reply from python worker {self.pid} after {timeout}s")
                continue
            try:
                message = self.channel.recv()
                if message[0] in ("bls", "bls_stream"):
                    kind, request, bls_timeout = message
                    run = self.bridge.collect_stream if kind == "bls_stream" else self.bridge.run
                    self.channel.send(("bls_result", run(request, bls_timeout)))
                    continue
            except ChannelClosed as exc:
                raise WorkerDied(self.exit_description()) from exc
            kind, payload, metric_ops = message
            if metric_ops:
                pb._METRICS.apply_ops(metric_ops)
            return kind, payload

    def _queued_reply(self, timeout: float | None) -> tuple[str, Any]:
        replies = self._replies
        assert replies is not None
        try:
            message = replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply from python worker {self.pid} after {timeout}s") from None
        if isinstance(message, WorkerDied):
            replies.put(message)  # every later call fails the same way
            raise message
        kind, payload, metric_ops = message
        if metric_ops:
            pb._METRICS.apply_ops(metric_ops)
        return kind, payload

    def exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return f"(pid {self.pid}) stopped answering"
        if code < 0:
            try:
                return f"(pid {self.pid}) was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"(pid {self.pid}) was killed by signal {-code}"
        return f"(pid {self.pid}) exited with code {code}"

    def stop(self, finalize_timeout: float) -> str | None:
        """finalize() in the worker, then a clean exit; kill after the timeouts. Returns finalize's error."""
        error = None
        if self.process.poll() is None:
            try:
                error = self.call(("finalize",), timeout=finalize_timeout)
                self.send(("exit",))
            except (WorkerDied, TimeoutError, ChannelClosed) as exc:
                error = f"worker {exc}"
        self._release(grace=5.0)
        return error

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self._release(grace=5.0)

    def _release(self, grace: float) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            # Wake the reader (a plain close would not interrupt its poll) and let it finish.
            with contextlib.suppress(OSError):
                self.channel.sock.shutdown(socket.SHUT_RDWR)
            if self._reader is not threading.current_thread():
                self._reader.join(timeout=5.0)
        self.channel.close()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.lifeline)  # last: the worker exits on EOF if it still runs somehow


class ProcessInstance:
    """An instance whose ``model.py`` runs in its own worker process (real parallelism for
    GIL-bound models); a crashed worker is restarted."""

    execution_mode = "process"
    # The calling thread waits on a socket with the GIL released: N instances, N threads.
    parallelism: Parallelism = "thread"
    out_of_process = True
    requires_thread = True
    finalize_timeout = 30.0
    close_timeout = 30.0  # how long close() waits for an in-flight execute before killing
    restart_interval = 1.0  # after a failed restart, requests fail fast for this long

    def __init__(self, context: ModelContext, spec: RunnerSpec) -> None:
        self.spec = spec
        self.name = spec.instance_name
        self.bridge = EngineBridge(context.server, context.extra.get("loop"))
        self.restarts = 0
        self._lock = threading.Lock()
        self._closing = False
        self._restart_error: str | None = None
        self._restart_at = 0.0
        self._worker: _Worker | None = self._start()

    @property
    def pid(self) -> int | None:
        """The current worker's pid (None while it is being restarted)."""
        worker = self._worker
        return worker.pid if worker is not None else None

    def _start(self) -> _Worker:
        try:
            worker = _Worker(self.bridge)
        except OSError as exc:
            raise Internal(
                f"cannot start a worker process for python model instance '{self.name}': {exc}"
            ) from exc
        worker.start(self.spec)
        return worker

    def execute(self, requests: list[InferRequest]) -> ExecuteResult:
        with self._lock:
            worker = self._worker
            if worker is None:
                restarted = self._restart_locked()
                if isinstance(restarted, ElastiserveError):
                    return [restarted] * len(requests)
                worker = restarted
            try:
                message = ("execute", pack_requests(requests))
            except (TypeError, ValueError) as exc:
                return [
                    Internal(f"cannot send requests to python model instance '{self.name}': {exc}")
                ] * len(requests)
            try:
                return unpack_results(worker.call(message))
            except WorkerDied as exc:
                self._worker = None
                worker.kill()
                state = "the model is unloading" if self._closing else "it is being restarted"
                message = (
                    f"python model instance '{self.name}' worker process {exc} while executing "
                    f"{len(requests)} request(s); {state}"
                )
                log.error(message)
                if not self._closing:
                    threading.Thread(
                        target=self._background_restart, name=f"restart-{self.name}", daemon=True
                    ).start()
                return [Internal(message)] * len(requests)

    def _restart_locked(self) -> _Worker | ElastiserveError:
        if self._closing:
            return Unavailable(f"python model instance '{self.name}' is unloaded")
        if self._restart_error is not None and time.monotonic() - self._restart_at < self.restart_interval:
            return Unavailable(
                f"python model instance '{self.name}' is down and could not be restarted: {self._restart_error}"
            )
        self._restart_at = time.monotonic()
        try:
            self._worker = self._start()
        except ElastiserveError as exc:
            self._restart_error = exc.message
            log.error("restarting python model instance '%s' failed: %s", self.name, exc.message)
            return Unavailable(
                f"python model instance '{self.name}' is down and could not be restarted: {exc.message}"
            )
        if self._closing:  # close() gave up waiting for this restart: do not leave a worker behind
            self._worker.kill()
            self._worker = None
            return Unavailable(f"python model instance '{self.name}' is unloaded")
        self._restart_error = None
        self.restarts += 1
        log.warning("python model instance '%s' restarted (worker pid %s)", self.name, self._worker.pid)
        return self._worker

    def _background_restart(self) -> None:
        with self._lock:
            if self._worker is None and not self._closing:
                self._restart_locked()

    def close(self) -> None:
        """finalize() in the worker and stop it; kills it if an execute is stuck past close_timeout."""
        self._closing = True
        if not self._lock.acquire(timeout=self.close_timeout):
            worker = self._worker
            if worker is not None:
                log.error("python model instance '%s' is stuck in execute; killing its worker", self.name)
                worker.process.kill()  # the executing thread sees it die and releases the worker
            return
        try:
            worker, self._worker = self._worker, None
            if worker is not None:
                error = worker.stop(self.finalize_timeout)
                if error:
                    log.warning("finalize() of python model instance '%s' failed: %s", self.name, error)
        finally:
            self._lock.release()


class DecoupledProcessInstance(ProcessInstance):
    """A decoupled model in a worker process. A reader thread owns the worker's socket:
    responses stream back to their requests' streams as the model sends them (also after
    ``execute`` returned, from threads the model started), and a client that goes away is
    told to the worker at once (``request.is_cancelled()``)."""

    def __init__(self, context: ModelContext, spec: RunnerSpec) -> None:
        self._streams: dict[int, tuple[_Worker, Any]] = {}  # token -> (worker, stream)
        self._tokens = itertools.count()
        super().__init__(context, spec)

    def _start(self) -> _Worker:
        worker = super()._start()
        worker.start_reader(self._on_response, lambda description: self._on_death(worker, description))
        return worker

    def _on_response(self, token: int, result: Any, final: bool) -> None:
        entry = self._streams.pop(token, None) if final else self._streams.get(token)
        if entry is not None:
            entry[1].put(result, final)

    def _on_death(self, worker: _Worker, description: str) -> None:
        """The open streams of a worker that went away end with an error (the model is gone)."""
        state = "the model is unloading" if self._closing else "it is being restarted"
        error = Internal(f"python model instance '{self.name}' worker process {description}; {state}")
        for token, (owner, stream) in list(self._streams.items()):
            if owner is worker and self._streams.pop(token, None) is not None:
                stream.put(error, True)

    def execute(self, requests: list[InferRequest]) -> ExecuteResult:
        error = Internal(f"model '{self.spec.model_name}' is decoupled: it answers through response streams")
        return [error] * len(requests)

    def execute_decoupled(self, requests: list[InferRequest], streams: list[Any]) -> bool:
        with self._lock:
            worker = self._worker
            if worker is None:
                restarted = self._restart_locked()
                if isinstance(restarted, ElastiserveError):
                    for stream in streams:
                        stream.put(restarted, True)
                    return False
                worker = restarted
            try:
                packed = pack_requests(requests)
            except (TypeError, ValueError) as exc:
                error = Internal(f"cannot send requests to python model instance '{self.name}': {exc}")
                for stream in streams:
                    stream.put(error, True)
                return False
            tokens = []
            for stream in streams:
                token = next(self._tokens)
                tokens.append(token)
                self._streams[token] = (worker, stream)
                stream.add_cancel_callback(self._canceller(worker, token))
            try:
                return bool(worker.call(("execute", packed, tokens)))
            except WorkerDied as exc:
                self._worker = None
                worker.kill()
                self._on_death(worker, str(exc))
                log.error(
                    "python model instance '%s' worker process %s during a decoupled execute", self.name, exc
                )
                if not self._closing:
                    threading.Thread(
                        target=self._background_restart, name=f"restart-{self.name}", daemon=True
                    ).start()
                return False

    def _canceller(self, worker: _Worker, token: int) -> Any:
        def cancel() -> None:  # on the loop: the client went away
            if self._streams.pop(token, None) is not None:
                with contextlib.suppress(WorkerDied):
                    worker.send(("cancel", token))

        return cancel


# -- the backend --------------------------------------------------------------------------------


class PythonBackend:
    """``backend: "python"``: ``<version>/model.py`` (or ``default_model_filename``)."""

    name = "python"
    # Process-mode instances release the GIL while they wait on their worker, so the scheduler
    # runs N instances in N threads. In-process instances report parallelism "process"
    # themselves (GIL-bound; the scheduler decides thread vs inline for count 1).
    parallelism: Parallelism = "thread"
    default_model_filename = "model.py"

    def auto_complete_config(self, config: ModelConfig, model_dir: Path, version: int | None) -> None:
        """Run the model's ``auto_complete_config(ModelConfig)`` staticmethod, if it has one, and
        write what it set back into ``config``. model.py is imported only if it mentions it."""
        from google.protobuf import json_format
        from tritonclient.grpc.model_config_pb2 import ModelConfig as ModelConfigProto

        version_dir = model_dir / str(version) if version is not None else _latest_version_dir(model_dir)
        if version_dir is None:
            return
        model_file = version_dir / (config.default_model_filename or self.default_model_filename)
        if not model_file.is_file() or "auto_complete_config" not in model_file.read_text(errors="replace"):
            return
        name = config.name or model_dir.name
        module = load_model_module(name, model_file)
        try:
            hook = getattr(getattr(module, "TritonPythonModel", None), "auto_complete_config", None)
            if hook is None:
                return
            helper = pb.ModelConfig(model_config_dict(config))
            helper.as_dict()["name"] = name
            try:
                result = hook(helper)
            except Exception as exc:
                raise ConfigError(
                    f"auto_complete_config of model '{name}' failed: {describe_exception(exc, str(model_file))}"
                ) from exc
            if result is None:
                result = helper
            if not isinstance(result, pb.ModelConfig):
                raise ConfigError(
                    f"auto_complete_config of model '{name}' must return the pb_utils.ModelConfig "
                    f"it was given, not {type(result).__name__}"
                )
            completed = result.as_dict()
            if not config.name:
                completed.pop("name", None)
            try:
                new = json_format.ParseDict(completed, ModelConfigProto())
            except json_format.ParseError as exc:
                raise ConfigError(
                    f"auto_complete_config of model '{name}' produced an invalid config: {exc}"
                ) from exc
            config.CopyFrom(new)
        finally:
            sys.modules.pop(module.__name__, None)

    def create_instance(self, context: ModelContext) -> ModelInstance:
        config = context.config
        model_file = context.model_file(self.default_model_filename)
        if not model_file.is_file():
            raise ConfigError(
                f"model '{context.name}' version {context.version}: {model_file} does not exist "
                "(the python backend needs a model.py that defines class TritonPythonModel)"
            )
        instance_name = context.instance_name or f"{context.name}_0_{context.instance_index}"
        args = {
            "model_config": model_config_json(config),
            "model_instance_kind": context.instance_kind.removeprefix("KIND_"),
            "model_instance_name": instance_name,
            "model_instance_device_id": str(context.device_id),
            "model_repository": str(context.model_dir),
            "model_version": str(context.version),
            "model_name": context.name,
        }
        spec = RunnerSpec(
            model_name=context.name,
            version=context.version,
            model_file=str(model_file.resolve()),
            instance_name=instance_name,
            args=args,
            output_names=[o.name for o in config.output],
            decoupled=config.model_transaction_policy.decoupled,
        )
        if execution_mode(config) == "process":
            if spec.decoupled:
                return DecoupledProcessInstance(context, spec)
            return ProcessInstance(context, spec)
        return InProcessInstance(context, spec)


BACKEND = PythonBackend()
