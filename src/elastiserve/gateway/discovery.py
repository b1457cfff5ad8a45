"""Keeping the gateway's :class:`~elastiserve.gateway.traffic.TrafficTable` in step with the control plane.

Two loops, both over the control plane's HTTP API (never its store):

* the **service list** (tokens, limits, groups) is long-polled with its last ``ETag``, so a
  change (a new token, a stopped service, a group's weights) arrives at once and an unchanged
  list costs a 304; it is also read at once (at most every 0.25 s) when a request names a
  service the gateway does not know yet, so a service is reachable the moment it is created;
* each service's **endpoints** are long-polled with its last ``ETag`` (``If-None-Match`` plus
  ``?wait=``): the call returns as soon as the ready set changes, and costs a 304 otherwise.
  Answers that come back early without a change are spaced out, so a control plane that ignores
  ``wait`` is still not polled in a tight loop.

When the control plane cannot be reached the last known state is kept: instances keep serving
while the control plane restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from elastiserve.client.aio import AsyncControlPlaneClient
from elastiserve.client.controlplane import ControlPlaneError
from elastiserve.gateway.traffic import Service, ServiceConfig, TrafficTable
from elastiserve.gateway.upstream import UpstreamConnection

log = logging.getLogger(__name__)

__all__ = ["Catalog"]

_ON_DEMAND_MIN_GAP: Final = 0.25
_UNCHANGED_MIN_GAP: Final = 1.0  # an unchanged answer sooner than this after the call: wait the rest
_CHANGED_MIN_GAP: Final = 0.05
_BACKOFF_FIRST: Final = 0.5
_BACKOFF_MAX: Final = 5.0


class Catalog:
    """Owns the traffic table's contents and the tasks that refresh them."""

    def __init__(
        self,
        client: AsyncControlPlaneClient,
        table: TrafficTable,
        busy: set[UpstreamConnection],
        *,
        refresh_interval: float = 2.0,
        long_poll: float = 30.0,
        pool_options: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.table = table
        self._busy = busy
        self.refresh_interval = refresh_interval
        self.long_poll = long_poll
        self._pool_options = pool_options or {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[bool] | None = None
        self._refresh_started = -1e9
        self._failing = False
        self._services_etag: str | None = None

    async def start(self) -> None:
        """Read the service list once (a failure is logged, not raised) and start refreshing."""
        with contextlib.suppress(ControlPlaneError):
            await self.refresh_now()
        self._loop_task = asyncio.create_task(self._refresh_loop(), name="gateway-catalog")

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, self._refreshing, *self._watchers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._watchers.clear()
        for service in self.table.services.values():
            service.close()
        await self.client.aclose()

    # -- service list ------------------------------------------------------------------------------

    async def refresh_now(self) -> None:
        """Read the service list (a read that starts now, shared by concurrent callers); raises
        ControlPlaneError when the control plane cannot be read."""
        await self._refreshed_since(time.monotonic(), min_gap=0.0)

    async def refresh_soon(self) -> None:
        """For a request naming an unknown service: a fresh read of the service list (one that
        started after this call), shared by concurrent callers and at most every 0.25 s; never raises."""
        with contextlib.suppress(ControlPlaneError):
            await self._refreshed_since(time.monotonic(), min_gap=_ON_DEMAND_MIN_GAP)

    async def _refreshed_since(self, since: float, min_gap: float) -> None:
        while True:
            task = self._refreshing
            if task is not None and self._refresh_started >= since:
                await asyncio.shield(task)
                return
            if task is not None and not task.done():
                with contextlib.suppress(ControlPlaneError):
                    await asyncio.shield(task)
                continue
            wait = self._refresh_started + min_gap - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._refresh_started = time.monotonic()
            self._refreshing = asyncio.create_task(self._refresh(), name="gateway-services")
            self._refreshing.add_done_callback(_retrieve)

    async def _refresh(self, wait: float | None = None) -> bool:
        """One (conditional) read of the service list; True when it changed."""
        try:
            result = await self.client.services(
                etag=self._services_etag if self.table.loaded else None, wait=wait
            )
        except ControlPlaneError as exc:
            if not self._failing:
                log.warning("cannot read services from the control plane (keeping the last known): %s", exc)
            self._failing = True
            raise
        if self._failing:
            log.info("control plane reachable again")
        self._failing = False
        if result.changed:
            self.apply([ServiceConfig.from_view(v) for v in result.services])
            self._services_etag = result.etag
        return result.changed

    def apply(self, configs: list[ServiceConfig]) -> None:
        """Make the table hold exactly ``configs`` (new services get an endpoint watcher)."""
        table = self.table
        wanted = {c.name: c for c in configs if c.name}
        changed = False
        for name, config in wanted.items():
            service = table.services.get(name)
            if service is None:
                service = Service(config, self._busy, **self._pool_options)
                table.services[name] = service
                self._watchers[name] = asyncio.create_task(
                    self._watch(service), name=f"gateway-endpoints-{name}"
                )
                changed = True
                log.info("service %s added", name)
            elif service.config != config:
                service.apply(config)
                changed = True
        for name in [n for n in table.services if n not in wanted]:
            service = table.services.pop(name)
            task = self._watchers.pop(name, None)
            if task is not None:
                task.cancel()
            service.close()
            changed = True
            log.info("service %s removed", name)
        if changed or not table.loaded:
            table.rebuild_groups()
        table.loaded = True

    async def _refresh_loop(self) -> None:
        """Long-poll the service list. An unchanged answer that comes back sooner than a second
        (a control plane that caps or ignores ``wait``) is followed by a pause, so the list is
        never read in a tight loop; one without an ETag means a plain read every
        ``refresh_interval``; failures back off."""
        backoff = _BACKOFF_FIRST
        while True:
            started = time.monotonic()
            try:
                changed = await self._refresh(wait=self.long_poll)
            except ControlPlaneError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_FIRST
            gap = _CHANGED_MIN_GAP if changed else _UNCHANGED_MIN_GAP
            if self._services_etag is None:  # a control plane without ETags: a plain periodic read
                gap = self.refresh_interval
            elapsed = time.monotonic() - started
            if elapsed < gap:
                await asyncio.sleep(gap - elapsed)

    # -- endpoints -----------------------------------------------------------------------------------

    async def _watch(self, service: Service) -> None:
        name = service.name
        backoff = _BACKOFF_FIRST
        failing = False
        while True:
            known = service.endpoints_known.is_set()
            wait = self.long_poll if known else None
            started = time.monotonic()
            try:
                result = await self.client.endpoints(
                    name, etag=service.endpoints_etag if known else None, wait=wait
                )
            except ControlPlaneError as exc:
                if not failing and exc.status != 404:
                    log.warning("service %s: cannot read endpoints (keeping the last known): %s", name, exc)
                failing = True
                await asyncio.sleep(backoff if exc.status != 404 else self.refresh_interval)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            failing = False
            backoff = _BACKOFF_FIRST
            elapsed = time.monotonic() - started
            if result.changed:
                service.set_endpoints(result.endpoints, result.etag)
                log.info("service %s: %d ready instance(s)", name, len(service.balancer))
                gap = _CHANGED_MIN_GAP
            else:
                gap = _UNCHANGED_MIN_GAP
            if elapsed < gap:
                await asyncio.sleep(gap - elapsed)


def _retrieve(task: asyncio.Task[bool]) -> None:
    """Mark a refresh's failure as seen (it was logged) even when no caller awaited it."""
    if not task.cancelled():
        task.exception()
