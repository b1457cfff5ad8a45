"""Model repositories published as an http(s) archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``).

Change detection uses the server's validators: the cached copy's ``ETag``/``Last-Modified`` go
back as ``If-None-Match``/``If-Modified-Since`` and a 304 means nothing to do; a server that
sends neither gets a full download whose SHA-256 is compared with the cached one. Extraction
refuses anything that could land outside the target folder: absolute names, ``..``, links that
point outside, device files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx

from elastiserve.storage.uri import StorageError, StorageURI, redact


class _RedactFilter(logging.Filter):
    """httpx logs every request URL at INFO: a presigned URL's signature must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


for _name in ("httpx", "httpcore"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _RedactFilter) for f in _logger.filters):
        _logger.addFilter(_RedactFilter())
if logging.getLogger("httpcore").level == logging.NOTSET:  # its debug lines carry headers
    logging.getLogger("httpcore").setLevel(logging.INFO)


@dataclass
class ArchiveResponse:
    """What a conditional GET found: ``None`` file when the cached copy is still current (304)."""

    file: Path | None
    etag: str
    last_modified: str
    size: int
    sha256: str


def fetch_archive(
    uri: StorageURI,
    dest: Path,
    *,
    etag: str = "",
    last_modified: str = "",
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
    timeout: float = 60.0,
) -> ArchiveResponse:
    """GET the archive into ``dest`` unless the validators show the cached copy is current."""
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout, connect=10.0)) as client,
            client.stream("GET", uri.raw, headers=headers) as response,
        ):
            if response.status_code == 304:
                return ArchiveResponse(None, etag, last_modified, 0, "")
            if response.status_code != 200:
                reason = {401: "access denied", 403: "access denied", 404: "not found"}.get(
                    response.status_code, "unexpected answer"
                )
                raise StorageError(f"'{uri.redacted}': {reason} (HTTP {response.status_code})")
            length = int(response.headers.get("content-length") or 0)
            if total is not None and length:
                total(length)
            with open(dest, "wb") as fh:
                for block in response.iter_bytes(1 << 20):
                    fh.write(block)
                    digest.update(block)
                    written += len(block)
                    if progress is not None:
                        progress(len(block))
            if length and written != length:
                raise StorageError(f"'{uri.redacted}': got {written} of {length} bytes")
            return ArchiveResponse(
                dest,
                response.headers.get("etag", ""),
                response.headers.get("last-modified", ""),
                written,
                digest.hexdigest(),
            )
    except httpx.ConnectError:
        raise StorageError(f"'{uri.redacted}': cannot connect to {httpx.URL(uri.raw).host}") from None
    except httpx.TimeoutException:
        raise StorageError(f"'{uri.redacted}': timed out") from None
    except httpx.HTTPError as exc:
        raise StorageError(f"'{uri.redacted}': download failed: {type(exc).__name__}: {exc}") from None


MAX_ARCHIVE_BYTES_ENV = "ELASTISERVE_MAX_ARCHIVE_BYTES"
MAX_ARCHIVE_MEMBERS = 100_000


def max_archive_bytes() -> int:
    """How much an archive may unpack to (a zip bomb is refused, not extracted): 64 GiB unless
    ``$ELASTISERVE_MAX_ARCHIVE_BYTES`` says otherwise."""
    try:
        return max(1, int(os.environ.get(MAX_ARCHIVE_BYTES_ENV, "")))
    except ValueError:
        return 64 << 30


def _too_big(name: str, limit: int) -> StorageError:
    return StorageError(
        f"'{name}': the archive unpacks to more than {limit:,} bytes; refusing to extract "
        f"(raise ${MAX_ARCHIVE_BYTES_ENV} if it is really that big)"
    )


def _check_count(count: int, name: str) -> None:
    if count > MAX_ARCHIVE_MEMBERS:
        raise StorageError(f"'{name}': the archive has {count:,} members (at most {MAX_ARCHIVE_MEMBERS:,})")


def extract_archive(archive: Path, suffix: str, dest: Path, name: str) -> None:
    """Unpack into ``dest`` (an empty folder) or raise :class:`StorageError`; ``name`` is for messages."""
    try:
        if suffix == ".zip":
            _extract_zip(archive, dest, name)
        else:
            _extract_tar(archive, dest, name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise StorageError(f"'{name}': not a readable {suffix} archive: {exc}") from None


def _check_name(member: str, name: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if path.is_absolute() or member.startswith(("/", "\\")) or ".." in path.parts or "\\" in member:
        raise StorageError(f"'{name}': archive member '{member}' escapes the archive; refusing to extract")
    return path


def _check_link(member: str, target: str, name: str) -> None:
    if target.startswith("/") or not _inside(PurePosixPath(member).parent / target):
        raise StorageError(
            f"'{name}': archive member '{member}' links to '{target}' outside the archive; refusing to extract"
        )


def _inside(path: PurePosixPath) -> bool:
    """Whether a relative path stays inside its root once '..' are resolved."""
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _extract_tar(archive: Path, dest: Path, name: str) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        _check_count(len(members), name)
        limit = max_archive_bytes()
        if sum(m.size for m in members if m.isfile()) > limit:  # tar headers carry the real sizes
            raise _too_big(name, limit)
        for member in members:
            _check_name(member.name, name)
            if member.issym():
                _check_link(member.name, member.linkname, name)
            elif member.islnk():
                _check_name(member.linkname, name)
            elif not (member.isfile() or member.isdir()):
                raise StorageError(f"'{name}': archive member '{member.name}' is not a file or folder")
        # The 'data' filter re-checks all of the above and drops modes like setuid.
        tar.extractall(dest, members=members, filter="data")


def _extract_zip(archive: Path, dest: Path, name: str) -> None:
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_count(len(infos), name)
        limit = max_archive_bytes()
        if sum(info.file_size for info in infos) > limit:
            raise _too_big(name, limit)
        written = 0  # sizes in a zip's directory can lie: count what is really unpacked
        for info in infos:
            _check_name(info.filename, name)
        for info in infos:
            mode = info.external_attr >> 16
            target = dest / info.filename
            if stat.S_ISLNK(mode):
                link = zf.read(info).decode()
                _check_link(info.filename, link, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(link, target)
                continue
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if not str(target.parent.resolve()).startswith(str(root)):
                raise StorageError(f"'{name}': archive member '{info.filename}' escapes the archive")
            with zf.open(info) as src, open(target, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    written += len(block)
                    if written > limit:
                        raise _too_big(name, limit)
                    out.write(block)
            # The archive's time, as tar does: an unchanged file keeps its mtime across versions.
            with contextlib.suppress(ValueError, OverflowError, OSError):
                stamp = time.mktime((*info.date_time, 0, 0, -1))
                os.utime(target, (stamp, stamp))
