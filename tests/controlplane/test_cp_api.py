"""The REST API over real HTTP: auth, CRUD, versions, instances, events, logs, endpoints, bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from elastiserve.controlplane.api import create_app, serve_in_thread
from elastiserve.controlplane.spec import parse_spec
from elastiserve.controlplane.store import InstanceRecord, Store

ADMIN = "admin-token-for-tests"  # the cp fixture's (tests/controlplane/conftest.py)
ControlPlane = Any  # conftest.ControlPlane; conftest modules are not importable by name

SEED = {
    "name": "triton_test",
    "processor": "triton",
    "processor_params": ["--model-repository=oss://triton-model-repo/models", "--allow-http=true"],
    "metadata": {"instance": 1, "cpu": 4, "gpu": 1, "memory": 10000, "resource": ""},
}
API = "/api/v2/services"


@pytest.fixture
def http(cp: ControlPlane) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cp.url, headers={"Authorization": ADMIN}, timeout=10) as client:
        yield client


@pytest.fixture
def anon(cp: ControlPlane) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cp.url, timeout=10) as client:
        yield client


def created(http: httpx.Client, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = http.post(API, json=body or SEED)
    assert response.status_code == 201, response.text
    return response.json()


def add_instance(
    cp: ControlPlane, iid: str, port: int, *, ready: bool = True, service: str = "triton_test"
) -> None:
    cp.store.upsert_instance(
        InstanceRecord(
            id=iid,
            service=service,
            version=1,
            address="127.0.0.1",
            port=port,
            status="Running",
            ready=ready,
            started=time.time(),
        )
    )


# -- auth ------------------------------------------------------------------------------------------


def test_writes_need_the_admin_token(cp: ControlPlane, anon: httpx.Client) -> None:
    response = anon.post(API, json=SEED)
    assert response.status_code == 401 and response.json() == {
        "error": "admin token required (Authorization header)"
    }
    response = anon.post(API, json=SEED, headers={"Authorization": "wrong"})
    assert response.status_code == 403 and response.json()["error"] == "invalid admin token"
    assert anon.post(API, json=SEED, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 201
    for method, path in [
        ("PUT", f"{API}/triton_test"),
        ("DELETE", f"{API}/triton_test"),
        ("POST", f"{API}/triton_test/stop"),
        ("POST", f"{API}/triton_test/start"),
        ("PUT", f"{API}/triton_test/versions/1"),
        ("DELETE", f"{API}/triton_test/instances/x"),
        ("GET", f"{API}/triton_test/logs"),
    ]:
        assert anon.request(method, path, json=SEED).status_code == 401, (method, path)
    assert cp.store.get_service("triton_test").desired == "running"


def test_reads_are_open_but_tokens_are_redacted(http: httpx.Client, anon: httpx.Client) -> None:
    token = created(http)["spec"]["token"]
    assert len(token) >= 16
    assert anon.get(f"{API}/triton_test").json()["spec"]["token"] == "********"
    assert anon.get(API).json()["services"][0]["spec"]["token"] == "********"
    assert anon.get(f"{API}/triton_test/versions").json()["versions"][0]["spec"]["token"] == "********"
    assert http.get(f"{API}/triton_test").json()["spec"]["token"] == token
    assert anon.get(f"{API}/triton_test", headers={"Authorization": "nope"}).status_code == 403


# -- services ----------------------------------------------------------------------------------------


def test_create_describe_list(cp: ControlPlane, http: httpx.Client) -> None:
    response = http.post(API, json={**SEED, "token": "my-own-token", "autoscaler": {"min": 1, "max": 3}})
    assert response.status_code == 201
    assert response.headers["location"] == f"{API}/triton_test"
    view = response.json()
    assert view["spec"]["token"] == "my-own-token"
    assert view["status"] == "Creating" and view["version"] == 1 and view["desired"] == "running"
    assert view["endpoint"] == "http://127.0.0.1:9999/api/predict/triton_test"
    assert view["instances"] == {"desired": 1, "total": 0, "ready": 0}
    assert view["warnings"] and view["warnings"][0].startswith("autoscaler: not implemented yet")
    assert cp.notifier.calls == ["triton_test"]
    described = http.get(f"{API}/triton_test")
    assert described.json()["spec"]["metadata"]["cpu"] == 4 and described.headers["etag"]
    assert [s["name"] for s in http.get(API).json()["services"]] == ["triton_test"]
    duplicate = http.post(API, json=SEED)
    assert duplicate.status_code == 409 and duplicate.json() == {
        "error": "service 'triton_test' already exists"
    }
    assert http.get(f"{API}/nope").status_code == 404


def test_put_scales_releases_and_keeps_token(cp: ControlPlane, http: httpx.Client) -> None:
    token = created(http)["spec"]["token"]
    scaled = http.put(
        f"{API}/triton_test", json={**SEED, "metadata": {**SEED["metadata"], "instance": 3}}
    ).json()
    assert scaled["change"] == "scaled" and scaled["version"] == 1 and scaled["spec"]["token"] == token
    same = http.put(
        f"{API}/triton_test", json={**SEED, "metadata": {**SEED["metadata"], "instance": 3}}
    ).json()
    assert same["change"] == "unchanged"
    released = http.put(
        f"{API}/triton_test", json={**SEED, "metadata": {**SEED["metadata"], "cpu": 2}}
    ).json()
    assert released["change"] == "released" and released["version"] == 2 and released["status"] == "Updating"
    assert released["spec"]["metadata"]["instance"] == 1
    assert cp.notifier.calls == ["triton_test", "triton_test", "triton_test"]  # not for the unchanged PUT
    renamed = http.put(f"{API}/triton_test", json={**SEED, "name": "other"})
    assert renamed.status_code == 400 and "cannot be renamed" in renamed.json()["error"]
    assert http.put(f"{API}/nope", json={**SEED, "name": "nope"}).status_code == 404


def test_put_if_match(http: httpx.Client) -> None:
    created(http)
    etag = http.get(f"{API}/triton_test").headers["etag"]
    body = {**SEED, "metadata": {**SEED["metadata"], "instance": 2}}
    first = http.put(f"{API}/triton_test", json=body, headers={"If-Match": etag})
    assert first.status_code == 200 and first.headers["etag"] != etag
    stale = http.put(f"{API}/triton_test", json=SEED, headers={"If-Match": etag})
    assert stale.status_code == 412 and "changed since it was read" in stale.json()["error"]
    assert http.put(f"{API}/triton_test", json=SEED, headers={"If-Match": "garbage"}).status_code == 400


def test_start_stop_delete(cp: ControlPlane, http: httpx.Client) -> None:
    created(http)
    stopped = http.post(f"{API}/triton_test/stop")
    assert stopped.status_code == 202 and stopped.json()["desired"] == "stopped"
    assert stopped.json()["instances"]["desired"] == 0
    assert http.post(f"{API}/triton_test/start").json()["status"] == "Starting"
    add_instance(cp, "triton_test-1", 9001)
    deleting = http.delete(f"{API}/triton_test")
    assert deleting.status_code == 202 and deleting.json() == {"name": "triton_test", "result": "deleting"}
    assert http.post(f"{API}/triton_test/start").status_code == 409
    cp.store.purge_service("triton_test")  # what the reconciler does once instances are gone
    created(http)
    gone = http.delete(f"{API}/triton_test")
    assert gone.status_code == 200 and gone.json()["result"] == "deleted"
    assert http.get(f"{API}/triton_test").status_code == 404
    assert http.delete(f"{API}/triton_test").status_code == 404


# -- versions ----------------------------------------------------------------------------------------


def test_versions_and_rollback(http: httpx.Client) -> None:
    created(http)
    http.put(f"{API}/triton_test", json={**SEED, "processor_params": ["--model-repository=/v2"]})
    http.put(
        f"{API}/triton_test",
        json={
            **SEED,
            "processor_params": ["--model-repository=/v2"],
            "metadata": {**SEED["metadata"], "instance": 4},
        },
    )
    versions = http.get(f"{API}/triton_test/versions").json()["versions"]
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]
    assert (
        http.get(f"{API}/triton_test/versions/1").json()["spec"]["processor_params"]
        == SEED["processor_params"]
    )
    rolled = http.put(f"{API}/triton_test/versions/1").json()
    assert rolled["version"] == 1 and rolled["latest_version"] == 2
    assert rolled["spec"]["processor_params"] == SEED["processor_params"]
    assert rolled["spec"]["metadata"]["instance"] == 4
    missing = http.put(f"{API}/triton_test/versions/9")
    assert missing.status_code == 404 and missing.json()["error"] == "service 'triton_test' has no version 9"
    bad = http.put(f"{API}/triton_test/versions/abc")
    assert bad.status_code == 400 and bad.json()["error"].startswith("number: ")


# -- instances, events, logs --------------------------------------------------------------------------


def test_instances_and_dw(cp: ControlPlane, http: httpx.Client) -> None:
    created(http)
    add_instance(cp, "triton_test-a", 9001)
    add_instance(cp, "triton_test-b", 9002, ready=False)
    instances = http.get(f"{API}/triton_test/instances").json()["instances"]
    assert {i["id"] for i in instances} == {"triton_test-a", "triton_test-b"}
    first = next(i for i in instances if i["id"] == "triton_test-a")
    assert first["address"] == "127.0.0.1" and first["port"] == 9001 and first["ready"] is True
    assert set(first) >= {"started", "restarts", "status", "reason"}
    view = http.get(f"{API}/triton_test").json()
    assert view["instances"] == {"desired": 1, "total": 2, "ready": 1}
    deleted = http.delete(f"{API}/triton_test/instances/triton_test-a")
    assert deleted.status_code == 202 and deleted.json()["desired"] == "deleted"
    assert http.delete(f"{API}/triton_test/instances/nope").status_code == 404
    events = http.get(f"{API}/triton_test/events").json()["events"]
    assert [e["kind"] for e in events] == ["Created", "InstanceDeleting"]
    assert (
        http.get(f"{API}/triton_test/events", params={"limit": 1}).json()["events"][0]["kind"]
        == "InstanceDeleting"
    )
    assert (
        http.get(f"{API}/triton_test/events", params={"since": events[0]["id"]}).json()["events"]
        == events[1:]
    )
    assert http.get(f"{API}/triton_test/events", params={"limit": 0}).status_code == 400


def test_logs(cp: ControlPlane, http: httpx.Client) -> None:
    created(http)
    spec = cp.store.get_service("triton_test").spec
    for iid in ("triton_test-a", "triton_test-b"):
        cp.runtime.start_instance(spec, iid, version=1)
        add_instance(cp, iid, 9000)
    cp.runtime.write_log("triton_test-a", "hello from a\n")
    both = http.get(f"{API}/triton_test/logs").text
    assert "[triton_test-a] hello from a\n" in both and "[triton_test-b] fake instance" in both
    one = http.get(f"{API}/triton_test/logs", params={"instance": "triton_test-a", "tail": 1}).text
    assert one == "hello from a\n"
    assert http.get(f"{API}/triton_test/logs", params={"instance": "zz"}).status_code == 404

    def later() -> None:
        time.sleep(0.3)
        cp.runtime.write_log("triton_test-a", "later line\n")

    threading.Thread(target=later).start()
    received = ""
    with http.stream(
        "GET", f"{API}/triton_test/logs", params={"instance": "triton_test-a", "follow": "true", "tail": 0}
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_text():
            received += chunk
            if "later line" in received:
                break
    assert received == "later line\n"


def test_logs_without_runtime(tmp_path: Any) -> None:
    with Store.open(tmp_path) as store, serve_in_thread(create_app(store, admin_token=ADMIN)) as url:
        store.create_service(parse_spec(SEED))
        response = httpx.get(f"{url}{API}/triton_test/logs", headers={"Authorization": ADMIN})
        assert response.status_code == 503 and "no runtime" in response.json()["error"]


# -- discovery ---------------------------------------------------------------------------------------


def test_endpoints_etag_and_304(cp: ControlPlane, anon: httpx.Client) -> None:
    cp.store.create_service(parse_spec(SEED))
    first = anon.get(f"{API}/triton_test/endpoints")
    assert first.status_code == 200 and first.json() == {"service": "triton_test", "endpoints": []}
    etag = first.headers["etag"]
    assert anon.get(f"{API}/triton_test/endpoints", headers={"If-None-Match": etag}).status_code == 304
    add_instance(cp, "triton_test-b", 9002)
    add_instance(cp, "triton_test-a", 9001)
    add_instance(cp, "triton_test-c", 9003, ready=False)
    second = anon.get(f"{API}/triton_test/endpoints", headers={"If-None-Match": etag})
    assert second.status_code == 200 and second.headers["etag"] != etag
    assert second.json()["endpoints"] == [
        {"ip": "127.0.0.1", "port": 9001, "weight": 100},
        {"ip": "127.0.0.1", "port": 9002, "weight": 100},
    ]
    cp.store.set_desired("triton_test", "stopped")
    assert anon.get(f"{API}/triton_test/endpoints").json()["endpoints"] == []
    assert anon.get(f"{API}/nope/endpoints").status_code == 404


def test_endpoints_publish_the_grpc_port(cp: ControlPlane, anon: httpx.Client) -> None:
    cp.store.create_service(parse_spec(SEED))
    add_instance(cp, "triton_test-a", 9001)
    cp.store.upsert_instance(
        InstanceRecord(
            id="triton_test-b",
            service="triton_test",
            version=1,
            address="127.0.0.1",
            port=9002,
            status="Running",
            ready=True,
            extra={"grpc_port": 9102},  # what the reconciler records from the runtime's ports["grpc"]
        )
    )
    assert anon.get(f"{API}/triton_test/endpoints").json()["endpoints"] == [
        {"ip": "127.0.0.1", "port": 9001, "weight": 100},
        {"ip": "127.0.0.1", "port": 9002, "weight": 100, "grpc_port": 9102},
    ]


def test_endpoints_long_poll(cp: ControlPlane, anon: httpx.Client) -> None:
    cp.store.create_service(parse_spec(SEED))
    etag = anon.get(f"{API}/triton_test/endpoints").headers["etag"]
    # No change: 304 after the wait.
    started = time.monotonic()
    timed_out = anon.get(
        f"{API}/triton_test/endpoints", params={"wait": 0.4}, headers={"If-None-Match": etag}
    )
    assert timed_out.status_code == 304 and 0.35 <= time.monotonic() - started < 3
    # Unrelated writes wake the poll but do not end it.
    threading.Timer(0.1, lambda: cp.store.add_event("triton_test", "Tick", "x")).start()
    threading.Timer(0.3, lambda: add_instance(cp, "triton_test-a", 9001)).start()
    started = time.monotonic()
    changed = anon.get(f"{API}/triton_test/endpoints", params={"wait": 4}, headers={"If-None-Match": etag})
    elapsed = time.monotonic() - started
    assert changed.status_code == 200 and changed.json()["endpoints"][0]["port"] == 9001
    assert 0.25 <= elapsed < 3
    # wait without If-None-Match answers at once.
    started = time.monotonic()
    assert anon.get(f"{API}/triton_test/endpoints", params={"wait": 3}).status_code == 200
    assert time.monotonic() - started < 2
    assert anon.get(f"{API}/triton_test/endpoints", params={"wait": -1}).status_code == 400


def test_services_list_etag_and_long_poll(cp: ControlPlane, http: httpx.Client, anon: httpx.Client) -> None:
    created(http)
    first = http.get(API)
    etag = first.headers["etag"]
    assert first.json()["services"][0]["name"] == "triton_test"
    assert http.get(API, headers={"If-None-Match": etag}).status_code == 304
    # Admin and anonymous readers see different bodies (tokens redacted), so different ETags.
    assert anon.get(API).headers["etag"] != etag
    assert anon.get(API, headers={"If-None-Match": etag}).status_code == 200
    # No change: 304 after the wait.
    started = time.monotonic()
    unchanged = http.get(API, params={"wait": 0.4}, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and 0.35 <= time.monotonic() - started < 3
    # A change (here: the service stopped) ends the long-poll at once with the new list.
    threading.Timer(0.2, lambda: cp.store.set_desired("triton_test", "stopped")).start()
    started = time.monotonic()
    changed = http.get(API, params={"wait": 5}, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["services"][0]["desired"] == "stopped"
    assert 0.15 <= time.monotonic() - started < 3
    assert http.get(API, params={"wait": -1}).status_code == 400
    assert http.get(API, params={"wait": "soon"}).status_code == 400


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_bodies(http: httpx.Client) -> None:
    response = http.post(API, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"].startswith(
        "request body is not valid JSON"
    )
    response = http.post(API, json=[SEED])
    assert response.status_code == 400 and response.json() == {
        "error": "request body must be a JSON object (a service spec)"
    }
    response = http.post(API)
    assert response.status_code == 422 and "request body required" in response.json()["error"]
    response = http.post(API, json={**SEED, "metadata": {"instnace": 3}})
    assert response.status_code == 422 and response.json() == {"error": "metadata.instnace: unknown field"}
    response = http.post(API, json={**SEED, "token": "short", "labels": {"a": 1}})
    body = response.json()
    assert response.status_code == 422 and len(body["details"]) == 2
    assert body["error"] == "; ".join(body["details"])
    assert any(line.startswith("token: must be at least 8 characters") for line in body["details"])
    response = http.post(API, json={**SEED, "processor": "nope"})
    assert response.json()["error"].startswith("processor: unknown processor 'nope'")


def test_oversize_bodies(http: httpx.Client) -> None:
    big = {**SEED, "labels": {"blob": "x" * 100_000}}
    response = http.post(API, json=big)
    assert response.status_code == 413 and response.json() == {
        "error": "request body too large (limit 65536 bytes)"
    }

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while streaming
        yield b'{"name": "triton_test", "labels": {"blob": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}}'

    response = http.post(API, content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert http.get(API).json()["services"] == []


def test_path_tricks_in_names(cp: ControlPlane, http: httpx.Client) -> None:
    for raw in ["..", "%2e%2e", "..%2f..%2fetc", "Bad", "a.b", "%252e%252e", "a%20b", "%00"]:
        for method, suffix in [("GET", ""), ("DELETE", "/instances/x"), ("GET", "/endpoints")]:
            # Sent raw: httpx would otherwise normalise the dots away before they reach the server.
            response = http.send(http.build_request(method, f"{cp.url}{API}/{raw}{suffix}"))
            assert response.status_code in (400, 404), (raw, suffix, response.status_code)
            assert "error" in response.json()
    assert http.get(f"{cp.url}{API}/%2e%2e").json()["error"].startswith("'..' is not a valid service name")


def test_bad_names_in_body(http: httpx.Client) -> None:
    for name in ("../x", "%2e%2e", "a/b"):
        response = http.post(API, json={**SEED, "name": name})
        assert response.status_code == 422 and response.json()["error"].startswith("name: ")


def test_errors_have_one_shape(cp: ControlPlane, anon: httpx.Client) -> None:
    assert anon.get("/nope").json() == {"error": "no route GET /nope"}
    response = anon.delete(API)
    assert response.status_code == 405 and response.json()["error"].startswith("method DELETE not allowed")


def test_openapi(anon: httpx.Client) -> None:
    doc = anon.get("/openapi.json").json()
    for path in (
        API,
        f"{API}/{{name}}",
        f"{API}/{{name}}/versions/{{number}}",
        f"{API}/{{name}}/endpoints",
        f"{API}/{{name}}/instances/{{instance_id}}",
        f"{API}/{{name}}/logs",
    ):
        assert path in doc["paths"], path
    assert "ServiceSpec" in doc["components"]["schemas"]
    assert "model_config" in doc["components"]["schemas"]["ServiceSpec"]["properties"]
    assert anon.get("/healthz").json() == {"status": "ok"}
