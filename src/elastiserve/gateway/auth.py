"""Service tokens: read the ``Authorization`` header and compare it in constant time.

EAS clients send the bare token (``Authorization: <token>``); HTTP libraries often add
``Bearer``; both are accepted. Tokens are compared as SHA-256 digests with
:func:`hmac.compare_digest`, so neither the content nor the length of a token leaks through
timing, and a request for a service group is checked against every member's token without an
early exit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

__all__ = ["AUTH_FORBIDDEN", "AUTH_OK", "AUTH_REQUIRED", "check", "digest", "presented_token"]

AUTH_OK = 0
AUTH_REQUIRED = 401
AUTH_FORBIDDEN = 403

_BEARER = b"bearer "


def digest(token: str | bytes) -> bytes:
    """What the gateway keeps of a token: its SHA-256 (fixed length, so comparisons are too)."""
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def presented_token(header: bytes | None) -> bytes | None:
    """The token in an ``Authorization`` header value (``<token>`` or ``Bearer <token>``)."""
    if header is None:
        return None
    value = header.strip()
    if value[:7].lower() == _BEARER:
        value = value[7:].strip()
    return value or None


def check(header: bytes | None, expected: Sequence[bytes]) -> int:
    """``AUTH_OK`` when ``expected`` is empty (an open service) or the header carries one of the
    expected tokens (given as :func:`digest`\\ s); ``AUTH_REQUIRED`` (401) without a token;
    ``AUTH_FORBIDDEN`` (403) with a wrong one."""
    if not expected:
        return AUTH_OK
    token = presented_token(header)
    if token is None:
        return AUTH_REQUIRED
    presented = hashlib.sha256(token).digest()
    matched = False
    for candidate in expected:  # no early exit: every member's token is compared
        matched |= hmac.compare_digest(presented, candidate)
    return AUTH_OK if matched else AUTH_FORBIDDEN
