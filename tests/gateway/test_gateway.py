"""The gateway process end to end: forwarding, auth, balancing, retries, limits, groups, metrics."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from elastiserve.testing import free_port, running_engine, wait_http_ready
from tests.gateway.conftest import ENGINE_ARGS, MAX_BODY, DroppingInstance, FakeInstance, Platform

TOKEN = "tok-for-gateway-tests"


def fp32(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def add_sub_json(a: np.ndarray, b: np.ndarray) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "INPUT0", "shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()},
            {"name": "INPUT1", "shape": list(b.shape), "datatype": "FP32", "data": b.ravel().tolist()},
        ]
    }


def raw_status(base: str, raw_path: str, method: str = "GET") -> int:
    """Send a request line exactly as written (no client-side path normalisation)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"{method} {raw_path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


# -- forwarding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_through_the_gateway(platform: Platform, binary: bool) -> None:
    name = f"fwd-{int(binary)}"
    platform.deploy(name, [platform.engines[0].http_port], token=TOKEN)
    url = f"{platform.gateway.removeprefix('http://')}/api/predict/{name}"
    client = httpclient.InferenceServerClient(url)
    auth = {"Authorization": TOKEN}
    assert client.is_server_ready(headers=auth)
    assert client.get_model_metadata("add_sub", headers=auth)["name"] == "add_sub"
    a, b = fp32((2, 16), 1), fp32((2, 16), 2)
    inputs = [
        httpclient.InferInput("INPUT0", [2, 16], "FP32"),
        httpclient.InferInput("INPUT1", [2, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("add_sub", inputs, outputs=outputs, headers=auth)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    client.close()


def test_default_model_and_model_entry(platform: Platform) -> None:
    port = platform.engines[0].http_port
    # Without model_entry: the first READY model of the repository index (add_sub < identity_fp32).
    platform.deploy("deflt", [port])
    a, b = fp32((1, 16), 3), fp32((1, 16), 4)
    r = httpx.post(f"{platform.gateway}/api/predict/deflt", json=add_sub_json(a, b))
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "add_sub"
    assert httpx.get(f"{platform.gateway}/api/predict/deflt").json()["name"] == "add_sub"
    # With model_entry (triton processor): that model.
    platform.deploy("entry", [port], model_entry="identity_fp32")
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.ravel().tolist()}]}
    r = httpx.post(f"{platform.gateway}/api/predict/entry", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "identity_fp32"
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], a.ravel(), rtol=1e-6)
    assert httpx.delete(f"{platform.gateway}/api/predict/entry").status_code == 405


def test_path_query_and_headers_are_forwarded(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    fake = fake_instances("echo")
    platform.deploy("echo", [fake.port], token=TOKEN)
    r = httpx.post(
        f"{platform.gateway}/api/predict/echo/some/path?x=1&y=%2F",
        content=b"abc",
        headers={"Authorization": f"Bearer {TOKEN}", "X-Custom": "kept", "Content-Type": "text/plain"},
    )
    assert r.status_code == 200, r.text
    seen = r.json()
    assert (seen["method"], seen["path"], seen["query"], seen["body_len"]) == (
        "POST",
        "/some/path",
        "x=1&y=%2F",
        3,
    )
    assert seen["headers"]["x-custom"] == "kept" and seen["headers"]["content-type"] == "text/plain"
    assert "authorization" not in seen["headers"]  # the service token stays at the gateway
    assert seen["headers"]["host"] == f"127.0.0.1:{fake.port}"
    assert r.headers["x-fake"] == "yes"


# -- auth -----------------------------------------------------------------------------------------


def test_tokens(platform: Platform, fake_instances: Callable[..., FakeInstance]) -> None:
    fake = fake_instances("auth")
    platform.deploy("locked", [fake.port], token=TOKEN)
    platform.deploy("open", [fake.port])
    url = f"{platform.gateway}/api/predict/locked/v2"
    r = httpx.get(url)
    assert r.status_code == 401 and "authorization required" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, headers={"Authorization": "wrong-token-123"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": TOKEN[:-1]}).status_code == 403
    assert httpx.get(url, headers={"Authorization": TOKEN}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"{platform.gateway}/api/predict/open/v2").status_code == 200  # no token: open
    assert fake.hits["/v2"] == 3
    # A new token reaches the gateway through its long-poll of the service list, well before its
    # --refresh-interval (30 s in these tests): the old token is refused within a second.
    record = platform.store.get_service("locked")
    spec = record.spec.model_copy(update={"token": "rotated-token-456"})
    started = time.monotonic()
    platform.store.update_service(spec)
    while time.monotonic() - started < 5:
        if httpx.get(url, headers={"Authorization": TOKEN}).status_code == 403:
            break
        time.sleep(0.02)
    assert time.monotonic() - started < 1.5
    assert httpx.get(url, headers={"Authorization": "rotated-token-456"}).status_code == 200


# -- balancing and retries --------------------------------------------------------------------------


def test_requests_spread_over_two_engines(platform: Platform) -> None:
    ports = [e.http_port for e in platform.engines]
    platform.deploy("spread", ports)
    a = fp32((1, 16), 5)
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.ravel().tolist()}]}
    url = f"{platform.gateway}/api/predict/spread/v2/models/identity_fp32/infer"

    def run(n: int) -> list[int]:
        with httpx.Client() as client:
            return [client.post(url, json=body).status_code for _ in range(n)]

    with ThreadPoolExecutor(4) as pool:
        codes = [c for chunk in pool.map(run, [50] * 4) for c in chunk]
    assert codes == [200] * 200
    counts = [
        platform.metric(
            f'elastiserve_gateway_instance_requests_total{{instance="127.0.0.1:{p}",service="spread"}}'
        )
        for p in ports
    ]
    assert sum(counts) >= 200 and min(counts) >= 50, counts  # (+ the deploy's readiness probe)


