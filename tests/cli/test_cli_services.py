"""The eascmd-style commands via CliRunner against a real control plane; exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from elastiserve.cli.services import register
from elastiserve.controlplane.store import InstanceRecord
from elastiserve.testing import free_port

SEED = {
    "name": "triton_test",
    "processor": "triton",
    "processor_params": ["--model-repository=oss://triton-model-repo/models", "--allow-http=true"],
    "metadata": {"instance": 1, "cpu": 4, "gpu": 1, "memory": 10000, "resource": ""},
}


@click.group()
def cli() -> None:
    """Stand-in for elastiserve.cli.main.cli."""


register(cli)


@pytest.fixture
def run(cp: Any) -> Any:
    runner = CliRunner()
    env = {"ELASTISERVE_ENDPOINT": cp.url, "ELASTISERVE_TOKEN": cp.admin, "ELASTISERVE_HOME": str(cp.home)}

    def invoke(*args: str, input: str | None = None, **extra_env: str) -> Result:
        return runner.invoke(cli, list(args), env={**env, **extra_env}, input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "service.json"
    path.write_text(json.dumps(SEED))
    return path


def test_create_list_desc(run: Any, seed_file: Path) -> None:
    result = run("create", str(seed_file))
    assert result.exit_code == 0, result.output
    assert "token: " in result.output and "service 'triton_test' created (version 1" in result.output
    listed = run("list")
    assert listed.exit_code == 0 and "triton_test" in listed.output and "NAME" in listed.output
    assert run("ls", "--json").exit_code == 0
    assert json.loads(run("ls", "--json").output)[0]["name"] == "triton_test"
    desc = run("desc", "triton_test")
    assert desc.exit_code == 0
    for field in ("Status", "Endpoint", "Token", "Instances", "CPU", "GPU", "Memory", "Version", "Message"):
        assert field in desc.output
    assert json.loads(run("desc", "triton_test", "--json").output)["spec"]["metadata"]["memory"] == 10000


def test_exit_codes(run: Any, seed_file: Path, tmp_path: Path) -> None:
    assert run("create", str(seed_file)).exit_code == 0
    duplicate = run("create", str(seed_file))
    assert duplicate.exit_code == 1 and "error: service 'triton_test' already exists" in duplicate.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SEED, "name": "other", "metadata": {"instnace": 2}}))
    result = run("create", str(bad))
    assert result.exit_code == 2 and result.output.strip() == "error: metadata.instnace: unknown field"
    bad.write_text("{not json")
    result = run("create", str(bad))
    assert result.exit_code == 2 and "not valid JSON" in result.output and "Traceback" not in result.output
    assert run("create", str(tmp_path / "missing.json")).exit_code == 2
    bad.write_text(json.dumps({**SEED, "name": "../etc"}))
    assert run("create", str(bad)).exit_code == 2
    assert run("desc", "nope").exit_code == 1
    assert run("desc").exit_code == 2  # click usage error
    assert run("modify", "triton_test").exit_code == 2
    assert run("modify", "triton_test", "-Dmetadata.instance=2", "-s", str(seed_file)).exit_code == 2
    unknown = run("modify", "triton_test", "-Dmetadata.instnace=2")
    assert unknown.exit_code == 2 and "metadata.instnace: unknown field" in unknown.output
    wrong = run("create", str(seed_file), ELASTISERVE_TOKEN="wrong")
    assert wrong.exit_code == 1 and "invalid admin token" in wrong.output
    down = run("ls", ELASTISERVE_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert down.exit_code == 1 and "cannot reach the control plane" in down.output


def test_create_from_stdin_and_multi_error(run: Any) -> None:
    result = run("create", "-", input=json.dumps(SEED))
    assert result.exit_code == 0, result.output
    result = run(
        "create", "-", input=json.dumps({"name": "x", "processor": "onnx", "metadata": {"a": 1, "b": 2}})
    )
    assert result.exit_code == 2
    assert "metadata.a: unknown field" in result.output and "metadata.b: unknown field" in result.output


def test_modify_versions_rollback(run: Any, seed_file: Path, tmp_path: Path) -> None:
    run("create", str(seed_file))
    scaled = run("modify", "triton_test", "-Dmetadata.instance=3")
    assert scaled.exit_code == 0 and "scaled (version 1" in scaled.output
    updated = run("modify", "triton_test", "-Dmetadata.cpu=2", "-Dlabels.team=ads")
    assert updated.exit_code == 0 and "updated (version 2" in updated.output
    new = tmp_path / "v3.json"
    new.write_text(json.dumps({k: v for k, v in SEED.items() if k != "name"} | {"model_path": "/models"}))
    replaced = run("modify", "triton_test", "-s", str(new))
    assert replaced.exit_code == 0 and "updated (version 3" in replaced.output
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SEED, "name": "other"}))
    assert run("modify", "triton_test", "-s", str(other)).exit_code == 2
    versions = run("versions", "triton_test")
    assert versions.exit_code == 0 and "VERSION" in versions.output
    assert [v["version"] for v in json.loads(run("versions", "triton_test", "--json").output)] == [1, 2, 3]
    rolled = run("version", "triton_test", "1")
    assert rolled.exit_code == 0 and "rolled back (version 1" in rolled.output
    spec = json.loads(run("desc", "triton_test", "--json").output)["spec"]
    assert (
        spec["metadata"]["cpu"] == 4 and spec["metadata"]["instance"] == 1
    )  # -s replaced the instance count
    assert run("version", "triton_test", "9").exit_code == 1
    assert run("version", "triton_test", "x").exit_code == 2


def test_start_stop_delete(run: Any, seed_file: Path, cp: Any) -> None:
    run("create", str(seed_file))
    assert "stopping" in run("stop", "triton_test").output
    assert "starting" in run("start", "triton_test").output
    refused = run("delete", "triton_test", input="n\n")
    assert refused.exit_code == 1 and cp.store.find_service("triton_test") is not None
    confirmed = run("delete", "triton_test", input="y\n")
    assert confirmed.exit_code == 0 and "service 'triton_test' deleted" in confirmed.output
    run("create", str(seed_file))
    assert run("delete", "triton_test", "-y").exit_code == 0
    assert run("delete", "triton_test", "-y").exit_code == 1


def test_w_dw_events_logs(run: Any, seed_file: Path, cp: Any) -> None:
    run("create", str(seed_file))
    assert "has no instances" in run("w", "triton_test").output
    spec = cp.store.get_service("triton_test").spec
    for iid, port in (("triton_test-a", 9001), ("triton_test-b", 9002)):
        cp.runtime.start_instance(spec, iid, version=1)
        cp.store.upsert_instance(
            InstanceRecord(
                id=iid,
                service="triton_test",
                version=1,
                address="127.0.0.1",
                port=port,
                ready=port == 9001,
                status="Running",
                reason="" if port == 9001 else "[Errno 111] refused",
                started=time.time(),
            )
        )
    table = run("w", "triton_test")
    assert table.exit_code == 0
    for text in ("INSTANCE", "triton_test-a", "127.0.0.1:9001", "RESTARTS", "[Errno 111] refused"):
        assert text in table.output
    assert len(json.loads(run("w", "triton_test", "--json").output)) == 2
    dw = run("dw", "triton_test", "triton_test-a")
    assert dw.exit_code == 0 and "instance 'triton_test-a' deleting" in dw.output
    partly = run("dw", "triton_test", "triton_test-b", "nope")
    assert partly.exit_code == 1 and "no instance 'nope'" in partly.output
    events = run("events", "triton_test")
    assert events.exit_code == 0 and "InstanceDeleting" in events.output
    assert json.loads(run("events", "triton_test", "--json").output)[0]["kind"] == "Created"
    logs = run("logs", "triton_test")
    assert logs.exit_code == 0 and "[triton_test-a] fake instance" in logs.output
    one = run("logs", "triton_test", "--instance", "triton_test-b")
    assert one.output.startswith("fake instance triton_test-b")
    assert run("logs", "triton_test", "--instance", "zz").exit_code == 1

    def stop_soon() -> None:  # -f ends when the service is gone
        time.sleep(0.3)
        cp.runtime.write_log("triton_test-b", "followed\n")
        time.sleep(0.6)
        cp.store.purge_service("triton_test")

    threading.Thread(target=stop_soon).start()
    followed = run("logs", "triton_test", "-f", "--instance", "triton_test-b", "--tail", "0")
    assert followed.exit_code == 0 and followed.output == "followed\n"


def test_wait_shows_progress_until_ready(run: Any, seed_file: Path, cp: Any) -> None:
    def reconcile() -> None:  # plays the reconciler
        time.sleep(0.3)
        cp.store.upsert_instance(
            InstanceRecord(
                id="triton_test-a",
                service="triton_test",
                version=1,
                address="127.0.0.1",
                port=9001,
                ready=True,
                status="Running",
            )
        )
        cp.store.set_status("triton_test", "Running")

    threading.Thread(target=reconcile).start()
    result = run("create", str(seed_file), "--wait", "--timeout", "10")
    assert result.exit_code == 0, result.output
    cp.store.set_status("triton_test", "Failed", "model not found")
    failed = run("start", "triton_test", "--wait", "--timeout", "5")
    assert failed.exit_code == 1 and "model not found" in failed.output
    cp.store.set_status("triton_test", "Updating")
    late = run("modify", "triton_test", "-Dmetadata.cpu=1", "--wait", "--timeout", "0.2")
    assert late.exit_code == 1 and "not ready after" in late.output


def test_token_and_endpoint_from_the_state_dir(run: Any, seed_file: Path, cp: Any) -> None:
    (cp.home / "admin_token").write_text(cp.admin + "\n")
    (cp.home / "endpoint").write_text(cp.url + "\n")
    result = run("create", str(seed_file), ELASTISERVE_TOKEN="", ELASTISERVE_ENDPOINT="")
    assert result.exit_code == 0, result.output
    flagged = run("ls", "--endpoint", cp.url, "--token", cp.admin, "--state-dir", "/nonexistent")
    assert flagged.exit_code == 0 and "triton_test" in flagged.output


def test_schema(run: Any) -> None:
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "metadata" in schema["properties"] and schema["additionalProperties"] is False


def test_registering_is_cheap_and_constants_agree() -> None:
    import subprocess
    import sys

    from elastiserve.cli import services
    from elastiserve.client import controlplane
    from elastiserve.controlplane import store

    assert services.DEFAULT_ENDPOINT == controlplane.DEFAULT_ENDPOINT
    assert (services.ENV_ENDPOINT, services.ENV_TOKEN) == (controlplane.ENV_ENDPOINT, controlplane.ENV_TOKEN)
    assert services.ENV_HOME == store.ENV_HOME
    code = "import sys, elastiserve.cli.services; print(sorted(m for m in ('pydantic', 'httpx', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # `elastiserve serve` must not pay for the platform commands
