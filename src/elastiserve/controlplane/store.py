"""The control plane's durable state: one SQLite file in the state directory.

Why SQLite from the standard library: one file, no server, transactions, and with WAL plus
``synchronous=FULL`` a write that returned has reached the disk, so a control plane killed with
``kill -9`` right after acknowledging a request loses nothing. One connection guarded by a lock
keeps the store safe to share between the API's threads and the reconciler.

The schema is versioned (``schema_version`` table) and :data:`MIGRATIONS` run in order at open,
each in its own transaction; a database written by a newer elastiserve is refused, not damaged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from elastiserve.controlplane.spec import ServiceSpec, check_service_name, parse_spec
from elastiserve.errors import AlreadyExists, ConfigError, ElastiserveError, NotFound

log = logging.getLogger(__name__)

ENV_HOME = "ELASTISERVE_HOME"
DB_FILE = "state.db"
ADMIN_TOKEN_FILE = "admin_token"

Desired = Literal["running", "stopped", "deleted"]
UpdateKind = Literal["unchanged", "scaled", "released"]


class Conflict(ElastiserveError):
    """The request conflicts with the service's current state (HTTP 409)."""

    code = "already_exists"


class PreconditionFailed(ElastiserveError):
    """``If-Match`` named a generation that is no longer current (HTTP 412)."""

    code = "precondition_failed"


# -- state directory ---------------------------------------------------------------------------


def default_state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--state-dir`` if given, else ``$ELASTISERVE_HOME``, else ``~/.elastiserve``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".elastiserve"


