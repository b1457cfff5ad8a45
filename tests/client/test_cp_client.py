"""ControlPlaneClient against a real control plane: every route, one exception type."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from elastiserve.client import ControlPlaneClient, ControlPlaneError, Endpoints
from elastiserve.controlplane.spec import SpecError, parse_spec
from elastiserve.controlplane.store import InstanceRecord
from elastiserve.testing import free_port

SEED = {
    "name": "triton_test",
    "processor": "triton",
    "processor_params": ["--model-repository=oss://triton-model-repo/models", "--allow-http=true"],
    "metadata": {"instance": 1, "cpu": 4, "gpu": 1, "memory": 10000, "resource": ""},
}


@pytest.fixture
def client(cp: Any) -> ControlPlaneClient:
    with ControlPlaneClient(cp.url, cp.admin) as c:
        yield c


def test_service_lifecycle(cp: Any, client: ControlPlaneClient) -> None:
    assert client.health()
    view = client.create_service(parse_spec(SEED))
    assert view["name"] == "triton_test" and view["spec"]["token"] and view["warnings"] == []
    assert [s["name"] for s in client.list_services()] == ["triton_test"]
    assert client.get_service("triton_test")["version"] == 1
    assert client.modify_service("triton_test", ["metadata.instance=2"])["change"] == "scaled"
    updated = client.update_service("triton_test", {**SEED, "metadata": {**SEED["metadata"], "cpu": 1}})
    assert updated["change"] == "released" and updated["spec"]["metadata"]["instance"] == 1
    assert [v["version"] for v in client.list_versions("triton_test")] == [1, 2]
    assert client.get_version("triton_test", 1)["spec"]["metadata"]["cpu"] == 4
    assert client.rollback("triton_test", 1)["version"] == 1
    assert client.stop_service("triton_test")["desired"] == "stopped"
    assert client.start_service("triton_test")["desired"] == "running"
    kinds = [e["kind"] for e in client.events("triton_test")]
    assert kinds == ["Created", "Scaled", "Updated", "RolledBack", "Stopped", "Started"]
    assert len(client.events("triton_test", limit=2)) == 2
    assert client.delete_service("triton_test") == {"name": "triton_test", "result": "deleted"}


def test_errors_carry_status_message_and_details(cp: Any, client: ControlPlaneClient) -> None:
    with pytest.raises(ControlPlaneError) as info:
        client.get_service("nope")
    assert (info.value.status, info.value.message) == (404, "service 'nope' not found")
    with pytest.raises(ControlPlaneError) as info:
        client.create_service({**SEED, "token": "short", "metadata": {"instnace": 1}})
    assert info.value.status == 422 and info.value.is_bad_request
    assert "metadata.instnace: unknown field" in info.value.details
    with pytest.raises(ControlPlaneError) as info:
        ControlPlaneClient(cp.url).create_service(SEED)
    assert info.value.status == 401 and not info.value.is_bad_request
    with pytest.raises(ControlPlaneError) as info:
        ControlPlaneClient(cp.url, "wrong").create_service(SEED)
    assert info.value.status == 403
    with pytest.raises(ControlPlaneError) as info:
        ControlPlaneClient(f"127.0.0.1:{free_port()}", timeout=2).list_services()
    assert info.value.status is None and "cannot reach the control plane" in info.value.message
    # A bad -D is caught locally before any write.
    client.create_service(SEED)
    with pytest.raises(SpecError, match=r"metadata\.instnace: unknown field"):
        client.modify_service("triton_test", ["metadata.instnace=3"])


def test_env_defaults(cp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTISERVE_ENDPOINT", cp.url)
    monkeypatch.setenv("ELASTISERVE_TOKEN", cp.admin)
    with ControlPlaneClient() as c:
        assert c.create_service(SEED)["name"] == "triton_test"


def test_names_are_quoted_into_the_path(cp: Any, client: ControlPlaneClient) -> None:
    for name in ("../x", "..", "a/b", "%2e%2e"):
        with pytest.raises(ControlPlaneError) as info:
            client.get_service(name)
        assert info.value.status in (400, 404)


def test_modify_retries_on_a_concurrent_change(
    cp: Any, client: ControlPlaneClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.create_service(SEED)
    real = client.get_service_with_etag
    reads = []

    def racing_read(name: str) -> tuple[dict[str, Any], str | None]:
        result = real(name)
        reads.append(result[1])
        if len(reads) == 1:  # someone else writes between our read and our write
            other = ControlPlaneClient(cp.url, cp.admin)
            other.update_service(name, {**SEED, "labels": {"by": "other"}})
        return result

    monkeypatch.setattr(client, "get_service_with_etag", racing_read)
    view = client.modify_service("triton_test", ["metadata.instance=3"])
    assert len(reads) == 2
    assert view["spec"]["labels"] == {"by": "other"} and view["spec"]["metadata"]["instance"] == 3
    with pytest.raises(ControlPlaneError) as info:
        client.update_service("triton_test", SEED, if_match=reads[0])
    assert info.value.status == 412


def test_instances_dw_and_logs(cp: Any, client: ControlPlaneClient) -> None:
    client.create_service(SEED)
    spec = cp.store.get_service("triton_test").spec
    cp.runtime.start_instance(spec, "triton_test-a", version=1)
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
    [inst] = client.list_instances("triton_test")
    assert inst["id"] == "triton_test-a" and inst["ready"] is True
    assert "fake instance triton_test-a" in client.logs("triton_test")
    assert client.logs("triton_test", instance="triton_test-a", tail=0) == ""

    threading.Timer(0.3, lambda: cp.runtime.write_log("triton_test-a", "new output\n")).start()
    seen = ""
    for chunk in client.follow_logs("triton_test", instance="triton_test-a", tail=0):
        seen += chunk
        if "new output" in seen:
            break
    assert seen == "new output\n"
    assert client.delete_instance("triton_test", "triton_test-a")["desired"] == "deleted"
    with pytest.raises(ControlPlaneError) as info:
        client.delete_instance("triton_test", "triton_test-a/../x")
    assert info.value.status == 404
    with pytest.raises(ControlPlaneError) as info:
        list(client.follow_logs("nope"))
    assert info.value.status == 404


def test_endpoints_polling(cp: Any, client: ControlPlaneClient) -> None:
    client.create_service(SEED)
    first = client.endpoints("triton_test")
    assert isinstance(first, Endpoints) and first.endpoints == [] and first.changed and first.etag
    same = client.endpoints("triton_test", etag=first.etag)
    assert not same.changed and same.etag == first.etag

    def ready() -> None:
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

    threading.Timer(0.2, ready).start()
    started = time.monotonic()
    changed = client.endpoints("triton_test", etag=first.etag, wait=5)
    assert changed.changed and changed.endpoints == [{"ip": "127.0.0.1", "port": 9001, "weight": 100}]
    assert time.monotonic() - started < 3
