"""Composition root of the engine: wires repository, registry, dataplane, frontends, metrics.

Frontends start before models load, so ``/v2/health/live`` answers at once and
``/v2/health/ready`` turns true when the initial models are ready (what a platform's readiness
probe needs). SIGTERM/SIGINT drain: readiness goes false, in-flight requests finish (up to
``--exit-timeout-secs``), models are finalized.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from elastiserve.engine.dataplane import DataPlane
from elastiserve.engine.metrics import CONTENT_TYPE, EngineMetrics
from elastiserve.engine.options import ServeOptions
from elastiserve.engine.registry import ModelRegistry
from elastiserve.engine.repository import ModelRepository
from elastiserve.errors import ElastiserveError

log = logging.getLogger("elastiserve.engine")


def configure_logging(options: ServeOptions) -> None:
    level = (
        logging.DEBUG
        if options.log_verbose > 0
        else (logging.INFO if options.log_info else logging.WARNING if options.log_warning else logging.ERROR)
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", stream=sys.stderr
    )


class EngineServer:
    """One engine process: what ``elastiserve serve`` runs."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.repository = ModelRepository(options.model_repository)
        self.registry = ModelRegistry(
            self.repository,
            control_mode=options.model_control_mode,
            strict_config=options.strict_model_config,
            strict_readiness=options.strict_readiness,
        )
        if options.cache_size:
            from elastiserve.engine.response_cache import ResponseCache

            self.registry.response_cache = ResponseCache(options.cache_size)
            log.info("response cache: local, %d bytes", options.cache_size)
        self.dataplane = DataPlane(self.registry, server_id=options.id)
        self.registry.server = self.dataplane
        self.metrics = EngineMetrics(self.registry)
        self._handles: list = []
        self._stop = asyncio.Event()

    async def start(self) -> list[str]:
        """Start frontends, load the initial models; returns model load failures."""
        options = self.options
        if options.allow_http:
            from elastiserve.engine.frontends.rest import start_http_server

            self._handles.append(
                await start_http_server(
                    self.dataplane,
                    options.http_address,
                    options.http_port,
                    max_body_bytes=options.http_max_body_bytes,
                )
            )
            log.info("started HTTPService at %s:%d", options.http_address, options.http_port)
        if options.allow_grpc:
            from elastiserve.engine.frontends.grpc import start_grpc_server

            self._handles.append(
                await start_grpc_server(
                    self.dataplane,
                    options.grpc_address,
                    options.grpc_port,
                    max_message_bytes=options.grpc_max_message_bytes,
                )
            )
            log.info("started GRPCInferenceService at %s:%d", options.grpc_address, options.grpc_port)
        if options.allow_metrics:
            from elastiserve.engine.frontends.rest import start_plain_http_server

            def metrics_route() -> tuple[int, dict[str, str], bytes]:
                return 200, {"Content-Type": CONTENT_TYPE}, self.metrics.render()

            self._handles.append(
                await start_plain_http_server(
                    options.metrics_address, options.metrics_port, {"/metrics": metrics_route}
                )
            )
            log.info("started Metrics Service at %s:%d", options.metrics_address, options.metrics_port)
        if self.repository.has_remote:  # s3://, oss://, http archives: sync into the local cache first
            await asyncio.to_thread(self.repository.refresh)
        failures = await self.registry.load_initial(options.load_model)
        for failure in failures:
            log.error("%s", failure)
        return failures

    async def poll_forever(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.options.repository_poll_secs)
            if self._stop.is_set():
                return
            try:
                await self.registry.poll()
            except Exception:
                log.exception("repository poll failed")

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self.dataplane.shutting_down = True
        for handle in reversed(self._handles):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.close(), self.options.exit_timeout_secs)
        await self.registry.close()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            failures = await self.start()
        except (ElastiserveError, OSError) as exc:
            log.error("error: creating server: %s", exc)
            await self.stop()
            return 1
        if failures and self.options.exit_on_error:
            log.error("error: creating server: failed to load all models")
            await self.stop()
            return 1
        poller = None
        if self.options.model_control_mode == "poll":
            poller = asyncio.create_task(self.poll_forever())
        await self._stop.wait()
        log.info("shutting down")
        if poller is not None:
            poller.cancel()
        await self.stop()
        return 0


def run(options: ServeOptions) -> int:
    configure_logging(options)
    for warning in options.warnings:
        log.warning("%s", warning)
    try:
        server = EngineServer(options)
    except ElastiserveError as exc:
        log.error("error: creating server: %s", exc)
        return 1
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(server.run())
