"""http(s) archives through the repository cache, served by a local http.server thread."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from elastiserve.storage import RepositoryCache, StorageError
from tests.storage.moto_support import _QuietHandler, file_server


def make_repo(root: Path, marker: str = "v1") -> Path:
    model = root / "repo" / "add_sub"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('backend: "python"\n')
    (model / "1" / "model.py").write_text(f"# {marker}\n")
    return root / "repo"


def pack(source: Path, archive: Path, *, top: str | None = None) -> Path:
    """``source``'s content at the archive's top level, or inside folder ``top``."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(source.rglob("*")):
                name = path.relative_to(source).as_posix()
                zf.write(path, f"{top}/{name}" if top else name)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(source.iterdir()):
                tar.add(path, f"{top}/{path.name}" if top else path.name)
    return archive


def entries(result_path: Path) -> list[str]:
    return sorted(p.relative_to(result_path).as_posix() for p in result_path.rglob("*") if p.is_file())


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_is_fetched_once_then_revalidated(tmp_path: Path, suffix: str) -> None:
    served = tmp_path / "served"
    served.mkdir()
    archive = pack(make_repo(tmp_path), served / f"repo{suffix}")
    cache = RepositoryCache(tmp_path / "cache")
    with file_server(served) as base:
        first = cache.sync(f"{base}/repo{suffix}")
        assert first.changed and first.downloaded_files == 1
        assert entries(first.path) == ["add_sub/1/model.py", "add_sub/config.pbtxt"]
        # A second process (another cache object on the same folder): a 304, nothing downloaded.
        again = RepositoryCache(tmp_path / "cache").sync(f"{base}/repo{suffix}")
        assert not again.changed and again.downloaded_bytes == 0 and again.path == first.path
        # A new archive (newer mtime, as a re-upload has): a new snapshot with the new content.
        shutil.rmtree(tmp_path / "repo")
        pack(make_repo(tmp_path, "v2"), archive)
        later = time.time() + 10
        os.utime(archive, (later, later))
        changed = cache.sync(f"{base}/repo{suffix}")
        assert changed.changed
        assert (changed.path / "add_sub/1/model.py").read_text() == "# v2\n"


def test_single_top_folder_is_unwrapped(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    pack(make_repo(tmp_path), served / "models.tgz", top="models")
    with file_server(served) as base:
        result = RepositoryCache(tmp_path / "cache").sync(f"{base}/models.tgz")
    assert result.path.name == "models" and entries(result.path)[0] == "add_sub/1/model.py"


class _NoValidators(_QuietHandler):
    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() not in ("last-modified", "etag"):
            super().send_header(keyword, value)


def test_server_without_validators_is_compared_by_content(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    pack(make_repo(tmp_path), served / "repo.tar.gz")
    cache = RepositoryCache(tmp_path / "cache")
    with file_server(served, _NoValidators) as base:
        assert cache.sync(f"{base}/repo.tar.gz").changed
        again = cache.sync(f"{base}/repo.tar.gz")
    assert not again.changed and again.downloaded_bytes > 0  # downloaded, found identical, not re-extracted


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / "served" / "bad.tar.gz"
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("add_sub/config.pbtxt")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("../evil.py"), "member '../evil.py' escapes the archive"),
        (tarfile.TarInfo("/etc/evil.py"), "member '/etc/evil.py' escapes the archive"),
        (tarfile.TarInfo("add_sub/../../evil.py"), "escapes the archive"),
        (
            _symlink("add_sub/1/model.py", "../../../../etc/passwd"),
            "links to '../../../../etc/passwd' outside",
        ),
        (_symlink("add_sub/abs", "/etc/passwd"), "links to '/etc/passwd' outside"),
        (_hardlink("add_sub/h", "../outside"), "escapes the archive"),
    ],
)
def test_path_traversal_tar_is_refused(tmp_path: Path, member: tarfile.TarInfo, message: str) -> None:
    _tar_with(tmp_path, member)
    cache = RepositoryCache(tmp_path / "cache")
    with file_server(tmp_path / "served") as base, pytest.raises(StorageError, match=message):
        cache.sync(f"{base}/bad.tar.gz")
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "outside").exists()
    assert not list((tmp_path / "cache").glob("*/current"))
    assert not list((tmp_path / "cache").glob("*/tmp-*"))


def test_symlink_inside_the_archive_is_fine(tmp_path: Path) -> None:
    _tar_with(tmp_path, _symlink("add_sub/alias.pbtxt", "config.pbtxt"))
    with file_server(tmp_path / "served") as base:
        result = RepositoryCache(tmp_path / "cache").sync(f"{base}/bad.tar.gz")
    assert (result.path / "add_sub/alias.pbtxt").read_text() == "x"


@pytest.mark.parametrize("name", ["../evil.py", "/abs/evil.py", "a/../../evil.py"])
def test_path_traversal_zip_is_refused(tmp_path: Path, name: str) -> None:
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "bad.zip", "w") as zf:
        zf.writestr("add_sub/config.pbtxt", "x")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with file_server(served) as base, pytest.raises(StorageError, match="escapes the archive"):
        RepositoryCache(tmp_path / "cache").sync(f"{base}/bad.zip")
    assert not list((tmp_path / "cache").glob("*/current"))


