"""Choosing an instance: least outstanding requests over two random choices, with passive health.

Power of two choices (pick two instances at random, send to the one with fewer requests in
flight) gets within a constant of the best possible load spread while reading only two
counters, and, unlike a global least-loaded scan, does not make every gateway herd onto the
same instance. Weights from the control plane (``{ip, port, weight}``) bias the random draw
and scale the load comparison, so a weight-50 instance gets half the traffic of a weight-100
one.

Passive health: an instance that refuses a connection is left out for a short, growing
time (0.25 s doubling to 8 s) instead of being tried by every request; when every instance is
out, they are tried anyway (better a retry than a certain 503).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

from elastiserve.gateway.upstream import ConnectionPool, UpstreamConnection

__all__ = ["QUEUE_FULL", "Balancer", "Instance"]

_BACKOFF_FIRST: Final = 0.25
_BACKOFF_MAX: Final = 8.0


class Instance:
    """One ready instance as the gateway sees it: address, weight, load and connections."""

    __slots__ = (
        "down_until",
        "failures",
        "grpc_port",
        "host",
        "key",
        "outstanding",
        "pool",
        "port",
        "requests",
        "weight",
    )

    def __init__(self, host: str, port: int, weight: int, busy: set[UpstreamConnection], **pool: Any) -> None:
        self.host = host
        self.port = port
        self.key = f"{host}:{port}"
        self.weight = max(0, int(weight))
        self.outstanding = 0
        self.requests = 0
        self.failures = 0
        self.down_until = 0.0
        self.grpc_port: int | None = None  # published by the control plane for enable_grpc services
        self.pool = ConnectionPool(host, port, busy, **pool)

    def mark_unreachable(self, now: float) -> None:
        """A connection was refused: leave this instance out for a while (exponential backoff)."""
        self.failures += 1
        self.down_until = now + min(_BACKOFF_FIRST * (2 ** (self.failures - 1)), _BACKOFF_MAX)

    def mark_reachable(self) -> None:
        self.failures = 0
        self.down_until = 0.0

    def __repr__(self) -> str:
        return f"Instance({self.key}, weight={self.weight}, outstanding={self.outstanding})"


class _QueueFull:
    """Sentinel: instances exist but every one has ``max_queue_size`` requests in flight."""

    def __repr__(self) -> str:
        return "QUEUE_FULL"


QUEUE_FULL: Final = _QueueFull()


class Balancer:
    """The ready instances of one service and the choice among them."""

    def __init__(
        self, busy: set[UpstreamConnection], *, rng: random.Random | None = None, **pool: Any
    ) -> None:
        self._busy = busy
        self._pool_options = pool
        self._random = (rng or random.Random()).random
        self.instances: list[Instance] = []
        self._by_key: dict[str, Instance] = {}
        self._uniform = True
        self._cum_weights: list[int] = []

    def __len__(self) -> int:
        return len(self.instances)

    def update(self, endpoints: Iterable[Mapping[str, Any]]) -> None:
        """Replace the instance set; instances that stay keep their counters and connections,
        instances that leave have their idle connections closed (in-flight requests finish)."""
        fresh: dict[str, Instance] = {}
        for ep in endpoints:
            host, port = str(ep.get("ip") or ""), int(ep.get("port") or 0)
            if not host or port <= 0:
                continue
            weight = int(ep.get("weight", 100) if ep.get("weight") is not None else 100)
            key = f"{host}:{port}"
            inst = self._by_key.get(key)
            if inst is None:
                inst = Instance(host, port, weight, self._busy, **self._pool_options)
            else:
                inst.weight = max(0, weight)
            grpc_port = ep.get("grpc_port")
            inst.grpc_port = int(grpc_port) if isinstance(grpc_port, int) and grpc_port > 0 else None
            fresh[key] = inst
        for key, old in self._by_key.items():
            if key not in fresh:
                old.pool.close()
        self._by_key = fresh
        self.instances = list(fresh.values())
        weights = [i.weight for i in self.instances]
        self._uniform = len(set(weights)) <= 1
        total = 0
        self._cum_weights = []
        for w in weights:
            total += w
            self._cum_weights.append(total)

    def close(self) -> None:
        for inst in self.instances:
            inst.pool.close()
        self.instances = []
        self._by_key = {}

    def pick(
        self, exclude: set[Instance] | None = None, max_outstanding: int | None = None
    ) -> Instance | _QueueFull | None:
        """An instance for the next attempt: the less loaded of two random healthy ones.

        ``exclude`` holds instances this request already tried. With ``max_outstanding`` (the
        service's ``rpc.max_queue_size``), a full choice falls back to the least loaded instance,
        and :data:`QUEUE_FULL` comes back when every instance is full. None: nothing to try.
        """
        instances = self.instances
        n = len(instances)
        if n == 0:
            return None
        now = time.monotonic()
        if exclude is None and n <= 2:
            a = instances[0]
            b = instances[1] if n == 2 else a
            if n == 2 and self._random() < 0.5:
                a, b = b, a  # ties (both idle) must not always favour the first
            if a.down_until > now or b.down_until > now:
                choice = self._pick_among(instances, now)
            else:
                choice = a if self._lighter(a, b) else b
        elif exclude is None and self._uniform:
            rand = self._random
            a = instances[int(rand() * n)]
            b = instances[int(rand() * n)]
            if a.down_until > now or b.down_until > now:
                choice = self._pick_among(instances, now)
            else:
                choice = a if self._lighter(a, b) else b
        else:
            candidates = instances if exclude is None else [i for i in instances if i not in exclude]
            if not candidates:
                return None
            choice = self._pick_among(candidates, now)
        if choice is None:
            return None
        if max_outstanding is not None and choice.outstanding >= max_outstanding:
            pool = instances if exclude is None else [i for i in instances if i not in exclude]
            least = min(pool, key=lambda i: i.outstanding, default=None)
            if least is None or least.outstanding >= max_outstanding:
                return QUEUE_FULL
            choice = least
        return choice

    def _pick_among(self, candidates: list[Instance], now: float) -> Instance | None:
        healthy = [i for i in candidates if i.down_until <= now] or candidates
        healthy = [i for i in healthy if i.weight > 0] or healthy
        if len(healthy) == 1:
            return healthy[0]
        a = self._draw(healthy)
        b = self._draw(healthy)
        return a if self._lighter(a, b) else b

    def _draw(self, candidates: list[Instance]) -> Instance:
        if self._uniform or len(candidates) != len(self.instances):
            weights_equal = len({i.weight for i in candidates}) <= 1
            if weights_equal:
                return candidates[int(self._random() * len(candidates))]
            total = sum(i.weight for i in candidates)
            point = self._random() * total
            for inst in candidates:
                point -= inst.weight
                if point < 0:
                    return inst
            return candidates[-1]
        point = self._random() * self._cum_weights[-1]
        for index, upto in enumerate(self._cum_weights):
            if point < upto:
                return self.instances[index]
        return self.instances[-1]

    @staticmethod
    def _lighter(a: Instance, b: Instance) -> bool:
        """True when ``a`` carries less load per unit of weight than ``b`` (ties go to ``a``)."""
        if a.weight == b.weight:
            return a.outstanding <= b.outstanding
        # a.outstanding / a.weight <= b.outstanding / b.weight, without division (weights may be 0).
        return (a.outstanding + 1) * b.weight <= (b.outstanding + 1) * a.weight
