"""One place that maps domain errors to gRPC status codes, for unary and streaming handlers."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc
from pydantic import ValidationError

from interscope._wire import RETRY_METADATA
from interscope.codec import TensorError
from interscope_server import errors

log = logging.getLogger(__name__)

#: The id of the request being served, for log lines and INTERNAL messages.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

STATUS_OF_ERROR: dict[type[errors.InterscopeError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def trailing_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The retry hint that goes with the status of `exc` (empty unless RESOURCE_EXHAUSTED)."""
    if isinstance(exc, errors.Overloaded):
        return ((RETRY_METADATA, "later"),)
    if isinstance(exc, errors.ResourceExhausted) or (
        isinstance(exc, TensorError) and str(exc).startswith("too large")
    ):
        return ((RETRY_METADATA, "no"),)
    return ()


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a caller gets for an exception raised while serving it."""
    if isinstance(exc, errors.InterscopeError):
        for kind in type(exc).__mro__:
            if kind in STATUS_OF_ERROR:
                return STATUS_OF_ERROR[kind], str(exc)
    if isinstance(exc, TensorError):
        text = str(exc)
        if text.startswith("too large"):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, text
        return grpc.StatusCode.INVALID_ARGUMENT, text
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        return grpc.StatusCode.INVALID_ARGUMENT, problems
    rid = request_id.get()
    log.exception("bug while serving request %s", rid)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {rid}); this is a bug"


F = TypeVar("F", bound=Callable[..., Any])


def rpc_errors(method: F) -> F:
    """Wrap a servicer method, unary or streaming (an async generator), so that every exception
    leaves as its mapped status with its retry hint: one mapping for every RPC."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # the point is to map everything
                await _abort(context, exc)

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("context.abort returned") from None

    return cast(F, unary)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, message = status_of(exc)
    await context.abort(code, message, trailing_metadata(exc))