def ensure_state_dir(state_dir: Path) -> Path:
    """Create the state directory owner-only: it holds the admin token and service tokens."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        state_dir.chmod(0o700)
    return state_dir


def load_or_create_admin_token(state_dir: Path) -> str:
    """The control plane's admin token, generated on first start and kept in ``admin_token`` (0600)
    so the CLI on the same machine finds it without flags."""
    path = ensure_state_dir(state_dir) / ADMIN_TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token


def read_admin_token(state_dir: Path) -> str | None:
    """The admin token saved by a local control plane, if any (the CLI's fallback)."""
    try:
        return (state_dir / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


# -- records -----------------------------------------------------------------------------------


@dataclass
class ServiceRecord:
    """A service as stored: its current spec plus control-plane state."""

    name: str
    spec: ServiceSpec
    version: int  # the version the current spec came from
    latest_version: int
    desired: Desired
    status: str
    message: str
    generation: int  # bumped on every change the reconciler must act on
    created: float
    updated: float


@dataclass
class VersionRecord:
    service: str
    number: int
    spec: ServiceSpec
    created: float


@dataclass
class InstanceRecord:
    """One instance as the reconciler last observed it (the runtime is the truth; this is the view)."""

    id: str
    service: str
    version: int
    address: str = ""
    port: int = 0
    pid: int | None = None
    started: float | None = None
    restarts: int = 0
    status: str = "Pending"
    ready: bool = False
    reason: str = ""
    desired: Literal["running", "deleted"] = "running"
    weight: int = 100
    updated: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EventRecord:
    id: int
    time: float
    service: str
    kind: str
    message: str


# -- schema ------------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None] | str

#: (version, migration) in order. Append only: never edit a released migration.
MIGRATIONS: list[tuple[int, Migration]] = [
    (
        1,
        """
        CREATE TABLE services (
            name TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            version INTEGER NOT NULL,
            desired TEXT NOT NULL DEFAULT 'running',
            status TEXT NOT NULL DEFAULT 'Creating',
            message TEXT NOT NULL DEFAULT '',
            generation INTEGER NOT NULL DEFAULT 1,
            created REAL NOT NULL,
            updated REAL NOT NULL
        );
        CREATE TABLE versions (
            service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            spec TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (service, number)
        );
        CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            service TEXT NOT NULL,
            version INTEGER NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            port INTEGER NOT NULL DEFAULT 0,
            pid INTEGER,
            started REAL,
            restarts INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'Pending',
            ready INTEGER NOT NULL DEFAULT 0,
            reason TEXT NOT NULL DEFAULT '',
            desired TEXT NOT NULL DEFAULT 'running',
            weight INTEGER NOT NULL DEFAULT 100,
            updated REAL NOT NULL,
            extra TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX instances_by_service ON instances(service);
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            service TEXT NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX events_by_service ON events(service, id);
        """,
    ),
    (
        2,
        # A runtime's own durable records (the local runtime's pid, start time, ports), so a
        # restarted control plane can adopt the processes it left running.
        """
        CREATE TABLE runtime_records (
            runtime TEXT NOT NULL,
            id TEXT NOT NULL,
            data TEXT NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (runtime, id)
        );
        """,
    ),
]


def latest_schema_version() -> int:
    return MIGRATIONS[-1][0] if MIGRATIONS else 0


class Store:
    """Thread-safe access to the state database; every write is one durable transaction."""

    def __init__(self, path: str | os.PathLike[str], *, event_retention: int = 1000) -> None:
        self.path = Path(path)
        self.event_retention = event_retention
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._change_seq = 0
        self._events_since_prune = 0
        self._listeners: list[Callable[[], None]] = []
        self._batch_depth = 0  # > 0 while the lock holder is inside batch(): writes join it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> Store:
        """Open (creating and migrating as needed) ``<state_dir>/state.db``."""
        directory = ensure_state_dir(default_state_dir(state_dir))
        return cls(directory / DB_FILE, **kwargs)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make every write inside the block one transaction (one fsync instead of one per write).

        The reconciler applies a service's changes this way. Readers in other threads wait for
        the block, so keep slow work (starting processes) outside it. Nested batches join the
        outer one; an exception rolls the whole batch back.
        """
        with self._lock:
            # Only the thread holding the lock can see a non-zero depth: this is a nested batch.
            if self._batch_depth:
                self._batch_depth += 1
                try:
                    yield
                finally:
                    self._batch_depth -= 1
                return
        with self._write():  # listeners run after the commit, outside the lock
            self._batch_depth = 1
            try:
                yield
            finally:
                self._batch_depth = 0

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; commit on success, then wake change waiters."""
        with self._lock:
            if self._batch_depth:  # inside batch() in this thread (the lock is ours): join it
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._change_seq += 1
            self._changed.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:  # outside the lock: a listener may read the store
            try:
                listener()
            except Exception:
                log.exception("store change listener failed")

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from the writing thread) after every committed write."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT version FROM schema_version").fetchone()
            return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self._lock:
            self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = self.schema_version
            latest = latest_schema_version()
            if current > latest:
                raise ConfigError(
                    f"{self.path}: state database has schema version {current}, newer than this "
                    f"elastiserve understands ({latest}); upgrade elastiserve"
                )
            for version, migration in MIGRATIONS:
                if version <= current:
                    continue
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if isinstance(migration, str):
                        for statement in migration.split(";"):
                            if statement.strip():
                                self._conn.execute(statement)
                    else:
                        migration(self._conn)
                    self._conn.execute("DELETE FROM schema_version")
                    self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")

    @property
    def change_seq(self) -> int:
        """Bumped by every committed write: cheap to compare for long-polls."""
        return self._change_seq

    def wait_for_change(self, seq: int, timeout: float) -> int:
        """Block until :attr:`change_seq` differs from ``seq`` or ``timeout`` passes; return it."""
        with self._changed:
            self._changed.wait_for(lambda: self._change_seq != seq, timeout=timeout)
            return self._change_seq

    # -- services ------------------------------------------------------------------------------

    def _service_row(self, name: str) -> sqlite3.Row | None:
        rows = self._query(
            "SELECT s.*, (SELECT MAX(number) FROM versions v WHERE v.service = s.name) AS latest "
            "FROM services s WHERE s.name = ?",
            (name,),
        )
        return rows[0] if rows else None

    @staticmethod
    def _to_service(row: sqlite3.Row) -> ServiceRecord:
        return ServiceRecord(
            name=row["name"],
            spec=parse_spec(json.loads(row["spec"])),
            version=row["version"],
            latest_version=row["latest"] or row["version"],
            desired=row["desired"],
            status=row["status"],
            message=row["message"],
            generation=row["generation"],
            created=row["created"],
            updated=row["updated"],
        )

    def find_service(self, name: str) -> ServiceRecord | None:
        row = self._service_row(name)
        return self._to_service(row) if row else None

    def get_service(self, name: str) -> ServiceRecord:
        record = self.find_service(name)
        if record is None:
            raise NotFound(f"service '{name}' not found")
        return record

    def service_names(self) -> list[str]:
        """Every service name, without parsing specs (one bad record cannot hide the others)."""
        return [row["name"] for row in self._query("SELECT name FROM services ORDER BY name")]

    def list_services(self) -> list[ServiceRecord]:
        rows = self._query(
            "SELECT s.*, (SELECT MAX(number) FROM versions v WHERE v.service = s.name) AS latest "
            "FROM services s ORDER BY s.name"
        )
        return [self._to_service(row) for row in rows]

    def create_service(self, spec: ServiceSpec) -> ServiceRecord:
        """Store a new service (desired running) as version 1."""
        check_service_name(spec.name)
        now = time.time()
        text = spec.to_json()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM services WHERE name = ?", (spec.name,)).fetchone():
                raise AlreadyExists(f"service '{spec.name}' already exists")
            conn.execute(
                "INSERT INTO services (name, spec, version, desired, status, message, generation, created, "
                "updated) VALUES (?, ?, 1, 'running', 'Creating', '', 1, ?, ?)",
                (spec.name, text, now, now),
            )
            conn.execute(
                "INSERT INTO versions (service, number, spec, created) VALUES (?, 1, ?, ?)",
                (spec.name, text, now),
            )
            self._event(conn, spec.name, "Created", "service created (version 1)")
        return self.get_service(spec.name)

    def update_service(
        self, spec: ServiceSpec, *, expect_generation: int | None = None
    ) -> tuple[ServiceRecord, UpdateKind]:
        """Replace a service's spec.

        A change of anything but ``metadata.instance`` is a release: it records version
        latest+1 and becomes current. A change of the instance count alone is a scale: the
        current spec is updated in place and no version is recorded, so the autoscaler does not
        flood the version list. ``expect_generation`` (the ETag a reader got) makes a
        read-modify-write fail with :class:`PreconditionFailed` if anything changed meanwhile.
        """
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM services WHERE name = ?", (spec.name,)).fetchone()
            if row is None:
                raise NotFound(f"service '{spec.name}' not found")
            if row["desired"] == "deleted":
                raise Conflict(f"service '{spec.name}' is being deleted")
            if expect_generation is not None and expect_generation != row["generation"]:
                raise PreconditionFailed(
                    f"service '{spec.name}' changed since it was read (generation {row['generation']}, "
                    f"expected {expect_generation}); read it again and retry"
                )
            old = parse_spec(json.loads(row["spec"]))
            if old.to_dict() == spec.to_dict():
                kind: UpdateKind = "unchanged"
            elif old.release_key() == spec.release_key():
                kind = "scaled"
                conn.execute(
                    "UPDATE services SET spec = ?, generation = generation + 1, updated = ? WHERE name = ?",
                    (spec.to_json(), now, spec.name),
                )
                self._event(
                    conn,
                    spec.name,
                    "Scaled",
                    f"instances {old.metadata.instance} -> {spec.metadata.instance}",
                )
            else:
                kind = "released"
                latest = (
                    conn.execute(
                        "SELECT MAX(number) FROM versions WHERE service = ?", (spec.name,)
                    ).fetchone()[0]
                    or 0
                )
                number = latest + 1
                text = spec.to_json()
                conn.execute(
                    "INSERT INTO versions (service, number, spec, created) VALUES (?, ?, ?, ?)",
                    (spec.name, number, text, now),
                )
                status = "Updating" if row["desired"] == "running" else row["status"]
                conn.execute(
                    "UPDATE services SET spec = ?, version = ?, status = ?, generation = generation + 1, "
                    "updated = ? WHERE name = ?",
                    (text, number, status, now, spec.name),
                )
                self._event(conn, spec.name, "Updated", f"version {number} created and made current")
        return self.get_service(spec.name), kind

    def rollback(self, name: str, number: int) -> ServiceRecord:
        """Make version ``number`` current again, keeping the current instance count (a rollback is
        a release, not a scale). No new version is recorded."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"service '{name}' not found")
            if row["desired"] == "deleted":
                raise Conflict(f"service '{name}' is being deleted")
            version = conn.execute(
                "SELECT spec FROM versions WHERE service = ? AND number = ?", (name, number)
            ).fetchone()
            if version is None:
                raise NotFound(f"service '{name}' has no version {number}")
            current = parse_spec(json.loads(row["spec"]))
            target = parse_spec(json.loads(version["spec"]))
            target.metadata.instance = current.metadata.instance
            if row["version"] == number and target.to_dict() == current.to_dict():
                return self.get_service(name)
            status = "Updating" if row["desired"] == "running" else row["status"]
            conn.execute(
                "UPDATE services SET spec = ?, version = ?, status = ?, generation = generation + 1, "
                "updated = ? WHERE name = ?",
                (target.to_json(), number, status, now, name),
            )
            self._event(conn, name, "RolledBack", f"version {number} made current (was {row['version']})")
        return self.get_service(name)

    def set_desired(self, name: str, desired: Literal["running", "stopped"]) -> ServiceRecord:
        """Start or stop a service (the reconciler drains and stops, or starts, its instances)."""
        with self._write() as conn:
            row = conn.execute("SELECT desired FROM services WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"service '{name}' not found")
            if row["desired"] == "deleted":
                raise Conflict(f"service '{name}' is being deleted")
            if row["desired"] != desired:
                status = "Starting" if desired == "running" else "Stopping"
                conn.execute(
                    "UPDATE services SET desired = ?, status = ?, message = '', generation = generation + 1, "
                    "updated = ? WHERE name = ?",
                    (desired, status, time.time(), name),
                )
                self._event(
                    conn,
                    name,
                    "Started" if desired == "running" else "Stopped",
                    f"desired state set to {desired}",
                )
        return self.get_service(name)

    def set_status(self, name: str, status: str, message: str = "") -> None:
        """The reconciler's view of a service (Running, Failed, ...); a no-op for unknown names."""
        with self._write() as conn:
            conn.execute(
                "UPDATE services SET status = ?, message = ?, updated = ? WHERE name = ? "
                "AND (status != ? OR message != ?)",
                (status, message, time.time(), name, status, message),
            )

    def delete_service(self, name: str) -> Literal["deleted", "deleting"]:
        """Delete a service: at once if it has no instances, else mark it ``deleted`` so the
        reconciler drains its instances first and then calls :meth:`purge_service`."""
        with self._write() as conn:
            row = conn.execute("SELECT desired FROM services WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"service '{name}' not found")
            has_instances = conn.execute(
                "SELECT 1 FROM instances WHERE service = ? LIMIT 1", (name,)
            ).fetchone()
            if not has_instances:
                self._purge(conn, name)
                return "deleted"
            conn.execute(
                "UPDATE services SET desired = 'deleted', status = 'Deleting', generation = generation + 1, "
                "updated = ? WHERE name = ?",
                (time.time(), name),
            )
            self._event(conn, name, "Deleting", "service deletion requested; draining instances")
            return "deleting"

    def purge_service(self, name: str) -> None:
        """Remove every trace of a service (the reconciler's last step of a delete)."""
        with self._write() as conn:
            self._purge(conn, name)

    @staticmethod
    def _purge(conn: sqlite3.Connection, name: str) -> None:
        conn.execute("DELETE FROM versions WHERE service = ?", (name,))
        conn.execute("DELETE FROM instances WHERE service = ?", (name,))
        conn.execute("DELETE FROM events WHERE service = ?", (name,))
        conn.execute("DELETE FROM services WHERE name = ?", (name,))

    # -- versions ------------------------------------------------------------------------------

    def list_versions(self, name: str) -> list[VersionRecord]:
        self.get_service(name)
        rows = self._query("SELECT * FROM versions WHERE service = ? ORDER BY number", (name,))
        return [
            VersionRecord(r["service"], r["number"], parse_spec(json.loads(r["spec"])), r["created"])
            for r in rows
        ]

    def get_version(self, name: str, number: int) -> VersionRecord:
        rows = self._query("SELECT * FROM versions WHERE service = ? AND number = ?", (name, number))
        if not rows:
            self.get_service(name)
            raise NotFound(f"service '{name}' has no version {number}")
        r = rows[0]
        return VersionRecord(r["service"], r["number"], parse_spec(json.loads(r["spec"])), r["created"])

    # -- instances -----------------------------------------------------------------------------

    _INSTANCE_COLUMNS = (
        "service",
        "version",
        "address",
        "port",
        "pid",
        "started",
        "restarts",
        "status",
        "ready",
        "reason",
        "desired",
        "weight",
        "extra",
    )

    @staticmethod
    def _to_instance(row: sqlite3.Row) -> InstanceRecord:
        return InstanceRecord(
            id=row["id"],
            service=row["service"],
            version=row["version"],
            address=row["address"],
            port=row["port"],
            pid=row["pid"],
            started=row["started"],
            restarts=row["restarts"],
            status=row["status"],
            ready=bool(row["ready"]),
            reason=row["reason"],
            desired=row["desired"],
            weight=row["weight"],
            updated=row["updated"],
            extra=json.loads(row["extra"] or "{}"),
        )

    def upsert_instance(self, record: InstanceRecord) -> None:
        """Insert or replace an instance row (the reconciler's mirror of the runtime)."""
        record.updated = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO instances (id, service, version, address, port, pid, started, restarts, "
                "status, ready, reason, desired, weight, updated, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.service,
                    record.version,
                    record.address,
                    record.port,
                    record.pid,
                    record.started,
                    record.restarts,
                    record.status,
                    int(record.ready),
                    record.reason,
                    record.desired,
                    record.weight,
                    record.updated,
                    json.dumps(record.extra),
                ),
            )

    def update_instance(self, instance_id: str, **changes: Any) -> InstanceRecord:
        """Change some columns of an instance; unknown column names are a programming error."""
        unknown = set(changes) - set(self._INSTANCE_COLUMNS)
        if unknown:
            raise ValueError(f"unknown instance fields: {sorted(unknown)}")
        if "ready" in changes:
            changes["ready"] = int(bool(changes["ready"]))
        if "extra" in changes:
            changes["extra"] = json.dumps(changes["extra"])
        with self._write() as conn:
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                cursor = conn.execute(
                    f"UPDATE instances SET {assignments}, updated = ? WHERE id = ?",
                    (*changes.values(), time.time(), instance_id),
                )
                if cursor.rowcount == 0:
                    raise NotFound(f"instance '{instance_id}' not found")
        return self.get_instance(instance_id)

    def remove_instance(self, instance_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    def get_instance(self, instance_id: str) -> InstanceRecord:
        rows = self._query("SELECT * FROM instances WHERE id = ?", (instance_id,))
        if not rows:
            raise NotFound(f"instance '{instance_id}' not found")
        return self._to_instance(rows[0])

    def list_instances(self, service: str | None = None) -> list[InstanceRecord]:
        if service is None:
            rows = self._query("SELECT * FROM instances ORDER BY service, started, id")
        else:
            rows = self._query("SELECT * FROM instances WHERE service = ? ORDER BY started, id", (service,))
        return [self._to_instance(row) for row in rows]

    def request_instance_delete(self, service: str, instance_id: str) -> InstanceRecord:
        """``dw``: mark an instance for deletion; the reconciler drains it and starts a replacement."""
        with self._write() as conn:
            row = conn.execute("SELECT service FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if row is None or row["service"] != service:
                raise NotFound(f"service '{service}' has no instance '{instance_id}'")
            conn.execute(
                "UPDATE instances SET desired = 'deleted', ready = 0, updated = ? WHERE id = ?",
                (time.time(), instance_id),
            )
            conn.execute("UPDATE services SET generation = generation + 1 WHERE name = ?", (service,))
            self._event(conn, service, "InstanceDeleting", f"instance {instance_id} deletion requested")
        return self.get_instance(instance_id)

    # -- events --------------------------------------------------------------------------------

    def add_event(self, service: str, kind: str, message: str) -> None:
        with self._write() as conn:
            self._event(conn, service, kind, message)

    def _event(self, conn: sqlite3.Connection, service: str, kind: str, message: str) -> None:
        conn.execute(
            "INSERT INTO events (time, service, kind, message) VALUES (?, ?, ?, ?)",
            (time.time(), service, kind, message),
        )
        self._events_since_prune += 1
        if self._events_since_prune >= 100:
            self._events_since_prune = 0
            conn.execute(
                "DELETE FROM events WHERE service = ? AND id <= (SELECT id FROM events WHERE service = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (service, service, self.event_retention),
            )

    def list_events(self, service: str, *, limit: int = 100, since: int = 0) -> list[EventRecord]:
        """The newest ``limit`` events with id > ``since``, oldest first."""
        rows = self._query(
            "SELECT * FROM (SELECT * FROM events WHERE service = ? AND id > ? ORDER BY id DESC LIMIT ?) "
            "ORDER BY id",
            (service, since, limit),
        )
        return [EventRecord(r["id"], r["time"], r["service"], r["kind"], r["message"]) for r in rows]

    # -- runtime records -----------------------------------------------------------------------

    def put_runtime_record(self, runtime: str, record_id: str, data: dict[str, Any]) -> None:
        """Save a runtime's own record of an instance (pid, start time, ports, ...)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO runtime_records (runtime, id, data, updated) VALUES (?, ?, ?, ?)",
                (runtime, record_id, json.dumps(data), time.time()),
            )

    def delete_runtime_record(self, runtime: str, record_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM runtime_records WHERE runtime = ? AND id = ?", (runtime, record_id))

    def list_runtime_records(self, runtime: str) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT id, data FROM runtime_records WHERE runtime = ? ORDER BY id", (runtime,))
        return {row["id"]: json.loads(row["data"]) for row in rows}
