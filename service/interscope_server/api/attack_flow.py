"""The Attack call: each input attacked (and, if asked, profiled clean and adversarial)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from interscope.v1 import analysis_pb2
from interscope_server import attacks, errors
from interscope_server.analysis.profile import ProfileSpec, run_perturbation
from interscope_server.analysis.results import PerturbationProfile
from interscope_server.analysis.values import ClassChoice, check_defined, check_deterministic
from interscope_server.api import admission, convert, numerics, specs
from interscope_server.api.call import Call, CallContext
from interscope_server.attacks.base import AttackSpec
from interscope_server.cancel import CancelToken
from interscope_server.config import Settings
from interscope_server.models.host import HostModule
from interscope_server.models.registry import LoadedModel


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


def attack_setup(
    model: LoadedModel,
    spec: analysis_pb2.AttackSpec,
    targets: list[int],
    cancel: CancelToken,
) -> tuple[AttackSpec, torch.nn.Module | None]:
    """The attack's domain spec and, for a white-box attack, the model's guarded module."""
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


@dataclass(frozen=True)
class _AttackJob:
    """A checked Attack request: model, inputs and labels, the attack and optional profile."""

    model: LoadedModel
    x: np.ndarray
    y: np.ndarray
    attack: AttackSpec
    torch_model: torch.nn.Module | None
    profile: ProfileSpec | None
    cost: int


def _targets(request: analysis_pb2.AttackRequest, count: int, n_classes: int) -> list[int]:
    if request.attack.targeted:
        chosen = convert.check_classes(request.targets, count, n_classes, "targets")
        return [int(t) for t in chosen]
    if request.targets:
        raise errors.InvalidArgument("targets given but attack.targeted is false")
    return []


def _perturbation_profile(
    request: analysis_pb2.AttackRequest, model: LoadedModel, x: np.ndarray, settings: Settings
) -> tuple[ProfileSpec, int]:
    """The requested perturbation profile's spec and its forwards for every input."""
    check_deterministic(model.backend.stochastic, model.name, "a perturbation_profile")
    profile, n_players = specs.profile_spec(
        request.perturbation_profile,
        ClassChoice.LABEL,
        x,
        settings,
        n_evaluations=2 * len(x),
        layout=model.config.layout,
    )
    # Each example's event carries its clean and adversarial profiles.
    admission.admit_result_bytes(
        "one example's result with its perturbation profile",
        2 * admission.profile_message_bytes(profile, n_players) + x[0].nbytes,
        settings,
    )
    check_defined(profile.value, model.backend.output_kind, model.name)
    return profile, 2 * admission.profile_cost(profile, n_players, len(x))


def _check(ctx: CallContext, request: analysis_pb2.AttackRequest, call: Call) -> _AttackJob:
    """Everything about the request that can be refused, refused before any forward."""
    model = ctx.model(request.model)
    if not request.HasField("attack"):
        raise errors.InvalidArgument("attack is required: give at least attack.kind")
    x = ctx.inputs(model, request.inputs, "inputs")
    n_classes = len(model.config.classes)
    y = convert.check_classes(request.labels, len(x), n_classes, "labels")
    targets = _targets(request, len(x), n_classes)
    domain, torch_model = attack_setup(model, request.attack, targets, call.cancel)
    admission.admit_attack(domain, len(x), ctx.settings)
    cost = admission.attack_schedule_cost(domain, len(x))
    profile: ProfileSpec | None = None
    if request.HasField("perturbation_profile"):
        profile, profile_cost = _perturbation_profile(request, model, x, ctx.settings)
        cost += profile_cost
    return _AttackJob(model, x, y, domain, torch_model, profile, cost)


def _events(job: _AttackJob, call: Call) -> Iterator[tuple[object, PerturbationProfile | None]]:
    """The attack's events, each example's with its perturbation profile (a worker thread)."""
    evaluate = call.evaluator(job.model)
    name = job.model.name
    for event in attacks.attack_events(
        job.attack, job.x, job.y, job.torch_model, evaluate, call.cancel
    ):
        if not isinstance(event, attacks.ExampleResult):
            yield event, None
            continue
        numerics.check_example(event, name, event.index)
        if job.profile is None:
            yield event, None
            continue
        checked = numerics.finite_evaluator(evaluate, name, event.index)
        x = job.x[event.index]
        label = int(job.y[event.index])
        yield event, run_perturbation(checked, x, event.x_adv, job.profile, label, call.cancel)


async def attack(
    ctx: CallContext, request: analysis_pb2.AttackRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[analysis_pb2.AttackEvent]:
    """Serve one Attack call: progress, each example's result, then the summary."""
    async with ctx.admit(context) as call:
        job = _check(ctx, request, call)
        deltas: list[analysis_pb2.PerturbationProfile] = []
        async for event, perturbation in ctx.events(lambda: _events(job, call), job.cost, call):
            if isinstance(event, attacks.ExampleProgress):
                progress = convert.progress(
                    "attack", event.examples_done, event.examples_total, "examples"
                )
                yield convert.attack_event(progress=progress)
            elif isinstance(event, attacks.StageProgress):
                progress = convert.progress(
                    f"attack: {event.stage} ({event.examples_left} examples left)",
                    event.stages_done,
                    event.stages_total,
                    "stages",
                    event.first_example,
                )
                yield convert.attack_event(progress=progress)
            elif isinstance(event, attacks.ExampleResult):
                message = convert.example_to_proto(event, not request.omit_adversarial)
                if perturbation is not None:
                    message.perturbation.CopyFrom(
                        convert.perturbation_to_proto(
                            perturbation,
                            event.index,
                            (event.clean_prediction, event.adversarial_prediction),
                            return_profiles=True,
                            return_pairs=job.profile is not None and job.profile.return_pairs,
                        )
                    )
                    deltas.append(message.perturbation)
                yield convert.attack_event(example=message)
            elif isinstance(event, attacks.AttackSummary):
                # Queries counted by the attack and its masking checks; each profile counted
                # its own forwards.
                forwards = (
                    event.total_queries
                    + event.check_queries
                    + sum(d.clean.forwards + d.adversarial.forwards for d in deltas)
                )
                seed = int(request.attack.seed)
                provenance = ctx.provenance(job.model, request.attack, seed, call, forwards)
                summary = convert.attack_summary(event, deltas, provenance)
                yield convert.attack_event(summary=summary)
