"""The SDK's exceptions under one module name (also re-exported from `interscope`)."""

from __future__ import annotations

from interscope._exceptions import (
    AlreadyExistsError,
    CancelledError,
    CheckpointError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InterscopeError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)

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
