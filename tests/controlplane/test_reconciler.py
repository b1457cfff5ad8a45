"""The reconciler over the FakeRuntime: scale, rollouts, crashes, capacity, drains, orphans, isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastiserve.controlplane.reconciler import Reconciler
from elastiserve.controlplane.runtimes.base import Phase, Resources
from elastiserve.controlplane.runtimes.fake import FakeRuntime
from elastiserve.controlplane.spec import apply_assignments
from elastiserve.controlplane.store import Store
from elastiserve.errors import ConfigError

from .reconciler_support import Clock, Env, make_spec


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    clock = Clock()
    store = Store.open(tmp_path / "state")
    runtime = FakeRuntime(clock=clock)
    rec = Reconciler(store, runtime, clock=clock, drain_delay=1.0, backoff_base=1.0, stable_after=30)
    yield Env(store, runtime, rec, clock)
    store.close()


def modify(env: Env, *assignments: str, name: str = "svc") -> None:
    current = env.store.get_service(name).spec
    env.store.update_service(apply_assignments(current, assignments))


def finish_drains(env: Env, passes: int = 6) -> None:
    """Let drain delays and (instant) fake terminations run out."""
    for _ in range(passes):
        env.step(1.0)


# -- create and scale --------------------------------------------------------------------------------


def test_create_starts_instances_and_reports_running(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.step()
    rows = env.rows()
    assert len(rows) == 2 and {r.status for r in rows} == {"Starting"}
    assert all(r.address == "127.0.0.1" and r.port for r in rows)
    assert env.status()[0] == "Creating"
    env.step()
    assert {(r.status, r.ready) for r in env.rows()} == {("Running", True)}
    assert env.status() == ("Running", "")
    kinds = env.events()
    assert kinds.count("InstanceStarting") == 2 and kinds.count("InstanceReady") == 2
    assert "ServiceRunning" in kinds
    # A steady pass writes nothing.
    assert env.step().writes == 0


def test_scale_out_and_in_is_not_a_rollout(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(3)
    first = {r.id for r in env.rows()}
    modify(env, "metadata.instance=4")
    env.settle(3)
    assert len(env.endpoints()) == 4 and first <= {r.id for r in env.rows()}
    assert "RolloutStarted" not in env.events()
    assert env.store.get_service("svc").version == 1
    modify(env, "metadata.instance=1")
    env.step()
    assert len(env.endpoints()) == 1
    draining = [r for r in env.rows() if r.desired == "deleted"]
    assert len(draining) == 3 and {r.status for r in draining} == {"Draining"}
    assert len(env.running()) == 4  # still serving while clients notice
    finish_drains(env)
    assert len(env.rows()) == 1 and len(env.running()) == 1
    assert env.rows()[0].id in first  # the oldest instance stays
    assert env.events().count("InstanceStopped") == 3


def test_scale_in_removes_pending_and_unready_first(env: Env) -> None:
    env.runtime = FakeRuntime(Resources(cpu=2, memory=10_000), clock=env.clock)
    env.rec = Reconciler(env.store, env.runtime, clock=env.clock, drain_delay=1.0)
    env.store.create_service(make_spec(instance=3))
    env.settle(3)
    pending = [r for r in env.rows() if r.status == "Pending"]
    assert len(pending) == 1 and "needs 1 cpu, 0 free" in pending[0].reason
    modify(env, "metadata.instance=2")
    env.step()
    assert [r.id for r in env.rows()] == [r.id for r in env.rows() if r.id != pending[0].id]
    assert pending[0].id not in {r.id for r in env.rows()} and len(env.endpoints()) == 2


# -- capacity -----------------------------------------------------------------------------------------


def test_instances_that_do_not_fit_are_pending_with_the_reason(env: Env) -> None:
    env.runtime = FakeRuntime(Resources(cpu=3, memory=10_000), clock=env.clock)
    env.rec = Reconciler(env.store, env.runtime, clock=env.clock, drain_delay=0.0)
    env.store.create_service(make_spec("big", instance=2, metadata={"cpu": 1}))
    env.store.create_service(make_spec("svc", instance=2, metadata={"cpu": 1}))
    for _ in range(5):
        env.step(0.5)
    [pending] = [r for r in env.rows("svc") if r.status == "Pending"]
    assert "insufficient resources" in pending.reason and "needs 1 cpu, 0 free" in pending.reason
    status, message = env.status("svc")
    assert "1 pending" in message and "needs 1 cpu" in message
    assert env.events("svc").count("InstancePending") == 1  # once, not every pass
    assert status != "Running"
    # Freeing capacity lets it start.
    env.store.set_desired("big", "stopped")
    for _ in range(5):
        env.step(0.5)
    assert len(env.endpoints("svc")) == 2 and env.status("svc") == ("Running", "")
    assert env.status("big")[0] == "Stopped"


# -- rolling updates ----------------------------------------------------------------------------------


def rollout_trace(
    env: Env, want: int, surge: int, unavailable: int, steps: int = 80
) -> list[tuple[int, int]]:
    """Step through a rollout, checking the strategy's invariants at every pass."""
    trace = []
    for _ in range(steps):
        env.step(0.25)
        published = len(env.endpoints())
        alive = len(env.running())
        trace.append((published, alive))
        assert published >= want - unavailable, f"availability dropped: {trace}"
        # Draining instances are out of discovery but still counted as alive until they stop.
        live = len(env.live())
        assert live <= want + surge, f"surge exceeded: {trace}"
        if all(r.version == 2 for r in env.rows()) and published == want and alive == want:
            break
    return trace


