"""Parsing model locations and keeping credentials out of every message."""

from __future__ import annotations

import pytest

from elastiserve.storage import StorageError, is_remote, parse_uri, redact, redact_uri


def test_local_forms() -> None:
    assert parse_uri("models").scheme == "file"
    assert parse_uri("/abs/models").path == "/abs/models"
    uri = parse_uri("file:///abs/models")
    assert (uri.scheme, uri.path, uri.is_remote) == ("file", "/abs/models", False)
    assert not is_remote("file:///x") and not is_remote("relative/dir") and is_remote("S3://b/x")


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "key", "endpoint"),
    [
        ("s3://bucket/models", "s3", "bucket", "models", ""),
        ("s3://bucket/models/", "s3", "bucket", "models", ""),
        ("s3://bucket//a//b/", "s3", "bucket", "a/b", ""),
        ("s3://bucket", "s3", "bucket", "", ""),
        ("oss://triton-model-repo/models", "oss", "triton-model-repo", "models", ""),
        # Triton's forms for an S3-compatible endpoint named in the URI.
        ("s3://127.0.0.1:9000/bucket/models", "s3", "bucket", "models", "http://127.0.0.1:9000"),
        ("s3://https://minio.local:9000/bucket/m", "s3", "bucket", "m", "https://minio.local:9000"),
    ],
)
def test_object_store_forms(text: str, scheme: str, bucket: str, key: str, endpoint: str) -> None:
    uri = parse_uri(text)
    assert (uri.scheme, uri.bucket, uri.key, uri.endpoint) == (scheme, bucket, key, endpoint)
    assert uri.is_remote and uri.is_object_store


def test_archives_and_basenames() -> None:
    assert parse_uri("https://h/x/repo.tar.gz?versionId=3").archive_suffix == ".tar.gz"
    assert parse_uri("http://h/repo.ZIP").archive_suffix == ".zip"
    assert parse_uri("https://h/x/simple_onnx.tgz").basename == "simple_onnx"
    assert parse_uri("s3://bkt/models/simple_onnx/").basename == "simple_onnx"
    assert parse_uri("oss://bkt").basename == "bkt"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://host/models", "must be an archive"),
        ("ftp://host/x.tar.gz", "unsupported scheme 'ftp'"),
        ("s3:///models", "expected s3://bucket/prefix"),
        ("s3://bucket/a/../b", "'.' and '..' are not allowed"),
        ("https:///x.zip", "no host"),
    ],
)
def test_malformed_locations_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        parse_uri(text)


def test_credentials_in_an_object_store_uri_are_refused_and_never_echoed() -> None:
    with pytest.raises(StorageError) as info:
        parse_uri("oss://AKID:TopSecret123@bucket/models")
    assert "TopSecret123" not in str(info.value) and "set them in the environment" in str(info.value)


def test_redact_uri() -> None:
    assert redact_uri("https://alice:pw123456@host:8443/r.tar.gz") == "https://***@host:8443/r.tar.gz"
    presigned = (
        "https://b.s3.amazonaws.com/r.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
        "&X-Amz-Signature=deadbeefcafe&X-Amz-Security-Token=tok123456&versionId=7"
    )
    out = redact_uri(presigned)
    assert "deadbeefcafe" not in out and "tok123456" not in out and "AKIA" not in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "versionId=7" in out
    oss = redact_uri(
        "https://b.oss-cn-hangzhou.aliyuncs.com/r.zip?OSSAccessKeyId=LTAI5&Expires=1&Signature=abc%2Bdef"
    )
    assert "LTAI5" not in oss and "abc" not in oss and "Expires=1" in oss


def test_redact_masks_uris_in_text_and_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "ossSecretValue42")
    text = (
        "failed: GET https://u:p4ssword@h/r.tar.gz?sig=xyz123 with key wJalrXUtnFEMI/K7MDENG "
        "and ossSecretValue42"
    )
    out = redact(text)
    for secret in ("p4ssword", "xyz123", "wJalrXUtnFEMI/K7MDENG", "ossSecretValue42"):
        assert secret not in out
    assert "https://***@h/r.tar.gz?sig=***" in out
    assert str(StorageError(text)).count("***") >= 3
