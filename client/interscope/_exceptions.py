"""The SDK's exception hierarchy and the translation of gRPC status codes into it."""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "CheckpointError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InterscopeError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
]


class InterscopeError(Exception):
    """Base of every error the SDK raises; `code` is the gRPC status name (or "CLIENT")."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class InvalidArgumentError(InterscopeError):
    """The request, a spec or a tensor in it was refused (INVALID_ARGUMENT, OUT_OF_RANGE)."""

    code = "INVALID_ARGUMENT"


class NotFoundError(InterscopeError):
    """The named model is not known to the replica (NOT_FOUND)."""

    code = "NOT_FOUND"


class AlreadyExistsError(InterscopeError):
    """A model of that name is already loaded; pass replace=True (ALREADY_EXISTS)."""

    code = "ALREADY_EXISTS"


class FailedPreconditionError(InterscopeError):
    """Well formed but not runnable now, e.g. a white-box attack without gradients."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(InterscopeError):
    """A server limit would be exceeded or its queue is full (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(InterscopeError):
    """No bearer token, or one the server does not accept (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(InterscopeError):
    """The caller is known but not allowed to do this (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"


class UnavailableError(InterscopeError):
    """The replica cannot be reached, is shutting down, or the model is loading (UNAVAILABLE)."""

    code = "UNAVAILABLE"


class DeadlineExceededError(InterscopeError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class CancelledError(InterscopeError):
    """The call was cancelled (CANCELLED)."""

    code = "CANCELLED"


class UnimplementedError(InterscopeError):
    """The server does not implement the method (UNIMPLEMENTED): an older or other server."""

    code = "UNIMPLEMENTED"


class InternalError(InterscopeError):
    """A server bug or a broken response (INTERNAL, UNKNOWN, DATA_LOSS)."""

    code = "INTERNAL"


class CheckpointError(InterscopeError):
    """An audit checkpoint is unreadable or belongs to an audit with another configuration."""

    code = "CLIENT"


_BY_CODE: dict[grpc.StatusCode, type[InterscopeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def error_for_code(code_name: str, message: str) -> InterscopeError:
    """The SDK exception for a status code given by name (as in SampleError.code)."""
    code = getattr(grpc.StatusCode, code_name.upper(), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, InternalError)(message, code=code.name)


def from_rpc_error(error: grpc.RpcError) -> InterscopeError:
    """Translate a gRPC error (sync or aio) into the SDK's exception for its status code."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(error)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, InternalError)(details or "", code=code.name)
