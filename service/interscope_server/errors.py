"""Domain errors raised by the engine, attacks and registry; the API layer maps each to a status.

    InterscopeError
    ├── InvalidArgument      bad spec or tensor               -> INVALID_ARGUMENT
    ├── NotFound             unknown model                    -> NOT_FOUND
    ├── AlreadyExists        loading a name already loaded    -> ALREADY_EXISTS
    ├── PermissionDenied     uploads off, no admin token      -> PERMISSION_DENIED
    ├── FailedPrecondition   e.g. white-box attack, no grads  -> FAILED_PRECONDITION
    ├── ResourceExhausted    the request is over a limit      -> RESOURCE_EXHAUSTED
    │   └── Overloaded       call limit, full queue: retry    -> RESOURCE_EXHAUSTED
    ├── Unavailable          model loading, shutting down     -> UNAVAILABLE
    │   └── BackendFailed    the model's forward pass raised  -> UNAVAILABLE
    ├── Cancelled            the caller cancelled             -> CANCELLED
    └── DeadlineExceeded     the caller's deadline passed     -> DEADLINE_EXCEEDED

StartupError (not an InterscopeError: no request is involved) is a replica that cannot start,
with a hint naming the setting to change; `interscope serve` prints it as one line.

Anything else that escapes a request is a bug and becomes INTERNAL (logged with the request id).
Messages say what was wrong and what is allowed; they are sent to the caller as they are.
"""

from __future__ import annotations


class InterscopeError(Exception):
    """Base of every error the service reports to callers on purpose."""


class InvalidArgument(InterscopeError):
    """The request or a tensor in it is malformed or outside what is allowed."""


class NotFound(InterscopeError):
    """A named model (or other resource) does not exist."""


class AlreadyExists(InterscopeError):
    """A resource with that name exists and the request did not ask to replace it."""


class PermissionDenied(InterscopeError):
    """The caller is known but may not do this (uploads off, or no admin token)."""


class FailedPrecondition(InterscopeError):
    """The request is well formed but the system is not in a state to run it."""


class ResourceExhausted(InterscopeError):
    """A configured limit would be exceeded, or a queue is full."""


class Overloaded(ResourceExhausted):
    """The server or a model is busy (the call limit, a full queue): the same request may be
    admitted later. Other ResourceExhausted refusals are about the request itself and would be
    refused again; the status's trailing metadata tells clients which
    (`interscope._wire.RETRY_METADATA`)."""


class Unavailable(InterscopeError):
    """The service or model cannot take the request now; retrying later may work."""


class BackendFailed(Unavailable):
    """A model's forward pass raised (runtime error, out of memory) while serving a request.

    UNAVAILABLE rather than INTERNAL: the fault is the model's or the device's, not a bug of the
    service; it fails only the requests whose rows were in that batch (a co-batched request may
    well succeed on retry), and the model keeps serving.
    """


class Cancelled(InterscopeError):
    """The caller cancelled the request; computation stopped at a chunk boundary."""


class DeadlineExceeded(InterscopeError):
    """The caller's deadline passed; computation stopped at a chunk boundary."""


class StartupError(Exception):
    """The replica cannot start as configured (a port taken, a missing repository)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message} ({hint})")
        self.message = message
        #: What to change, naming the setting (flag and environment variable).
        self.hint = hint
