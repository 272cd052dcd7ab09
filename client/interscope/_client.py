"""Client and AsyncClient: one base holds addresses, credentials, deadlines and request builders."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import grpc.experimental
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interscope._audit import AuditPlan, AuditProgress, run_audit
from interscope._exceptions import InternalError, NotFoundError, from_rpc_error
from interscope._models import (
    AttackResult,
    AttackSummary,
    AuditReport,
    ExampleResult,
    InteractionProfile,
    ModelInfo,
    OrderEstimate,
    ProfileResult,
    Progress,
)
from interscope._options import _CLASS_CHOICES, AttackOptions, ProfileOptions
from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc

#: Events of `profile_stream`; the last one is the ProfileResult.
ProfileEvent = Progress | OrderEstimate | InteractionProfile | ProfileResult
#: Events of `attack_stream`; the last one is the AttackResult (examples plus summary).
AttackEvent = Progress | ExampleResult | AttackResult

_T = TypeVar("_T")
MiB = 1024 * 1024
_SERVICES = ("interscope.v1.ModelService", "interscope.v1.AnalysisService")


class UseClientDefault:
    """Sentinel type: a call's `timeout` left at the client's default."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()
Timeout = float | None | UseClientDefault


def split_addresses(address: str | Sequence[str]) -> list[str]:
    """Addresses from one string (commas allowed) or a list; at least one."""
    items = [address] if isinstance(address, str) else list(address)
    out = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not out:
        raise ValueError("give at least one address, e.g. localhost:50051")
    return out


def combined_target(addresses: Sequence[str]) -> str:
    """One gRPC target for the addresses: itself for one, an `ipv4:`/`ipv6:` list for several.

    gRPC's resolvers take several addresses only as IP literals; with host names among several
    addresses the channel uses the first (audits still spread over all, one channel each).
    """
    if len(addresses) == 1:
        return addresses[0]
    hosts: list[tuple[str, str]] = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or "/" in address:
            return addresses[0]
        host = host.strip("[]")
        hosts.append(("127.0.0.1" if host == "localhost" else host, port))
    try:
        versions = {ipaddress.ip_address(host).version for host, _ in hosts}
    except ValueError:
        return addresses[0]
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts)
    return addresses[0]