def test_zip_symlink_escaping_is_refused(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "bad.zip", "w") as zf:
        info = zipfile.ZipInfo("add_sub/link")
        info.external_attr = 0o120777 << 16  # a symlink entry, as Info-ZIP stores one
        zf.writestr(info, "../../../etc/passwd")
    with file_server(served) as base, pytest.raises(StorageError, match="outside the archive"):
        RepositoryCache(tmp_path / "cache").sync(f"{base}/bad.zip")


class _Truncating(_QuietHandler):
    """Promises the whole file, sends half of it, then drops the connection."""

    def do_GET(self) -> None:
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


def test_interrupted_download_leaves_nothing_visible(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    big = make_repo(tmp_path)
    (big / "add_sub" / "1" / "weights.bin").write_bytes(os.urandom(2 << 20))
    pack(big, served / "repo.tar.gz")
    cache = RepositoryCache(tmp_path / "cache")
    with (
        file_server(served, _Truncating) as base,
        pytest.raises(StorageError, match=r"download failed|got \d+ of"),
    ):
        cache.sync(f"{base}/repo.tar.gz")
    entry = next((tmp_path / "cache").iterdir())
    assert not (entry / "current").exists() and not list(entry.glob("tmp-*"))
    with file_server(served) as base:  # the next try starts clean and succeeds
        result = cache.sync(f"{base}/repo.tar.gz")
    assert (result.path / "add_sub/1/weights.bin").stat().st_size == 2 << 20


def test_http_errors_are_clear_and_redacted(tmp_path: Path) -> None:
    cache = RepositoryCache(tmp_path / "cache")
    with file_server(tmp_path) as base:
        with pytest.raises(StorageError, match=r"not found \(HTTP 404\)") as info:
            cache.sync(f"{base}/missing.tar.gz?X-Amz-Signature=supersecretsig")
        assert "supersecretsig" not in str(info.value)
        port = base.rsplit(":", 1)[1]
    with pytest.raises(StorageError, match=r"cannot connect to 127\.0\.0\.1") as info:
        cache.sync(f"http://user:hunter2pass@127.0.0.1:{port}/gone.zip")
    assert "hunter2pass" not in str(info.value)


def test_long_downloads_log_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = tmp_path / "served"
    served.mkdir()
    big = make_repo(tmp_path)
    (big / "add_sub" / "1" / "weights.bin").write_bytes(os.urandom(1 << 20))
    pack(big, served / "repo.tar.gz")
    cache = RepositoryCache(tmp_path / "cache", progress_interval=0.0)
    with caplog.at_level(logging.INFO, logger="elastiserve.storage"), file_server(served) as base:
        cache.sync(f"{base}/repo.tar.gz")
    lines = [r.getMessage() for r in caplog.records if "downloading" in r.getMessage()]
    assert lines and "MB/s" in lines[-1] and "%" in lines[-1]
    assert any("downloaded 1 file(s)" in r.getMessage() for r in caplog.records)


def test_httpx_request_log_is_redacted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = tmp_path / "served"
    served.mkdir()
    pack(make_repo(tmp_path), served / "repo.zip")
    with caplog.at_level(logging.INFO), file_server(served) as base:
        RepositoryCache(tmp_path / "cache").sync(f"{base}/repo.zip?token=abcdef123456")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "abcdef123456" not in text and "HTTP Request" in text


def test_archives_that_unpack_too_big_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from elastiserve.storage.http import extract_archive

    monkeypatch.setenv("ELASTISERVE_MAX_ARCHIVE_BYTES", str(1 << 20))
    zeros = bytes(4 << 20)  # compresses to a few KB: a small bomb
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/1/model.bin", zeros)
    assert bomb.stat().st_size < 64 << 10
    (tmp_path / "out-zip").mkdir()
    with pytest.raises(StorageError, match=r"unpacks to more than 1,048,576 bytes; refusing to extract"):
        extract_archive(bomb, ".zip", tmp_path / "out-zip", "bomb.zip")
    tarball = tmp_path / "bomb.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("m/1/model.bin")
        info.size = len(zeros)
        tar.addfile(info, io.BytesIO(zeros))
    (tmp_path / "out-tar").mkdir()
    with pytest.raises(StorageError, match="ELASTISERVE_MAX_ARCHIVE_BYTES"):
        extract_archive(tarball, ".tar.gz", tmp_path / "out-tar", "bomb.tar.gz")
    assert not any((tmp_path / "out-tar").iterdir())
    # Under the limit it unpacks.
    monkeypatch.setenv("ELASTISERVE_MAX_ARCHIVE_BYTES", str(8 << 20))
    (tmp_path / "ok").mkdir()
    extract_archive(bomb, ".zip", tmp_path / "ok", "bomb.zip")
    assert (tmp_path / "ok" / "m" / "1" / "model.bin").stat().st_size == 4 << 20


def test_a_zip_whose_directory_lies_about_sizes_is_stopped_while_unpacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from elastiserve.storage.http import extract_archive

    monkeypatch.setenv("ELASTISERVE_MAX_ARCHIVE_BYTES", str(1 << 20))
    liar = tmp_path / "liar.zip"
    with zipfile.ZipFile(liar, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", bytes(2 << 20))
    data = bytearray(liar.read_bytes())
    # Rewrite the uncompressed size in the central directory (and the local header) to 10 bytes.
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = data.find(signature)
        data[at + offset : at + offset + 4] = (10).to_bytes(4, "little")
    liar.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(StorageError):
        extract_archive(liar, ".zip", tmp_path / "out", "liar.zip")
