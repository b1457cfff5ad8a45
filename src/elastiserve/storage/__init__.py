"""Remote model locations: ``s3://``, ``oss://`` and http(s) archives, synced into a local cache.

A leaf package (it imports nothing from the engine or the control plane): the engine's model
repository and the local runtime both use :class:`RepositoryCache`. boto3 and httpx are
imported only when a remote location is actually synced.
"""

from elastiserve.storage.cache import CACHE_DIR_ENV, RepositoryCache, SyncResult, default_cache_dir
from elastiserve.storage.uri import StorageError, StorageURI, is_remote, parse_uri, redact, redact_uri

__all__ = [
    "CACHE_DIR_ENV",
    "RepositoryCache",
    "StorageError",
    "StorageURI",
    "SyncResult",
    "default_cache_dir",
    "is_remote",
    "parse_uri",
    "redact",
    "redact_uri",
]
