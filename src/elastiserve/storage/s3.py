"""S3 and Alibaba OSS (through its S3-compatible API) with boto3: list a prefix, download objects.

Where the endpoint and keys come from (documented in docs/object-storage.md):

* ``s3://``: botocore's own chain — ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
  ``AWS_SESSION_TOKEN``, profiles, instance roles; endpoint ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (or one named in the URI, Triton's ``s3://host:port/bucket/...``);
  region ``AWS_REGION``/``AWS_DEFAULT_REGION``, else us-east-1.
* ``oss://``: endpoint ``OSS_ENDPOINT`` (``oss-cn-hangzhou.aliyuncs.com``; ``https://`` is added
  when no scheme is given), keys ``OSS_ACCESS_KEY_ID``/``OSS_ACCESS_KEY_SECRET`` (optional
  ``OSS_SESSION_TOKEN``), falling back to the AWS ones; region ``OSS_REGION`` or taken from the
  endpoint's host; virtual-hosted addressing (OSS refuses path style) unless
  ``OSS_ADDRESSING_STYLE`` says otherwise or the endpoint is an IP address or localhost.

Errors become :class:`StorageError` messages that name the (redacted) URI and the reason.

Listing — all that a warm cache hit or a poll tick needs — is one hand-signed ListObjectsV2 GET
(botocore's SigV4 signer, httpx): building a boto3 client loads S3's service model, 50-90 ms,
which would be most of a warm hit's cost. Anything unusual (an error, a redirect to another
region, a path-style request an endpoint refuses) falls back to the boto3 client, which gives the
real error; downloads always use boto3.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode, urlsplit

import boto3
import botocore.exceptions
import botocore.session
import httpx
from boto3.s3.transfer import TransferConfig
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from elastiserve.storage.uri import StorageError, StorageURI

log = logging.getLogger(__name__)

_OSS_REGION = re.compile(r"(?:^|\.)oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
    "403",
    "Forbidden",
}
# Our downloads never log request details; keep chatty third-party loggers off DEBUG (their
# debug lines carry signed headers) unless someone configured them on purpose.
for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class RemoteObject:
    key: str  # full object key
    relative: str  # path under the prefix ('/'-separated), where it lands in the local copy
    size: int
    etag: str  # without quotes


class ObjectStore:
    """One ``s3://`` or ``oss://`` location: the client is built once and reused (thread-safe)."""

    page_size: int | None = None  # keys per listing page (S3's default, 1000, when None); tests

    def __init__(self, uri: StorageURI, env: Mapping[str, str] | None = None) -> None:
        assert uri.is_object_store
        self.uri = uri
        env = os.environ if env is None else env
        self._env = env
        self.endpoint, self._kwargs = _client_settings(uri, env)
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._http: httpx.Client | None = None
        self.transfer = TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=8, use_threads=True
        )

    def describe(self) -> str:
        """The endpoint this location is read from (part of the cache key)."""
        return self.endpoint or "aws"

    @property
    def client(self) -> Any:
        """The boto3 client, built on first use (downloads, fallbacks): building it costs 50-90 ms."""
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = boto3.session.Session().client("s3", **self._kwargs)
                except (botocore.exceptions.BotoCoreError, ValueError) as exc:
                    raise StorageError(f"'{self.uri.redacted}': cannot set up the client: {exc}") from None
            return self._client

    def list(self) -> list[RemoteObject]:
        """Every object under the prefix (or the one object the URI names), relative paths checked."""
        prefix = self.uri.key
        objects: list[RemoteObject] = []
        listing_prefix = f"{prefix}/" if prefix else ""
        try:
            items = self._signed_list(listing_prefix)
            if items is None:
                paginator = self.client.get_paginator("list_objects_v2")
                items = [
                    (item["Key"], int(item["Size"]), item["ETag"])
                    for page in paginator.paginate(Bucket=self.uri.bucket, Prefix=listing_prefix)
                    for item in page.get("Contents", [])
                ]
            for key, size, etag in items:
                relative = key[len(listing_prefix) :]
                if not relative or relative.endswith("/"):  # folder markers
                    continue
                if not _safe_relative(relative):
                    log.warning("%s: skipping object with an unsafe name %r", self.uri.redacted, key)
                    continue
                objects.append(RemoteObject(key, relative, size, _etag(etag)))
            if not objects and prefix:  # the URI may name one object (a model file)
                head = self._head(prefix)
                if head is not None:
                    name = prefix.rsplit("/", 1)[-1]
                    objects.append(
                        RemoteObject(prefix, name, int(head["ContentLength"]), _etag(head["ETag"]))
                    )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self.error(exc) from None
        return sorted(objects, key=lambda o: o.relative)

    def _signed_list(self, prefix: str) -> list[tuple[str, int, str]] | None:
        """(key, size, etag) for every object under ``prefix`` by signed GETs, or None when the
        boto3 client should do it instead (no credentials here, any non-200 answer)."""
        base = self._bucket_url()
        credentials = self._credentials()
        if base is None or credentials is None:
            return None
        if self._http is None:
            # Plain http has no TLS to verify; building a verifying context costs ~15 ms, so it is
            # made only for https endpoints (and once per process).
            verify: Any = _tls_context() if base.startswith("https:") else False
            self._http = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0), verify=verify)
        region = self._kwargs.get("region_name") or "us-east-1"
        items: list[tuple[str, int, str]] = []
        token = ""
        for _ in range(100_000):  # pages of 1000 keys; bounded
            params = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
            if self.page_size:
                params["max-keys"] = str(self.page_size)
            if token:
                params["continuation-token"] = token
            request = AWSRequest(
                method="GET", url=f"{base}?{urlencode(sorted(params.items()), quote_via=quote)}"
            )
            S3SigV4Auth(credentials, "s3", region).add_auth(request)
            try:
                response = self._http.get(request.url, headers=dict(request.headers.items()))
            except httpx.HTTPError:
                return None  # boto3 retries and words the error
            if response.status_code != 200:
                return None
            try:
                root = ElementTree.fromstring(response.content)
            except ElementTree.ParseError:
                return None
            for node in root:
                if _tag(node) != "Contents":
                    continue
                fields = {_tag(child): child.text or "" for child in node}
                items.append(
                    (
                        unquote_plus(fields.get("Key", "")),
                        int(fields.get("Size", "0")),
                        fields.get("ETag", ""),
                    )
                )
            fields = {_tag(child): child.text or "" for child in root if len(child) == 0}
            if fields.get("IsTruncated", "false").lower() != "true":
                return items
            token = fields.get("NextContinuationToken", "")
            if not token:
                return None
        return None

    def _bucket_url(self) -> str | None:
        """The bucket's URL the way the boto3 client would address it (None: let boto3 decide)."""
        bucket = self.uri.bucket
        if not self.endpoint:
            if "." in bucket:
                return None
            region = self._kwargs.get("region_name") or "us-east-1"
            return f"https://{bucket}.s3.{region}.amazonaws.com/"
        parts = urlsplit(self.endpoint)
        config = self._kwargs.get("config")
        style = ((getattr(config, "s3", None) or {}).get("addressing_style")) or "path"
        if style == "virtual" and "." not in bucket and parts.hostname and not _is_local(parts.hostname):
            return f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path.rstrip('/')}/"
        return f"{self.endpoint.rstrip('/')}/{quote(bucket)}"

    def _credentials(self) -> Any:
        key_id = self._kwargs.get("aws_access_key_id")
        if key_id:
            return Credentials(
                key_id, self._kwargs["aws_secret_access_key"], self._kwargs.get("aws_session_token")
            )
        env = self._env
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):  # first in botocore's chain too
            return Credentials(
                env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN") or None
            )
        try:
            found = botocore.session.Session().get_credentials()
        except botocore.exceptions.BotoCoreError:
            return None
        return found.get_frozen_credentials() if found is not None else None

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.uri.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def download(self, obj: RemoteObject, dest: Path, progress: Callable[[int], None]) -> None:
        """Download ``obj`` to ``dest`` and check it: the size listed, and the MD5 where the ETag is one."""
        digest = hashlib.md5(usedforsecurity=False)
        try:
            if obj.size >= self.transfer.multipart_threshold:
                self.client.download_file(
                    self.uri.bucket, obj.key, str(dest), Callback=progress, Config=self.transfer
                )
                checkable = _plain_md5(obj.etag)
                if checkable:
                    with open(dest, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(block)
            else:
                response = self.client.get_object(
                    Bucket=self.uri.bucket, Key=obj.key, IfMatch=f'"{obj.etag}"'
                )
                headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                checkable = _plain_md5(obj.etag) and not headers.get(
                    "x-amz-server-side-encryption-customer-algorithm"
                )
                if headers.get("x-amz-server-side-encryption") == "aws:kms":
                    checkable = False
                body = response["Body"]
                with open(dest, "wb") as fh:
                    for block in body.iter_chunks(1 << 20):
                        fh.write(block)
                        digest.update(block)
                        progress(len(block))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            if isinstance(exc, botocore.exceptions.ClientError) and _code(exc) in (
                "PreconditionFailed",
                "412",
                "NoSuchKey",
                "404",
            ):
                raise ObjectChanged(
                    f"'{self.uri.redacted}': '{obj.relative}' changed while downloading"
                ) from None
            raise self.error(exc, obj.relative) from None
        size = dest.stat().st_size
        if size != obj.size:
            raise ObjectChanged(
                f"'{self.uri.redacted}': '{obj.relative}' has {size} bytes, the listing said {obj.size}"
            )
        if checkable and digest.hexdigest() != obj.etag.lower():
            raise ObjectChanged(f"'{self.uri.redacted}': '{obj.relative}' does not match its MD5 ETag")

    def error(self, exc: BaseException, what: str = "") -> StorageError:
        """A clear, redacted message for a boto error."""
        where = f"'{self.uri.redacted}'" + (f" ('{what}')" if what else "")
        endpoint = self.endpoint or "the AWS endpoint"
        if isinstance(
            exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
        ):
            keys = (
                "OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET"
                if self.uri.scheme == "oss"
                else "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
            return StorageError(f"{where}: no credentials found (set {keys})")
        if isinstance(
            exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
        ):
            return StorageError(f"{where}: cannot reach the endpoint {endpoint}")
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return StorageError(f"{where}: the endpoint {endpoint} timed out")
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            if code in ("NoSuchBucket",):
                return StorageError(f"{where}: bucket '{self.uri.bucket}' does not exist (at {endpoint})")
            if code in _DENIED:
                return StorageError(
                    f"{where}: access denied ({code}); check the credentials and the bucket's permissions"
                )
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            message = exc.response.get("Error", {}).get("Message", "")
            return StorageError(f"{where}: {code or 'error'} (HTTP {status}) {message}".rstrip())
        return StorageError(f"{where}: {type(exc).__name__}: {exc}")


class ObjectChanged(StorageError):
    """An object changed between listing and download: the sync is retried."""


def _client_settings(uri: StorageURI, env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """(endpoint or '', boto3 client kwargs) for ``uri`` from the environment."""
    config: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 3, "mode": "standard"},
        "max_pool_connections": 16,
    }
    kwargs: dict[str, Any] = {}
    if uri.scheme == "oss":
        endpoint = env.get("OSS_ENDPOINT", "").strip()
        if not endpoint:
            raise StorageError(
                f"'{uri.redacted}': set OSS_ENDPOINT (for example s3.oss-cn-hangzhou.aliyuncs.com) "
                "to read oss:// locations"
            )
        if "://" not in endpoint:
            endpoint = f"https://{endpoint}"
        host = urlsplit(endpoint).hostname or ""
        found = _OSS_REGION.search(host)
        region = env.get("OSS_REGION") or (found.group(1) if found else "") or "us-east-1"
        style = env.get("OSS_ADDRESSING_STYLE", "").strip().lower() or (
            "path" if _is_local(host) else "virtual"
        )
        if style not in ("virtual", "path", "auto"):
            raise StorageError(f"OSS_ADDRESSING_STYLE must be virtual, path or auto, not '{style}'")
        key_id = env.get("OSS_ACCESS_KEY_ID") or env.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
        secret = env.get("OSS_ACCESS_KEY_SECRET") or env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        token = (
            env.get("OSS_SESSION_TOKEN")
            or env.get("OSS_SECURITY_TOKEN")
            or env.get("ALIBABA_CLOUD_SECURITY_TOKEN")
        )
        if key_id and secret:
            kwargs.update(
                aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token or None
            )
        config["s3"] = {"addressing_style": style}
        # OSS does not implement the newer flexible checksums: only send/check them when required.
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
        kwargs.update(endpoint_url=endpoint, region_name=region)
    else:
        endpoint = uri.endpoint or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", "")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        kwargs["region_name"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs["config"] = Config(**config)
    return endpoint, kwargs


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def _tag(node: ElementTree.Element) -> str:
    return node.tag.rsplit("}", 1)[-1]


def _etag(value: str) -> str:
    return value.strip().strip('"')


def _plain_md5(etag: str) -> bool:
    """A single-part upload's ETag is the MD5 of the content (multipart ones end in '-N')."""
    return bool(re.fullmatch(r"[0-9a-fA-F]{32}", etag))


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _safe_relative(relative: str) -> bool:
    parts = relative.split("/")
    return (
        not relative.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "\\" not in relative
    )
