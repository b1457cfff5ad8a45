"""s3:// and oss:// through the repository cache, against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from elastiserve.storage import RepositoryCache, StorageError
from elastiserve.storage import s3 as s3_module
from tests.storage.moto_support import MotoServer

BUCKET = "unit-models"


@pytest.fixture(scope="module")
def bucket(moto: MotoServer, example_repo: Path) -> str:
    """The example repository's add_sub and simple_onnx under s3://unit-models/models/."""
    for name in ("add_sub", "simple_onnx"):
        moto.upload_dir(BUCKET, f"models/{name}", example_repo / name)
    return BUCKET


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_sync_then_cache_hit_then_only_changed_objects(
    cloud_env: MotoServer, bucket: str, tmp_path: Path
) -> None:
    s3 = cloud_env.client()
    s3.put_object(Bucket=bucket, Key="changing/a/config.pbtxt", Body=b"one")
    s3.put_object(Bucket=bucket, Key="changing/a/1/model.py", Body=b"# same\n")
    s3.put_object(Bucket=bucket, Key="changing/b/1/model.py", Body=b"# same too\n")
    cache = RepositoryCache(tmp_path)
    first = cache.sync(f"s3://{bucket}/changing")
    assert first.changed and first.downloaded_files == 3
    assert files(first.path) == ["a/1/model.py", "a/config.pbtxt", "b/1/model.py"]
    assert first.path.is_symlink() is True and first.path.name == "current"
    # Another process on the same machine (new cache object, new client): nothing downloaded.
    second = RepositoryCache(tmp_path).sync(f"s3://{bucket}/changing/")
    assert not second.changed and second.downloaded_files == 0 and second.path == first.path
    inode_before = (first.path / "a/1/model.py").stat().st_ino
    folders_before = {d: (first.path / d).stat().st_mtime_ns for d in ("a/1", "b", "b/1")}
    s3.put_object(Bucket=bucket, Key="changing/a/config.pbtxt", Body=b"two")
    third = cache.sync(f"s3://{bucket}/changing")
    assert third.changed and (third.downloaded_files, third.reused_files) == (1, 2)
    assert (third.path / "a/config.pbtxt").read_bytes() == b"two"
    # Unchanged files are the same inode: the engine's fingerprints (size, mtime) see no change.
    assert (third.path / "a/1/model.py").stat().st_ino == inode_before
    assert {d: (third.path / d).stat().st_mtime_ns for d in folders_before} == folders_before
    s3.delete_object(Bucket=bucket, Key="changing/b/1/model.py")
    fourth = cache.sync(f"s3://{bucket}/changing")
    assert files(fourth.path) == ["a/1/model.py", "a/config.pbtxt"]
    # Old snapshots are collected: the current one and the one before it stay.
    snapshots = [p for p in (fourth.path.parent / "snapshots").iterdir() if p.is_dir()]
    assert len(snapshots) == 2
    assert cache.stats["downloaded_files"] == 4


def test_single_object_uri_gives_the_file(cloud_env: MotoServer, bucket: str, tmp_path: Path) -> None:
    result = RepositoryCache(tmp_path).sync(f"s3://{bucket}/models/simple_onnx/1/model.onnx")
    assert result.path.is_file() and result.path.name == "model.onnx" and result.path.stat().st_size > 100


