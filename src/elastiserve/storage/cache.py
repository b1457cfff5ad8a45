"""A local cache of remote model locations, shared by every process on the machine.

Layout of one entry (``<cache>/<slug>-<hash>/``, hash = SHA-256 of the redacted, normalised URI
and the endpoint it is read from)::

    lock                      fcntl lock: one process syncs an entry at a time, the others wait
    current -> snapshots/<id> what readers use; swapped atomically (symlink + rename)
    snapshots/<id>/           a complete, verified copy
    snapshots/<id>.json       its manifest: object key -> ETag and size (or the archive's validators)
    tmp-*/                    a sync in progress; never read, removed by the next sync

A sync lists the remote objects (or sends a conditional GET for an archive) and compares with the
current manifest: nothing changed means nothing downloaded, which is what makes a restart or a
second instance cheap. Otherwise a new snapshot is built in ``tmp-*`` — unchanged files hard-linked
from the current one (same inode and mtime, so the engine's poll fingerprints see them unchanged),
changed ones downloaded and checked — then renamed into ``snapshots/`` and ``current`` is swapped.
A download that fails or is killed half-way leaves only ``tmp-*``: partial copies are never visible.
The current snapshot and the one before it are kept (a model still loading may read from it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elastiserve.storage.uri import StorageError, StorageURI, parse_uri

if TYPE_CHECKING:
    from elastiserve.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "ELASTISERVE_CACHE_DIR"
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def default_cache_dir() -> Path:
    """``$ELASTISERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/elastiserve/repositories`` (``~/.cache/...``)."""
    given = os.environ.get(CACHE_DIR_ENV, "").strip()
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "elastiserve" / "repositories"


@dataclass(frozen=True, slots=True)
class SyncResult:
    uri: str  # redacted
    path: Path  # the local copy through ``current``: a folder, or a file when the URI names one object
    changed: bool  # a new snapshot was published by this sync
    files: int
    downloaded_files: int
    downloaded_bytes: int
    reused_files: int
    seconds: float


@dataclass(slots=True)
class _Snapshot:
    path: Path
    manifest: dict[str, Any]


class RepositoryCache:
    """Syncs remote locations into local folders; thread- and process-safe per entry."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        progress_interval: float = 2.0,
        lock_timeout: float = 3600.0,
        workers: int = 8,
        keep: int = 2,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.progress_interval = progress_interval
        self.lock_timeout = lock_timeout
        self.workers = max(1, workers)
        self.keep = max(1, keep)
        self._stores: dict[str, ObjectStore] = {}
        self._stores_lock = threading.Lock()
        #: Totals over this object's life (tests, benchmarks): syncs, downloads, bytes.
        self.stats = {"syncs": 0, "unchanged": 0, "downloaded_files": 0, "downloaded_bytes": 0}

    # -- public ------------------------------------------------------------------------------------

    def sync(self, location: str | StorageURI) -> SyncResult:
        """Bring the local copy of ``location`` up to date (downloading only what changed)."""
        uri = parse_uri(location) if isinstance(location, str) else location
        if not uri.is_remote:
            raise StorageError(f"'{uri.redacted}' is a local path, not a remote location")
        from elastiserve.storage.s3 import ObjectChanged

        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                return self._sync_once(uri)
            except ObjectChanged as exc:
                if attempt == attempts:
                    raise StorageError(f"{exc} (gave up after {attempts} attempts)") from None
                log.warning("%s; syncing again", exc)
        raise AssertionError("unreachable")

    def entry_dir(self, uri: StorageURI, endpoint: str = "") -> Path:
        canonical = _canonical(uri)
        digest = hashlib.sha256(f"{canonical}\n{endpoint}".encode()).hexdigest()[:20]
        slug = _SLUG.sub("-", canonical.split("?", 1)[0].replace("://", "-")).strip("-.")[:60]
        return self.root / f"{slug}-{digest}"

    # -- one sync ----------------------------------------------------------------------------------

    def _sync_once(self, uri: StorageURI) -> SyncResult:
        store = self._store(uri) if uri.is_object_store else None
        entry = self.entry_dir(uri, store.describe() if store is not None else "")
        try:
            entry.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"'{uri.redacted}': cannot create the cache folder {entry}: {exc}") from None
        started = time.monotonic()
        with self._locked(entry, uri):
            for stale in entry.glob("tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            current = self._current(entry)
            if store is not None:
                result = self._sync_objects(uri, store, entry, current, started)
            else:
                result = self._sync_archive(uri, entry, current, started)
        self.stats["syncs"] += 1
        self.stats["unchanged"] += 0 if result.changed else 1
        self.stats["downloaded_files"] += result.downloaded_files
        self.stats["downloaded_bytes"] += result.downloaded_bytes
        if result.changed:
            log.info(
                "%s: downloaded %d file(s), %s in %.1f s (%d reused from the cache) into %s",
                result.uri,
                result.downloaded_files,
                _mb(result.downloaded_bytes),
                result.seconds,
                result.reused_files,
                entry,
            )
        else:
            log.info(
                "%s: up to date in the local cache (%d file(s), nothing downloaded)", result.uri, result.files
            )
        return result

    def _sync_objects(
        self, uri: StorageURI, store: ObjectStore, entry: Path, current: _Snapshot | None, started: float
    ) -> SyncResult:
        objects = store.list()
        if not objects:
            raise StorageError(
                f"'{uri.redacted}': no objects under this prefix (bucket '{uri.bucket}' at {store.describe()})"
            )
        wanted = {o.relative: {"etag": o.etag, "size": o.size} for o in objects}
        single = len(objects) == 1 and objects[0].key == uri.key
        root = objects[0].relative if single else ""
        if (
            current is not None
            and current.manifest.get("objects") == wanted
            and current.manifest.get("root") == root
        ):
            return self._result(uri, entry, root, False, len(objects), 0, 0, 0, started)
        tmp = entry / f"tmp-{secrets.token_hex(6)}"
        tree = tmp / "tree"
        tree.mkdir(parents=True)
        try:
            previous = current.manifest.get("objects", {}) if current is not None else {}
            pending = []
            reused = 0
            for obj in objects:
                target = tree / obj.relative
                target.parent.mkdir(parents=True, exist_ok=True)
                old = current.path / obj.relative if current is not None else None
                if old is not None and previous.get(obj.relative) == wanted[obj.relative] and old.is_file():
                    _link_or_copy(old, target)
                    reused += 1
                else:
                    pending.append(obj)
            progress = _Progress(
                uri.redacted, sum(o.size for o in pending), len(pending), self.progress_interval
            )
            if pending:
                with concurrent.futures.ThreadPoolExecutor(
                    min(self.workers, len(pending)), thread_name_prefix="storage-download"
                ) as pool:
                    futures = [
                        pool.submit(store.download, o, tree / o.relative, progress.add) for o in pending
                    ]
                    try:
                        for future in concurrent.futures.as_completed(futures):
                            future.result()
                    except BaseException:
                        for future in futures:
                            future.cancel()
                        raise
            manifest = {"uri": uri.redacted, "endpoint": store.describe(), "objects": wanted, "root": root}
            self._publish(entry, tmp, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        downloaded = sum(o.size for o in pending)
        return self._result(uri, entry, root, True, len(objects), len(pending), downloaded, reused, started)

    def _sync_archive(
        self, uri: StorageURI, entry: Path, current: _Snapshot | None, started: float
    ) -> SyncResult:
        from elastiserve.storage.http import extract_archive, fetch_archive

        validators: dict[str, Any] = dict(current.manifest.get("http", {})) if current is not None else {}
        tmp = entry / f"tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            progress = _Progress(uri.redacted, 0, 1, self.progress_interval)
            fetched = fetch_archive(
                uri,
                tmp / f"archive{uri.archive_suffix}",
                etag=validators.get("etag", ""),
                last_modified=validators.get("last_modified", ""),
                progress=progress.add,
                total=progress.set_total,
            )
            if current is not None and (fetched.file is None or fetched.sha256 == validators.get("sha256")):
                if fetched.file is not None:  # same bytes, new validators: remember them for next time
                    validators.update(etag=fetched.etag, last_modified=fetched.last_modified)
                    current.manifest["http"] = validators
                    _write_json(current.path.parent / f"{current.path.name}.json", current.manifest)
                root = str(current.manifest.get("root", ""))
                files = int(current.manifest.get("files", 0))
                return self._result(uri, entry, root, False, files, 0, fetched.size, 0, started)
            if fetched.file is None:
                raise StorageError(f"'{uri.redacted}': the server answered 304 to an unconditional GET")
            tree = tmp / "tree"
            tree.mkdir()
            extract_archive(fetched.file, uri.archive_suffix, tree, uri.redacted)
            fetched.file.unlink()
            root = _repository_root(tree)
            files = sum(1 for p in tree.rglob("*") if p.is_file())
            manifest = {
                "uri": uri.redacted,
                "http": {
                    "etag": fetched.etag,
                    "last_modified": fetched.last_modified,
                    "sha256": fetched.sha256,
                    "size": fetched.size,
                },
                "root": root,
                "files": files,
            }
            self._publish(entry, tmp, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._result(uri, entry, root, True, files, 1, fetched.size, 0, started)

    def _result(
        self,
        uri: StorageURI,
        entry: Path,
        root: str,
        changed: bool,
        files: int,
        downloaded_files: int,
        downloaded_bytes: int,
        reused: int,
        started: float,
    ) -> SyncResult:
        path = entry / "current" / root if root else entry / "current"
        return SyncResult(
            uri.redacted,
            path,
            changed,
            files,
            downloaded_files,
            downloaded_bytes,
            reused,
            time.monotonic() - started,
        )

    # -- snapshots ---------------------------------------------------------------------------------

    def _current(self, entry: Path) -> _Snapshot | None:
        link = entry / "current"
        try:
            target = os.readlink(link)
        except OSError:
            return None
        path = (entry / target).resolve()
        try:
            manifest = json.loads((path.parent / f"{path.name}.json").read_text())
        except (OSError, ValueError):
            return None
        if not path.is_dir():
            return None
        return _Snapshot(path, manifest)

    def _publish(self, entry: Path, tmp: Path, manifest: dict[str, Any]) -> None:
        """Move the finished ``tmp/tree`` into ``snapshots/`` and point ``current`` at it."""
        _settle_dir_mtimes(tmp / "tree")
        snapshots = entry / "snapshots"
        snapshots.mkdir(exist_ok=True)
        snap_id = f"{time.time_ns():x}"
        manifest["created"] = time.time()
        _write_json(snapshots / f"{snap_id}.json", manifest)
        os.replace(tmp / "tree", snapshots / snap_id)
        link = entry / f".current-{secrets.token_hex(4)}"
        os.symlink(f"snapshots/{snap_id}", link)
        os.replace(link, entry / "current")
        _fsync_dir(entry)
        self._collect(entry, snap_id)

    def _collect(self, entry: Path, current_id: str) -> None:
        """Drop snapshots older than the newest ``keep`` (the current one always stays)."""
        snapshots = entry / "snapshots"
        ids = sorted(
            {
                p.name.removesuffix(".json")
                for p in snapshots.iterdir()
                if re.fullmatch(r"[0-9a-f]+(\.json)?", p.name)
            },
            key=lambda s: int(s, 16),
        )
        keep = set(ids[-self.keep :]) | {current_id}
        for snap_id in ids:
            if snap_id not in keep:
                shutil.rmtree(snapshots / snap_id, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    (snapshots / f"{snap_id}.json").unlink()

    # -- helpers -----------------------------------------------------------------------------------

    def _store(self, uri: StorageURI) -> ObjectStore:
        from elastiserve.storage.s3 import ObjectStore

        with self._stores_lock:
            store = self._stores.get(uri.raw)
            if store is None:
                store = self._stores[uri.raw] = ObjectStore(uri)
            return store

    @contextlib.contextmanager
    def _locked(self, entry: Path, uri: StorageURI) -> Iterator[None]:
        fd = os.open(entry / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            next_note = 0.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        raise StorageError(
                            f"'{uri.redacted}': another process kept the cache entry {entry} locked for "
                            f"{self.lock_timeout:.0f} s"
                        ) from None
                    if now >= next_note:
                        log.info("%s: waiting for another process that is syncing it", uri.redacted)
                        next_note = now + 30.0
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the lock


class _Progress:
    """Download progress, logged every ``interval`` seconds while a download lasts longer than that."""

    def __init__(self, name: str, total: int, files: int, interval: float) -> None:
        self.name, self.total, self.files, self.interval = name, total, files, interval
        self.done = 0
        self.started = time.monotonic()
        self.next_log = self.started + interval
        self._lock = threading.Lock()

    def set_total(self, total: int) -> None:
        self.total = total

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now < self.next_log:
                return
            self.next_log = now + self.interval
            done, total = self.done, self.total
        rate = done / max(now - self.started, 1e-6)
        share = f" of {_mb(total)} ({100 * done / total:.0f}%)" if total else ""
        log.info("%s: downloading, %s%s, %s/s", self.name, _mb(done), share, _mb(int(rate)))


def _canonical(uri: StorageURI) -> str:
    if uri.is_object_store:
        return f"{uri.scheme}://{uri.bucket}/{uri.key}"
    return uri.redacted


def _repository_root(tree: Path) -> str:
    """Where the repository starts inside an unpacked archive: an archive holding one folder
    that is not itself a model (no config.pbtxt, no version folders) is unwrapped."""
    root = tree
    for _ in range(3):
        entries = [e for e in root.iterdir() if not e.name.startswith(".") and e.name != "__MACOSX"]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            break
        inner = entries[0]
        if (inner / "config.pbtxt").exists() or any(c.is_dir() and c.name.isdigit() for c in inner.iterdir()):
            break
        root = inner
    return str(root.relative_to(tree)) if root != tree else ""


def _settle_dir_mtimes(tree: Path) -> None:
    """Give each folder the newest mtime of what it holds, so a folder whose files did not change
    looks the same in the new snapshot as in the old one (the engine's poll fingerprints include
    folders; fresh folders would otherwise make every model look changed)."""
    for folder, dirs, files in os.walk(tree, topdown=False):
        newest = 0
        for name in (*files, *dirs):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime_ns)
        with contextlib.suppress(OSError):
            os.utime(folder, ns=(newest, newest))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"