def service_config(retries: int) -> dict[str, Any]:
    """Channel service config: round_robin over resolved addresses, retry UNAVAILABLE.

    gRPC retries a call transparently (with exponential backoff) only until the server has
    answered, which is exactly when a retry cannot repeat work; it caps attempts at 5.
    """
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": s} for s in _SERVICES],
                "retryPolicy": {
                    "maxAttempts": min(retries + 1, 5),
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def _read_pem(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _as_batch(x: npt.ArrayLike, what: str = "x") -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(
            f"{what} must be a batch (N, *input_shape) with N >= 1 or one example, got shape "
            f"{arr.shape}"
        )
    return arr


def _labels(labels: int | npt.ArrayLike | None, n: int, what: str) -> list[int]:
    if labels is None:
        return []
    arr = np.asarray(labels)
    if arr.ndim == 0:
        return [int(arr)] * n
    if arr.shape != (n,):
        raise ValueError(f"{what} must be one int or {n} ints, got shape {arr.shape}")
    return [int(v) for v in arr]


def _profile_event(event: analysis_pb2.ProfileEvent) -> ProfileEvent | None:
    kind = event.WhichOneof("event")
    if kind == "progress":
        return Progress.from_proto(event.progress)
    if kind == "partial":
        return OrderEstimate.from_proto(event.partial)
    if kind == "profile":
        return InteractionProfile.from_proto(event.profile)
    if kind == "result":
        return ProfileResult.from_proto(event.result)
    return None  # an event kind newer than this client


class _AttackAssembler:
    """Turns Attack events into SDK events, collecting examples for the final AttackResult."""

    def __init__(self) -> None:
        self.examples: list[ExampleResult] = []

    def feed(self, event: analysis_pb2.AttackEvent) -> AttackEvent | None:
        kind = event.WhichOneof("event")
        if kind == "progress":
            return Progress.from_proto(event.progress)
        if kind == "example":
            example = ExampleResult.from_proto(event.example)
            self.examples.append(example)
            return example
        if kind == "summary":
            examples = sorted(self.examples, key=lambda e: e.input_index)
            return AttackResult(examples, AttackSummary.from_proto(event.summary))
        return None


@dataclass(frozen=True)
class AuditRun:
    """Everything `audit` takes, in one place: the model's name, x (N, *input_shape), y.

    Fields besides those: attack and profile (the options, or dicts of their fields); checkpoint (a
    JSON-lines file of finished samples, so a rerun sends only what is missing); addresses
    (default the client's) and streams_per_address; ids (default "0" .. "N-1"); targets (one
    per sample, targeted attacks); window (samples in flight per stream); return_adversarial;
    audit_id; on_progress (called with each AuditProgress); shard=(index, count); eps_sweep
    (robustness curve: each sample also attacked at each of these eps, attack only).
    """

    model: str
    x: npt.ArrayLike
    y: npt.ArrayLike
    attack: AttackOptions | Mapping[str, Any]
    profile: ProfileOptions | Mapping[str, Any]
    checkpoint: str | os.PathLike[str] | None = None
    addresses: Sequence[str] | str | None = None
    streams_per_address: int = 2
    ids: Sequence[str] | None = None
    targets: npt.ArrayLike | None = None
    window: int = 4
    return_adversarial: bool = False
    audit_id: str = ""
    on_progress: Callable[[AuditProgress], None] | None = None
    shard: tuple[int, int] | None = None
    eps_sweep: Sequence[float] = ()


class BaseClient:
    """What Client and AsyncClient share: target, credentials, metadata, request building."""

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        client_cert: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        retries: int = 4,
        max_message_bytes: int = 128 * MiB,
    ) -> None:
        """Connect to `address` ("host:port", a comma-separated list or a list of them).

        Args:
            token: bearer token sent with every call. tls: use TLS (default: when certificates
                are given). root_certificates, client_cert, client_key: PEM bytes or paths
                (client_cert and client_key together for mutual TLS).
            timeout: default seconds per call (None: no deadline). retries: attempts for
                UNAVAILABLE calls (at most 4). max_message_bytes: largest message either way.
        """
        self.addresses = split_addresses(address)
        self.target = combined_target(self.addresses)
        self.timeout = timeout
        self.retries = retries
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together (mutual TLS)")
        use_tls = tls if tls is not None else bool(root_certificates or client_cert)
        self._credentials: grpc.ChannelCredentials | None = (
            grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates),
                private_key=_read_pem(client_key),
                certificate_chain=_read_pem(client_cert),
            )
            if use_tls
            else None
        )
        # Sent as call metadata (not call credentials) so it also works on plaintext channels
        # inside a cluster; the server's interceptor reads "authorization: Bearer <token>".
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config(retries))),
        ]
        self._open()

    def _open(self) -> None:
        """Open the channel and its stubs (blocking or asyncio: the subclass's kind)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, UseClientDefault) else timeout

    def _aio_channel(self, target: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=self._options)
        return grpc.aio.secure_channel(target, self._credentials, options=self._options)

    # -- request builders ------------------------------------------------------------------

    @staticmethod
    def _load_request(
        name: str,
        model_bytes: bytes | None,
        config: models_pb2.ModelConfig | Mapping[str, Any] | str | None,
        replace: bool,
    ) -> models_pb2.LoadModelRequest:
        request = models_pb2.LoadModelRequest(name=name, replace=replace)
        if model_bytes is None:
            if config is not None:
                raise ValueError("config goes with model_bytes (an upload)")
            request.repository.SetInParent()
            return request
        if config is None:
            raise ValueError("an upload needs config= (config.json as a dict or its text)")
        request.upload.model = model_bytes
        if isinstance(config, models_pb2.ModelConfig):
            request.upload.config.CopyFrom(config)  # the deprecated typed form
        elif isinstance(config, str):
            request.upload.config_json = config
        else:
            request.upload.config_json = json.dumps(dict(config))
        return request

    @staticmethod
    def _profile_request(
        model: str,
        x: npt.ArrayLike,
        label: int | npt.ArrayLike | None,
        class_choice: str | None,
        options: ProfileOptions | Mapping[str, Any] | None,
        spec: Mapping[str, Any],
    ) -> analysis_pb2.ProfileRequest:
        batch = _as_batch(x)
        opts = ProfileOptions.coerce({**_fields(options), **spec})
        choice = class_choice or ("label" if label is not None else "predicted")
        if choice not in _CLASS_CHOICES:
            raise ValueError(f"class_choice {choice!r}: use one of {', '.join(_CLASS_CHOICES)}")
        return analysis_pb2.ProfileRequest(
            model=model,
            inputs=to_tensor(batch),
            labels=_labels(label, len(batch), "label"),
            class_choice=_CLASS_CHOICES[choice],
            spec=opts.to_proto(),
        )

    @staticmethod
    def _attack_request(
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        targets: npt.ArrayLike | None,
        profile: ProfileOptions | Mapping[str, Any] | None,
        omit_adversarial: bool,
        options: Mapping[str, Any],
    ) -> analysis_pb2.AttackRequest:
        batch = _as_batch(x)
        request = analysis_pb2.AttackRequest(
            model=model,
            inputs=to_tensor(batch),
            labels=_labels(y, len(batch), "y"),
            targets=_labels(targets, len(batch), "targets"),
            attack=AttackOptions.coerce(options).to_proto(),
            omit_adversarial=omit_adversarial,
        )
        if profile is not None:
            request.perturbation_profile.CopyFrom(ProfileOptions.coerce(profile).to_proto())
        return request

    def _audit_plan(self, run: AuditRun) -> AuditPlan:
        ids, targets, shard = run.ids, run.targets, run.shard
        batch = _as_batch(run.x)
        n = len(batch)
        labels = np.asarray(run.y, dtype=np.int64).reshape(-1)
        goals = None if targets is None else np.asarray(targets, dtype=np.int64).reshape(-1)
        names = [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]
        placed: tuple[int, int, int] | None = None
        if shard is not None:
            index, count = shard
            if count < 1 or not 0 <= index < count:
                raise ValueError(
                    f"shard must be (index, count) with 0 <= index < count, got {shard}"
                )
            if len(labels) != n or len(names) != n or (goals is not None and len(goals) != n):
                raise ValueError(f"x, y, ids and targets must all have {n} entries to shard")
            # Every count-th sample from index: ids stay the whole dataset's, so shards merge.
            batch, labels, names = batch[index::count], labels[index::count], names[index::count]
            goals = None if goals is None else goals[index::count]
            placed = (index, count, n)
        return AuditPlan(
            model=run.model,
            x=batch,
            y=labels,
            targets=goals,
            ids=names,
            shard=placed,
            attack=AttackOptions.coerce(run.attack).to_proto(),
            profile=ProfileOptions.coerce(run.profile).to_proto(),
            checkpoint=Path(run.checkpoint) if run.checkpoint is not None else None,
            streams_per_address=run.streams_per_address,
            window=run.window,
            return_adversarial=run.return_adversarial,
            eps_sweep=tuple(float(e) for e in run.eps_sweep),
            audit_id=run.audit_id,
            on_progress=run.on_progress,
            metadata=self._metadata,
        )

    async def _run_audit(self, plan: AuditPlan, addresses: Sequence[str] | None) -> AuditReport:
        # Audits open their own aio channels, one per address, so the sync Client can run the
        # same engine and each address gets its own streams.
        targets = split_addresses(addresses) if addresses is not None else self.addresses
        channels = [self._aio_channel(t) for t in targets]
        try:
            return await run_audit(plan, channels, channels[0])
        finally:
            for channel in channels:
                await channel.close()


def _fields(options: ProfileOptions | AttackOptions | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields of an options dataclass, or a dict of them, as a dict."""
    if options is None:
        return {}
    if isinstance(options, ProfileOptions | AttackOptions):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return dict(options)


