"""The load generator behind ``elastiserve bench``: lean clients for KServe v2 over HTTP and gRPC.

Modules, one concept each: ``workload`` (inputs and their wire bytes, built once),
``http_driver`` / ``grpc_driver`` (raw protocol clients), ``targets`` (URL + protocol → connect
and call), ``runner`` (closed and open loop), ``report`` (percentiles, JSON/CSV/table), ``api``
(levels, worker processes). See docs/bench.md.
"""

from __future__ import annotations

from elastiserve.loadgen.api import run_benchmark
from elastiserve.loadgen.report import LevelResult, Report
from elastiserve.loadgen.runner import LevelSpec
from elastiserve.loadgen.targets import TargetOptions, fetch_metadata
from elastiserve.loadgen.workload import Workload, WorkloadError, build_workload, parse_shape_option

__all__ = [
    "LevelResult",
    "LevelSpec",
    "Report",
    "TargetOptions",
    "Workload",
    "WorkloadError",
    "build_workload",
    "fetch_metadata",
    "parse_shape_option",
    "run_benchmark",
]
