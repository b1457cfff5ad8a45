"""Asyncio client for the control plane's read routes that long-running processes watch.

The gateway (and later the direct-connect SDK) keeps one long-poll per service open on
``GET …/endpoints?wait=``; with the blocking :class:`~elastiserve.client.ControlPlaneClient`
that would be one thread per service, so this is the same contract over ``httpx.AsyncClient``:
same paths, same :class:`~elastiserve.client.Endpoints` result, same
:class:`~elastiserve.client.ControlPlaneError`.
"""

from __future__ import annotations

from typing import Any

import httpx

from elastiserve.client.controlplane import (
    API,
    ControlPlaneClient,
    ControlPlaneError,
    Endpoints,
    ServiceList,
    _path,
    resolve_endpoint_and_token,
)

__all__ = ["AsyncControlPlaneClient"]


class AsyncControlPlaneClient:
    """``AsyncControlPlaneClient(endpoint, token)``: services list and endpoint long-polls."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint, self.token = resolve_endpoint_and_token(endpoint, token)
        headers = {"Authorization": self.token} if self.token else {}
        self._timeout = timeout
        # One long-poll per service is held open: no cap on connections.
        self._http = httpx.AsyncClient(
            base_url=self.endpoint,
            headers=headers,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncControlPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ControlPlaneError(
                f"control plane at {self.endpoint} timed out ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"cannot reach the control plane at {self.endpoint}: {exc}") from None
        if response.is_success or response.status_code in ok:
            return response
        raise ControlPlaneClient._error(response)  # same error reading as the sync client

    async def health(self) -> bool:
        try:
            return (await self._http.get("/healthz", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def list_services(self) -> list[dict[str, Any]]:
        """Every service's view (specs with tokens when this client holds the admin token)."""
        return (await self._request("GET", API)).json()["services"]

    async def services(self, *, etag: str | None = None, wait: float | None = None) -> ServiceList:
        """The service list; with ``etag`` an unchanged list is a cheap 304 (``changed`` False),
        and with ``wait`` the call long-polls until something changes or ``wait`` seconds pass."""
        response = await self._request(
            "GET",
            API,
            ok=(304,),
            headers={"If-None-Match": etag} if etag else {},
            params={"wait": wait} if wait else {},
            timeout=(wait or 0) + self._timeout,
        )
        new_etag = response.headers.get("etag", etag)
        if response.status_code == 304:
            return ServiceList([], new_etag, changed=False)
        return ServiceList(response.json()["services"], new_etag, changed=True)

    async def endpoints(self, name: str, *, etag: str | None = None, wait: float | None = None) -> Endpoints:
        """Ready instances; with ``etag`` an unchanged set is a cheap 304 (``changed`` False), and
        with ``wait`` the call long-polls until the set changes or ``wait`` seconds pass."""
        headers = {"If-None-Match": etag} if etag else {}
        params = {"wait": wait} if wait else {}
        response = await self._request(
            "GET",
            f"{_path(name)}/endpoints",
            ok=(304,),
            headers=headers,
            params=params,
            timeout=(wait or 0) + self._timeout,
        )
        new_etag = response.headers.get("etag", etag)
        if response.status_code == 304:
            return Endpoints(name, [], new_etag, changed=False)
        body = response.json()
        return Endpoints(body.get("service", name), body.get("endpoints", []), new_etag, changed=True)
