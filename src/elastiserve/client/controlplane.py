"""Client for the control plane's REST API: one method per route, one exception type.

Thin on purpose: the CLI, the gateway and the autoscaler all talk to the control plane through
this class (never its store), so each can run in its own process or on its own machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from elastiserve.controlplane.spec import ServiceSpec, apply_assignments

DEFAULT_PORT = 8470
DEFAULT_ENDPOINT = f"http://127.0.0.1:{DEFAULT_PORT}"
ENV_ENDPOINT = "ELASTISERVE_ENDPOINT"
ENV_TOKEN = "ELASTISERVE_TOKEN"
API = "/api/v2/services"


class ControlPlaneError(Exception):
    """The control plane said no (``status`` is its HTTP status) or could not be reached
    (``status`` is None). ``message`` is the server's one-line error; ``details`` its per-field lines."""

    def __init__(self, message: str, status: int | None = None, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.details = details or []

    def __str__(self) -> str:
        return self.message

    @property
    def is_bad_request(self) -> bool:
        """The request itself was wrong (bad spec, bad argument): retrying will not help."""
        return self.status in (400, 413, 422)


@dataclass
class Endpoints:
    """A service's ready instances for direct connection; ``changed`` is False on a 304."""

    service: str
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    etag: str | None = None
    changed: bool = True


@dataclass
class ServiceList:
    """Every service's view; ``changed`` is False on a 304 (then ``services`` is empty)."""

    services: list[dict[str, Any]] = field(default_factory=list)
    etag: str | None = None
    changed: bool = True


def _path(name: str) -> str:
    # Quote everything: a name is validated by the server, but must never alter the URL path.
    return f"{API}/{quote(name, safe='')}"


def _spec_body(spec: ServiceSpec | Mapping[str, Any]) -> dict[str, Any]:
    return spec.to_dict() if isinstance(spec, ServiceSpec) else dict(spec)


def resolve_endpoint_and_token(endpoint: str | None, token: str | None) -> tuple[str, str | None]:
    """The control plane URL (``$ELASTISERVE_ENDPOINT`` or the local default; scheme added when
    missing) and admin token (``$ELASTISERVE_TOKEN``), shared by the sync and async clients."""
    url = (endpoint or os.environ.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url, token if token is not None else os.environ.get(ENV_TOKEN)


class ControlPlaneClient:
    """``ControlPlaneClient(endpoint, token)``; endpoint and token default to
    ``$ELASTISERVE_ENDPOINT`` / ``$ELASTISERVE_TOKEN``."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint, self.token = resolve_endpoint_and_token(endpoint, token)
        headers = {"Authorization": self.token} if self.token else {}
        self._http = httpx.Client(
            base_url=self.endpoint, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, ok: Iterable[int] = (), **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ControlPlaneError(
                f"control plane at {self.endpoint} timed out ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"cannot reach the control plane at {self.endpoint}: {exc}") from None
        if response.is_success or response.status_code in ok:
            return response
        raise self._error(response)

    @staticmethod
    def _error(response: httpx.Response) -> ControlPlaneError:
        message, details = "", None
        try:
            body = response.json()
            if isinstance(body, dict):
                message = str(body.get("error") or "")
                details = body.get("details")
        except ValueError:
            message = response.text.strip()[:500]
        return ControlPlaneError(message or f"HTTP {response.status_code}", response.status_code, details)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- services --------------------------------------------------------------------------------

    def health(self) -> bool:
        """True when the control plane answers its health check."""
        try:
            return self._http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def create_service(self, spec: ServiceSpec | Mapping[str, Any]) -> dict[str, Any]:
        """Create a service; the reply holds the view, the (possibly generated) token and ``warnings``."""
        return self._json("POST", API, json=_spec_body(spec))

    def list_services(self) -> list[dict[str, Any]]:
        return self._json("GET", API)["services"]

    def get_service(self, name: str) -> dict[str, Any]:
        return self._json("GET", _path(name))

    def get_service_with_etag(self, name: str) -> tuple[dict[str, Any], str | None]:
        response = self._request("GET", _path(name))
        return response.json(), response.headers.get("etag")

    def update_service(
        self, name: str, spec: ServiceSpec | Mapping[str, Any], *, if_match: str | None = None
    ) -> dict[str, Any]:
        """Replace the spec (``change`` in the reply: unchanged, scaled or released)."""
        headers = {"If-Match": if_match} if if_match else {}
        return self._json("PUT", _path(name), json=_spec_body(spec), headers=headers)

    def modify_service(self, name: str, assignments: Iterable[str], *, retries: int = 3) -> dict[str, Any]:
        """``-Dkey=value`` modifications: read the spec, apply them, validate, write it back guarded
        by the ETag; a concurrent change (412) is retried on the fresh spec."""
        assignments = list(assignments)
        for attempt in range(retries + 1):
            current, etag = self.get_service_with_etag(name)
            spec = apply_assignments(current["spec"], assignments)
            try:
                return self.update_service(name, spec, if_match=etag)
            except ControlPlaneError as exc:
                if exc.status != 412 or attempt == retries:
                    raise
        raise AssertionError("unreachable")

    def delete_service(self, name: str) -> dict[str, Any]:
        """``result`` is ``deleted`` (gone) or ``deleting`` (instances are draining)."""
        return self._json("DELETE", _path(name))

    def start_service(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"{_path(name)}/start")

    def stop_service(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"{_path(name)}/stop")

    # -- versions --------------------------------------------------------------------------------

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        return self._json("GET", f"{_path(name)}/versions")["versions"]

    def get_version(self, name: str, number: int) -> dict[str, Any]:
        return self._json("GET", f"{_path(name)}/versions/{int(number)}")

    def rollback(self, name: str, number: int) -> dict[str, Any]:
        """Make version ``number`` current (``eascmd version NAME N``)."""
        return self._json("PUT", f"{_path(name)}/versions/{int(number)}")

    # -- instances, events, logs -----------------------------------------------------------------

    def list_instances(self, name: str) -> list[dict[str, Any]]:
        return self._json("GET", f"{_path(name)}/instances")["instances"]

    def delete_instance(self, name: str, instance_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"{_path(name)}/instances/{quote(instance_id, safe='')}")

    def events(self, name: str, *, limit: int = 100, since: int = 0) -> list[dict[str, Any]]:
        return self._json("GET", f"{_path(name)}/events", params={"limit": limit, "since": since})["events"]

    def logs(self, name: str, *, instance: str | None = None, tail: int = 200) -> str:
        params: dict[str, Any] = {"tail": tail}
        if instance:
            params["instance"] = instance
        return self._request("GET", f"{_path(name)}/logs", params=params).text

    def follow_logs(self, name: str, *, instance: str | None = None, tail: int = 200) -> Iterator[str]:
        """Yield log text as it arrives until the service goes away or the caller stops."""
        params: dict[str, Any] = {"tail": tail, "follow": "true"}
        if instance:
            params["instance"] = instance
        try:
            with self._http.stream(
                "GET", f"{_path(name)}/logs", params=params, timeout=httpx.Timeout(10.0, read=None)
            ) as response:
                if not response.is_success:
                    response.read()
                    raise self._error(response)
                yield from response.iter_text()
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"log stream from {self.endpoint} broke: {exc}") from None

    # -- discovery -------------------------------------------------------------------------------

    def endpoints(self, name: str, *, etag: str | None = None, wait: float | None = None) -> Endpoints:
        """Ready instances. With the previous ``etag`` an unchanged set costs a 304; with ``wait``
        the call long-polls until the set changes or ``wait`` seconds pass."""
        headers = {"If-None-Match": etag} if etag else {}
        params = {"wait": wait} if wait else {}
        timeout = (wait or 0) + self._http.timeout.read if self._http.timeout.read else None
        response = self._request(
            "GET", f"{_path(name)}/endpoints", ok=(304,), headers=headers, params=params, timeout=timeout
        )
        new_etag = response.headers.get("etag", etag)
        if response.status_code == 304:
            return Endpoints(name, [], new_etag, changed=False)
        body = response.json()
        return Endpoints(body.get("service", name), body.get("endpoints", []), new_etag, changed=True)