@pytest.mark.parametrize(
    ("surge", "unavailable"), [(1, 0), (0, 1), (2, 0), ("50%", 0), (1, 1), ("25%", "25%")]
)
def test_rolling_update_respects_surge_and_unavailable(env: Env, surge: object, unavailable: object) -> None:
    env.runtime.ready_after = 1.0
    strategy = {"max_surge": surge, "max_unavailable": unavailable}
    env.store.create_service(make_spec(instance=4, metadata={"rolling_strategy": strategy}))
    for _ in range(8):
        env.step(0.5)
    assert len(env.endpoints()) == 4
    old_ids = {r.id for r in env.rows()}
    modify(env, 'processor_params=["--log-verbose=1"]')
    assert env.store.get_service("svc").status == "Updating"
    record = env.store.get_service("svc")
    s, u = record.spec.metadata.rolling_strategy.resolve(4)
    rollout_trace(env, 4, s, u)
    rows = env.rows()
    assert len(rows) == 4 and {r.version for r in rows} == {2} and not old_ids & {r.id for r in rows}
    for _ in range(4):
        env.step(0.5)
    assert env.status() == ("Running", "")
    kinds = env.events()
    assert kinds.count("RolloutStarted") == 1 and "RolloutComplete" in kinds


def test_a_release_instances_do_not_use_keeps_them_running(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(3)
    before = {(r.id, r.pid) for r in env.rows()}
    # Token, a group weight label, gateway limits: version 2, same instances (no restart).
    modify(env, "token=another-token-123", "labels.group_weight=50", "metadata.rpc.rate_limit=10")
    env.settle(3)
    assert env.store.get_service("svc").version == 2
    assert {(r.id, r.pid) for r in env.rows()} == before
    assert {r.version for r in env.rows()} == {2}
    assert "RolloutStarted" not in env.events() and env.events().count("InstanceAdopted") == 2
    assert env.status() == ("Running", "")
    # Something instances are made from: a real rollout.
    modify(env, "metadata.cpu=2")
    env.settle(3)
    finish_drains(env)
    assert env.store.get_service("svc").version == 3
    assert "RolloutStarted" in env.events()
    assert not ({r.id for r in env.rows()} & {i for i, _ in before})


def test_rollout_starts_new_before_stopping_old(env: Env) -> None:
    env.runtime.ready_after = 1.0
    env.store.create_service(make_spec(instance=2))
    for _ in range(6):
        env.step(0.5)
    modify(env, 'processor_params=["--id=v2"]')
    env.runtime.calls.clear()
    for _ in range(40):
        env.step(0.25)
    calls = env.runtime.calls
    new = [i for op, i in calls if op == "start"]
    stops = [i for op, i in calls if op == "stop"]
    assert len(new) == 2 and len(stops) == 2
    # Surge 1, unavailable 0: a new instance is ready before an old one leaves discovery, and the
    # second new one starts only once the first old one is out (the total stays <= 3).
    story = [
        m.split(" (")[0]
        for m in env.messages()
        if m.split(":")[0] in ("InstanceReady", "InstanceStarting", "InstanceDraining")
    ]
    story = story[story.index(next(m for m in story if new[0] in m and m.startswith("InstanceStarting"))) :]
    order = [(m.split(":")[0], m.split("instance ")[1].split(" ")[0]) for m in story]
    assert order[:4] == [
        ("InstanceStarting", new[0]),
        ("InstanceReady", new[0]),
        ("InstanceDraining", stops[0]),
        ("InstanceStarting", new[1]),
    ]
    assert order[4:6] == [("InstanceReady", new[1]), ("InstanceDraining", stops[1])]


def test_crashed_old_instances_during_a_rollout_are_not_restarted(env: Env) -> None:
    env.store.create_service(make_spec(instance=2, metadata={"rolling_strategy": {"max_surge": 1}}))
    env.settle(3)
    env.runtime.ready_after = 5.0
    modify(env, 'processor_params=["--id=v2"]')
    env.step()
    old = [r for r in env.live() if r.version == 1]
    env.runtime.crash(old[0].id)
    env.runtime.calls.clear()
    env.step()
    # Gone at once (it was not serving), not restarted; its place goes to a new-version instance.
    assert old[0].id not in {r.id for r in env.rows()}
    assert ("start", old[0].id) not in env.runtime.calls
    assert len([r for r in env.live() if r.version == 2]) == 2


def test_rollback_is_a_rollout(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(3)
    modify(env, 'processor_params=["--id=v2"]')
    for _ in range(20):
        env.step(0.5)
    assert {r.version for r in env.rows()} == {2}
    env.store.rollback("svc", 1)
    for _ in range(20):
        env.step(0.5)
    assert {r.version for r in env.rows()} == {1} and len(env.endpoints()) == 2


# -- crashes ------------------------------------------------------------------------------------------


def test_crash_restarts_with_exponential_backoff(env: Env) -> None:
    env.store.create_service(make_spec(instance=1))
    env.settle(2)
    [row] = env.rows()
    env.runtime.crash(row.id, exit_code=3, reason="boom")
    env.step()
    [row] = env.rows()
    assert row.status == "Restarting" and not row.ready
    assert "exited with code 3: boom" in row.reason and "restarting in 1s" in row.reason
    assert env.endpoints() == []
    env.step(0.5)
    assert env.rows()[0].status == "Restarting"  # still backing off
    env.step(0.6)
    env.step()
    [row] = env.rows()
    assert (row.status, row.ready, row.restarts) == ("Running", True, 1)
    assert "InstanceCrashed" in env.events() and "InstanceRestarted" in env.events()
    # Second crash in a row: 2 s.
    env.runtime.crash(row.id)
    env.step()
    assert "restarting in 2s" in env.rows()[0].reason
    env.step(1.5)
    assert env.rows()[0].status == "Restarting"
    env.step(0.6)
    env.step()
    assert env.rows()[0].restarts == 2 and env.rows()[0].ready


def test_crash_counter_resets_after_a_stable_run(env: Env) -> None:
    env.store.create_service(make_spec(instance=1))
    env.settle(2)
    for _ in range(2):
        env.runtime.crash(env.rows()[0].id)
        env.settle(3, seconds=5)
    env.step(31)  # stable for longer than stable_after
    env.runtime.crash(env.rows()[0].id)
    env.step()
    assert "restarting in 1s" in env.rows()[0].reason


def test_crash_loop_is_shown_on_instance_and_service(env: Env) -> None:
    env.store.create_service(make_spec(instance=1))
    env.settle(2)
    for _ in range(3):
        env.runtime.crash(env.rows()[0].id, reason="segfault")
        env.step()
        env.step(10)
        env.step()
    [row] = env.rows()
    env.runtime.crash(row.id, reason="segfault")
    env.step()
    [row] = env.rows()
    assert row.status == "CrashLoopBackOff"
    assert "crash loop" in row.reason and "segfault" in row.reason
    status, message = env.status()
    assert status == "Failed" and row.id in message and "crash loop" in message
    assert "CrashLoop" in env.events()
    # It keeps being restarted (with a longer backoff), and recovers.
    env.step(60)
    env.step()
    assert env.rows()[0].ready and env.status() == ("Running", "")


def test_a_restart_that_does_not_fit_waits_without_counting_failures(env: Env) -> None:
    env.runtime = FakeRuntime(Resources(cpu=1, memory=10_000), clock=env.clock)
    env.rec = Reconciler(env.store, env.runtime, clock=env.clock, drain_delay=0.0)
    env.store.create_service(make_spec(instance=1))
    env.settle(2)
    [row] = env.rows()
    env.runtime.crash(row.id)
    env.step()
    env.store.create_service(make_spec("other"))  # takes the only cpu while svc backs off
    env.step(2.0)
    [row] = env.rows()
    assert row.status == "Pending" and "needs 1 cpu, 0 free" in row.reason
    assert len(env.live("other")) == 1
    for _ in range(5):
        env.step(1.0)
    assert env.rows()[0].extra["failures"] == 1 and env.rows()[0].status == "Pending"
    env.store.set_desired("other", "stopped")
    for _ in range(3):
        env.step(1.0)
    assert env.rows()[0].ready and env.rows()[0].restarts == 1


def test_crash_block_leaves_the_instance_stopped(env: Env) -> None:
    env.store.create_service(make_spec(instance=1, runtime={"enable_crash_block": True}))
    env.settle(2)
    instance_id = env.rows()[0].id
    for _ in range(3):
        env.runtime.crash(instance_id, reason="bad model")
        env.step()
        env.step(10)
        env.step()
    [row] = env.rows()
    assert row.status == "CrashBlocked" and "enable_crash_block" in row.reason
    starts = len([c for c in env.runtime.calls if c[0] == "start"])
    for _ in range(5):
        env.step(100)
    assert len([c for c in env.runtime.calls if c[0] == "start"]) == starts  # left stopped
    assert env.status()[0] == "Failed" and "CrashBlocked" in env.events()
    [obs] = env.runtime.list_instances()
    assert obs.phase == Phase.EXITED  # still there for inspection (logs)
    # dw replaces it.
    env.store.request_instance_delete("svc", instance_id)
    env.settle(3)
    [row] = env.rows()
    assert row.id != instance_id and row.ready and env.status() == ("Running", "")


def test_start_failures_are_retried_and_reported(env: Env) -> None:
    env.runtime.fail_next_start(ConfigError("model_path: oss:// is not supported yet"))
    env.store.create_service(make_spec(instance=1))
    env.step()
    [row] = env.rows()
    assert row.status == "Failed" and "oss:// is not supported" in row.reason
    assert "InstanceStartFailed" in env.events()
    env.step(1.1)
    env.step()
    assert env.rows()[0].ready


def test_an_instance_the_runtime_lost_is_replaced(env: Env) -> None:
    env.store.create_service(make_spec(instance=1))
    env.settle(2)
    assert len(env.rows()) == 1
    env.runtime._instances.clear()  # the runtime forgot it (e.g. a node went away)
    env.step()
    assert "disappeared" in env.rows()[0].reason
    env.step(1.1)
    env.step()
    assert env.rows()[0].ready and env.rows()[0].restarts == 1


# -- stop, start, delete, dw -------------------------------------------------------------------------


def test_stop_drains_then_start_starts_again(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(2)
    env.store.set_desired("svc", "stopped")
    env.step()
    assert env.endpoints() == [] and len(env.running()) == 2  # out of discovery, still serving
    assert {r.status for r in env.rows()} == {"Draining"} and env.status()[0] == "Stopping"
    env.step(0.5)
    assert env.runtime.calls.count(("stop", env.rows()[0].id)) == 0
    finish_drains(env)
    assert env.rows() == [] and env.running() == [] and env.status() == ("Stopped", "")
    env.store.set_desired("svc", "running")
    env.settle(3)
    assert len(env.endpoints()) == 2 and env.status()[0] == "Running"


def test_delete_drains_then_purges(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(2)
    assert env.store.delete_service("svc") == "deleting"
    env.step()
    assert env.store.get_service("svc").status == "Deleting" and len(env.running()) == 2
    assert env.runtime.forgotten == []  # not while instances drain
    finish_drains(env)
    assert env.store.find_service("svc") is None
    assert env.running() == [] and env.store.list_instances() == []
    assert env.runtime.forgotten == ["svc"]  # the runtime drops what it kept (logs)


def test_dw_replaces_the_instance(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(2)
    victim = env.rows()[0].id
    env.store.request_instance_delete("svc", victim)
    env.step()
    live = env.live()
    assert len(live) == 2 and victim not in {r.id for r in live}
    finish_drains(env)
    assert victim not in env.running() and len(env.endpoints()) == 2
    assert "InstanceDraining" in env.events()


def test_terminating_respects_the_grace_period(env: Env) -> None:
    env.runtime.stop_after = 100.0  # the process ignores SIGTERM: killed after the grace period
    spec = make_spec(instance=1, metadata={"eas": {"termination_grace_period": 5}})
    env.store.create_service(spec)
    env.settle(2)
    modify(env, "metadata.instance=0")
    env.step()
    env.step(1.0)
    [row] = env.rows()
    assert row.status == "Terminating"
    env.step(4.0)
    assert [r.status for r in env.rows()] == ["Terminating"]
    env.step(1.1)
    env.step()
    assert env.rows() == [] and env.running() == []


# -- orphans, adoption, isolation --------------------------------------------------------------------


def test_orphans_are_stopped(env: Env) -> None:
    env.store.create_service(make_spec(instance=1))
    env.settle(2)
    env.runtime.start_instance(make_spec(), "svc-stray", version=1)
    env.runtime.start_instance(make_spec("gone"), "gone-1", version=1)
    env.step()
    env.step()
    ids = {o.instance_id for o in env.runtime.list_instances()}
    assert "svc-stray" not in ids and "gone-1" not in ids and len(ids) == 1
    assert "OrphanStopped" in env.events()


def test_a_new_reconciler_adopts_running_instances(env: Env) -> None:
    env.store.create_service(make_spec(instance=2))
    env.settle(2)
    before = {(r.id, r.started) for r in env.rows()}
    starts = len(env.runtime.calls)
    fresh = Reconciler(env.store, env.runtime, clock=env.clock)
    fresh.reconcile_once()
    fresh.reconcile_once()
    assert {(r.id, r.started) for r in env.rows()} == before
    assert len(env.runtime.calls) == starts and all(r.ready for r in env.rows())
    assert env.events().count("InstanceAdopted") == 2


def test_one_broken_service_does_not_stop_the_others(env: Env) -> None:
    env.store.create_service(make_spec("bad", instance=1))
    env.store.create_service(make_spec("good", instance=1))
    with env.store._write() as conn:  # a record this version cannot read
        conn.execute(
            'UPDATE services SET spec = \'{"name": "bad", "processor": "nope"}\' WHERE name = \'bad\''
        )
    stats = env.settle(3)
    assert stats.errors == 1
    assert len(env.endpoints("good")) == 1 and env.status("good")[0] == "Running"


def test_an_exception_in_one_service_is_reported_on_it(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.store.create_service(make_spec("bad", instance=1))
    env.store.create_service(make_spec("good", instance=1))
    original = env.rec._converge

    def broken(work, record, now):  # type: ignore[no-untyped-def]
        if record.name == "bad":
            raise RuntimeError("bug in a code path only 'bad' reaches")
        return original(work, record, now)

    monkeypatch.setattr(env.rec, "_converge", broken)
    env.settle(3)
    assert env.status("good")[0] == "Running"
    status, message = env.status("bad")
    assert status == "Failed" and "bug in a code path" in message
    assert env.events("bad").count("ReconcileError") == 1  # once, not every pass


def test_the_loop_thread_survives_runtime_errors_and_wakes_on_notify(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    runtime = FakeRuntime()
    rec = Reconciler(store, runtime, period=30.0, fast_period=0.02)
    failures = {"left": 2}
    original = runtime.list_instances

    def flaky(service=None):  # type: ignore[no-untyped-def]
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("runtime hiccup")
        return original(service)

    runtime.list_instances = flaky  # type: ignore[method-assign]
    with rec:
        rec.notify()
        time.sleep(0.05)
        rec.notify()
        time.sleep(0.05)
        store.create_service(make_spec(instance=2))
        started = time.monotonic()
        rec.notify("svc")  # the period is 30 s: only notify can make this fast
        while time.monotonic() - started < 5:
            if store.get_service("svc").status == "Running":
                break
            time.sleep(0.01)
        assert store.get_service("svc").status == "Running"
        assert time.monotonic() - started < 2
    assert failures["left"] == 0
    store.close()


def test_notify_from_many_threads_is_safe(env: Env) -> None:
    threads = [threading.Thread(target=env.rec.notify, args=("svc",)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    env.step()
