"""The gateway's pure parts: paths, idempotency, tokens, spec reading, groups, limits, balancing."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from elastiserve.gateway import auth
from elastiserve.gateway.balancing import QUEUE_FULL, Balancer
from elastiserve.gateway.routing import RouteError, is_idempotent, split_predict_path
from elastiserve.gateway.traffic import Group, Service, ServiceConfig, TokenBucket, TrafficTable


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/predict/svc", ("svc", "")),
        ("/api/predict/svc/", ("svc", "")),
        ("/api/predict/svc/v2/models/m/infer", ("svc", "/v2/models/m/infer")),
        ("/api/predict/svc/v2/models/a.b/ready", ("svc", "/v2/models/a.b/ready")),
        ("/api/predict/svc/v2/models/%61/ready", ("svc", "/v2/models/%61/ready")),  # passed on encoded
        ("/api/predict/svc/x/", ("svc", "/x/")),
    ],
)
def test_split_predict_path(path: str, expected: tuple[str, str]) -> None:
    assert split_predict_path(path) == expected


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/other", 404),
        ("/api/predict/", 400),
        ("/api/predict/..", 400),
        ("/api/predict/%2e%2e/x", 400),
        ("/api/predict/UPPER", 400),
        ("/api/predict/a.b", 400),
        ("/api/predict/svc/../x", 400),
        ("/api/predict/svc/%2E%2e/x", 400),
        ("/api/predict/svc/.", 400),
        ("/api/predict/svc/a%2Fb", 400),
        ("/api/predict/svc/a%5cb", 400),
        ("/api/predict/svc/a\\b", 400),
        ("/api/predict/svc/a%00", 400),
        ("/api/predict/svc//a", 400),
    ],
)
def test_split_predict_path_refuses(path: str, status: int) -> None:
    with pytest.raises(RouteError) as info:
        split_predict_path(path)
    assert info.value.status == status


def test_is_idempotent() -> None:
    assert is_idempotent("GET", "/v2/models/m", b"", None)
    assert is_idempotent("POST", "/v2/models/m/infer", b'{"inputs": []}', None)
    assert is_idempotent("POST", "/v2/models/m/versions/2/infer", b"{}", None)
    assert not is_idempotent("POST", "/v2/models/m/infer", b'{"parameters": {"sequence_id": 3}}', None)
    # Only the JSON header counts: binary tensor bytes that happen to spell it do not.
    assert is_idempotent("POST", "/v2/models/m/infer", b"{}" + b"sequence_id", 2)
    assert not is_idempotent("POST", "/v2/repository/models/m/load", b"{}", None)
    assert not is_idempotent("POST", "/custom", b"", None)


def test_auth_check() -> None:
    expected = [auth.digest("secret-token-1")]
    assert auth.check(None, []) == auth.AUTH_OK
    assert auth.check(None, expected) == auth.AUTH_REQUIRED
    assert auth.check(b"   ", expected) == auth.AUTH_REQUIRED
    assert auth.check(b"secret-token-1", expected) == auth.AUTH_OK
    assert auth.check(b"Bearer secret-token-1", expected) == auth.AUTH_OK
    assert auth.check(b"bearer   secret-token-1 ", expected) == auth.AUTH_OK
    assert auth.check(b"secret-token-2", expected) == auth.AUTH_FORBIDDEN
    assert auth.check(b"secret-token-2", [*expected, auth.digest("secret-token-2")]) == auth.AUTH_OK


def view(name: str, **spec: Any) -> dict[str, Any]:
    return {"name": name, "desired": spec.pop("desired", "running"), "spec": {"name": name, **spec}}


def test_service_config_from_view() -> None:
    config = ServiceConfig.from_view(
        view(
            "svc",
            processor="triton",
            token="secret-token-1",
            model_entry="add_sub",
            labels={"group": "grp", "group_weight": "30"},
            metadata={"enable_grpc": True, "rpc": {"rate_limit": 10, "max_queue_size": 4, "keepalive": 1500}},
            future_field={"ignored": True},  # a newer control plane's field: not an error here
        )
    )
    assert config.token_digest == auth.digest("secret-token-1") and not config.token_hidden
    assert (config.rate_limit, config.max_queue_size, config.timeout) == (10, 4, 1.5)
    assert (config.group, config.group_weight, config.enable_grpc) == ("grp", 30, True)
    assert config.default_model == "add_sub"
    hidden = ServiceConfig.from_view(view("svc", processor="triton", token="********"))
    assert hidden.token_hidden and hidden.token_digest is None
    assert (
        ServiceConfig.from_view(view("py", processor="python", model_entry="model.py")).default_model is None
    )
    assert ServiceConfig.from_view(view("t", processor="triton", model_entry="m.onnx")).default_model is None
    assert ServiceConfig.from_view(view("c", containers=[{"command": "x", "port": 1}])).custom
    assert not ServiceConfig.from_view(view("s", desired="stopped")).running
    odd = ServiceConfig.from_view(view("o", labels={"group": "Bad Name", "group_weight": "-3"}))
    assert (odd.group, odd.group_weight) == (None, 0)


def test_token_bucket() -> None:
    bucket = TokenBucket(5)
    assert sum(bucket.take() for _ in range(20)) == 5
    time.sleep(0.45)
    assert 1 <= sum(bucket.take() for _ in range(20)) <= 3


def _endpoints(*ports: int, weights: list[int] | None = None) -> list[dict[str, Any]]:
    return [
        {"ip": "127.0.0.1", "port": p, "weight": (weights or [100] * len(ports))[i]}
        for i, p in enumerate(ports)
    ]


async def test_balancer_prefers_the_less_loaded() -> None:
    balancer = Balancer(set(), rng=random.Random(1))
    balancer.update(_endpoints(1, 2, 3, 4))
    a, b, c, d = balancer.instances
    a.outstanding, b.outstanding, c.outstanding, d.outstanding = 9, 9, 9, 0
    picks = [balancer.pick() for _ in range(400)]
    # d wins every draw it is part of (7 in 16 of them), and never loses to a busier one.
    assert 0.3 < picks.count(d) / 400 < 0.6
    assert balancer.pick(exclude={a, b, c}) is d
    assert balancer.pick(exclude={a, b, c, d}) is None
    assert balancer.pick(max_outstanding=9) is d  # the full ones are skipped
    d.outstanding = 9
    assert balancer.pick(max_outstanding=9) is QUEUE_FULL


async def test_balancer_weights_and_health() -> None:
    balancer = Balancer(set(), rng=random.Random(2))
    balancer.update(_endpoints(1, 2, weights=[100, 25]))
    heavy, light = balancer.instances
    counts = {heavy.key: 0, light.key: 0}
    for _ in range(2000):
        inst = balancer.pick()
        assert inst is heavy or inst is light
        counts[inst.key] += 1
        inst.outstanding += 1  # load builds up in proportion to what each was sent
    assert 3 < counts[heavy.key] / counts[light.key] < 6
    heavy.outstanding = light.outstanding = 0
    heavy.mark_unreachable(time.monotonic())
    assert all(balancer.pick() is light for _ in range(20))
    heavy.mark_reachable()
    # Instances that stay keep their state; those that leave are dropped.
    heavy.outstanding = 3
    balancer.update(_endpoints(1, 5))
    assert balancer.instances[0] is heavy and balancer.instances[0].outstanding == 3
    assert [i.port for i in balancer.instances] == [1, 5]


async def test_group_shares_and_resolution() -> None:
    busy: set[Any] = set()
    table = TrafficTable()

    def add(name: str, ports: list[int], **labels: str) -> Service:
        service = Service(ServiceConfig.from_view(view(name, labels=labels)), busy)
        service.set_endpoints(_endpoints(*ports), "x")
        table.services[name] = service
        return service

    prod = add("prod", [1, 2, 3], group="shop")
    canary = add("canary", [4], group="shop")
    add("lonely", [5], group="other")
    table.rebuild_groups()
    group = table.resolve("shop")
    assert isinstance(group, Group)
    assert [(m.name, s) for m, s in group.shares()] == [("canary", 1.0), ("prod", 3.0)]  # by instances
    prod.apply(ServiceConfig.from_view(view("prod", labels={"group": "shop", "group_weight": "90"})))
    canary.apply(ServiceConfig.from_view(view("canary", labels={"group": "shop", "group_weight": "10"})))
    table.rebuild_groups()
    group = table.resolve("shop")
    assert isinstance(group, Group)
    picks = [group.pick() for _ in range(2000)]
    assert 0.06 < picks.count(canary) / 2000 < 0.14
    canary.set_endpoints([], "y")  # a canary with nothing ready gets nothing
    assert all(group.pick() is prod for _ in range(50))
    # A service named like a group it does not belong to keeps its name.
    add("other", [6])
    table.rebuild_groups()
    assert table.resolve("other") is table.services["other"]
    assert table.resolve("lonely") is table.services["lonely"]


# -- upstream: whole responses taken without the parser ---------------------------------------------


def test_whole_response_fast_path_takes_only_plain_complete_answers() -> None:
    from elastiserve.gateway.upstream import _whole_response

    ok = _whole_response(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    assert ok is not None
    assert (ok.status, ok.headers, ok.body, ok.keep_alive) == (
        200,
        b"Content-Type: application/json\r\n",
        b"{}",
        True,
    )
    error = _whole_response(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    assert error is not None and error.status == 400 and error.body == b""
    for other in (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{}",  # partial body
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{}",  # more bytes than the body
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n",  # partial head
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length : 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\nb\r\ncontent-length: 0\r\n\r\n",  # a bare LF: no header smuggling
        b"HTTP/1.1 200 OK\r\nx: a\rb\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon\r\ncontent-length: 0\r\n\r\n",
    ):
        assert _whole_response(other) is None, other
