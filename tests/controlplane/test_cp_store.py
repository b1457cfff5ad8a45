"""Store: versions and scale, desired state, instances, events, migrations, threads, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from elastiserve.controlplane import store as store_module
from elastiserve.controlplane.spec import ServiceSpec, apply_assignments, parse_spec
from elastiserve.controlplane.store import (
    Conflict,
    InstanceRecord,
    PreconditionFailed,
    Store,
    default_state_dir,
    load_or_create_admin_token,
    read_admin_token,
)
from elastiserve.errors import AlreadyExists, ConfigError, NotFound


def spec(name: str = "svc", **meta: object) -> ServiceSpec:
    return parse_spec(
        {
            "name": name,
            "processor": "onnx",
            "model_path": "/models/m.onnx",
            "token": "tok-12345678",
            "metadata": {"instance": 1, **meta},
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store.open(tmp_path) as s:
        yield s


def test_state_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTISERVE_HOME", str(tmp_path / "env"))
    assert default_state_dir() == tmp_path / "env"
    assert default_state_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("ELASTISERVE_HOME")
    assert default_state_dir() == Path.home() / ".elastiserve"


def test_open_creates_owner_only_state(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Store.open(home) as s:
        assert s.schema_version == store_module.latest_schema_version()
        mode = os.stat(home).st_mode & 0o777
        assert mode == 0o700
        journal = s._query("PRAGMA journal_mode")[0][0]
        sync = s._query("PRAGMA synchronous")[0][0]
        assert journal == "wal" and sync == 2  # FULL
    token = load_or_create_admin_token(home)
    assert token == load_or_create_admin_token(home) == read_admin_token(home)
    assert os.stat(home / "admin_token").st_mode & 0o777 == 0o600
    assert read_admin_token(tmp_path / "missing") is None


def test_create_get_list_and_duplicates(store: Store) -> None:
    record = store.create_service(spec("a"))
    assert (record.version, record.latest_version, record.desired, record.status) == (
        1,
        1,
        "running",
        "Creating",
    )
    store.create_service(spec("b"))
    assert [r.name for r in store.list_services()] == ["a", "b"]
    with pytest.raises(AlreadyExists):
        store.create_service(spec("a"))
    with pytest.raises(NotFound, match="service 'zz' not found"):
        store.get_service("zz")
    assert store.find_service("zz") is None


def test_scale_is_not_a_version_release_is(store: Store) -> None:
    store.create_service(spec())
    record, kind = store.update_service(spec(instance=3))
    assert kind == "scaled" and record.version == 1 and record.spec.metadata.instance == 3
    assert [v.number for v in store.list_versions("svc")] == [1]
    record, kind = store.update_service(spec(instance=3))
    assert kind == "unchanged"
    record, kind = store.update_service(spec(instance=3, cpu=2))
    assert kind == "released" and record.version == 2 and record.latest_version == 2
    assert record.status == "Updating"
    assert [v.number for v in store.list_versions("svc")] == [1, 2]
    assert store.get_version("svc", 2).spec.metadata.cpu == 2
    with pytest.raises(NotFound, match="no version 7"):
        store.get_version("svc", 7)


def test_rollback_keeps_instance_count(store: Store) -> None:
    store.create_service(spec())
    store.update_service(spec(cpu=2))
    store.update_service(spec(cpu=2, instance=5))
    record = store.rollback("svc", 1)
    assert record.version == 1 and record.latest_version == 2
    assert record.spec.metadata.cpu == 1 and record.spec.metadata.instance == 5
    # The next release numbers after the latest, not after the current.
    record, kind = store.update_service(apply_assignments(record.spec, ["metadata.memory=2000"]))
    assert kind == "released" and record.version == 3
    with pytest.raises(NotFound):
        store.rollback("svc", 99)


def test_expect_generation_guards_read_modify_write(store: Store) -> None:
    record = store.create_service(spec())
    store.update_service(spec(instance=2), expect_generation=record.generation)
    with pytest.raises(PreconditionFailed):
        store.update_service(spec(instance=4), expect_generation=record.generation)


def test_desired_state_and_status(store: Store) -> None:
    store.create_service(spec())
    generation = store.get_service("svc").generation
    record = store.set_desired("svc", "stopped")
    assert (record.desired, record.status) == ("stopped", "Stopping") and record.generation == generation + 1
    store.set_status("svc", "Stopped", "all instances stopped")
    assert store.get_service("svc").message == "all instances stopped"
    assert store.set_desired("svc", "running").status == "Starting"
    store.set_status("nope", "Running")  # unknown names are ignored (service deleted meanwhile)


def test_delete_purges_at_once_without_instances(store: Store) -> None:
    store.create_service(spec())
    assert store.delete_service("svc") == "deleted"
    assert store.find_service("svc") is None and store.list_events("svc") == []
    store.create_service(spec())  # the name is free again; versions restart at 1
    assert [v.number for v in store.list_versions("svc")] == [1]


def test_delete_with_instances_drains_first(store: Store) -> None:
    store.create_service(spec())
    store.upsert_instance(
        InstanceRecord(id="svc-1", service="svc", version=1, address="127.0.0.1", port=9000)
    )
    assert store.delete_service("svc") == "deleting"
    record = store.get_service("svc")
    assert (record.desired, record.status) == ("deleted", "Deleting")
    with pytest.raises(Conflict):
        store.update_service(spec(instance=2))
    with pytest.raises(Conflict):
        store.set_desired("svc", "running")
    with pytest.raises(AlreadyExists):
        store.create_service(spec())
    store.purge_service("svc")
    assert store.find_service("svc") is None and store.list_instances("svc") == []


def test_instances(store: Store) -> None:
    store.create_service(spec())
    store.upsert_instance(
        InstanceRecord(
            id="svc-1",
            service="svc",
            version=1,
            address="127.0.0.1",
            port=9000,
            pid=42,
            started=time.time(),
            extra={"log": "/x"},
        )
    )
    inst = store.update_instance("svc-1", status="Running", ready=True, restarts=2)
    assert inst.ready is True and inst.restarts == 2 and inst.extra == {"log": "/x"} and inst.pid == 42
    with pytest.raises(ValueError, match="unknown instance fields"):
        store.update_instance("svc-1", bogus=1)
    with pytest.raises(NotFound):
        store.update_instance("nope", status="x")
    generation = store.get_service("svc").generation
    inst = store.request_instance_delete("svc", "svc-1")
    assert inst.desired == "deleted" and inst.ready is False
    assert store.get_service("svc").generation == generation + 1
    with pytest.raises(NotFound):
        store.request_instance_delete("other", "svc-1")
    store.remove_instance("svc-1")
    assert store.list_instances() == []


def test_events_order_limit_and_retention(tmp_path: Path) -> None:
    with Store.open(tmp_path, event_retention=50) as s:
        s.create_service(spec())
        for i in range(300):
            s.add_event("svc", "Tick", f"event {i}")
        events = s.list_events("svc", limit=1000)
        assert 50 <= len(events) <= 150  # pruned every 100 inserts down to the retention
        assert events[-1].message == "event 299"
        last3 = s.list_events("svc", limit=3)
        assert [e.message for e in last3] == ["event 297", "event 298", "event 299"]
        assert s.list_events("svc", since=events[-2].id)[0].message == "event 299"


def test_change_seq_and_listeners(store: Store) -> None:
    calls: list[int] = []
    store.add_listener(lambda: calls.append(store.change_seq))
    seq = store.change_seq
    waiter = threading.Thread(target=lambda: calls.append(-store.wait_for_change(seq, 5)))
    waiter.start()
    time.sleep(0.05)
    store.create_service(spec())
    waiter.join(5)
    assert store.change_seq == seq + 1 and -(seq + 1) in calls and seq + 1 in calls
    assert store.wait_for_change(store.change_seq, 0.01) == store.change_seq


def test_migrations_run_in_order_and_newer_schema_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path) as s:
        s.create_service(spec())
    latest = store_module.latest_schema_version()

    def add_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE services ADD COLUMN owner TEXT NOT NULL DEFAULT 'nobody'")

    migrations = [
        *store_module.MIGRATIONS,
        (latest + 1, add_column),
        (latest + 2, "CREATE TABLE notes (id INTEGER PRIMARY KEY); INSERT INTO notes VALUES (1)"),
    ]
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)
    with Store.open(tmp_path) as s:
        assert s.schema_version == latest + 2
        assert s._query("SELECT owner FROM services")[0][0] == "nobody"
        assert s.get_service("svc").spec.metadata.instance == 1  # data survives migration
    # A failing migration leaves the database at the last good version.
    monkeypatch.setattr(store_module, "MIGRATIONS", [*migrations, (latest + 3, "CREATE TABLE broken (")])
    with pytest.raises(sqlite3.OperationalError):
        Store.open(tmp_path)
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)
    with Store.open(tmp_path) as s:
        assert s.schema_version == latest + 2
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    with pytest.raises(ConfigError, match="newer than this elastiserve understands"):
        Store.open(tmp_path)


def test_concurrent_writers_from_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(15):
                name = f"t{n}-{i}"
                store.create_service(spec(name))
                store.update_service(spec(name, cpu=2))
                store.add_event(name, "Tick", "x")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    services = store.list_services()
    assert len(services) == 90 and all(r.version == 2 for r in services)


WRITER = """
import sys
from elastiserve.controlplane.spec import parse_spec
from elastiserve.controlplane.store import Store
store = Store(sys.argv[1])
i = 0
while True:
    store.create_service(parse_spec({"name": f"s{i}", "processor": "onnx", "model_path": "/m"}))
    print(i, flush=True)  # acknowledged: the transaction has committed
    i += 1
"""


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    assert proc.stdout is not None
    try:
        while len(acked) < 40:
            line = proc.stdout.readline()
            assert line, "writer died"
            acked.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    acked += [int(x) for x in rest.split()]
    with Store(db) as s:
        assert s._query("PRAGMA integrity_check")[0][0] == "ok"
        names = {r.name for r in s.list_services()}
        assert {f"s{i}" for i in acked} <= names
        assert all(s.get_service(f"s{i}").version == 1 for i in acked)