def test_oss_through_the_s3_compatible_api(
    cloud_env: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name, value in cloud_env.oss_env().items():
        monkeypatch.setenv(name, value)
    result = RepositoryCache(tmp_path).sync(f"oss://{bucket}/models")
    assert "add_sub/config.pbtxt" in files(result.path)
    monkeypatch.delenv("OSS_ENDPOINT")
    with pytest.raises(StorageError, match="set OSS_ENDPOINT"):
        RepositoryCache(tmp_path).sync(f"oss://{bucket}/models")


def test_oss_client_settings() -> None:
    from elastiserve.storage.uri import parse_uri

    endpoint, kwargs = s3_module._client_settings(
        parse_uri("oss://bkt/m"),
        {
            "OSS_ENDPOINT": "s3.oss-cn-hangzhou.aliyuncs.com",
            "OSS_ACCESS_KEY_ID": "id",
            "OSS_ACCESS_KEY_SECRET": "sk",
        },
    )
    assert endpoint == "https://s3.oss-cn-hangzhou.aliyuncs.com" and kwargs["region_name"] == "cn-hangzhou"
    assert kwargs["config"].s3 == {"addressing_style": "virtual"} and kwargs["aws_secret_access_key"] == "sk"
    _, kwargs = s3_module._client_settings(
        parse_uri("oss://bkt/m"), {"OSS_ENDPOINT": "oss-cn-beijing-internal.aliyuncs.com", "OSS_REGION": "x"}
    )
    assert kwargs["region_name"] == "x" and "aws_access_key_id" not in kwargs
    _, kwargs = s3_module._client_settings(parse_uri("oss://bkt/m"), {"OSS_ENDPOINT": "http://127.0.0.1:9"})
    assert kwargs["config"].s3 == {"addressing_style": "path"}
    with pytest.raises(StorageError, match="OSS_ADDRESSING_STYLE"):
        s3_module._client_settings(
            parse_uri("oss://bkt/m"), {"OSS_ENDPOINT": "h", "OSS_ADDRESSING_STYLE": "odd"}
        )
    endpoint, kwargs = s3_module._client_settings(
        parse_uri("s3://127.0.0.1:9000/bkt/m"), {"AWS_ENDPOINT_URL": "http://elsewhere"}
    )
    assert endpoint == kwargs["endpoint_url"] == "http://127.0.0.1:9000"


def test_wrong_credentials_are_a_clear_error_without_the_secret(
    cloud_env: MotoServer,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "Wr0ngSecretKeyValue/abcdefghijklmnop"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError, match="access denied") as info:
        RepositoryCache(tmp_path).sync(f"s3://{bucket}/models")
    assert f"'s3://{bucket}/models'" in str(info.value)
    assert wrong not in str(info.value) and wrong not in caplog.text
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKNOWNKEY0000")
    with pytest.raises(StorageError, match=r"access denied \(InvalidAccessKeyId\)"):
        RepositoryCache(tmp_path).sync(f"s3://{bucket}/models")
    assert not list(tmp_path.glob("*/current"))


def test_missing_bucket_empty_prefix_and_unreachable_endpoint(
    cloud_env: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = RepositoryCache(tmp_path)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        cache.sync("s3://no-such-bucket/models")
    with pytest.raises(StorageError, match="no objects under this prefix"):
        cache.sync(f"s3://{bucket}/nothing-here")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"cannot reach the endpoint http://127.0.0.1:9"):
        RepositoryCache(tmp_path).sync(f"s3://{bucket}/models")


def test_failed_download_publishes_nothing(
    cloud_env: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = s3_module.ObjectStore.download
    calls = {"n": 0}

    def flaky(self: s3_module.ObjectStore, obj: s3_module.RemoteObject, dest: Path, progress: object) -> None:
        calls["n"] += 1
        if obj.relative.endswith("model.onnx"):
            dest.write_bytes(b"partial")
            raise StorageError("connection reset in the middle of the download")
        real(self, obj, dest, progress)  # type: ignore[arg-type]

    monkeypatch.setattr(s3_module.ObjectStore, "download", flaky)
    cache = RepositoryCache(tmp_path, workers=1)
    with pytest.raises(StorageError, match="connection reset"):
        cache.sync(f"s3://{bucket}/models")
    entry = next(tmp_path.iterdir())
    assert not (entry / "current").exists()
    monkeypatch.setattr(s3_module.ObjectStore, "download", real)
    result = cache.sync(f"s3://{bucket}/models")
    assert (result.path / "simple_onnx/1/model.onnx").read_bytes() != b"partial"
    assert not list(entry.glob("tmp-*"))


def test_object_changing_during_download_is_retried(
    cloud_env: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = cloud_env.client()
    s3.put_object(Bucket=bucket, Key="racy/m/config.pbtxt", Body=b"old")
    real_list = s3_module.ObjectStore.list
    state = {"first": True}

    def list_then_change(self: s3_module.ObjectStore) -> list[s3_module.RemoteObject]:
        listed = real_list(self)
        if state.pop("first", False):  # the object changes between listing and download
            s3.put_object(Bucket=bucket, Key="racy/m/config.pbtxt", Body=b"newer")
        return listed

    monkeypatch.setattr(s3_module.ObjectStore, "list", list_then_change)
    result = RepositoryCache(tmp_path).sync(f"s3://{bucket}/racy")
    assert (result.path / "m/config.pbtxt").read_bytes() == b"newer"


def test_two_processes_share_one_download(cloud_env: MotoServer, bucket: str, tmp_path: Path) -> None:
    """Two syncers of one URI at once (separate cache objects, as two engines would be): the lock
    makes the second wait and find the first one's copy."""
    s3 = cloud_env.client()
    s3.put_object(Bucket=bucket, Key="shared/m/blob.bin", Body=os.urandom(3 << 20))
    caches = [RepositoryCache(tmp_path), RepositoryCache(tmp_path)]
    results = []
    barrier = threading.Barrier(2)

    def run(cache: RepositoryCache) -> None:
        barrier.wait(5)
        results.append(cache.sync(f"s3://{bucket}/shared"))

    threads = [threading.Thread(target=run, args=(c,)) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 2
    assert sorted(r.downloaded_files for r in results) == [0, 1]


def test_progress_is_logged(
    cloud_env: MotoServer, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = cloud_env.client()
    s3.put_object(Bucket=bucket, Key="progress/m/blob.bin", Body=os.urandom(2 << 20))
    with caplog.at_level(logging.INFO, logger="elastiserve.storage"):
        RepositoryCache(tmp_path, progress_interval=0.0).sync(f"s3://{bucket}/progress")
    assert any("downloading" in r.getMessage() and "MB/s" in r.getMessage() for r in caplog.records)


def test_signed_listing_matches_boto3_and_spares_the_client(
    cloud_env: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """A warm hit lists with one hand-signed GET: no boto3 client (its service model costs 50-90 ms)."""
    s3 = cloud_env.client()
    keys = ["odd/m/a b+c.txt", "odd/m/ü/ß.bin", "odd/m/x%41y", "odd/m/1/model.py", "odd/n/config.pbtxt"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    RepositoryCache(tmp_path).sync(f"s3://{bucket}/odd")
    cache = RepositoryCache(tmp_path)
    result = cache.sync(f"s3://{bucket}/odd")
    assert not result.changed
    store = cache._stores[f"s3://{bucket}/odd"]
    assert store._client is None  # the listing did not need the boto3 client
    store.page_size = 2  # pagination with continuation tokens
    assert store._http is not None
    real_get, pages = store._http.get, []
    store._http.get = lambda *a, **k: pages.append(1) or real_get(*a, **k)  # type: ignore[method-assign]
    signed = store._signed_list("odd/")
    assert len(pages) == 3
    assert signed is not None and sorted(k for k, _, _ in signed) == sorted(keys)
    boto = [
        (o["Key"], o["Size"], o["ETag"]) for o in s3.list_objects_v2(Bucket=bucket, Prefix="odd/")["Contents"]
    ]
    assert sorted(signed) == sorted(boto)
    assert (result.path / "m/ü/ß.bin").read_bytes() == "odd/m/ü/ß.bin".encode()
