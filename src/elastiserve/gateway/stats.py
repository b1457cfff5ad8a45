"""Per-service request statistics and their Prometheus exposition (``GET /metrics``).

The request path only bumps plain integers (a prometheus-client ``labels().inc()`` takes a lock
and a dict lookup per call, which at tens of thousands of requests a second is measurable);
a custom collector turns them into metric families when ``/metrics`` is scraped, through
prometheus-client's exposition code, so the text format is the standard one.

Metric names (all ``elastiserve_gateway_*``):

* ``requests_total{service,code}``: answered requests routed to a service, by status code
  (including the gateway's own 401/403/429/450/502/503/504);
* ``request_errors_total{service,reason}``: requests the gateway failed or refused, by reason
  (``unauthorized``, ``forbidden``, ``rate_limited``, ``queue_full``, ``no_instance``,
  ``unreachable``, ``dropped``, ``timeout``, ``bad_response``, ``upstream_5xx``);
* ``request_duration_seconds{service}``: histogram of gateway-side latency;
* ``requests_in_flight{service}``: gauge;
* ``upstream_retries_total{service,reason}``: attempts sent again to another instance;
* ``instances{service}``: ready instances known to the gateway;
* ``instance_requests_total{service,instance}``, ``instance_requests_in_flight{service,instance}``;
* ``group_requests_total{group,service}``: traffic split of service groups;
* ``unrouted_requests_total{reason}``: requests that named no service (404, 400), kept apart so
  arbitrary names in URLs cannot create label values.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from elastiserve.gateway.traffic import Service

__all__ = ["BUCKETS", "CONTENT_TYPE_LATEST", "GatewayCollector", "ServiceStats", "render"]

#: Latency histogram upper bounds, seconds (a proxied identity call is ~1 ms; LLM calls are seconds).
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceStats:
    """Counters of one service; survives endpoint changes and spec changes of that service."""

    __slots__ = ("buckets", "codes", "errors", "group_requests", "in_flight", "latency_sum", "retries")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        self.group_requests: dict[str, int] = {}
        self.in_flight = 0
        self.buckets = [0] * (len(BUCKETS) + 1)  # last slot: +Inf
        self.latency_sum = 0.0

    def observe(self, status: int, seconds: float) -> None:
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    @property
    def requests(self) -> int:
        return sum(self.codes.values())


class GatewayCollector(Collector):
    """Reads :class:`ServiceStats` of every known service at scrape time."""

    def __init__(self, services: Callable[[], Iterable[Service]], unrouted: dict[str, int]) -> None:
        self._services = services
        self._unrouted = unrouted

    def collect(self) -> Iterator[Metric]:
        p = "elastiserve_gateway_"
        requests = CounterMetricFamily(
            p + "requests", "Requests answered, by service and status code", labels=["service", "code"]
        )
        errors = CounterMetricFamily(
            p + "request_errors",
            "Requests failed or refused by the gateway, by reason",
            labels=["service", "reason"],
        )
        retries = CounterMetricFamily(
            p + "upstream_retries", "Requests sent again to another instance", labels=["service", "reason"]
        )
        in_flight = GaugeMetricFamily(p + "requests_in_flight", "Requests being handled", labels=["service"])
        instances = GaugeMetricFamily(
            p + "instances", "Ready instances known to the gateway", labels=["service"]
        )
        latency = HistogramMetricFamily(
            p + "request_duration_seconds", "Gateway-side request latency", labels=["service"]
        )
        inst_requests = CounterMetricFamily(
            p + "instance_requests", "Attempts sent to an instance", labels=["service", "instance"]
        )
        inst_in_flight = GaugeMetricFamily(
            p + "instance_requests_in_flight",
            "Requests in flight to an instance",
            labels=["service", "instance"],
        )
        groups = CounterMetricFamily(
            p + "group_requests",
            "Requests to a service group, by the member that got them",
            labels=["group", "service"],
        )
        unrouted = CounterMetricFamily(
            p + "unrouted_requests", "Requests that named no service", labels=["reason"]
        )
        for service in self._services():
            name, stats = service.name, service.stats
            for code, count in sorted(stats.codes.items()):
                requests.add_metric([name, str(code)], count)
            for reason, count in sorted(stats.errors.items()):
                errors.add_metric([name, reason], count)
            for reason, count in sorted(stats.retries.items()):
                retries.add_metric([name, reason], count)
            for group, count in sorted(stats.group_requests.items()):
                groups.add_metric([group, name], count)
            in_flight.add_metric([name], stats.in_flight)
            instances.add_metric([name], len(service.balancer))
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([name], buckets, stats.latency_sum)
            for inst in service.balancer.instances:
                inst_requests.add_metric([name, inst.key], inst.requests)
                inst_in_flight.add_metric([name, inst.key], inst.outstanding)
        for reason, count in sorted(self._unrouted.items()):
            unrouted.add_metric([reason], count)
        yield from (
            requests,
            errors,
            retries,
            in_flight,
            instances,
            latency,
            inst_requests,
            inst_in_flight,
            groups,
            unrouted,
        )


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
