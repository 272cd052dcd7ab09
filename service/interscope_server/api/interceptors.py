"""Cross-cutting concerns as aio server interceptors: request ids, auth, metrics, call limits."""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc

from interscope_server.api.errors import request_id
from interscope_server.metrics import Metrics

#: grpc ships no type information; handlers are grpc.RpcMethodHandler at run time.
Handler: TypeAlias = Any
#: Methods that stay open without a token, so that probes and load balancers can check health.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _short_method(full_method: str) -> str:
    """'/interscope.v1.AnalysisService/Profile' -> 'AnalysisService/Profile' for labels."""
    service, _, method = full_method.rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


def _wrap(handler: Handler, around: Callable[..., Any]) -> Handler:
    """Rebuild `handler` with its behaviour wrapped by `around(kind, behaviour)`."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            around("unary", handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            around("stream", handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            around("unary", handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        around("stream", handler.stream_stream),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens ("authorization: Bearer <token>") on every RPC except health checks."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() != "authorization":
                continue
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer":
                return False
            # Compare against every token in constant time so timing leaks nothing.
            return any(hmac.compare_digest(token.strip().encode(), t) for t in self._tokens)
        return False

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


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status name a call ends with when `exc` escapes its handler."""
    if isinstance(exc, grpc.aio.AbortError):
        status = context.code()
        return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, (GeneratorExit, BaseException)) and not isinstance(exc, Exception):
        return "CANCELLED"
    return "UNKNOWN"
