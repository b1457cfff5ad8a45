"""One exception tree for the whole project.

Every error carries a Triton-style code; frontends map it to an HTTP status or a gRPC status
code in exactly one place each (:data:`HTTP_STATUS`, :data:`GRPC_CODE_NAME`), so the mapping
matches Triton's ``HttpCodeFromError`` and its gRPC status translation.
"""

from __future__ import annotations


class ElastiserveError(Exception):
    """Base error: ``code`` is one of Triton's TRITONSERVER_Error codes (lower case)."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @property
    def grpc_code_name(self) -> str:
        return GRPC_CODE_NAME.get(self.code, "INTERNAL")


class InvalidArgument(ElastiserveError):
    """The client sent something wrong (bad tensor, unknown model, bad JSON)."""

    code = "invalid_arg"


class NotFound(ElastiserveError):
    code = "not_found"


class Unavailable(ElastiserveError):
    """Temporarily unable to serve (queue full, model not ready, shutting down)."""

    code = "unavailable"


class Unsupported(ElastiserveError):
    code = "unsupported"


class AlreadyExists(ElastiserveError):
    code = "already_exists"


class Internal(ElastiserveError):
    code = "internal"


class PayloadTooLarge(ElastiserveError):
    """Request body over the configured limit (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""

    code = "payload_too_large"


class Cancelled(ElastiserveError):
    code = "cancelled"


class ConfigError(InvalidArgument):
    """A model configuration, service spec or command line that cannot be used."""


# Triton's http_server.cc HttpCodeFromError.
HTTP_STATUS: dict[str, int] = {
    "internal": 500,
    "not_found": 404,
    "invalid_arg": 400,
    "unavailable": 503,
    "unsupported": 501,
    "already_exists": 400,
    "unknown": 400,
    "payload_too_large": 413,
    "cancelled": 499,
}

# Names of grpc.StatusCode members (looked up lazily so this module imports nothing heavy).
GRPC_CODE_NAME: dict[str, str] = {
    "internal": "INTERNAL",
    "not_found": "NOT_FOUND",
    "invalid_arg": "INVALID_ARGUMENT",
    "unavailable": "UNAVAILABLE",
    "unsupported": "UNIMPLEMENTED",
    "already_exists": "ALREADY_EXISTS",
    "unknown": "UNKNOWN",
    "payload_too_large": "RESOURCE_EXHAUSTED",
    "cancelled": "CANCELLED",
}
