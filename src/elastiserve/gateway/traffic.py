"""What the gateway knows about services: tokens, limits, service groups and their traffic split.

Built from the control plane's service list (each entry's ``spec``), read tolerantly: only the
fields the gateway acts on are looked at, so a newer control plane with more fields still works.

Service groups (EAS's blue-green / canary mechanism), declared with two labels:

* ``labels.group``: the group's name. ``/api/predict/<group>`` splits traffic across the group's
  members; each member keeps its own ``/api/predict/<service>`` endpoint, which bypasses the
  split (EAS: test a new version with zero live traffic first).
* ``labels.group_weight``: the member's share, a whole number ≥ 0 (relative; need not add up to
  100). When no member gives one, traffic follows the members' ready instance counts (EAS's
  default: a one-instance canary next to a nine-instance production service gets 10%). When any
  member gives one, members without one get no group traffic (EAS: a service joins a group with
  no traffic until it is given a share).

Members without ready instances are skipped, so stopping a canary returns all traffic to the
others. Blue-green is ``group_weight`` 100 on one member and 0 on the other, switched by
modifying both; canary is e.g. 90/10. A name that is both a service and a group means the
group only when that service is itself a member (the "production service keeps its URL and a
canary joins its group" pattern); otherwise the service wins.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from elastiserve.controlplane.spec import NAME_RE, REDACTED
from elastiserve.gateway import auth
from elastiserve.gateway.balancing import Balancer
from elastiserve.gateway.stats import ServiceStats
from elastiserve.gateway.upstream import UpstreamConnection

log = logging.getLogger(__name__)

__all__ = [
    "GROUP_LABEL",
    "GROUP_WEIGHT_LABEL",
    "Group",
    "Service",
    "ServiceConfig",
    "TokenBucket",
    "TrafficTable",
]

GROUP_LABEL: Final = "group"
GROUP_WEIGHT_LABEL: Final = "group_weight"
# model_entry is read as the default model only when it looks like a model name, not a file.
_FILE_SUFFIXES: Final = (
    ".py",
    ".onnx",
    ".pt",
    ".pth",
    ".json",
    ".txt",
    ".pkl",
    ".joblib",
    ".bin",
    ".zip",
    ".tar.gz",
)


@dataclass(frozen=True)
class ServiceConfig:
    """The gateway-relevant part of one service's spec."""

    name: str
    token_digest: bytes | None = None
    token_hidden: bool = False  # the control plane redacted the token: we cannot check it
    running: bool = True
    rate_limit: int | None = None
    max_queue_size: int | None = None
    timeout: float | None = None  # metadata.rpc.keepalive, seconds
    enable_grpc: bool = False
    group: str | None = None
    group_weight: int | None = None
    default_model: str | None = None  # explicit (triton processor's model_entry)
    custom: bool = False  # containers: no V2 default-model mapping

    @classmethod
    def from_view(cls, view: Mapping[str, Any]) -> ServiceConfig:
        """From one entry of ``GET /api/v2/services``."""
        spec: Mapping[str, Any] = view.get("spec") or {}
        name = str(view.get("name") or spec.get("name") or "")
        token = spec.get("token")
        metadata: Mapping[str, Any] = spec.get("metadata") or {}
        rpc: Mapping[str, Any] = metadata.get("rpc") or {}
        labels: Mapping[str, Any] = spec.get("labels") or {}
        group = labels.get(GROUP_LABEL)
        if group is not None and not (isinstance(group, str) and NAME_RE.match(group)):
            log.warning("service %s: label group=%r is not a valid name; ignored", name, group)
            group = None
        weight = _weight(name, labels.get(GROUP_WEIGHT_LABEL))
        keepalive = rpc.get("keepalive")
        model_entry = spec.get("model_entry")
        default_model = None
        if (
            spec.get("processor") == "triton"
            and isinstance(model_entry, str)
            and model_entry
            and "/" not in model_entry
            and not model_entry.endswith(_FILE_SUFFIXES)
        ):
            default_model = model_entry
        return cls(
            name=name,
            token_digest=auth.digest(token)
            if isinstance(token, str) and token and token != REDACTED
            else None,
            token_hidden=token == REDACTED,
            running=view.get("desired", "running") == "running",
            rate_limit=_positive(rpc.get("rate_limit")),
            max_queue_size=_positive(rpc.get("max_queue_size")),
            timeout=keepalive / 1000.0 if isinstance(keepalive, int | float) and keepalive > 0 else None,
            enable_grpc=bool(metadata.get("enable_grpc", False)),
            group=group,
            group_weight=weight,
            default_model=default_model,
            custom=spec.get("containers") is not None,
        )


