"""The whole benchmark as a function: levels one after another, optionally over worker processes.

One Python process drives one core; ``workers > 1`` splits each level's clients (or rate)
across processes that connect first, start together at an agreed wall-clock time, and send
back raw samples that are merged before any percentile is taken (percentiles of percentiles
would be wrong).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from typing import Any

from elastiserve.loadgen.report import LevelResult, Report, summarize
from elastiserve.loadgen.runner import LevelSpec, Progress, Sample, run_level
from elastiserve.loadgen.targets import TargetOptions, make_target
from elastiserve.loadgen.workload import Workload

__all__ = ["run_benchmark", "split_level"]


def split_level(spec: LevelSpec, workers: int) -> list[LevelSpec]:
    """Divide clients (or the rate) across ``workers``; never a worker with zero clients."""
    if workers <= 1:
        return [spec]
    if spec.rate is not None:
        return [replace(spec, rate=spec.rate / workers, seed=spec.seed + i) for i in range(workers)]
    concurrency = spec.concurrency or 1
    count = min(workers, concurrency)
    shares = [concurrency // count + (1 if i < concurrency % count else 0) for i in range(count)]
    connections = spec.connections
    return [
        replace(
            spec,
            concurrency=share,
            seed=spec.seed + i,
            connections=max(1, (connections * share) // concurrency) if connections else None,
        )
        for i, share in enumerate(shares)
    ]


def _worker(options: TargetOptions, workload: Workload, spec: LevelSpec) -> Sample:
    return run_level(make_target(options, workload), spec)


def run_benchmark(
    options: TargetOptions,
    workload: Workload,
    levels: Sequence[LevelSpec],
    *,
    workers: int = 1,
    progress: Progress | None = None,
    on_result: Any = None,
) -> Report:
    """Run every level; ``on_result(LevelResult)`` is called as each finishes."""
    results: list[LevelResult] = []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) if workers > 1 else None
    try:
        target = make_target(options, workload) if pool is None else None
        for spec in levels:
            if pool is None:
                assert target is not None
                sample = run_level(target, spec, progress)
            else:
                start_at = time.time() + 2.0  # time for every worker to connect
                parts = split_level(replace(spec, start_at=start_at), workers)
                futures = [pool.submit(_worker, options, workload, part) for part in parts]
                sample = Sample.merge([f.result() for f in futures])
            result = summarize(spec, sample)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    target_info = {k: v for k, v in asdict(options).items() if k != "headers"}
    target_info["headers"] = [name for name, _ in options.headers]  # never the token's value
    workload_info = {
        "model": workload.model,
        "version": workload.version,
        "batch_size": workload.batch_size,
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": workload.shape_of(s)} for s in workload.inputs
        ],
        "outputs": workload.outputs,
        "variants": len(workload.variants),
        "workers": workers,
    }
    return Report(target_info, workload_info, results)
