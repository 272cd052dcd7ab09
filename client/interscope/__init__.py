"""interscope: Python SDK for the interscope robustness-audit service (numpy in, numpy out).

    with interscope.Client("localhost:50051") as client:
        result = client.profile(model="digits-cnn", x=x[:1], label=y[:1], grid=(4, 4))

Exceptions (every call raises only these for server and transport failures; `code` holds the
gRPC status name):

    InterscopeError
    ├── InvalidArgumentError      INVALID_ARGUMENT, OUT_OF_RANGE: bad spec or tensor
    ├── NotFoundError             NOT_FOUND: unknown model
    ├── AlreadyExistsError        ALREADY_EXISTS: model loaded already (pass replace=True)
    ├── FailedPreconditionError   FAILED_PRECONDITION, ABORTED: e.g. white-box attack, no grads
    ├── ResourceExhaustedError    RESOURCE_EXHAUSTED: server limits, full queue
    ├── UnauthenticatedError      UNAUTHENTICATED: missing or wrong token
    ├── PermissionDeniedError     PERMISSION_DENIED
    ├── UnavailableError          UNAVAILABLE: unreachable, shutting down, model loading
    ├── DeadlineExceededError     DEADLINE_EXCEEDED: the call's timeout passed
    ├── CancelledError            CANCELLED
    ├── UnimplementedError        UNIMPLEMENTED: an older or other server
    ├── InternalError             INTERNAL, UNKNOWN, DATA_LOSS: a server bug
    └── CheckpointError           an audit checkpoint of another configuration (client side)

Bad arguments caught before anything is sent raise ValueError (TensorError for arrays).
"""

from __future__ import annotations

from interscope._audit import AuditProgress
from interscope._client import (
    AsyncClient,
    AttackEvent,
    AuditRun,
    BaseClient,
    Client,
    ProfileEvent,
)
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
)
from interscope._merge import merge_audits
from interscope._models import (
    AttackResult,
    AttackSummary,
    AuditReport,
    AuditSummary,
    ClassBreakdown,
    ExampleResult,
    InteractionProfile,
    ModelInfo,
    OrderEstimate,
    OrderStatistic,
    PerturbationProfile,
    ProfileResult,
    Progress,
    Provenance,
    SampleError,
    SampleResult,
    TensorInfo,
)
from interscope._options import AttackOptions, ProfileOptions
from interscope._specificity import CategorySpecificity, category_specificity
from interscope.codec import TensorError

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AttackEvent",
    "AttackOptions",
    "AttackResult",
    "AttackSummary",
    "AuditProgress",
    "AuditReport",
    "AuditRun",
    "AuditSummary",
    "BaseClient",
    "CancelledError",
    "CategorySpecificity",
    "CheckpointError",
    "ClassBreakdown",
    "Client",
    "DeadlineExceededError",
    "ExampleResult",
    "FailedPreconditionError",
    "InteractionProfile",
    "InternalError",
    "InterscopeError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "OrderEstimate",
    "OrderStatistic",
    "PermissionDeniedError",
    "PerturbationProfile",
    "ProfileEvent",
    "ProfileOptions",
    "ProfileResult",
    "Progress",
    "Provenance",
    "ResourceExhaustedError",
    "SampleError",
    "SampleResult",
    "TensorError",
    "TensorInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "category_specificity",
    "merge_audits",
]

# Public names report this package as their home (as httpx does), so reprs and docs show
# `interscope.Client`, not a private module.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("interscope._"):
        _obj.__module__ = "interscope"
del _name, _obj
