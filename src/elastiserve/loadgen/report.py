"""From raw samples to the numbers people read: throughput, percentiles, errors, generator CPU.

Percentiles are exact (numpy over every latency kept), not histogram buckets: a run keeps at
most a few million floats. One :class:`LevelResult` per measured point; a report is a list of
them plus what was measured (target, workload, generator). Output as a table (rich), JSON
(everything) or CSV (one flat row per level, for spreadsheets and ``bench/``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from elastiserve.loadgen.runner import LevelSpec, Sample

__all__ = ["BOTTLENECK_CPU", "LevelResult", "Report", "summarize"]

BOTTLENECK_CPU = 0.9  # of one core, per generator process: above it the generator may be the limit
PERCENTILES = (50, 90, 95, 99)
LATE_MS = 1.0  # open loop: a request dispatched this late behind its schedule counts as late


@dataclass
class LevelResult:
    mode: str  # closed | open
    concurrency: int | None
    rate: float | None
    duration_s: float
    requests: int  # successful requests started in the window
    errors: dict[str, int]
    throughput_rps: float
    latency_ms: dict[str, float]  # min mean p50 p90 p95 p99 max
    generator_cpu: float  # cores used by the generator (all worker processes) over the window
    generator_workers: int
    generator_bottleneck: bool
    sent: int = 0
    schedule: dict[str, float] | None = None  # open loop: asked/achieved rate, dispatch lag
    warnings: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def summarize(spec: LevelSpec, sample: Sample) -> LevelResult:
    lat = sample.latencies * 1000.0
    if lat.size:
        values = np.percentile(lat, PERCENTILES)
        latency = {"min": float(lat.min()), "mean": float(lat.mean())}
        latency |= {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
        latency["max"] = float(lat.max())
    else:
        latency = {k: float("nan") for k in ("min", "mean", *(f"p{p}" for p in PERCENTILES), "max")}
    duration = sample.duration or spec.duration
    cpu = sample.cpu_seconds / duration if duration else 0.0
    per_worker = cpu / max(1, sample.workers)
    result = LevelResult(
        mode="open" if spec.rate is not None else "closed",
        concurrency=spec.concurrency,
        rate=spec.rate,
        duration_s=duration,
        requests=int(lat.size),
        errors=dict(sorted(sample.errors.items(), key=lambda kv: -kv[1])),
        throughput_rps=lat.size / duration if duration else 0.0,
        latency_ms={k: round(v, 4) for k, v in latency.items()},
        generator_cpu=round(cpu, 3),
        generator_workers=sample.workers,
        generator_bottleneck=per_worker > BOTTLENECK_CPU,
        sent=sample.sent,
    )
    if result.generator_bottleneck:
        result.warnings.append(
            f"the generator used {per_worker:.0%} of a core per process: it may be the bottleneck "
            "(pin it to a core of its own, or add --workers)"
        )
    if spec.rate is not None:
        lags = sample.lags * 1000.0 if sample.lags is not None and sample.lags.size else np.zeros(1)
        late = float((lags > LATE_MS).mean())
        result.schedule = {
            "asked_rps": spec.rate,
            "scheduled_rps": round(sample.scheduled / duration, 2) if duration else 0.0,
            "sent_rps": round(sample.sent / duration, 2) if duration else 0.0,
            "dispatch_lag_p50_ms": round(float(np.percentile(lags, 50)), 4),
            "dispatch_lag_p99_ms": round(float(np.percentile(lags, 99)), 4),
            "dispatch_lag_max_ms": round(float(lags.max()), 4),
            "late_fraction": round(late, 4),
        }
        if late > 0.01:
            result.warnings.append(
                f"the generator fell behind its schedule: {late:.1%} of requests left more than "
                f"{LATE_MS:g} ms late (latencies still count from the scheduled time)"
            )
    failed = result.error_count
    if failed and failed >= result.requests:
        result.warnings.append(f"most requests failed ({failed} errors): see errors")
    return result


@dataclass
class Report:
    """What was measured and the results; ``to_json``/``to_csv``/``table`` render it."""

    target: dict[str, Any]
    workload: dict[str, Any]
    results: list[LevelResult]
    host: dict[str, Any] = field(default_factory=lambda: host_info())

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "workload": self.workload,
            "host": self.host,
            "results": [asdict(r) for r in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(clean_nan(self.to_dict()), indent=2, allow_nan=False) + "\n"

    CSV_FIELDS = [
        "mode",
        "concurrency",
        "rate",
        "duration_s",
        "requests",
        "errors",
        "throughput_rps",
        "min_ms",
        "mean_ms",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "generator_cpu",
        "generator_workers",
        "generator_bottleneck",
        "sent_rps",
        "dispatch_lag_p99_ms",
        "error_kinds",
    ]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in self.results:
            row: dict[str, Any] = {
                "mode": r.mode,
                "concurrency": r.concurrency if r.concurrency is not None else "",
                "rate": r.rate if r.rate is not None else "",
                "duration_s": r.duration_s,
                "requests": r.requests,
                "errors": r.error_count,
                "throughput_rps": round(r.throughput_rps, 2),
                "generator_cpu": r.generator_cpu,
                "generator_workers": r.generator_workers,
                "generator_bottleneck": int(r.generator_bottleneck),
                "sent_rps": (r.schedule or {}).get("sent_rps", ""),
                "dispatch_lag_p99_ms": (r.schedule or {}).get("dispatch_lag_p99_ms", ""),
                "error_kinds": ";".join(f"{k}={v}" for k, v in r.errors.items()),
            }
            row |= {f"{k}_ms": _fmt(v) for k, v in r.latency_ms.items()}
            writer.writerow(row)
        return out.getvalue()

    def table(self) -> Any:
        from rich.table import Table

        title = f"{self.workload.get('model')} · {self.target.get('protocol')} · {self.target.get('url')}"
        table = Table(title=title, title_justify="left")
        for name in ("load", "req/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms", "errors", "gen CPU"):
            table.add_column(name, justify="left" if name == "load" else "right")
        for r in self.results:
            load = f"{r.concurrency} clients" if r.mode == "closed" else f"{r.rate:g}/s Poisson"
            lat = r.latency_ms
            errors = f"{r.error_count:,}"
            cpu = f"{r.generator_cpu:.0%}" + ("!" if r.generator_bottleneck else "")
            table.add_row(
                load,
                f"{r.throughput_rps:,.0f}",
                *(_fmt(lat[k], 3) for k in ("p50", "p90", "p95", "p99", "max")),
                errors,
                cpu,
            )
        return table


def _fmt(value: float, digits: int = 4) -> str:
    return "" if value != value else f"{value:.{digits}f}"  # NaN → empty


def host_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def clean_nan(data: Any) -> Any:
    """NaN (no successful request) → None, so that JSON stays strict."""
    if isinstance(data, float) and data != data:
        return None
    if isinstance(data, dict):
        return {k: clean_nan(v) for k, v in data.items()}
    if isinstance(data, list):
        return [clean_nan(v) for v in data]
    return data
