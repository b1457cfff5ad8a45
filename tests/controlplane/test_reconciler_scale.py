"""Reconcile loop time with 100 services / 300 instances on the FakeRuntime (issue 3's figure).

Run with ``-s`` to see the figures; the asserts are loose ceilings so a slow CI machine passes
while a regression by an order of magnitude (a query per instance, a write per steady pass) does not.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from elastiserve.controlplane.reconciler import Reconciler
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.store import Store

from .reconciler_support import Clock, make_spec

SERVICES, PER_SERVICE = 100, 3


def test_reconcile_loop_time_100_services_300_instances(tmp_path: Path) -> None:
    clock = Clock()
    store = Store.open(tmp_path / "state")
    runtime = FakeRuntime(clock=clock)
    rec = Reconciler(store, runtime, clock=clock, drain_delay=0.0)
    for i in range(SERVICES):
        store.create_service(make_spec(f"svc{i:03d}", instance=PER_SERVICE))

    started = time.perf_counter()
    first = rec.reconcile_once()  # creates and starts 300 instances
    second = rec.reconcile_once()  # observes 300 ready instances
    converge = time.perf_counter() - started
    assert first.errors == second.errors == 0
    assert all(r.status == "Running" for r in store.list_services())
    assert len(runtime.list_instances()) == SERVICES * PER_SERVICE

    steady = []
    for _ in range(20):
        stats = rec.reconcile_once()
        assert stats.writes == 0 and stats.instances == SERVICES * PER_SERVICE
        steady.append(stats.duration)

    # One crash among 300: the pass that handles it costs about a steady pass plus one write.
    runtime.crash(store.list_instances("svc050")[0].id)
    crash_pass = rec.reconcile_once()
    assert crash_pass.writes >= 1

    median = statistics.median(steady)
    print(
        f"\nreconcile {SERVICES} services / {SERVICES * PER_SERVICE} instances: "
        f"create->running {converge * 1000:.0f} ms in 2 passes "
        f"({first.duration * 1000:.0f} + {second.duration * 1000:.0f} ms), "
        f"steady pass median {median * 1000:.1f} ms (max {max(steady) * 1000:.1f}), "
        f"pass with one crash {crash_pass.duration * 1000:.1f} ms"
    )
    assert median < 0.5
    assert converge < 20
    store.close()
