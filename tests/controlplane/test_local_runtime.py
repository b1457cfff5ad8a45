"""The local runtime with real subprocesses: engines, custom commands, crashes, stops, adoption."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from elastiserve.controlplane.runtimes.base import (
    InstanceNotFound,
    InsufficientResources,
    ObservedInstance,
    Phase,
    Resources,
    Runtime,
)
from elastiserve.controlplane.runtimes.local import RUNTIME_NAME, LocalRuntime, build_repository
from elastiserve.controlplane.spec import ServiceSpec, parse_spec
from elastiserve.controlplane.store import Store
from elastiserve.errors import AlreadyExists, ConfigError

PY = shlex.quote(sys.executable)
CAPACITY = Resources(cpu=64, gpu=0, memory=64_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as s:
        yield s


@pytest.fixture
def runtime(store: Store) -> Iterator[LocalRuntime]:
    rt = LocalRuntime(store, capacity=CAPACITY)
    try:
        yield rt
    finally:
        rt.stop_all(grace=2)
        rt.close()


def engine_spec(repo: Path, name: str = "engine", **meta: Any) -> ServiceSpec:
    return parse_spec(
        {
            "name": name,
            "processor": "triton",
            "processor_params": [f"--model-repository={repo}", "--allow-http=true"],
            "metadata": {"instance": 1, "cpu": 1, "memory": 500, **meta},
        }
    )


def custom_spec(command: str, name: str = "web", port: int = 8999, **container: Any) -> ServiceSpec:
    return parse_spec(
        {
            "name": name,
            "containers": [{"command": command, "port": port, **container}],
            "metadata": {"instance": 1, "cpu": 0.5, "memory": 100},
        }
    )


def http_server(extra: str = "") -> str:
    return f"{extra}exec {PY} -m http.server $PORT --bind 127.0.0.1"


def wait_for(
    rt: LocalRuntime, instance_id: str, check: Callable[[ObservedInstance | None], bool], timeout: float = 30
) -> ObservedInstance | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {o.instance_id: o for o in rt.list_instances()}.get(instance_id)
        if check(found):
            return found
        time.sleep(0.05)
    raise AssertionError(f"{instance_id}: condition not met; now {found!r}\n{log_of(rt, instance_id)}")


def log_of(rt: LocalRuntime, instance_id: str) -> str:
    try:
        return rt.instance_logs(instance_id).text
    except InstanceNotFound:
        return "(no log)"


def is_ready(o: ObservedInstance | None) -> bool:
    return o is not None and o.phase == Phase.RUNNING and o.ready


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not gone(pid):
        time.sleep(0.05)
    assert gone(pid), f"process {pid} still running"


def test_is_a_runtime(runtime: LocalRuntime) -> None:
    assert isinstance(runtime, Runtime)
    assert runtime.capacity().total == CAPACITY


def test_engine_instance_becomes_ready_and_serves(runtime: LocalRuntime, example_repo: Path) -> None:
    handle = runtime.start_instance(engine_spec(example_repo), "engine-1", version=1, env={"X_TEST": "1"})
    assert handle.address == "127.0.0.1" and set(handle.ports) == {"http", "grpc", "metrics"}
    started = time.monotonic()
    obs = wait_for(runtime, "engine-1", is_ready)
    assert obs is not None and obs.pid == handle.pid
    print(f"\nengine instance ready after {time.monotonic() - started:.2f}s")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{handle.port}")
    data = np.ones((1, 16), dtype=np.float32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "FP32"),
        httpclient.InferInput("INPUT1", [1, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(data)
    inputs[1].set_data_from_numpy(data)
    result = client.infer("add_sub", inputs)
    assert np.allclose(result.as_numpy("OUTPUT0"), 2.0)
    client.close()
    # Every engine port is on loopback; the process has our environment.
    proc = psutil.Process(handle.pid)
    listening = {c.laddr.port: c.laddr.ip for c in proc.net_connections(kind="tcp") if c.status == "LISTEN"}
    assert {handle.ports["http"], handle.ports["grpc"], handle.ports["metrics"]} <= set(listening)
    assert all(_loopback(ip) for ip in listening.values()), listening
    assert proc.environ().get("X_TEST") == "1"
    logs = runtime.instance_logs("engine-1")
    assert "starting instance engine-1" in logs.text and "--model-repository=" in logs.text
    assert runtime.instance_logs("engine-1", tail=1).offset == logs.offset
    # A stop is SIGTERM: the engine drains and exits long before the grace period.
    runtime.stop_instance("engine-1", grace=20)
    assert runtime.list_instances()[0].phase == Phase.TERMINATING
    wait_for(runtime, "engine-1", lambda o: o is None, timeout=15)
    wait_gone(handle.pid)
    assert store_records(runtime) == {}


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def store_records(rt: LocalRuntime) -> dict[str, Any]:
    return rt.store.list_runtime_records(RUNTIME_NAME)


def test_custom_command_with_http_readiness_and_env(runtime: LocalRuntime, tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "healthz").write_text("ok")
    spec = custom_spec(
        f'cd {shlex.quote(str(tmp_path / "www"))} && echo "greeting=$GREETING" && {http_server()}',
        env=[{"name": "GREETING", "value": "hello"}],
        readiness_check={"http_get": {"path": "/healthz"}, "period_seconds": 0.5},
    )
    h1 = runtime.start_instance(spec, "web-1", version=1)
    h2 = runtime.start_instance(spec, "web-2", version=1)  # $PORT: several instances fit
    assert h1.port != h2.port and 8999 not in (h1.port, h2.port)
    for instance_id in ("web-1", "web-2"):
        wait_for(runtime, instance_id, is_ready, timeout=15)
    assert httpx.get(f"http://127.0.0.1:{h1.port}/healthz").text == "ok"
    assert "greeting=hello" in runtime.instance_logs("web-1").text


def test_custom_command_on_a_fixed_port_with_tcp_readiness(runtime: LocalRuntime) -> None:
    from elastiserve.testing import free_port

    port = free_port()
    spec = custom_spec(f"exec {PY} -m http.server {port} --bind 127.0.0.1", port=port)
    handle = runtime.start_instance(spec, "fixed-1", version=1)
    assert handle.port == port
    wait_for(runtime, "fixed-1", is_ready, timeout=15)
    with pytest.raises(ConfigError, match=r"port .* is used by instance fixed-1.*\$PORT"):
        runtime.start_instance(spec, "fixed-2", version=1)


def test_kill_9_is_detected_and_start_restarts(runtime: LocalRuntime) -> None:
    spec = custom_spec(http_server())
    handle = runtime.start_instance(spec, "web-1", version=1)
    wait_for(runtime, "web-1", is_ready, timeout=15)
    assert handle.pid is not None
    os.kill(handle.pid, signal.SIGKILL)
    obs = wait_for(runtime, "web-1", lambda o: o is not None and o.phase == Phase.EXITED, timeout=5)
    assert obs is not None and obs.exit_code == -9 and not obs.ready
    runtime.start_instance(spec, "other", version=1)
    with pytest.raises(AlreadyExists):
        runtime.start_instance(spec, "other", version=1)
    again = runtime.start_instance(spec, "web-1", version=1)
    assert again.pid != handle.pid
    obs = wait_for(runtime, "web-1", is_ready, timeout=15)
    assert obs is not None and obs.restarts == 1


def test_error_exit_reports_the_last_log_line(runtime: LocalRuntime) -> None:
    runtime.start_instance(custom_spec("echo 'fatal: no model here' >&2; exit 3"), "bad-1", version=1)
    obs = wait_for(runtime, "bad-1", lambda o: o is not None and o.phase == Phase.EXITED, timeout=10)
    assert obs is not None and obs.exit_code == 3 and obs.reason == "fatal: no model here"


def test_alive_but_never_ready_is_killed_after_the_startup_timeout(runtime: LocalRuntime) -> None:
    spec = parse_spec(
        {
            "name": "mute",
            "containers": [{"command": "sleep 60", "port": 8999}],  # alive, never listens
            "metadata": {"instance": 1, "cpu": 0.5, "memory": 100},
            "runtime": {"startup_timeout": 1},
        }
    )
    started = time.monotonic()
    handle = runtime.start_instance(spec, "mute-1", version=1)
    obs = wait_for(runtime, "mute-1", lambda o: o is not None and o.phase == Phase.EXITED, timeout=10)
    assert 1.0 <= time.monotonic() - started < 5
    assert obs is not None and obs.exit_code == -9 and not obs.ready
    assert obs.reason.startswith("not ready after 1s (runtime.startup_timeout); last check:"), obs.reason
    assert handle.pid is not None
    wait_gone(handle.pid)
    # Started again (what the reconciler does), it is counted as a restart.
    runtime.start_instance(spec, "mute-1", version=1)
    obs = wait_for(runtime, "mute-1", lambda o: o is not None and o.phase == Phase.STARTING, timeout=5)
    assert obs is not None and obs.restarts == 1


def _tiny_wheel(directory: Path, name: str = "es_greeting", version: str = "1.0") -> Path:
    """A pure-Python wheel built by hand: installs offline, no build backend needed."""
    import base64
    import hashlib
    import zipfile

    files = {
        f"{name}.py": f"GREETING = 'hello from {name} {version}'\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def test_python_requirements_are_installed_once_and_importable(runtime: LocalRuntime, tmp_path: Path) -> None:
    wheel = _tiny_wheel(tmp_path)
    serve = (
        f'exec {PY} -c "import es_greeting, http.server, os; '
        "h = type('H', (http.server.BaseHTTPRequestHandler,), {'do_GET': lambda s: (s.send_response(200), "
        "s.end_headers(), s.wfile.write(es_greeting.GREETING.encode()))}); "
        "http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), h).serve_forever()\""
    )
    spec = custom_spec(
        serve,
        name="greet",
        prepare={"pythonRequirements": [str(wheel)]},
        readiness_check={"http_get": {"path": "/"}},
    )
    runtime.start_instance(spec, "greet-1", version=1)
    first = wait_for(runtime, "greet-1", is_ready, timeout=60)
    assert first is not None
    assert httpx.get(f"http://127.0.0.1:{first.port}/").text == "hello from es_greeting 1.0"
    assert "installing python requirements" in log_of(runtime, "greet-1")
    # A second instance with the same list reuses the install.
    runtime.start_instance(spec, "greet-2", version=1)
    second = wait_for(runtime, "greet-2", is_ready, timeout=60)
    assert second is not None
    assert "python requirements already installed" in log_of(runtime, "greet-2")
    # A requirement that cannot be installed: the instance exits with a clear reason.
    broken = custom_spec(
        serve, name="broken", prepare={"pythonRequirements": [str(tmp_path / "missing-1.0-py3-none-any.whl")]}
    )
    runtime.start_instance(broken, "broken-1", version=1)
    obs = wait_for(runtime, "broken-1", lambda o: o is not None and o.phase == Phase.EXITED, timeout=60)
    assert obs is not None and obs.exit_code == 1
    assert obs.reason.startswith("error: installing prepare.pythonRequirements failed"), obs.reason


def test_warm_up_requests_are_answered_before_the_instance_is_ready(
    runtime: LocalRuntime, example_repo: Path, tmp_path: Path
) -> None:
    ones = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
    entry = {"model": "add_sub", "inputs": [ones, {**ones, "name": "INPUT1"}], "count": 3}
    warm = tmp_path / "warmup.jsonl"
    warm.write_text(json.dumps(entry) + "\n" + json.dumps({"path": "/v2/health/ready"}) + "\n")
    spec = engine_spec(example_repo, name="warm")
    spec = spec.model_copy(update={"warm_up_data_path": str(warm)})
    handle = runtime.start_instance(spec, "warm-1", version=1)
    wait_for(runtime, "warm-1", is_ready)
    # Readiness came after the three warm-up inferences, which the engine counted.
    stats = httpx.get(f"http://127.0.0.1:{handle.port}/v2/models/add_sub/stats").json()
    assert stats["model_stats"][0]["inference_count"] == 3

    # A warm-up request the instance rejects keeps it out of traffic, with the reason.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**entry, "model": "no_such_model"}]))
    handle = runtime.start_instance(
        spec.model_copy(update={"warm_up_data_path": str(bad)}), "warm-2", version=1
    )
    obs = wait_for(
        runtime, "warm-2", lambda o: o is not None and "warm-up request 0" in (o.reason or ""), timeout=30
    )
    assert obs is not None and not obs.ready and obs.phase == Phase.STARTING
    assert "answered 404" in obs.reason and "no_such_model" in obs.reason, obs.reason


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("[1, 2", "not valid JSON"),
        ('{"model": "m", "inputs": []}\nnot json', "line 2 is not valid JSON"),
        ("[]", "no requests in it"),
        ('[{"inputs": []}]', "request 0: give 'model'"),
        ('[{"model": "m", "inputs": [], "count": 0}]', "request 0: count must be an integer"),
        ('[{"path": "predict"}]', "request 0: path must be a string starting with '/'"),
        ('[{"path": "/p", "verb": "x"}]', "request 0: unknown field(s) ['verb']"),
    ],
)
def test_bad_warm_up_files_are_clear_errors(
    runtime: LocalRuntime, example_repo: Path, tmp_path: Path, content: str, message: str
) -> None:
    warm = tmp_path / "warm.json"
    warm.write_text(content)
    spec = engine_spec(example_repo, name="warm").model_copy(update={"warm_up_data_path": str(warm)})
    with pytest.raises(ConfigError, match=re.escape(message)):
        runtime.start_instance(spec, "warm-1", version=1)
    assert runtime.list_instances() == []


def test_forget_service_removes_its_logs_once_nothing_runs(runtime: LocalRuntime) -> None:
    handle = runtime.start_instance(custom_spec(http_server()), "web-1", version=1)
    wait_for(runtime, "web-1", is_ready, timeout=15)
    logs = runtime.state_dir / "logs" / "web"
    assert (logs / "web-1.log").exists()
    runtime.forget_service("web")  # still running: kept
    assert logs.exists()
    runtime.stop_instance("web-1", grace=2)
    assert handle.pid is not None
    wait_gone(handle.pid)
    wait_for(runtime, "web-1", lambda o: o is None, timeout=10)
    runtime.forget_service("web")
    assert not logs.exists()
    with pytest.raises(ConfigError):
        runtime.forget_service("../etc")


def test_stop_kills_the_whole_process_group(runtime: LocalRuntime) -> None:
    handle = runtime.start_instance(custom_spec(http_server("sleep 300 & ")), "web-1", version=1)
    wait_for(runtime, "web-1", is_ready, timeout=15)
    assert handle.pid is not None
    children = psutil.Process(handle.pid).children(recursive=True)
    assert [c.name() for c in children] == ["sleep"]
    assert os.getpgid(children[0].pid) == handle.pid  # same group: a stop reaches it
    runtime.stop_instance("web-1", grace=5)
    wait_for(runtime, "web-1", lambda o: o is None, timeout=10)
    wait_gone(children[0].pid, timeout=5)


def test_sigterm_ignored_means_sigkill_after_grace(runtime: LocalRuntime) -> None:
    spec = custom_spec("trap '' TERM; sleep 300")
    handle = runtime.start_instance(spec, "stubborn-1", version=1)
    time.sleep(0.3)
    started = time.monotonic()
    runtime.stop_instance("stubborn-1", grace=1.0)
    time.sleep(0.5)
    assert handle.pid is not None and not gone(handle.pid)  # SIGTERM ignored
    wait_for(runtime, "stubborn-1", lambda o: o is None, timeout=10)
    assert 0.9 <= time.monotonic() - started < 5
    wait_gone(handle.pid)


def test_capacity_accounting(store: Store) -> None:
    rt = LocalRuntime(store, capacity=Resources(cpu=1, gpu=0, memory=1000), monitor=False)
    try:
        spec = custom_spec("echo $PORT; exec sleep 300")
        rt.start_instance(spec, "a", version=1)
        rt.start_instance(spec, "b", version=1)
        with pytest.raises(InsufficientResources, match=r"needs 0.5 cpu, 0 free"):
            rt.start_instance(spec, "c", version=1)
        assert rt.capacity().allocated.cpu == 1.0
        rt.stop_instance("a", grace=0)
        rt.stop_all(grace=0, wait=5)  # killed: an exited or stopped instance holds nothing
        rt.start_instance(spec, "c", version=1)
        with pytest.raises(ConfigError, match="unknown resource group 'gpu-pool'"):
            rt.start_instance(
                parse_spec({**spec.to_dict(), "metadata": {"resource": "gpu-pool"}}), "d", version=1
            )
    finally:
        rt.stop_all(grace=1)
        rt.close()


def test_remote_and_missing_repositories_are_clear_errors(runtime: LocalRuntime, tmp_path: Path) -> None:
    # Remote repositories go to the engine as they are (tests/e2e/test_object_storage.py); one the
    # engine could never read is refused before anything starts.
    with pytest.raises(ConfigError, match=r"'http://host/models': an http\(s\) model location must be an archive"):
        runtime.start_instance(engine_spec("http://host/models"), "e-1", version=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model repository '.*nowhere' does not exist"):
        runtime.start_instance(engine_spec(tmp_path / "nowhere"), "e-2", version=1)
    assert runtime.list_instances() == []


def test_relative_repository_resolves_against_base_dir(store: Store, example_repo: Path) -> None:
    rt = LocalRuntime(store, capacity=CAPACITY, base_dir=example_repo.parent, monitor=False)
    try:
        handle = rt.start_instance(engine_spec(Path("models")), "rel-1", version=1)
        assert f"--model-repository={example_repo.resolve()}" in rt.instance_logs("rel-1").text
        assert handle.pid
    finally:
        rt.stop_all(grace=2)
        rt.close()


def test_onnx_shortcut_builds_a_one_model_repository(runtime: LocalRuntime, example_repo: Path) -> None:
    spec = parse_spec(
        {
            "name": "mlp",
            "processor": "onnx",
            "model_path": str(example_repo / "simple_onnx" / "1" / "model.onnx"),
            "metadata": {"instance": 1, "cpu": 1, "memory": 500},
        }
    )
    handle = runtime.start_instance(spec, "mlp-1", version=1)
    wait_for(runtime, "mlp-1", is_ready, timeout=30)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{handle.port}")
    assert [(m["name"], m["state"]) for m in client.get_model_repository_index()] == [("mlp", "READY")]
    meta = client.get_model_metadata("mlp")
    x = np.zeros([1, *[int(d) for d in meta["inputs"][0]["shape"][1:]]], dtype=np.float32)
    inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert client.infer("mlp", [inp]).as_numpy(meta["outputs"][0]["name"]).shape[0] == 1
    client.close()


def test_build_repository_variants(tmp_path: Path) -> None:
    model = tmp_path / "src" / "booster.json"
    model.parent.mkdir()
    model.write_text("{}")
    spec = parse_spec({"name": "trees", "processor": "xgboost", "model_path": str(model.parent)})
    repo = build_repository(spec, tmp_path / "repo", tmp_path)
    config = (repo / "trees" / "config.pbtxt").read_text()
    assert 'backend: "fil"' in config and 'default_model_filename: "booster.json"' in config
    assert 'string_value: "xgboost_json"' in config
    assert (repo / "trees" / "1" / "booster.json").resolve() == model.resolve()
    # model_config (JSON in Triton's field names) is merged in.
    spec = parse_spec(
        {
            "name": "clf",
            "processor": "sklearn",
            "model_path": str(model),
            "model_config": {
                "max_batch_size": 8,
                "parameters": {"method": {"string_value": "predict_proba"}},
            },
        }
    )
    config = (build_repository(spec, tmp_path / "repo2", tmp_path) / "clf" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in config and "predict_proba" in config and 'backend: "sklearn"' in config
    # A directory with several candidates needs model_entry.
    (model.parent / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="set model_entry"):
        build_repository(
            parse_spec({"name": "t", "processor": "xgboost", "model_path": str(model.parent)}),
            tmp_path / "repo3",
            tmp_path,
        )


def test_adoption_by_a_new_runtime_over_the_same_store(store: Store, example_repo: Path) -> None:
    first = LocalRuntime(store, capacity=CAPACITY)
    second: LocalRuntime | None = None
    try:
        engine = first.start_instance(engine_spec(example_repo), "engine-1", version=3)
        web = first.start_instance(custom_spec(http_server()), "web-1", version=1)
        doomed = first.start_instance(custom_spec(http_server(), name="doomed"), "doomed-1", version=1)
        for instance_id in ("engine-1", "web-1", "doomed-1"):
            wait_for(first, instance_id, is_ready, timeout=30)
        first.close()  # the control plane goes away; its instances keep running
        assert doomed.pid is not None
        os.kill(doomed.pid, signal.SIGKILL)  # ... and one of them dies while nobody watches
        time.sleep(0.2)

        second = LocalRuntime(store, capacity=CAPACITY)
        seen = {o.instance_id: o for o in second.list_instances()}
        assert seen["engine-1"].pid == engine.pid and seen["engine-1"].ready  # ready at once
        assert seen["engine-1"].version == 3 and seen["engine-1"].port == engine.port
        assert seen["web-1"].pid == web.pid and seen["web-1"].phase == Phase.RUNNING
        assert seen["doomed-1"].phase == Phase.EXITED
        assert "while the control plane was down" in seen["doomed-1"].reason
        assert second.capacity().allocated.cpu == 1.5  # the two live ones
        # Adopted processes are still watched: kill -9 is noticed without a Popen.
        assert web.pid is not None
        os.kill(web.pid, signal.SIGKILL)
        wait_for(second, "web-1", lambda o: o is not None and o.phase == Phase.EXITED, timeout=5)
        # ... and stopped through their process group.
        second.stop_instance("engine-1", grace=10)
        wait_for(second, "engine-1", lambda o: o is None, timeout=15)
        assert engine.pid is not None
        wait_gone(engine.pid)
    finally:
        for rt in (first, second):
            if rt is not None:
                rt.stop_all(grace=1)
                rt.close()


def test_a_reused_pid_is_never_adopted_or_signalled(store: Store) -> None:
    me = psutil.Process()
    store.put_runtime_record(
        RUNTIME_NAME,
        "impostor-1",
        {
            "service": "impostor",
            "version": 1,
            "pid": me.pid,  # alive, but not started when the record says
            "create_time": me.create_time() - 1000,
            "started": time.time(),
            "phase": "Running",
            "port": 1,
            "resources": [1, 0, 100],
        },
    )
    rt = LocalRuntime(store, capacity=CAPACITY, monitor=False)
    try:
        [obs] = rt.list_instances()
        assert obs.phase == Phase.EXITED and obs.pid == me.pid
        rt.stop_instance("impostor-1", grace=0)  # forgets it; must not signal us
        assert rt.list_instances() == []
    finally:
        rt.close()


def test_gpus_are_accounted_and_handed_out(store: Store) -> None:
    rt = LocalRuntime(store, capacity=Resources(cpu=8, gpu=2, memory=8000), monitor=False)
    command = 'echo "$PORT cuda=[$CUDA_VISIBLE_DEVICES]"; exec sleep 300'
    try:
        spec = parse_spec({**custom_spec(command).to_dict(), "metadata": {"gpu": 1, "cpu": 1}})
        for i in range(2):
            rt.start_instance(spec, f"g-{i}", version=1)
        with pytest.raises(InsufficientResources, match="needs 1 gpu, 0 free"):
            rt.start_instance(spec, "g-2", version=1)
        rt.start_instance(custom_spec(command), "c-1", version=1)

        def cuda(instance_id: str) -> str | None:
            found = re.search(r"^\d+ cuda=\[([^\]]*)\]$", rt.instance_logs(instance_id).text, re.MULTILINE)
            return found.group(1) if found else None

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and None in [cuda(i) for i in ("g-0", "g-1", "c-1")]:
            time.sleep(0.02)
        assert sorted([cuda("g-0"), cuda("g-1")]) == ["0", "1"] and cuda("c-1") == ""  # type: ignore[type-var]
    finally:
        rt.stop_all(grace=0, wait=5)
        rt.close()
