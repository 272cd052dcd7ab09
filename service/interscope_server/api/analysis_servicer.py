"""AnalysisService: thin async servicers that validate, run the engine off-loop, and stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, tensor_pb2
from interscope_server import attacks, errors
from interscope_server.analysis import results as engine
from interscope_server.analysis.profile import (
    ProfileSpec,
    profile_events,
    run_perturbation,
)
from interscope_server.analysis.values import ClassChoice, check_defined
from interscope_server.api import admission, convert, numerics, specs
from interscope_server.api.errors import stream_errors
from interscope_server.api.lanes import WorkerLanes
from interscope_server.api.streaming import iterate_in_thread
from interscope_server.attacks.base import AttackSpec
from interscope_server.cancel import CancelToken
from interscope_server.config import Settings
from interscope_server.models.host import HostModule
from interscope_server.models.registry import LoadedModel, ModelRegistry

#: Progress events go out at most this often, so a fast computation does not flood the stream.
PROGRESS_INTERVAL_S = 0.2


@dataclass(eq=False)  # identity semantics: calls live in a set
class _Call:
    """Bookkeeping of one analysis call: its cancel token and when it started."""

    cancel: CancelToken
    started: float = field(default_factory=time.monotonic)


class GuardedModule(torch.nn.Module):
    """A model's differentiable module whose failures say so (BackendFailed -> UNAVAILABLE).

    White-box attacks call the module directly, not through the batcher; without this, a model
    that raises in a gradient pass would surface as an INTERNAL error of the service.
    """

    def __init__(self, inner: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.inner = inner
        self._name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.inner(x)
        except errors.InterscopeError:
            raise  # already says what is wrong (wrong output shape, host died, deadline)
        except Exception as exc:
            raise errors.BackendFailed(
                f"model {self._name!r} failed in a forward/backward pass: {exc}"
            ) from exc


class _Throttle:
    """Lets a progress event through at most every PROGRESS_INTERVAL_S, and always the last."""

    def __init__(self) -> None:
        self._last = 0.0

    def ready(self, done: int, total: int) -> bool:
        now = time.monotonic()
        if done >= total or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            return True
        return False


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Profile, Attack and Audit over the registry, the engine and the attacks."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        executor: Executor,
        lanes: WorkerLanes | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._executor = executor
        # Long calls share a bounded part of `executor`, so short ones always find a thread.
        self.lanes = lanes or WorkerLanes(
            settings.worker_threads,
            settings.reserved_worker_threads,
            settings.long_call_forwards,
        )
        self._calls: set[_Call] = set()
        self._idle = asyncio.Event()  # set while no analysis call runs; lets shutdown drain
        self._idle.set()
        self.shutting_down = False

    # -- call admission, cancellation ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
        if self.shutting_down:
            raise errors.Unavailable("the server is shutting down; retry on another replica")
        if len(self._calls) >= self._settings.max_concurrent_calls:
            raise errors.Overloaded(
                f"{len(self._calls)} analysis calls are running, the most this server allows "
                f"({self._settings.max_concurrent_calls}); retry later"
            )
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        call = _Call(CancelToken(deadline))
        self._calls.add(call)
        self._idle.clear()
        try:
            yield call
        finally:
            call.cancel.cancel()
            self._calls.discard(call)
            if not self._calls:
                self._idle.set()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for running calls to finish, then stop the rest with
        UNAVAILABLE, so their callers retry on another replica."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except asyncio.TimeoutError:  # (distinct from TimeoutError before Python 3.11)
            for call in list(self._calls):
                call.cancel.cancel(
                    "the server is shutting down; retry on another replica", errors.Unavailable
                )

    def _provenance(
        self, model: LoadedModel, spec_json: str, seed: int, started: float, forwards: int
    ) -> analysis_pb2.Provenance:
        return analysis_pb2.Provenance(
            model=model.name,
            model_content_hash=f"sha256:{model.backend.content_hash}",
            spec_json=spec_json,
            seed=seed,
            versions=convert.versions(),
            wall_seconds=time.monotonic() - started,
            forwards=forwards,
            device=model.backend.device,
            replica=socket.gethostname(),
        )

    def _evaluator(
        self, model: LoadedModel, cancel: CancelToken
    ) -> Callable[[np.ndarray], np.ndarray]:
        def evaluate(batch: np.ndarray) -> np.ndarray:
            return model.evaluate(batch, cancel)

        return evaluate

    def _inputs(self, model: LoadedModel, tensor: tensor_pb2.Tensor, what: str) -> np.ndarray:
        return convert.decode_inputs(
            tensor,
            tuple(model.config.input.shape),
            what=what,
            max_bytes=self._settings.max_tensor_bytes,
            max_inputs=self._settings.max_inputs_per_request,
        )

    # -- Profile --------------------------------------------------------------------------------

    @stream_errors
    async def Profile(
        self, request: analysis_pb2.ProfileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[analysis_pb2.ProfileEvent]:
        async with self._admit(context) as call:
            model = self._registry.get(request.model)
            x = self._inputs(model, request.inputs, "inputs")
            choice = specs.class_choice(request.class_choice)
            classes = self._classes(request.labels, choice, len(x), model)
            spec, n_players = specs.profile_spec(
                request.spec,
                choice,
                x,
                self._settings,
                n_evaluations=len(x),
                layout=model.config.layout,
            )
            # The final result carries every input's profile in one message.
            admission.admit_result_bytes(
                f"the ProfileResult of {len(x)} input(s)",
                len(x) * admission.profile_message_bytes(spec, n_players),
                self._settings,
            )
            check_defined(spec.value, model.backend.output_kind, model.name)
            evaluate = self._evaluator(model, call.cancel)

            def events() -> Iterator[tuple[int, int, object]]:
                for index in range(len(x)):
                    checked = numerics.finite_evaluator(evaluate, model.name, index)
                    prediction = int(np.argmax(checked(x[index : index + 1])[0]))
                    cls = None if classes is None else int(classes[index])
                    for event in profile_events(checked, x[index], spec, cls, call.cancel):
                        yield index, prediction, event

            throttle = _Throttle()
            profiles: list[analysis_pb2.InteractionProfile] = []
            planned = 0
            # One more forward per input: its clean prediction.
            cost = admission.profile_cost(spec, n_players, len(x)) + len(x)
            async for index, prediction, event in iterate_in_thread(
                self._executor, events, call.cancel, self.lanes.slot(cost, call.cancel)
            ):
                if isinstance(event, engine.Progress):
                    planned = event.forwards_planned * len(x)
                    done = event.forwards_planned * index + event.forwards_done
                    if throttle.ready(done, planned):
                        yield analysis_pb2.ProfileEvent(
                            progress=analysis_pb2.Progress(
                                stage="profile",
                                done=done,
                                total=planned,
                                unit="forwards",
                                input_index=index,
                            )
                        )
                elif isinstance(event, engine.OrderEstimate):
                    yield analysis_pb2.ProfileEvent(partial=_order_estimate(index, event))
                elif isinstance(event, engine.InteractionProfile):
                    message = convert.profile_to_proto(event, index, prediction, spec.return_pairs)
                    profiles.append(message)
                    yield analysis_pb2.ProfileEvent(profile=message)
            result = _aggregate(profiles)
            result.provenance.CopyFrom(
                self._provenance(
                    model,
                    convert.spec_json(request.spec),
                    int(request.spec.seed),
                    call.started,
                    sum(p.forwards for p in profiles) + len(x),
                )
            )
            yield analysis_pb2.ProfileEvent(result=result)

    def _classes(
        self, values: object, choice: ClassChoice, count: int, model: LoadedModel
    ) -> np.ndarray | None:
        if choice is ClassChoice.PREDICTED:
            if values:
                # Refuse rather than ignore: the caller meant these classes to matter.
                raise errors.InvalidArgument(
                    "labels were sent with CLASS_CHOICE_PREDICTED, which uses the model's "
                    "prediction: send no labels, or choose CLASS_CHOICE_LABEL or _TARGET"
                )
            return None
        what = "targets" if choice is ClassChoice.TARGET else "labels"
        return convert.check_classes(values, count, len(model.config.classes), what)

    # -- Attack ---------------------------------------------------------------------------------

    def _attack_setup(
        self,
        model: LoadedModel,
        spec: analysis_pb2.AttackSpec,
        targets: list[int],
        cancel: CancelToken,
    ) -> tuple[AttackSpec, torch.nn.Module | None]:
        domain = specs.attack_spec(spec, targets, model.config)
        if model.backend.integer_inputs:
            domain = dataclasses.replace(domain, integer_inputs=True)
        torch_model = model.backend.torch_module() if domain.white_box else None
        if domain.white_box and torch_model is None:
            raise errors.FailedPrecondition(
                f"{domain.name} needs gradients, which model {model.name!r} does not provide "
                f"({model.backend.gradient_note or 'no differentiable form'}); "
                f"use a black-box attack: {', '.join(attacks.BLACK_BOX_ATTACKS)}"
            )
        if torch_model is None:
            return domain, None
        if isinstance(torch_model, HostModule):
            # Host calls end with this request's deadline (the host is killed after its grace).
            torch_model = torch_model.bound(cancel)
        checked = numerics.ShapeCheckedModule(torch_model, model.name, len(model.config.classes))
        return domain, GuardedModule(checked, model.name)

    @stream_errors
    async def Attack(
        self, request: analysis_pb2.AttackRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[analysis_pb2.AttackEvent]:
        async with self._admit(context) as call:
            model = self._registry.get(request.model)
            if not request.HasField("attack"):
                raise errors.InvalidArgument("attack is required: give at least attack.kind")
            x = self._inputs(model, request.inputs, "inputs")
            n_classes = len(model.config.classes)
            y = convert.check_classes(request.labels, len(x), n_classes, "labels")
            targets: list[int] = []
            if request.attack.targeted:
                targets = [
                    int(t)
                    for t in convert.check_classes(request.targets, len(x), n_classes, "targets")
                ]
            elif request.targets:
                raise errors.InvalidArgument("targets given but attack.targeted is false")
            domain, torch_model = self._attack_setup(model, request.attack, targets, call.cancel)
            admission.admit_attack(domain, len(x), self._settings)
            cost = admission.attack_schedule_cost(domain, len(x))
            profile: ProfileSpec | None = None
            if request.HasField("perturbation_profile"):
                profile, n_players = specs.profile_spec(
                    request.perturbation_profile,
                    ClassChoice.LABEL,
                    x,
                    self._settings,
                    n_evaluations=2 * len(x),
                    layout=model.config.layout,
                )
                # Each example's event carries its clean and adversarial profiles.
                admission.admit_result_bytes(
                    "one example's result with its perturbation profile",
                    2 * admission.profile_message_bytes(profile, n_players) + x[0].nbytes,
                    self._settings,
                )
                check_defined(profile.value, model.backend.output_kind, model.name)
                cost += 2 * admission.profile_cost(profile, n_players, len(x))
            evaluate = self._evaluator(model, call.cancel)

            def events() -> Iterator[tuple[object, engine.PerturbationProfile | None]]:
                for event in attacks.attack_events(
                    domain,
                    x,
                    y,
                    torch_model,
                    evaluate,
                    call.cancel,
                ):
                    if isinstance(event, attacks.ExampleResult):
                        numerics.check_example(event, model.name, event.index)
                    if isinstance(event, attacks.ExampleResult) and profile is not None:
                        yield (
                            event,
                            run_perturbation(
                                numerics.finite_evaluator(evaluate, model.name, event.index),
                                x[event.index],
                                event.x_adv,
                                profile,
                                int(y[event.index]),
                                call.cancel,
                            ),
                        )
                    else:
                        yield event, None

            deltas: list[analysis_pb2.PerturbationProfile] = []
            async for event, perturbation in iterate_in_thread(
                self._executor, events, call.cancel, self.lanes.slot(cost, call.cancel)
            ):
                if isinstance(event, attacks.Progress):
                    yield analysis_pb2.AttackEvent(
                        progress=analysis_pb2.Progress(
                            stage="attack",
                            done=event.examples_done,
                            total=event.examples_total,
                            unit="examples",
                        )
                    )
                elif isinstance(event, attacks.ExampleResult):
                    message = _example(event, not request.omit_adversarial)
                    if perturbation is not None:
                        message.perturbation.CopyFrom(
                            convert.perturbation_to_proto(
                                perturbation,
                                event.index,
                                (event.clean_pred, event.adv_pred),
                                return_profiles=True,
                                return_pairs=profile is not None and profile.return_pairs,
                            )
                        )
                        deltas.append(message.perturbation)
                    yield analysis_pb2.AttackEvent(example=message)
                elif isinstance(event, attacks.AttackSummary):
                    summary = analysis_pb2.AttackSummary(
                        n=event.n_examples,
                        clean_accuracy=event.clean_accuracy,
                        robust_accuracy=event.robust_accuracy,
                        success_rate=event.success_rate,
                        mean_linf=event.mean_linf,
                        mean_l2=event.mean_l2,
                    )
                    if deltas:
                        summary.orders.extend(deltas[0].clean.orders)
                        summary.delta_mean.extend(
                            np.mean([list(d.delta_mean) for d in deltas], axis=0).tolist()
                        )
                    forwards = event.total_queries + sum(
                        d.clean.forwards + d.adversarial.forwards for d in deltas
                    )
                    summary.provenance.CopyFrom(
                        self._provenance(
                            model,
                            convert.spec_json(request.attack),
                            int(request.attack.seed),
                            call.started,
                            forwards,
                        )
                    )
                    yield analysis_pb2.AttackEvent(summary=summary)

    # -- Audit ----------------------------------------------------------------------------------

    async def Audit(
        self,
        request_iterator: AsyncIterator[analysis_pb2.AuditRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[analysis_pb2.AuditEvent]:
        from interscope_server.api.audit import run_audit

        async for event in run_audit(self, request_iterator, context):
            yield event


def _order_estimate(index: int, event: engine.OrderEstimate) -> analysis_pb2.OrderEstimate:
    return analysis_pb2.OrderEstimate(
        input_index=index,
        order=event.order,
        ratio=event.ratio,
        mean=event.mean,
        mean_stderr=event.mean_se,
        mean_abs=event.mean_abs,
        mean_abs_stderr=event.mean_abs_se,
        disentanglement=0.0 if np.isnan(event.disentanglement) else event.disentanglement,
    )


def _example(event: attacks.ExampleResult, with_adversarial: bool) -> analysis_pb2.ExampleResult:
    message = analysis_pb2.ExampleResult(
        input_index=event.index,
        success=event.success,
        label=event.label,
        target=-1 if event.target is None else event.target,
        clean_prediction=event.clean_pred,
        adversarial_prediction=event.adv_pred,
        clean_margin=event.clean_margin,
        adversarial_margin=event.adv_margin,
        linf=event.linf,
        l2=event.l2,
        steps=event.steps,
        queries=event.queries,
    )
    if with_adversarial:
        message.adversarial.CopyFrom(to_tensor(np.asarray(event.x_adv, dtype=np.float32)))
    return message


def _aggregate(profiles: list[analysis_pb2.InteractionProfile]) -> analysis_pb2.ProfileResult:
    """Per-order means over inputs with standard errors across inputs."""
    result = analysis_pb2.ProfileResult(profiles=profiles)
    if not profiles:
        return result
    result.orders.extend(profiles[0].orders)
    for values_name, target, target_se in (
        ("mean", result.mean, result.mean_stderr),
        ("mean_abs", result.mean_abs, result.mean_abs_stderr),
    ):
        table = np.array([list(getattr(p, values_name)) for p in profiles], dtype=np.float64)
        target.extend(table.mean(axis=0).tolist())
        if len(profiles) > 1:
            target_se.extend((table.std(axis=0, ddof=1) / np.sqrt(len(profiles))).tolist())
        else:
            target_se.extend(list(getattr(profiles[0], f"{values_name}_stderr")))
    return result
