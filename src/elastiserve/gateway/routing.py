"""Request paths: ``/api/predict/<service>[/<path>]`` split, checked and mapped to an instance path.

The gateway forwards the raw (still percent-encoded) path, so nothing here decodes what it
passes on; it only refuses what could make an instance see a different path than the one the
gateway authorised: dot segments (``..``, ``%2e%2e``, ``.%2E``), encoded slashes and
backslashes (``%2f``, ``%5c``), raw backslashes, NUL bytes and empty segments. Service names
follow the control plane's rule exactly (lower-case letters, digits, ``_`` and ``-``), checked on
the raw bytes, so an encoded or dotted name can never resolve to a service.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

from elastiserve.controlplane.spec import NAME_RE

__all__ = ["PREDICT_PREFIX", "RouteError", "default_model_path", "is_idempotent", "split_predict_path"]

PREDICT_PREFIX: Final = "/api/predict/"
_PREFIX_LEN: Final = len(PREDICT_PREFIX)
# Encoded '/', '\' and NUL: an instance (or anything behind it) may decode them into structure.
_FORBIDDEN_ENCODED = re.compile(r"%(?:2f|5c|00)", re.IGNORECASE)
_DOT_SEGMENT = {".", ".."}
# V2 inference routes: retried after a dropped connection (see ``is_idempotent``).
_INFER_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$")
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class RouteError(Exception):
    """A path the gateway refuses: ``status`` (400 or 404) and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def split_predict_path(path: str) -> tuple[str, str]:
    """``/api/predict/svc/v2/models/m/infer`` → ``("svc", "/v2/models/m/infer")``.

    The remainder is ``""`` for ``/api/predict/svc`` and ``/api/predict/svc/``. Raises
    :class:`RouteError` for paths outside the prefix (404) and for unsafe paths or invalid
    service names (400).
    """
    if not path.startswith(PREDICT_PREFIX):
        raise RouteError(404, f"no route {path[:200]!r} (use /api/predict/<service>/...)")
    slash = path.find("/", _PREFIX_LEN)
    if slash < 0:
        name, rest = path[_PREFIX_LEN:], ""
    else:
        name, rest = path[_PREFIX_LEN:slash], path[slash:]
    if not NAME_RE.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise RouteError(400, f"invalid service name {shown!r} in the path")
    if rest == "/":
        return name, ""
    if rest:
        _check_rest(rest)
    return name, rest


def _check_rest(rest: str) -> None:
    if "." not in rest and "%" not in rest and "\\" not in rest and "//" not in rest and "\x00" not in rest:
        return  # the common case (/v2/models/m/infer): nothing that could alter the path
    if "\\" in rest or "\x00" in rest or _FORBIDDEN_ENCODED.search(rest):
        raise RouteError(400, "path contains an encoded slash, a backslash or a NUL byte")
    segments = rest.split("/")
    # segments[0] is "" (rest starts with '/'); a trailing '/' gives one more "" at the end.
    last = len(segments) - 1
    for index in range(1, len(segments)):
        segment = segments[index]
        if not segment:
            if index == last:
                continue
            raise RouteError(400, "path contains an empty segment ('//')")
        if "." in segment or "%" in segment:
            decoded = unquote(segment)
            if decoded in _DOT_SEGMENT:
                raise RouteError(400, "path contains a '.' or '..' segment")


def default_model_path(method: str, model: str) -> str | None:
    """Where ``/api/predict/<service>`` goes on an instance: ``POST`` infers with the service's
    default model, ``GET``/``HEAD`` read its metadata; None for any other method."""
    if method == "POST":
        return f"/v2/models/{model}/infer"
    if method in ("GET", "HEAD"):
        return f"/v2/models/{model}"
    return None


def is_idempotent(method: str, path: str, body: bytes, json_header_length: int | None) -> bool:
    """May this request be sent again after the connection dropped mid-flight?

    Idempotent methods may. So may a V2 ``infer`` (inference on a model is a function of its
    request) unless its JSON header names a ``sequence_id``: sequence (stateful) models must not
    see a request twice. Everything else (repository load/unload, custom services' POSTs) is
    only retried when it provably never reached an instance.
    """
    if method in _IDEMPOTENT_METHODS:
        return True
    if method != "POST" or not _INFER_PATH.match(path.partition("?")[0]):
        return False
    header = body if json_header_length is None else body[:json_header_length]
    return b"sequence_id" not in header