def _positive(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _weight(service: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        weight = int(str(value).strip())
    except ValueError:
        weight = -1
    if weight < 0:
        log.warning(
            "service %s: label group_weight=%r is not a whole number >= 0; treated as 0", service, value
        )
        return 0
    return weight


class TokenBucket:
    """``rate`` requests a second with bursts of up to one second's worth (at least 1)."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, self.rate)
        self._tokens = self.burst
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class Service:
    """One service: its config, its instances and their balancer, limits and statistics."""

    def __init__(self, config: ServiceConfig, busy: set[UpstreamConnection], **pool: Any) -> None:
        self.name = config.name
        self.config = config
        self.balancer = Balancer(busy, **pool)
        self.stats = ServiceStats()
        self.limiter: TokenBucket | None = None
        self.expected_tokens: tuple[bytes, ...] = ()
        self.endpoints_known = asyncio.Event()  # set once the first endpoint list arrived
        self.endpoints_etag: str | None = None
        self.default_model: str | None = None  # learned from an instance's repository index
        self.default_model_task: asyncio.Task[str] | None = None
        self.apply(config)

    def apply(self, config: ServiceConfig) -> None:
        """Take a new config (spec change); keeps the balancer, statistics and rate-limit state
        when the limit is unchanged."""
        old = self.config
        self.config = config
        self.expected_tokens = (config.token_digest,) if config.token_digest else ()
        if config.rate_limit is None:
            self.limiter = None
        elif self.limiter is None or old.rate_limit != config.rate_limit:
            self.limiter = TokenBucket(config.rate_limit)
        if old.default_model != config.default_model or old.custom != config.custom:
            self.forget_default_model()

    def set_endpoints(self, endpoints: Iterable[Mapping[str, Any]], etag: str | None) -> None:
        self.balancer.update(endpoints)
        self.endpoints_etag = etag
        self.endpoints_known.set()
        # A new instance set may serve another repository (a rolling update): ask again.
        self.forget_default_model()

    def forget_default_model(self) -> None:
        # Not cancelled: requests awaiting a lookup under way still get its answer.
        self.default_model = None
        self.default_model_task = None

    def close(self) -> None:
        self.forget_default_model()
        self.balancer.close()


@dataclass
class Group:
    """Services sharing ``labels.group``; ``pick`` draws the member for one request."""

    name: str
    members: list[Service] = field(default_factory=list)
    expected_tokens: tuple[bytes, ...] = ()
    _random: Any = field(default_factory=lambda: random.Random().random)

    def refresh(self) -> None:
        """Recompute the accepted tokens: any member's token; open only when every member is."""
        self.expected_tokens = tuple(t for m in self.members for t in m.expected_tokens)

    def shares(self) -> list[tuple[Service, float]]:
        """Each member's current share of group traffic (members without ready instances get 0)."""
        weighted = any(m.config.group_weight is not None for m in self.members)
        shares = []
        for member in self.members:
            ready = len(member.balancer)
            if ready == 0 or not member.config.running:
                share = 0.0
            elif weighted:
                share = float(member.config.group_weight or 0)
            else:
                share = float(ready)
            shares.append((member, share))
        return shares

    def pick(self) -> Service | None:
        """A member drawn by share; when no member has a share (all weights 0, or nothing ready),
        the first member, whose endpoint then answers (503 with its reason)."""
        shares = self.shares()
        total = sum(s for _, s in shares)
        if total <= 0:
            return self.members[0] if self.members else None
        point = self._random() * total
        for member, share in shares:
            point -= share
            if point < 0 and share > 0:
                return member
        return next(m for m, s in reversed(shares) if s > 0)


class TrafficTable:
    """Every known service and group, by name; replaced as a whole on each catalog refresh."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.groups: dict[str, Group] = {}
        self.loaded = False  # a service list was read from the control plane at least once

    def resolve(self, name: str) -> Service | Group | None:
        """The service or group ``/api/predict/<name>`` means (see the module doc for clashes)."""
        group = self.groups.get(name)
        if group is not None:
            return group
        return self.services.get(name)

    def rebuild_groups(self) -> None:
        groups: dict[str, Group] = {}
        for service in sorted(self.services.values(), key=lambda s: s.name):
            name = service.config.group
            if name is None:
                continue
            owner = self.services.get(name)
            if owner is not None and owner.config.group != name:
                log.warning(
                    "group %s has the name of service %s, which is not a member: the name means the service",
                    name,
                    name,
                )
                continue
            groups.setdefault(name, Group(name)).members.append(service)
        for group in groups.values():
            group.refresh()
        self.groups = groups
