"""Transports that serve bytes-in/bytes-out unary gRPC methods whose handlers run on the engine's
event loop.

``core`` (the default) drives gRPC's C core directly through grpcio's Cython layer: one
daemon thread blocks in ``CompletionQueue.poll`` (GIL released), accepts calls, reads the
request message and queues ``(call, handler, bytes)`` for the event loop, waking it once per
batch; the handler runs as a task on the loop (the same loop, and thread, as the dataplane,
so no second hop), and the loop thread starts the send-status batch itself. Per call that is
one thread hop and three small completion events, where ``grpc.aio`` pays several
hop-and-future round trips and the sync ``grpc.server`` two thread hand-offs plus a condition
variable. docs/grpc-stack.md has the measurements behind the choice.

``aio`` is the public ``grpc.aio`` server on the same loop: slower, but it uses only public
grpcio API, so it is the fallback when grpcio's Cython layer is not the one this module
expects (``ELASTISERVE_GRPC_TRANSPORT=aio`` forces it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from elastiserve.errors import ElastiserveError

log = logging.getLogger("elastiserve.engine.grpc")

Handler = Callable[[bytes], Awaitable[bytes]]
ChannelOptions = Sequence[tuple[str, Any]]

_OK = grpc.StatusCode.OK.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for a failed handler: ElastiserveError by its code; anything else is a
    server bug, logged here with its traceback and answered INTERNAL with a one-line message."""
    if isinstance(exc, ElastiserveError):
        return getattr(grpc.StatusCode, exc.grpc_code_name, grpc.StatusCode.INTERNAL), exc.message
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled: the server is shutting down"
    log.error("unhandled error in gRPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC wants it (IPv6 literals bracketed)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class CoreUnavailable(RuntimeError):
    """grpcio's Cython layer does not look like the one the core transport was written for."""


class CoreTransport:
    """gRPC's completion queue polled by one thread, handlers run on ``loop``."""

    _ARMED_CALLS = 8  # outstanding request_call slots, so new calls never wait for a re-arm

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handlers: Mapping[str, Handler],
        unimplemented: Mapping[str, str],
        options: ChannelOptions,
    ) -> None:
        try:
            from grpc._cython import cygrpc

            self._cygrpc = cygrpc
            self._cq = cygrpc.CompletionQueue()
            self._server = cygrpc.Server(tuple(options), False)
            self._server.register_completion_queue(self._cq)
            self._queue_shutdown = cygrpc.CompletionType.queue_shutdown
            self._recv_op = cygrpc.ReceiveMessageOperation
            self._md_op = cygrpc.SendInitialMetadataOperation
            self._status_op = cygrpc.SendStatusFromServerOperation
            self._message_op = cygrpc.SendMessageOperation
        except (ImportError, AttributeError, TypeError) as exc:
            raise CoreUnavailable(f"grpcio {grpc.__version__}: {exc}") from exc
        self._loop = loop
        self._handlers = {path.encode(): handler for path, handler in handlers.items()}
        self._unimplemented = {path.encode(): message.encode() for path, message in unimplemented.items()}
        self._pending: collections.deque[tuple[Any, Handler, bytes]] = collections.deque()
        self._scheduled = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._cq_closed = False
        self._shutdown_complete = False
        self._closing: asyncio.Task[None] | None = None
        self._new_tag = object()
        self._sent_tag = object()
        self._shutdown_tag = object()
        self._shutdown_seen: asyncio.Future[None] = loop.create_future()
        self._thread_done: asyncio.Future[None] = loop.create_future()
        self._thread: threading.Thread | None = None

    def bind(self, address: str) -> int:
        port = self._server.add_http2_port(address.encode())
        if not port:
            raise OSError(f"failed to bind the gRPC server to {address} (address in use or not available)")
        return int(port)

    def start(self) -> None:
        self._server.start()
        self._accepting = True
        for _ in range(self._ARMED_CALLS):
            self._server.request_call(self._cq, self._cq, self._new_tag)
        self._thread = threading.Thread(target=self._poll, name="elastiserve-grpc-poll", daemon=True)
        self._thread.start()

    async def close(self, grace: float | None) -> None:
        """Stop accepting calls, let in-flight ones finish for ``grace`` seconds, then cancel them."""
        if self._closing is None:
            self._closing = self._loop.create_task(self._close(grace))
        await asyncio.shield(self._closing)

    async def _close(self, grace: float | None) -> None:
        self._accepting = False
        self._server.shutdown(self._cq, self._shutdown_tag)
        try:
            await asyncio.wait_for(asyncio.shield(self._shutdown_seen), grace)
        except TimeoutError:
            self._server.cancel_all_calls()
            for task in list(self._inflight):
                task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self._shutdown_seen), 5.0)
            except TimeoutError:
                log.warning("gRPC server did not finish shutting down; leaving its poller thread")
                return
        # Every call is done: no batch can start any more, so the queue may shut down.
        self._cq_closed = True
        self._cq.shutdown()
        await asyncio.shield(self._thread_done)
        if self._shutdown_complete:  # else destroy() would wait for a tag nobody polls
            self._server.destroy()

    # -- poller thread ------------------------------------------------------------------------
    def _poll(self) -> None:
        cq = self._cq
        new_tag, shutdown_tag = self._new_tag, self._shutdown_tag
        queue_shutdown = self._queue_shutdown
        try:
            while True:
                event = cq.poll()
                if event.completion_type == queue_shutdown:
                    return
                tag = event.tag
                try:
                    if tag is new_tag:
                        self._on_new_call(event)
                    elif tag.__class__ is tuple:
                        self._on_message(event, tag)
                    elif tag is shutdown_tag:
                        self._shutdown_complete = True
                        self._to_loop(_resolve, self._shutdown_seen)
                except Exception:  # one bad call must not stop the server
                    log.exception("gRPC poller: failed to handle a completion event")
        except BaseException:
            log.exception("gRPC poller thread failed")
            self._to_loop(_resolve, self._shutdown_seen)
        finally:
            self._to_loop(_resolve, self._thread_done)

    def _on_new_call(self, event: Any) -> None:
        if not event.success:
            return  # a slot released by shutdown
        if self._accepting:
            with contextlib.suppress(ValueError):  # shutdown began since the check
                self._server.request_call(self._cq, self._cq, self._new_tag)
        call = event.call
        method = event.call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            message = self._unimplemented.get(method) or b"Method not found!"
            self._finish(call, None, _UNIMPLEMENTED.value[0], message)
            return
        call.start_server_batch((self._recv_op(0),), (call, handler))

    def _on_message(self, event: Any, tag: tuple[Any, Handler]) -> None:
        call, handler = tag
        data = event.batch_operations[0].message() if event.success else None
        if data is None:
            if event.success:  # the client half-closed without sending its request
                self._finish(call, None, _UNIMPLEMENTED.value[0], b"expected exactly one request message")
            return  # cancelled, or refused by the core (e.g. over the message size limit)
        self._pending.append((call, handler, data))
        if not self._scheduled:
            self._scheduled = True
            self._to_loop(self._drain)

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    # -- event loop ----------------------------------------------------------------------------
    def _drain(self) -> None:
        # Cleared before draining: a call queued meanwhile schedules another drain (at worst an
        # empty one), so none is ever left behind.
        self._scheduled = False
        pending = self._pending
        create_task = self._loop.create_task
        inflight = self._inflight
        while pending:
            call, handler, data = pending.popleft()
            task = create_task(self._serve(call, handler, data))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

    async def _serve(self, call: Any, handler: Handler, data: bytes) -> None:
        try:
            payload = await handler(data)
        except BaseException as exc:
            code, details = status_of(exc)
            self._finish(call, None, code.value[0], details.encode("utf-8", "replace"))
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            return
        self._finish(call, payload, _OK, b"")

    def _finish(self, call: Any, payload: bytes | None, code: int, details: bytes) -> None:
        if self._cq_closed:
            return
        ops = [self._md_op((), 0), self._status_op((), code, details, 0)]
        if payload is not None:
            ops.append(self._message_op(payload, 0))
        try:
            call.start_server_batch(ops, self._sent_tag)
        except Exception:  # a call the core already finished (cancelled): nothing to answer
            log.debug("could not send a gRPC status", exc_info=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class AioTransport:
    """The public ``grpc.aio`` server on the engine's loop (fallback, and the baseline)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handlers: Mapping[str, Handler],
        unimplemented: Mapping[str, str],
        options: ChannelOptions,
    ) -> None:
        self._server = grpc.aio.server(options=list(options))
        self._server.add_generic_rpc_handlers((_AioRouter(handlers, unimplemented),))

    def bind(self, address: str) -> int:
        try:
            return int(self._server.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"failed to bind the gRPC server to {address}: {exc}") from None

    def start(self) -> Awaitable[None]:
        return self._server.start()

    async def close(self, grace: float | None) -> None:
        await self._server.stop(grace)


class _AioRouter(grpc.GenericRpcHandler):
    def __init__(self, handlers: Mapping[str, Handler], unimplemented: Mapping[str, str]) -> None:
        self._handlers = {path: self._wrap(handler) for path, handler in handlers.items()}
        self._unimplemented = unimplemented

    @staticmethod
    def _wrap(handler: Handler) -> grpc.RpcMethodHandler:
        async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await handler(request)
            except Exception as exc:
                code, details = status_of(exc)
                await context.abort(code, details)
                raise  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(behavior)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        found = self._handlers.get(method)
        if found is not None:
            return found
        message = self._unimplemented.get(method)
        if message is None:
            return None  # grpc answers UNIMPLEMENTED "Method not found!"

        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(_UNIMPLEMENTED, message)

        return grpc.stream_stream_rpc_method_handler(refuse)
