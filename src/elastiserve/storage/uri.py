"""Model locations as URIs: parse and classify them, and redact credentials out of them.

Accepted forms: a plain path or ``file://path``; ``s3://bucket/prefix`` (also Triton's
``s3://host:port/bucket/prefix`` and ``s3://https://host:port/bucket/prefix`` for an S3-compatible
endpoint named in the URI); ``oss://bucket/prefix``; ``http(s)://host/path/repo.tar.gz`` (or
``.tgz``, ``.tar``, ``.zip``). Every message that may carry a URI goes through :func:`redact`
first, so user names, passwords, presigned-URL signatures and the secret keys held in the
environment never reach a log line or an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from elastiserve.errors import ConfigError

REMOTE_SCHEMES = ("s3", "oss", "http", "https")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
#: Environment variables whose values are secrets: never printed, wherever they turn up.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "OSS_ACCESS_KEY_SECRET",
    "OSS_SESSION_TOKEN",
    "OSS_SECURITY_TOKEN",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "ALIBABA_CLOUD_SECURITY_TOKEN",
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_URI_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)\]]+")
# Query parameters that carry secrets (presigned S3/OSS URLs, SAS tokens, basic API keys).
_SECRET_PARAM = re.compile(r"signature|credential|token|secret|password|passwd|key|sig$|auth", re.IGNORECASE)
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d+$")
MASK = "***"


class StorageError(ConfigError):
    """A remote model location that cannot be used; the message is already redacted."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True, slots=True)
class StorageURI:
    """One parsed location. ``raw`` may hold credentials: print :attr:`redacted`, never ``raw``."""

    raw: str
    scheme: str  # "file", "s3", "oss", "http", "https"
    bucket: str = ""
    key: str = ""  # object key or prefix inside the bucket, no leading '/'
    path: str = ""  # local path (file)
    endpoint: str = ""  # an endpoint named in the URI itself (Triton's s3://host:port/...)

    @property
    def is_remote(self) -> bool:
        return self.scheme in REMOTE_SCHEMES

    @property
    def is_object_store(self) -> bool:
        return self.scheme in ("s3", "oss")

    @property
    def redacted(self) -> str:
        return redact_uri(self.raw)

    @property
    def basename(self) -> str:
        """The last path segment, without an archive suffix (a model's name when the URI is one model)."""
        if self.is_object_store:
            return self.key.rsplit("/", 1)[-1] or self.bucket
        name = urlsplit(self.raw).path.rstrip("/").rsplit("/", 1)[-1] if self.scheme != "file" else self.path
        suffix = self.archive_suffix
        return (name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name).rsplit("/", 1)[-1]

    @property
    def archive_suffix(self) -> str:
        """``.tar.gz``/``.tgz``/``.tar``/``.zip`` for an http(s) archive, else ''."""
        if self.scheme not in ("http", "https"):
            return ""
        path = urlsplit(self.raw).path.lower()
        return next((s for s in ARCHIVE_SUFFIXES if path.endswith(s)), "")


def is_remote(location: str) -> bool:
    match = _SCHEME.match(location)
    return bool(match) and match.group(1).lower() in REMOTE_SCHEMES  # type: ignore[union-attr]


def parse_uri(location: str) -> StorageURI:
    """Classify ``location``; a malformed remote one is a :class:`StorageError` that names it."""
    text = location.strip()
    match = _SCHEME.match(text)
    if not match:
        return StorageURI(raw=location, scheme="file", path=text)
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "file":
        return StorageURI(raw=location, scheme="file", path=rest)
    if scheme in ("s3", "oss"):
        endpoint = ""
        if scheme == "s3":
            inner = _SCHEME.match(rest)
            if inner and inner.group(1).lower() in ("http", "https"):  # s3://https://host:port/bucket/...
                head, _, tail = rest[inner.end() :].partition("/")
                endpoint, rest = f"{inner.group(1).lower()}://{head}", tail
            else:
                head, _, tail = rest.partition("/")
                if _HOST_PORT.match(head):  # s3://host:port/bucket/... (Triton)
                    endpoint, rest = f"http://{head}", tail
        bucket, _, key = rest.partition("/")
        if "@" in bucket:
            raise StorageError(
                f"'{location}': credentials do not belong in a {scheme}:// URI; set them in the "
                "environment (see docs/object-storage.md)"
            )
        if not bucket or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
            raise StorageError(f"'{location}': expected {scheme}://bucket/prefix")
        key = "/".join(part for part in key.split("/") if part)
        if any(part in (".", "..") for part in key.split("/")):
            raise StorageError(f"'{location}': '.' and '..' are not allowed in an object prefix")
        return StorageURI(raw=location, scheme=scheme, bucket=bucket, key=key, endpoint=endpoint)
    if scheme in ("http", "https"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise StorageError(f"'{location}': no host")
        uri = StorageURI(raw=location, scheme=scheme)
        if not uri.archive_suffix:
            raise StorageError(
                f"'{location}': an http(s) model location must be an archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        return uri
    raise StorageError(
        f"'{location}': unsupported scheme '{scheme}' (use a local path, file://, s3://, oss://, "
        "or an http(s) archive)"
    )


def redact_uri(uri: str) -> str:
    """``uri`` without the user info and with secret-looking query values masked."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(name, safe='-_.')}={MASK if _SECRET_PARAM.search(name) else quote(value, safe='-_.:/')}"
            for name, value in pairs
        )
    return _mask_secrets(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def redact(text: str) -> str:
    """``text`` with every URI in it redacted and every secret from the environment masked."""
    return _mask_secrets(_URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text))


def _mask_secrets(text: str) -> str:
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 6 and value in text:
            text = text.replace(value, MASK)
    return text
