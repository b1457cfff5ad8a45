"""Transports that serve bytes-in/bytes-out unary gRPC methods whose handlers run on the engine's
event loop.

``core`` (the default before ``h2``, :mod:`.grpc_h2`) drives gRPC's C core directly through grpcio's Cython layer: one
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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc

from elastiserve.errors import ElastiserveError

log = logging.getLogger("elastiserve.engine.grpc")

Handler = Callable[[bytes], Awaitable[bytes]]
ChannelOptions = Sequence[tuple[str, Any]]


class StreamCall(Protocol):
    """A bidirectional streaming call as a stream handler sees it, on the loop (both transports).

    ``read()`` returns the next request message, or None once the client half-closed or the call
    was cancelled; ``write()`` queues a response message (never blocks; order is kept); the
    transport sends the OK status when the handler returns (an error status if it raises).
    ``cancelled`` and the cancel callbacks tell the handler that the client went away."""

    cancelled: bool

    async def read(self) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...

    def add_cancel_callback(self, callback: Callable[[], None]) -> None: ...


StreamHandler = Callable[[StreamCall], Awaitable[None]]

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
        stream_handlers: Mapping[str, StreamHandler] | None = None,
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
            self._close_op = cygrpc.ReceiveCloseOnServerOperation
        except (ImportError, AttributeError, TypeError) as exc:
            raise CoreUnavailable(f"grpcio {grpc.__version__}: {exc}") from exc
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._handlers = {path.encode(): handler for path, handler in handlers.items()}
        self._unimplemented = {path.encode(): message.encode() for path, message in unimplemented.items()}
        self._stream_handlers = {path.encode(): handler for path, handler in (stream_handlers or {}).items()}
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
                    elif tag.__class__ is _StreamTag:
                        tag.stream.on_event(tag.kind, event)
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
            stream_handler = self._stream_handlers.get(method)
            if stream_handler is not None:
                _CoreStream(self, call).start(stream_handler)
                return
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

    async def _serve_stream(self, stream: _CoreStream, handler: StreamHandler) -> None:
        try:
            await handler(stream)
        except BaseException as exc:
            code, details = status_of(exc)
            stream.finish(code.value[0], details.encode("utf-8", "replace"))
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            return
        stream.finish(_OK, b"")

    def _start_stream_task(self, stream: _CoreStream, handler: StreamHandler) -> None:
        task = self._loop.create_task(self._serve_stream(stream, handler))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)


_RECV, _SENT, _CLOSED = 0, 1, 2


class _StreamTag:
    """Completion-queue tag of one kind of operation of one streaming call."""

    __slots__ = ("kind", "stream")

    def __init__(self, stream: _CoreStream, kind: int) -> None:
        self.stream = stream
        self.kind = kind


class StreamInbox:
    """The receiving half every transport's :class:`StreamCall` shares, used on the loop:
    request messages queued for :meth:`read` (None once the client half-closed or the call was
    cancelled) and the cancel callbacks."""

    __slots__ = ("_callbacks", "_inbox", "_inbox_loop", "_reader", "cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inbox_loop = loop
        self._inbox: collections.deque[bytes | None] = collections.deque()
        self._reader: asyncio.Future[None] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    async def read(self) -> bytes | None:
        while not self._inbox:
            if self.cancelled:
                return None
            self._reader = self._inbox_loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = self._inbox[0]
        if data is not None:  # None (half-closed) stays: every later read sees it too
            self._inbox.popleft()
        return data

    def add_cancel_callback(self, callback: Callable[[], None]) -> None:
        if self.cancelled:
            callback()
        else:
            self._callbacks.append(callback)

    def _deliver(self, data: bytes | None) -> None:
        self._inbox.append(data)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _on_cancelled(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self._deliver(None)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a gRPC stream cancel callback failed")


class _CoreStream(StreamInbox):
    """A bidirectional streaming call on the core transport.

    The poller thread keeps one receive armed (re-arming on each message) and hands messages to
    the loop; sends are chained from the poller thread too: at most one send batch is in flight
    (the core's rule), the next queued message goes out from the send's completion, and the
    status follows the last message. A ``ReceiveCloseOnServer`` batch reports cancellation."""

    __slots__ = (
        "_lock",
        "_metadata_sent",
        "_outbox",
        "_recv_tag",
        "_sending",
        "_sent_tag",
        "_status",
        "_status_sent",
        "_transport",
        "call",
        "dead",
    )

    threadsafe = True  # write() may be called from any thread (it takes the send lock)

    def __init__(self, transport: CoreTransport, call: Any) -> None:
        super().__init__(transport._loop)
        self._transport = transport
        self.call = call
        self._lock = threading.Lock()
        self._outbox: collections.deque[bytes] = collections.deque()
        self._sending = False
        self._metadata_sent = False
        self._status: tuple[int, bytes] | None = None
        self._status_sent = False
        self._recv_tag = _StreamTag(self, _RECV)
        self._sent_tag = _StreamTag(self, _SENT)
        self.dead = False  # the core finished the call: nothing more can be sent

    # -- poller thread ----------------------------------------------------------------------------
    def start(self, handler: StreamHandler) -> None:
        transport = self._transport
        self.call.start_server_batch((transport._close_op(0),), _StreamTag(self, _CLOSED))
        self.call.start_server_batch((transport._recv_op(0),), self._recv_tag)
        transport._to_loop(transport._start_stream_task, self, handler)

    def on_event(self, kind: int, event: Any) -> None:
        transport = self._transport
        if kind == _RECV:
            data = event.batch_operations[0].message() if event.success else None
            transport._to_loop(self._deliver, data)
            if data is not None:
                try:
                    self.call.start_server_batch((transport._recv_op(0),), self._recv_tag)
                except Exception:  # the call is over: this was its last message
                    transport._to_loop(self._deliver, None)
        elif kind == _SENT:
            with self._lock:
                self._sending = False
                if not event.success:
                    self.dead = True
                    self._outbox.clear()
                    return
                self._send_next_locked()
        else:  # _CLOSED: the call is over, cancelled by the client (or the server shutting down)
            with self._lock:
                self.dead = True
                self._outbox.clear()
            if event.batch_operations[0].cancelled():
                transport._to_loop(self._on_cancelled)

    def _send_next_locked(self) -> None:
        """Start the next send batch if any (caller holds the lock, no send is in flight)."""
        transport = self._transport
        if self.dead or self._status_sent or transport._cq_closed:
            return
        outbox = self._outbox
        message = outbox.popleft() if outbox else None
        status = self._status if not outbox else None
        if message is None and status is None:
            return
        ops: list[Any] = []
        if not self._metadata_sent:
            self._metadata_sent = True
            ops.append(transport._md_op((), 0))
        if message is not None:
            ops.append(transport._message_op(message, 0))
        if status is not None:
            ops.append(transport._status_op((), status[0], status[1], 0))
            self._status_sent = True
        try:
            self.call.start_server_batch(ops, self._sent_tag)
            self._sending = True
        except Exception:  # the core already finished the call (cancelled)
            self.dead = True
            outbox.clear()

    # -- the loop ---------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        with self._lock:
            if self.dead or self._status is not None:
                return
            self._outbox.append(data)
            if not self._sending:
                self._send_next_locked()
                return
        if threading.get_ident() != self._transport._loop_thread:
            # A model thread sending a burst: let the poller thread (which chains the sends)
            # have the GIL now, or the queued responses would leave only when the model is done
            # (measured: the 2nd of 100 responses 0.7 ms after the 1st instead of 0.05 ms).
            time.sleep(0)

    def finish(self, code: int, details: bytes) -> None:
        """The handler is done: the status goes out after the queued messages."""
        with self._lock:
            if self._status is not None:
                return
            self._status = (code, details)
            if not self._sending:
                self._send_next_locked()


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
        stream_handlers: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self._server = grpc.aio.server(options=list(options))
        self._server.add_generic_rpc_handlers((_AioRouter(handlers, unimplemented, stream_handlers or {}),))

    def bind(self, address: str) -> int:
        try:
            return int(self._server.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"failed to bind the gRPC server to {address}: {exc}") from None

    def start(self) -> Awaitable[None]:
        return self._server.start()

    async def close(self, grace: float | None) -> None:
        await self._server.stop(grace)


class _AioStream:
    """:class:`StreamCall` over a ``grpc.aio`` servicer context; one writer task keeps the
    queued messages in order (``context.write`` must not be called concurrently)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._outbox: collections.deque[bytes] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    async def read(self) -> bytes | None:
        if self.cancelled:
            return None
        message = await self._context.read()
        return None if message is grpc.aio.EOF else message

    def write(self, data: bytes) -> None:
        if self.cancelled:
            return
        self._outbox.append(data)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_all())

    async def _write_all(self) -> None:
        outbox = self._outbox
        while outbox:
            try:
                await self._context.write(outbox.popleft())
            except Exception:  # the call is over
                outbox.clear()
                self.cancel()
                return

    async def drain(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def add_cancel_callback(self, callback: Callable[[], None]) -> None:
        if self.cancelled:
            callback()
        else:
            self._callbacks.append(callback)

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a gRPC stream cancel callback failed")


class _AioRouter(grpc.GenericRpcHandler):
    def __init__(
        self,
        handlers: Mapping[str, Handler],
        unimplemented: Mapping[str, str],
        stream_handlers: Mapping[str, StreamHandler],
    ) -> None:
        self._handlers = {path: self._wrap(handler) for path, handler in handlers.items()}
        self._handlers.update({path: self._wrap_stream(h) for path, h in stream_handlers.items()})
        self._unimplemented = unimplemented

    @staticmethod
    def _wrap_stream(handler: StreamHandler) -> grpc.RpcMethodHandler:
        async def behavior(requests: Any, context: grpc.aio.ServicerContext) -> None:
            stream = _AioStream(context)
            context.add_done_callback(lambda _: stream.cancel() if context.cancelled() else None)
            try:
                await handler(stream)
                await stream.drain()
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as exc:
                await stream.drain()
                code, details = status_of(exc)
                await context.abort(code, details)

        return grpc.stream_stream_rpc_method_handler(behavior)

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
