"""Cross-cutting concerns as aio server interceptors: request ids, auth, metrics, wire checks."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc

from interscope_server.api.errors import request_id
from interscope_server.errors import InvalidArgument
from interscope_server.metrics import Metrics

log = logging.getLogger(__name__)

#: grpc ships no type information; handlers are grpc.RpcMethodHandler at run time.
Handler: TypeAlias = Any
#: Methods that stay open without a token, so that probes and load balancers can check health.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _short_method(full_method: str) -> str:
    """'/interscope.v1.AnalysisService/Profile' -> 'AnalysisService/Profile' for labels."""
    service, _, method = full_method.rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


def _kind(behaviour: Callable[..., Any], streaming: bool) -> str:
    """'unary' for coroutine behaviours, 'stream' for async generators.

    A server-streaming handler may be either: ours yield events, but grpc's own health servicer
    (Watch) is a coroutine that calls `context.write`. Wrapping that as a generator made every
    Watch answer UNKNOWN, so the kind follows what the function is, not what the RPC is.
    """
    if streaming and inspect.isasyncgenfunction(behaviour):
        return "stream"
    return "unary"


def _wrap(
    handler: Handler,
    around: Callable[..., Any],
    deserializer: Callable[[Callable[..., Any] | None], Any] | None = None,
) -> Handler:
    """Rebuild `handler` with its behaviour wrapped by `around(kind, behaviour)` (and its
    request deserializer by `deserializer`, when given)."""
    decode = handler.request_deserializer
    if deserializer is not None:
        decode = deserializer(decode)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            around(_kind(handler.unary_unary, False), handler.unary_unary),
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            around(_kind(handler.unary_stream, True), handler.unary_stream),
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            around(_kind(handler.stream_unary, False), handler.stream_unary),
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        around(_kind(handler.stream_stream, True), handler.stream_stream),
        request_deserializer=decode,
        response_serializer=handler.response_serializer,
    )


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the call's 'authorization: Bearer <token>' metadata, if it has one."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def token_matches(token: bytes | None, tokens: Sequence[str]) -> bool:
    """Whether `token` is one of `tokens`, compared against every one in constant time."""
    if token is None:
        return False
    return any([hmac.compare_digest(token, t.encode()) for t in tokens])


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens ("authorization: Bearer <token>") on every RPC except health checks."""

    def __init__(self, tokens: Sequence[str]) -> None:
        # Admin tokens (uploads, unloads) are valid callers too; the servicer checks the role.
        self._tokens = list(tokens)

    def _allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        return token_matches(bearer_token(metadata), self._tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self._allowed(details.invocation_metadata):
            return handler

        def around(kind: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
            message = (
                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
            )
            if kind == "unary":

                async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

                return deny_unary

            async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - makes this an async generator

            return deny_stream

        return _wrap(handler, around)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Request ids for logs, and call counts, latencies and in-flight gauges by method."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = _short_method(details.method)
        metrics = self._metrics
        incoming = dict(details.invocation_metadata or ())
        rid_value = incoming.get("x-request-id") or uuid.uuid4().hex[:16]
        rid = rid_value.decode() if isinstance(rid_value, bytes) else str(rid_value)

        def finish(context: grpc.aio.ServicerContext, started: float, code: str | None) -> None:
            if code is None:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "OK"
            metrics.rpc_calls.labels(method, code).inc()
            metrics.rpc_duration.labels(method).observe(time.perf_counter() - started)
            metrics.rpc_in_flight.labels(method).dec()
            metrics.update_gpu_memory()  # cheap, and a no-op without CUDA

        def around(kind: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if kind == "unary":

                async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    request_id.set(rid)
                    metrics.rpc_in_flight.labels(method).inc()
                    started, code = time.perf_counter(), None
                    try:
                        return await behaviour(request, context)
                    except BaseException as exc:
                        code = _code_of(exc, context)
                        raise
                    finally:
                        finish(context, started, code)

                return unary

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                request_id.set(rid)
                metrics.rpc_in_flight.labels(method).inc()
                started, code = time.perf_counter(), None
                try:
                    async for item in behaviour(request, context):
                        yield item
                except BaseException as exc:
                    code = _code_of(exc, context)
                    raise
                finally:
                    finish(context, started, code)

            return stream

        return _wrap(handler, around)


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it."""

    def __init__(self, error: Exception) -> None:
        self.message = (
            f"request bytes could not be decoded as this method's message: {error or 'invalid'}"
        )


def _safe_deserializer(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:  # any parse failure is the caller's bytes, not our bug
            return _Undecodable(exc)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Undecodable):
            raise InvalidArgument(item.message)
        yield item


class WireInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes end the call with INVALID_ARGUMENT on every method.

    grpc itself answers a request its deserializer cannot parse with UNKNOWN (unary) or
    INTERNAL (streams); neither tells the caller that its bytes were wrong.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        streaming_requests = bool(handler.stream_unary or handler.stream_stream)

        def around(kind: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if streaming_requests:
                # A bad message mid-stream raises InvalidArgument where the handler reads it,
                # so the handler's own error mapping ends the call with that status.
                if kind == "unary":

                    async def unary_in(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                        return await behaviour(_checked(requests), context)

                    return unary_in

                async def stream_in(
                    requests: Any, context: grpc.aio.ServicerContext
                ) -> AsyncIterator[Any]:
                    async for item in behaviour(_checked(requests), context):
                        yield item

                return stream_in
            if kind == "unary":

                async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    if isinstance(request, _Undecodable):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                    return await behaviour(request, context)

                return unary

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for item in behaviour(request, context):
                    yield item

            return stream

        return _wrap(handler, around, _safe_deserializer)


class StallInterceptor(grpc.aio.ServerInterceptor):
    """Cancels a streaming call whose client stops reading, freeing its slot and buffers.

    A server-streaming handler's events are written with a time limit: when the client has not
    taken the previous ones (HTTP/2 flow control holds the write) for `stall_seconds`, the
    handler is closed, which ends its computation and releases its admission slot, and the call
    ends with DEADLINE_EXCEEDED (sent once the client takes the message grpc still holds, or
    ended by the client's own deadline or cancel; grpc cannot reset the stream earlier).
    """

    def __init__(self, stall_seconds: float, metrics: Metrics | None = None) -> None:
        self._stall = stall_seconds
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or not (handler.unary_stream or handler.stream_stream):
            return handler
        stall = self._stall
        method = details.method

        def around(kind: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if kind == "unary":
                return behaviour  # a coroutine handler (health Watch) writes by itself

            async def write_with_limit(request: Any, context: grpc.aio.ServicerContext) -> None:
                events = behaviour(request, context)
                loop = asyncio.get_running_loop()
                # Each write is awaited directly; one timer per call watches for a write that
                # has waited `stall` seconds (a task and a timed wait per message cost more
                # than a small call's computation).
                writing_since: float | None = None
                stalled: asyncio.Task[None] | None = None
                timer: asyncio.TimerHandle

                async def stop() -> None:
                    log.warning(
                        "%s: the client read nothing for %.0f s; cancelling the call",
                        method,
                        stall,
                    )
                    await events.aclose()  # stops the work, frees the call's slot
                    if self._metrics is not None:
                        self._metrics.send_stalls.labels(_short_method(method)).inc()

                def watch() -> None:
                    nonlocal timer, stalled
                    left = stall if writing_since is None else writing_since + stall - loop.time()
                    if left > 0:
                        timer = loop.call_later(left, watch)
                    else:
                        stalled = asyncio.ensure_future(stop())

                timer = loop.call_later(stall, watch)
                try:
                    async for item in events:
                        writing_since = loop.time()
                        # The write is never cancelled: grpc cannot withdraw a message it has
                        # taken, and a cancelled write left the call unable to send any status
                        # (ExecuteBatchError, INTERNAL "Internal error from Core"). A failed
                        # write (client gone) ends the call here.
                        await context.write(item)
                        writing_since = None
                        if stalled is not None:
                            # The work and slot were released while the write waited; grpc
                            # could send no status while the message waited for the client's
                            # flow-control window (it used to fail in core with INTERNAL).
                            # Now the client took it, so it learns why.
                            await stalled
                            await context.abort(
                                grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the client stopped reading: no event could be sent for "
                                f"{stall:.0f} s (send_stall_seconds); the call was cancelled",
                            )
                finally:
                    timer.cancel()
                    if stalled is not None:
                        await stalled
                    await events.aclose()

            return write_with_limit

        return _wrap(handler, around)


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status name a call ends with when `exc` escapes its handler."""
    if isinstance(exc, grpc.aio.AbortError):
        status = context.code()
        return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, (GeneratorExit, BaseException)) and not isinstance(exc, Exception):
        return "CANCELLED"
    return "UNKNOWN"
