"""The engine's Prometheus metrics, with Triton's names and labels.

Values are read from the per-model :class:`~elastiserve.engine.stats.ModelStats` at scrape
time by a custom collector, so the hot path pays nothing for metrics and ``/metrics`` always
agrees with the statistics extension. Process CPU and memory come from prometheus-client's
process collector plus Triton's ``nv_cpu_*`` gauges.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from elastiserve.engine.registry import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name, help, attribute of ModelStats or a Duration attribute path, unit divisor)
_COUNTERS = [
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        "success.count",
        1,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        "inference_count",
        1,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        "execution_count",
        1,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        "success.ns",
        1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        "queue.ns",
        1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        "compute_input.ns",
        1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        "compute_infer.ns",
        1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include cached requests)",
        "compute_output.ns",
        1000,
    ),
    ("nv_cache_num_hits_per_model", "Number of cache hits per model", "cache_hit.count", 1),
    ("nv_cache_num_misses_per_model", "Number of cache misses per model", "cache_miss.count", 1),
    (
        "nv_cache_hit_duration_per_model",
        "Total cache hit duration per model, in microseconds",
        "cache_hit.ns",
        1000,
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Total cache miss (insert+lookup) duration per model, in microseconds",
        "cache_miss.ns",
        1000,
    ),
]

_FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


def _read(stats: object, path: str) -> int:
    value: object = stats
    for part in path.split("."):
        value = getattr(value, part)
    return int(value)  # type: ignore[call-overload]


class EngineCollector:
    """Collects ``nv_*`` metrics from the registry's live statistics."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.process = psutil.Process()
        self.process.cpu_percent(None)

    def _all_stats(self) -> list:
        return [m.stats for entry in self.registry.models.values() for m in entry.versions.values()]

    def collect(self) -> Iterator[Metric]:
        all_stats = self._all_stats()
        for name, doc, path, divisor in _COUNTERS:
            metric = Metric(name, doc, "counter")
            for stats in all_stats:
                metric.add_sample(
                    name, {"model": stats.name, "version": stats.version}, _read(stats, path) // divisor
                )
            yield metric
        failure = Metric(
            "nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "counter"
        )
        for stats in all_stats:
            for reason in _FAILURE_REASONS:
                failure.add_sample(
                    "nv_inference_request_failure",
                    {"model": stats.name, "reason": reason, "version": stats.version},
                    stats.failures_by_reason.get(reason, 0),
                )
        yield failure
        pending = Metric(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
            "gauge",
        )
        for stats in all_stats:
            pending.add_sample(
                "nv_inference_pending_request_count",
                {"model": stats.name, "version": stats.version},
                stats.pending,
            )
        yield pending
        memory = psutil.virtual_memory()
        for name, doc, value in (
            ("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", psutil.cpu_percent(None) / 100.0),
            ("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", memory.total),
            ("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", memory.total - memory.available),
            (
                "elastiserve_process_cpu_utilization",
                "CPU used by this server process since the last scrape, in cores",
                self.process.cpu_percent(None) / 100.0,
            ),
        ):
            metric = Metric(name, doc, "gauge")
            metric.add_sample(name, {}, value)
            yield metric


class EngineMetrics:
    """The registry behind ``--metrics-port``'s ``/metrics``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.prometheus = CollectorRegistry()
        ProcessCollector(registry=self.prometheus)
        self.prometheus.register(EngineCollector(registry))  # type: ignore[arg-type]

    def render(self) -> bytes:
        text = generate_latest(self.prometheus)
        # Custom metrics of Python models (pb_utils.MetricFamily), only once that backend is in use:
        # importing it here would load it into every engine.
        python_backend = sys.modules.get("elastiserve.engine.backends.python")
        if python_backend is not None:
            text += python_backend.custom_metrics_text().encode()
        return text
