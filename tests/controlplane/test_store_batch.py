"""Store additions for the platform: batch(), service_names(), runtime records (migration 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastiserve.controlplane.store import InstanceRecord, Store

from .reconciler_support import make_spec


def test_batch_is_one_transaction(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.create_service(make_spec("svc"))
        calls: list[int] = []
        store.add_listener(lambda: calls.append(store.change_seq))
        seq = store.change_seq
        with store.batch():
            store.upsert_instance(InstanceRecord(id="a", service="svc", version=1))
            with store.batch():  # nested batches join the outer one
                store.add_event("svc", "Test", "one")
            store.set_status("svc", "Running")
        assert store.change_seq == seq + 1 and calls == [seq + 1]
        assert [i.id for i in store.list_instances("svc")] == ["a"]
        with pytest.raises(RuntimeError), store.batch():
            store.upsert_instance(InstanceRecord(id="b", service="svc", version=1))
            store.add_event("svc", "Test", "two")
            raise RuntimeError("boom")
        assert [i.id for i in store.list_instances("svc")] == ["a"]
        assert [e.message for e in store.list_events("svc") if e.kind == "Test"] == ["one"]
        store.upsert_instance(InstanceRecord(id="c", service="svc", version=1))  # usable afterwards
        assert store.service_names() == ["svc"]


def test_runtime_records_survive_reopening(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        assert store.schema_version >= 2
        store.put_runtime_record("local", "i-1", {"pid": 42, "create_time": 1.5})
        store.put_runtime_record("local", "i-2", {"pid": 43})
        store.put_runtime_record("ray", "i-1", {"actor": "x"})
        store.delete_runtime_record("local", "i-2")
    with Store.open(tmp_path) as store:
        assert store.list_runtime_records("local") == {"i-1": {"pid": 42, "create_time": 1.5}}
        assert store.list_runtime_records("ray") == {"i-1": {"actor": "x"}}