def test_retry_when_an_instance_port_is_dead(platform: Platform) -> None:
    dead = free_port()
    platform.deploy("deadport", [platform.engines[0].http_port, dead])
    url = f"{platform.gateway}/api/predict/deadport/v2/models/add_sub"
    with httpx.Client() as client:
        codes = [client.get(url).status_code for _ in range(30)]
    assert codes == [200] * 30
    assert (
        platform.metric('elastiserve_gateway_upstream_retries_total{reason="unreachable",service="deadport"}')
        >= 1
    )


def test_kill_9_of_an_instance_under_load_loses_no_request(platform: Platform, example_repo: Path) -> None:
    """In-flight inferences on the killed instance are retried (infer is idempotent), new ones
    find its port refused and go to the other instance."""
    with running_engine(example_repo, args=ENGINE_ARGS) as doomed:
        wait_http_ready(f"http://{doomed.http_url}/v2/health/ready", process=doomed.process)
        platform.deploy("killed", [platform.engines[1].http_port, doomed.http_port])
        url = f"{platform.gateway}/api/predict/killed/v2/models/identity_fp32/infer"
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
        stop = time.monotonic() + 1.5
        codes: list[int] = []

        def load() -> None:
            with httpx.Client() as client:
                while time.monotonic() < stop:
                    codes.append(client.post(url, json=body).status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        doomed.process.kill()
        for t in threads:
            t.join()
    assert len(codes) > 50 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert (
        platform.metric('elastiserve_gateway_upstream_retries_total{reason="unreachable",service="killed"}')
        >= 1
    )


def test_all_instances_dead_is_503_with_reason(platform: Platform) -> None:
    platform.deploy("alldead", [free_port(), free_port()])
    r = httpx.get(f"{platform.gateway}/api/predict/alldead/v2")
    assert r.status_code == 503
    assert "could be reached" in r.json()["error"] and "alldead" in r.json()["error"]


def test_no_ready_instance_is_503(platform: Platform) -> None:
    platform.deploy("noinst", [], wait=False)
    r = httpx.get(f"{platform.gateway}/api/predict/noinst/v2")
    assert r.status_code == 503
    assert r.json() == {"error": "service 'noinst' has no ready instance"}
    assert r.headers["retry-after"] == "1"


def test_retry_on_450_and_503_answers(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    busy, full, good = fake_instances("busy", 503), fake_instances("full", 450), fake_instances("good")
    platform.deploy("flaky", [busy.port, full.port, good.port])
    with httpx.Client() as client:
        replies = [
            client.post(f"{platform.gateway}/api/predict/flaky/v2/models/m/infer", content=b"{}")
            for _ in range(20)
        ]
    assert [r.status_code for r in replies] == [200] * 20
    assert {r.json()["instance"] for r in replies} == {"good"}
    assert busy.hits and full.hits  # they were tried, and their refusals retried elsewhere


def test_dropped_connection_retried_only_when_idempotent(
    platform: Platform, fake_instances: Callable[..., FakeInstance], dropping_instance: DroppingInstance
) -> None:
    good = fake_instances("after-drop")
    platform.deploy("dropper", [dropping_instance.port, good.port])
    infer = f"{platform.gateway}/api/predict/dropper/v2/models/m/infer"
    with httpx.Client() as client:
        assert all(client.post(infer, content=b"{}").status_code == 200 for _ in range(10))
    assert dropping_instance.accepted >= 1  # some went to the dropping instance and were retried
    # Alone, a non-idempotent request that may have run is not sent again.
    platform.deploy("dropper-alone", [dropping_instance.port])
    before = dropping_instance.accepted
    r = httpx.post(f"{platform.gateway}/api/predict/dropper-alone/v2/repository/models/m/load", content=b"{}")
    assert r.status_code == 502 and "not retried" in r.json()["error"]
    seq = httpx.post(infer.replace("dropper", "dropper-alone"), content=b'{"parameters":{"sequence_id":7}}')
    assert seq.status_code == 502
    time.sleep(0.1)
    assert dropping_instance.accepted - before == 2  # one attempt each


def test_response_ending_at_connection_close(platform: Platform) -> None:
    old_style = DroppingInstance(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close")
    try:
        platform.deploy("http10", [old_style.port], wait=False)
        r = httpx.get(f"{platform.gateway}/api/predict/http10/x")
        assert (r.status_code, r.text, r.headers["content-type"]) == (200, "body until close", "text/plain")
    finally:
        old_style.close()


def test_request_timeout_from_rpc_keepalive(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    fake = fake_instances("slow")
    platform.deploy("timeout", [fake.port], rpc={"keepalive": 300})
    started = time.monotonic()
    r = httpx.get(f"{platform.gateway}/api/predict/timeout/slow?s=3")
    assert r.status_code == 504 and "did not answer in time" in r.json()["error"]
    assert time.monotonic() - started < 2
    assert httpx.get(f"{platform.gateway}/api/predict/timeout/fast").status_code == 200


# -- refusals ---------------------------------------------------------------------------------------


def test_unknown_service_and_path_tricks(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    fake = fake_instances("tricks")
    platform.deploy("tricks", [fake.port])
    fake.hits.clear()  # the deploy's readiness probe
    gw = platform.gateway
    assert httpx.get(f"{gw}/api/predict/nosuchservice/v2").status_code == 404
    assert httpx.get(f"{gw}/api/predict/nosuchservice").json() == {
        "error": "service 'nosuchservice' not found"
    }
    assert httpx.get(f"{gw}/elsewhere").status_code == 404
    tricks = {
        "/api/predict/../tricks/v2": 400,
        "/api/predict/%2e%2e/tricks/v2": 400,
        "/api/predict/tricks%2fv2": 400,
        "/api/predict/Tricks/v2": 400,
        "/api/predict/tr%69cks/v2": 400,
        "/api/predict/tricks/v2/../../admin": 400,
        "/api/predict/tricks/v2/%2e%2e/%2E%2e/x": 400,
        "/api/predict/tricks/v2/.%2e/x": 400,
        "/api/predict/tricks/./v2": 400,
        "/api/predict/tricks/v2%2fmodels": 400,
        "/api/predict/tricks/v2%5cmodels": 400,
        "/api/predict/tricks/v2%00": 400,
        "/api/predict/tricks//v2": 400,
        "/api/predict/": 400,
        "/api/predictx/tricks/v2": 404,
    }
    got = {path: raw_status(gw, path) for path in tricks}
    assert got == tricks
    assert fake.hits == {}  # nothing reached the instance
    assert raw_status(gw, "/api/predict/tricks/v2/models/a..b/ready") == 200  # dots inside a name are fine


def test_oversize_body_is_413(platform: Platform, fake_instances: Callable[..., FakeInstance]) -> None:
    fake = fake_instances("big")
    platform.deploy("big", [fake.port])
    fake.hits.clear()
    r = httpx.post(f"{platform.gateway}/api/predict/big/v2/models/m/infer", content=b"x" * (MAX_BODY + 1))
    assert r.status_code == 413
    assert (
        httpx.post(
            f"{platform.gateway}/api/predict/big/v2/models/m/infer", content=b"x" * MAX_BODY
        ).status_code
        == 200
    )
    assert fake.hits == {"/v2/models/m/infer": 1}


def test_rate_limit_is_429(platform: Platform, fake_instances: Callable[..., FakeInstance]) -> None:
    fake = fake_instances("limited")
    platform.deploy("limited", [fake.port], rpc={"rate_limit": 5})
    time.sleep(1.1)  # the deploy's readiness probes used part of the budget; let it refill
    with httpx.Client() as client:
        codes = [client.get(f"{platform.gateway}/api/predict/limited/v2").status_code for _ in range(30)]
    assert 5 <= codes.count(200) <= 8, codes
    assert codes.count(429) == 30 - codes.count(200)
    assert (
        platform.metric('elastiserve_gateway_request_errors_total{reason="rate_limited",service="limited"}')
        >= 22
    )


def test_queue_full_is_450(platform: Platform, fake_instances: Callable[..., FakeInstance]) -> None:
    fake = fake_instances("queued")
    platform.deploy("queued", [fake.port], rpc={"max_queue_size": 1})
    url = f"{platform.gateway}/api/predict/queued"
    slow = threading.Thread(target=httpx.get, args=(f"{url}/slow?s=1",), kwargs={"timeout": 10})
    slow.start()
    deadline = time.monotonic() + 5
    while fake.hits.get("/slow", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    r = httpx.get(f"{url}/v2")
    assert r.status_code == 450 and "queue" in r.json()["error"]
    slow.join()
    assert httpx.get(f"{url}/v2").status_code == 200


# -- service groups ---------------------------------------------------------------------------------


def _group_split(platform: Platform, group: str, n: int, token: str | None = None) -> dict[str, int]:
    headers = {"Authorization": token} if token else {}
    counts: dict[str, int] = {}
    with httpx.Client() as client:
        for _ in range(n):
            r = client.get(f"{platform.gateway}/api/predict/{group}/echo", headers=headers)
            assert r.status_code == 200, r.text
            label = r.json()["instance"]
            counts[label] = counts.get(label, 0) + 1
    return counts


def test_canary_split_and_blue_green_switch(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    prod, canary = fake_instances("prod"), fake_instances("canary")
    platform.deploy("shop-prod", [prod.port], token=TOKEN, labels={"group": "shop", "group_weight": "90"})
    platform.deploy("shop-canary", [canary.port], labels={"group": "shop", "group_weight": "10"})
    counts = _group_split(platform, "shop", 400, TOKEN)
    assert 15 <= counts.get("canary", 0) <= 70, counts  # 10% of 400 = 40
    # The group needs a member's token; each member keeps its own endpoint.
    assert httpx.get(f"{platform.gateway}/api/predict/shop/echo").status_code == 401
    assert httpx.get(f"{platform.gateway}/api/predict/shop-canary/echo").json()["instance"] == "canary"
    # Blue-green: all traffic to the other side.
    for name, weight in (("shop-prod", "0"), ("shop-canary", "100")):
        spec = platform.store.get_service(name).spec.to_dict()
        spec["labels"]["group_weight"] = weight
        from elastiserve.controlplane.spec import parse_spec

        platform.store.update_service(parse_spec(spec))
    deadline = time.monotonic() + 5
    while _group_split(platform, "shop", 5, TOKEN) != {"canary": 5} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_split(platform, "shop", 50, TOKEN) == {"canary": 50}


def test_group_split_by_instance_count(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    big = [fake_instances(f"big{i}") for i in range(3)]
    small = fake_instances("small")
    platform.deploy("cnt-a", [f.port for f in big], labels={"group": "cnt"})
    platform.deploy("cnt-b", [small.port], labels={"group": "cnt"})
    counts = _group_split(platform, "cnt", 400)
    assert 50 <= counts.get("small", 0) <= 160, counts  # 1 of 4 instances: 100 expected


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics(platform: Platform, fake_instances: Callable[..., FakeInstance]) -> None:
    fake = fake_instances("metered")
    platform.deploy("metered", [fake.port], token=TOKEN)
    with httpx.Client() as client:
        for _ in range(7):
            assert (
                client.get(
                    f"{platform.gateway}/api/predict/metered/a", headers={"Authorization": TOKEN}
                ).status_code
                == 200
            )
        assert client.get(f"{platform.gateway}/api/predict/metered/a").status_code == 401
    text = platform.metrics()
    assert "# TYPE elastiserve_gateway_request_duration_seconds histogram" in text
    assert platform.metric('elastiserve_gateway_requests_total{code="200",service="metered"}') >= 7
    assert platform.metric('elastiserve_gateway_requests_total{code="401",service="metered"}') == 1
    assert (
        platform.metric('elastiserve_gateway_request_errors_total{reason="unauthorized",service="metered"}')
        == 1
    )
    assert platform.metric('elastiserve_gateway_request_duration_seconds_count{service="metered"}') >= 8
    assert platform.metric('elastiserve_gateway_requests_in_flight{service="metered"}') == 0
    assert platform.metric('elastiserve_gateway_instances{service="metered"}') == 1
    assert platform.metric('elastiserve_gateway_unrouted_requests_total{reason="unknown_service"}') >= 0
    health = httpx.get(f"{platform.gateway}/healthz").json()
    assert health["status"] == "ok" and health["catalog_loaded"] is True


def test_instance_leaving_stops_getting_traffic(
    platform: Platform, fake_instances: Callable[..., FakeInstance]
) -> None:
    one, two = fake_instances("one"), fake_instances("two")
    platform.deploy("scaled", [one.port, two.port])
    platform.set_instances("scaled", [two.port])  # the long-poll delivers the change at once
    platform.wait_ready("scaled", count=1)
    before = one.hits.copy()
    with httpx.Client() as client:
        labels = {
            client.get(f"{platform.gateway}/api/predict/scaled/x").json()["instance"] for _ in range(20)
        }
    assert labels == {"two"} and one.hits == before


def test_json_error_bodies(platform: Platform) -> None:
    r = httpx.get(f"{platform.gateway}/api/predict/nosuch2/v2")
    assert r.headers["content-type"] == "application/json"
    assert set(orjson.loads(r.content)) == {"error"}