def _given(
    options: type[ProfileOptions] | type[AttackOptions], args: Mapping[str, Any]
) -> dict[str, Any]:
    """The options fields a verb was called with: its parameters of those names not None."""
    names = (f.name for f in dataclasses.fields(options))
    return {name: args[name] for name in names if args.get(name) is not None}


def _arguments(args: Mapping[str, Any]) -> dict[str, Any]:
    """A verb's own arguments (its locals() on entry) to pass on unchanged to its stream form."""
    return {k: v for k, v in args.items() if k not in ("self", "__class__")}


class Client(BaseClient):
    """Blocking interscope client over one gRPC channel; use it as a context manager.

    >>> with interscope.Client("localhost:50051") as client:
    ...     result = client.profile(model="digits-cnn", x=x[:1], label=y[:1], grid=(4, 4))
    """

    def _open(self) -> None:
        # Profile and Attack are unary-stream calls; by default grpc starts a polling thread
        # for each one (about 1 ms per call), which this option replaces with reading the
        # stream on the caller's own thread.
        options = [*self._options, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._analysis = analysis_pb2_grpc.AnalysisServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._ranks: dict[str, int] = {}

    def _batched(self, model: str, x: npt.ArrayLike) -> np.ndarray:
        """x as a batch: one example (the model's per-example rank) gets a batch dimension."""
        arr = np.asarray(x, dtype=np.float32)
        if model not in self._ranks:
            try:
                self._ranks[model] = len(self.get_model(model).input.shape)
            except NotFoundError:
                return arr  # the call itself reports the unknown model
        return arr[None] if arr.ndim == self._ranks[model] else arr

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Callable[..., _T], request: Any, timeout: Timeout) -> _T:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def _stream(self, method: Callable[..., Any], request: Any, timeout: Timeout) -> Iterator[Any]:
        call = method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a caller that stops iterating early stops the server's work too

    # -- models ----------------------------------------------------------------------------

    def list_models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        """Every model the replica knows, in name order, whatever its state."""
        response = self._unary(self._models.ListModels, models_pb2.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in response.models]

    def get_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model's metadata; NotFoundError if the replica does not know it."""
        request = models_pb2.GetModelRequest(name=name)
        return ModelInfo.from_proto(self._unary(self._models.GetModel, request, timeout))

    def load_model(
        self,
        name: str,
        *,
        model_bytes: bytes | None = None,
        config: models_pb2.ModelConfig | Mapping[str, Any] | str | None = None,
        replace: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ModelInfo:
        """Load `name` from the server's repository, or upload `model_bytes` with `config`.

        `config` is the model's config.json, as a dict or as its JSON text, exactly as a
        repository folder holds it ("name" and "file" may be left out). A typed
        `models_pb2.ModelConfig` is still accepted but deprecated.
        """
        request = self._load_request(name, model_bytes, config, replace)
        return ModelInfo.from_proto(self._unary(self._models.LoadModel, request, timeout).model)

    def unload_model(
        self, name: str, *, delete: bool = False, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Unload a model; NotFoundError if unknown. `delete` also removes an uploaded model's
        folder from the server's repository."""
        request = models_pb2.UnloadModelRequest(name=name, delete=delete)
        self._unary(self._models.UnloadModel, request, timeout)

    def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """grpc.health.v1 status name ("SERVING", ...) of the server ("") or a model name."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._unary(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # -- analysis --------------------------------------------------------------------------

    def profile_stream(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        label: int | npt.ArrayLike | None = None,
        class_choice: str | None = None,
        options: ProfileOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        grid: tuple[int, int] | None = None,
        features: Sequence[Sequence[int]] | None = None,
        mask: np.ndarray | None = None,
        baseline: str | float | np.ndarray | None = None,
        baseline_reference: np.ndarray | None = None,
        value: str | None = None,
        orders: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None,
        estimator: str | None = None,
        pairs: str | None = None,
        num_pairs: int | None = None,
        neighbor_radius: int | None = None,
        contexts_per_order: int | None = None,
        context_sharing: str | None = None,
        target_statistic: str | None = None,
        seed: int | None = None,
        return_pairs: bool | None = None,
    ) -> Iterator[ProfileEvent]:
        """Interaction profiles of the inputs `x` (N, *input_shape, or one example), as events.

        Yields Progress, OrderEstimate (per-order partials), InteractionProfile (one per
        input) and last the ProfileResult.

        Args:
            model: the model's name. x: FP32 inputs (N, *input_shape) or one example.
            label: the class to explain per input (or one for all); None with class_choice
                unset explains the predicted class. class_choice: "label", "target" or
                "predicted".
            options: a ProfileOptions (or a dict of its fields) to start from; every
                ProfileOptions field below that is not None overrides it (see ProfileOptions
                for their meaning): grid=(R, C) | features= | mask= (the players), baseline,
                baseline_reference, value, orders | ratios, estimator, pairs, num_pairs,
                neighbor_radius, contexts_per_order, context_sharing, target_statistic, seed,
                return_pairs.
            timeout: seconds for the whole call; default the client's.
        """
        spec = _given(ProfileOptions, locals())
        x = self._batched(model, x)
        request = self._profile_request(model, x, label, class_choice, options, spec)
        for event in self._stream(self._analysis.Profile, request, timeout):
            converted = _profile_event(event)
            if converted is not None:
                yield converted

    def profile(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        label: int | npt.ArrayLike | None = None,
        class_choice: str | None = None,
        options: ProfileOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        grid: tuple[int, int] | None = None,
        features: Sequence[Sequence[int]] | None = None,
        mask: np.ndarray | None = None,
        baseline: str | float | np.ndarray | None = None,
        baseline_reference: np.ndarray | None = None,
        value: str | None = None,
        orders: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None,
        estimator: str | None = None,
        pairs: str | None = None,
        num_pairs: int | None = None,
        neighbor_radius: int | None = None,
        contexts_per_order: int | None = None,
        context_sharing: str | None = None,
        target_statistic: str | None = None,
        seed: int | None = None,
        return_pairs: bool | None = None,
    ) -> ProfileResult:
        """Like `profile_stream` (the same parameters), returning only the final ProfileResult."""
        spec = _given(ProfileOptions, locals())
        x = self._batched(model, x)
        request = self._profile_request(model, x, label, class_choice, options, spec)
        request.omit_input_profiles = True  # the result carries them; one message fewer each
        result = None
        for event in self._stream(self._analysis.Profile, request, timeout):
            if event.WhichOneof("event") == "result":
                result = ProfileResult.from_proto(event.result)
        if result is None:
            raise InternalError("the Profile stream ended without a result")
        return result

    def attack_stream(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        targets: npt.ArrayLike | None = None,
        profile: ProfileOptions | Mapping[str, Any] | None = None,
        omit_adversarial: bool = False,
        options: AttackOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        attack: str | None = None,
        norm: str | None = None,
        eps: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        random_start: bool | None = None,
        restarts: int | None = None,
        targeted: bool | None = None,
        margin_threshold: float | None = None,
        query_budget: int | None = None,
        seed: int | None = None,
        check_queries: int | None = None,
        check_reruns: int | None = None,
        loss: str | None = None,
    ) -> Iterator[AttackEvent]:
        """Attack the inputs `x` with labels `y`, as events: Progress, ExampleResult, AttackResult.

        Args:
            model: the model's name. x: FP32 inputs (N, *input_shape) or one example.
            y: true labels, one per input. targets: target classes when targeted.
            profile: ProfileOptions (or a dict) for the perturbation profile of each clean and
                adversarial input; None for none. omit_adversarial: leave x_adv out of results.
            options: an AttackOptions (or a dict of its fields) to start from; every
                AttackOptions field below that is not None overrides it (see AttackOptions):
                attack (a kind: "fgsm", "pgd", "pgd-margin", "apgd", "square", "simba"), norm,
                eps, steps, step_size, random_start, restarts, targeted, margin_threshold,
                query_budget, seed, check_queries and check_reruns (the gradient-masking
                checks' budgets; 0 turns one off).
            timeout: seconds for the whole call; default the client's.
        """
        given = _given(AttackOptions, locals())
        x = self._batched(model, x)
        request = self._attack_request(
            model, x, y, targets, profile, omit_adversarial, {**_fields(options), **given}
        )
        assembler = _AttackAssembler()
        for event in self._stream(self._analysis.Attack, request, timeout):
            converted = assembler.feed(event)
            if converted is not None:
                yield converted

    def attack(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        targets: npt.ArrayLike | None = None,
        profile: ProfileOptions | Mapping[str, Any] | None = None,
        omit_adversarial: bool = False,
        options: AttackOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        attack: str | None = None,
        norm: str | None = None,
        eps: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        random_start: bool | None = None,
        restarts: int | None = None,
        targeted: bool | None = None,
        margin_threshold: float | None = None,
        query_budget: int | None = None,
        seed: int | None = None,
        check_queries: int | None = None,
        check_reruns: int | None = None,
        loss: str | None = None,
    ) -> AttackResult:
        """Like `attack_stream` (the same parameters), returning only the final AttackResult."""
        arguments = _arguments(locals())
        result = None
        for event in self.attack_stream(**arguments):
            if isinstance(event, AttackResult):
                result = event
        if result is None:
            raise InternalError("the Attack stream ended without a summary")
        return result

    def audit(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        attack: AttackOptions | Mapping[str, Any],
        profile: ProfileOptions | Mapping[str, Any],
        checkpoint: str | os.PathLike[str] | None = None,
        addresses: Sequence[str] | str | None = None,
        streams_per_address: int = 2,
        ids: Sequence[str] | None = None,
        targets: npt.ArrayLike | None = None,
        window: int = 4,
        return_adversarial: bool = False,
        audit_id: str = "",
        on_progress: Callable[[AuditProgress], None] | None = None,
        shard: tuple[int, int] | None = None,
        eps_sweep: Sequence[float] = (),
    ) -> AuditReport:
        """Audit every sample exactly once over concurrent Audit streams; see AsyncClient.audit."""
        run = AuditRun(**_arguments(locals()))
        plan = self._audit_plan(run)
        address_list = None if run.addresses is None else split_addresses(run.addresses)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._run_audit(plan, address_list))
        # Called from inside an event loop (a notebook): run the engine on its own thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._run_audit(plan, address_list)).result()


class AsyncClient(BaseClient):
    """asyncio interscope client (grpc.aio); use it as an async context manager."""

    def _open(self) -> None:
        self._channel = self._aio_channel(self.target)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._analysis = analysis_pb2_grpc.AnalysisServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._ranks: dict[str, int] = {}

    async def _batched(self, model: str, x: npt.ArrayLike) -> np.ndarray:
        """x as a batch: one example (the model's per-example rank) gets a batch dimension."""
        arr = np.asarray(x, dtype=np.float32)
        if model not in self._ranks:
            try:
                self._ranks[model] = len((await self.get_model(model)).input.shape)
            except NotFoundError:
                return arr  # the call itself reports the unknown model
        return arr[None] if arr.ndim == self._ranks[model] else arr

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: Timeout) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def _stream(
        self, method: Callable[..., Any], request: Any, timeout: Timeout
    ) -> AsyncIterator[Any]:
        call = method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        """Every model the replica knows, in name order, whatever its state."""
        request = models_pb2.ListModelsRequest()
        response = await self._unary(self._models.ListModels, request, timeout)
        return [ModelInfo.from_proto(m) for m in response.models]

    async def get_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model's metadata; NotFoundError if the replica does not know it."""
        request = models_pb2.GetModelRequest(name=name)
        return ModelInfo.from_proto(await self._unary(self._models.GetModel, request, timeout))

    async def load_model(
        self,
        name: str,
        *,
        model_bytes: bytes | None = None,
        config: models_pb2.ModelConfig | Mapping[str, Any] | str | None = None,
        replace: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ModelInfo:
        """Load `name` from the server's repository, or upload `model_bytes` with `config`.

        `config` is the model's config.json, as a dict or as its JSON text, exactly as a
        repository folder holds it ("name" and "file" may be left out). A typed
        `models_pb2.ModelConfig` is still accepted but deprecated.
        """
        request = self._load_request(name, model_bytes, config, replace)
        response = await self._unary(self._models.LoadModel, request, timeout)
        return ModelInfo.from_proto(response.model)

    async def unload_model(
        self, name: str, *, delete: bool = False, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Unload a model; NotFoundError if unknown. `delete` also removes an uploaded model's
        folder from the server's repository."""
        request = models_pb2.UnloadModelRequest(name=name, delete=delete)
        await self._unary(self._models.UnloadModel, request, timeout)

    async def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """grpc.health.v1 status name ("SERVING", ...) of the server ("") or a model name."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._unary(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def profile_stream(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        label: int | npt.ArrayLike | None = None,
        class_choice: str | None = None,
        options: ProfileOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        grid: tuple[int, int] | None = None,
        features: Sequence[Sequence[int]] | None = None,
        mask: np.ndarray | None = None,
        baseline: str | float | np.ndarray | None = None,
        baseline_reference: np.ndarray | None = None,
        value: str | None = None,
        orders: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None,
        estimator: str | None = None,
        pairs: str | None = None,
        num_pairs: int | None = None,
        neighbor_radius: int | None = None,
        contexts_per_order: int | None = None,
        context_sharing: str | None = None,
        target_statistic: str | None = None,
        seed: int | None = None,
        return_pairs: bool | None = None,
    ) -> AsyncIterator[ProfileEvent]:
        """Interaction profiles as events; the parameters are Client.profile_stream's."""
        spec = _given(ProfileOptions, locals())
        x = await self._batched(model, x)
        request = self._profile_request(model, x, label, class_choice, options, spec)
        async for event in self._stream(self._analysis.Profile, request, timeout):
            converted = _profile_event(event)
            if converted is not None:
                yield converted

    async def profile(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        label: int | npt.ArrayLike | None = None,
        class_choice: str | None = None,
        options: ProfileOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        grid: tuple[int, int] | None = None,
        features: Sequence[Sequence[int]] | None = None,
        mask: np.ndarray | None = None,
        baseline: str | float | np.ndarray | None = None,
        baseline_reference: np.ndarray | None = None,
        value: str | None = None,
        orders: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None,
        estimator: str | None = None,
        pairs: str | None = None,
        num_pairs: int | None = None,
        neighbor_radius: int | None = None,
        contexts_per_order: int | None = None,
        context_sharing: str | None = None,
        target_statistic: str | None = None,
        seed: int | None = None,
        return_pairs: bool | None = None,
    ) -> ProfileResult:
        """Like `profile_stream` (the same parameters), returning only the final ProfileResult."""
        spec = _given(ProfileOptions, locals())
        x = await self._batched(model, x)
        request = self._profile_request(model, x, label, class_choice, options, spec)
        request.omit_input_profiles = True  # the result carries them; one message fewer each
        result = None
        async for event in self._stream(self._analysis.Profile, request, timeout):
            if event.WhichOneof("event") == "result":
                result = ProfileResult.from_proto(event.result)
        if result is None:
            raise InternalError("the Profile stream ended without a result")
        return result

    async def attack_stream(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        targets: npt.ArrayLike | None = None,
        profile: ProfileOptions | Mapping[str, Any] | None = None,
        omit_adversarial: bool = False,
        options: AttackOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        attack: str | None = None,
        norm: str | None = None,
        eps: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        random_start: bool | None = None,
        restarts: int | None = None,
        targeted: bool | None = None,
        margin_threshold: float | None = None,
        query_budget: int | None = None,
        seed: int | None = None,
        check_queries: int | None = None,
        check_reruns: int | None = None,
        loss: str | None = None,
    ) -> AsyncIterator[AttackEvent]:
        """Attack events; the parameters are Client.attack_stream's."""
        given = _given(AttackOptions, locals())
        x = await self._batched(model, x)
        request = self._attack_request(
            model, x, y, targets, profile, omit_adversarial, {**_fields(options), **given}
        )
        assembler = _AttackAssembler()
        async for event in self._stream(self._analysis.Attack, request, timeout):
            converted = assembler.feed(event)
            if converted is not None:
                yield converted

    async def attack(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        targets: npt.ArrayLike | None = None,
        profile: ProfileOptions | Mapping[str, Any] | None = None,
        omit_adversarial: bool = False,
        options: AttackOptions | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        attack: str | None = None,
        norm: str | None = None,
        eps: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        random_start: bool | None = None,
        restarts: int | None = None,
        targeted: bool | None = None,
        margin_threshold: float | None = None,
        query_budget: int | None = None,
        seed: int | None = None,
        check_queries: int | None = None,
        check_reruns: int | None = None,
        loss: str | None = None,
    ) -> AttackResult:
        """Like `attack_stream` (the same parameters), returning only the final AttackResult."""
        arguments = _arguments(locals())
        result = None
        async for event in self.attack_stream(**arguments):
            if isinstance(event, AttackResult):
                result = event
        if result is None:
            raise InternalError("the Attack stream ended without a summary")
        return result

    async def audit(
        self,
        *,
        model: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        attack: AttackOptions | Mapping[str, Any],
        profile: ProfileOptions | Mapping[str, Any],
        checkpoint: str | os.PathLike[str] | None = None,
        addresses: Sequence[str] | str | None = None,
        streams_per_address: int = 2,
        ids: Sequence[str] | None = None,
        targets: npt.ArrayLike | None = None,
        window: int = 4,
        return_adversarial: bool = False,
        audit_id: str = "",
        on_progress: Callable[[AuditProgress], None] | None = None,
        shard: tuple[int, int] | None = None,
        eps_sweep: Sequence[float] = (),
    ) -> AuditReport:
        """Audit every sample of `x` (N, *input_shape) with labels `y` exactly once.

        Runs `streams_per_address` Audit streams per address (`addresses`, default the
        client's; a `dns:///` target spreads its streams over replicas by round_robin). A
        broken stream's unanswered samples go out again on another stream; `checkpoint` (a
        JSON-lines file) records finished samples as they arrive, so a rerun with the same
        configuration sends only what is missing. The summary is computed here from every
        sample's result. Sample ids default to "0" .. "N-1".

        `shard=(index, count)` audits only samples index, index + count, ... (ids stay the whole
        dataset's); `merge_audits` over the checkpoints of all `count` shards gives the report
        of the whole dataset, as a Kubernetes Indexed Job does with JOB_COMPLETION_INDEX.
        """
        run = AuditRun(**_arguments(locals()))
        plan = self._audit_plan(run)
        address_list = None if run.addresses is None else split_addresses(run.addresses)
        return await self._run_audit(plan, address_list)
