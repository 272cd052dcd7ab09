"""The Profile call: inputs and spec checked, each input profiled off-loop, events streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from interscope.v1 import analysis_pb2
from interscope_server import errors
from interscope_server.analysis import results
from interscope_server.analysis.profile import ProfileEvent, ProfileSpec, profile_events
from interscope_server.analysis.values import ClassChoice, check_defined, check_deterministic
from interscope_server.api import admission, convert, numerics, specs
from interscope_server.api.call import Call, CallContext
from interscope_server.models.registry import LoadedModel

#: Progress events go out at most this often, so a fast computation does not flood the stream.
PROGRESS_INTERVAL_S = 0.2


class _Throttle:
    """Lets a progress event through once the call has run PROGRESS_INTERVAL_S, then at most
    every PROGRESS_INTERVAL_S, and the last one when any went before it: a call that ends
    sooner sends none (each message costs a write, a small call's largest cost)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._sent = False

    def ready(self, done: int, total: int) -> bool:
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S or (done >= total and self._sent):
            self._last, self._sent = now, True
            return True
        return False


@dataclass(frozen=True)
class _ProfileJob:
    """A checked Profile request: the model, its inputs and classes, the spec and its cost."""

    model: LoadedModel
    x: np.ndarray
    classes: np.ndarray | None  # None: each input's predicted class
    spec: ProfileSpec
    cost: int


def _classes(
    values: object, choice: ClassChoice, count: int, model: LoadedModel
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


def _check(ctx: CallContext, request: analysis_pb2.ProfileRequest) -> _ProfileJob:
    """Everything about the request that can be refused, refused before any forward."""
    settings = ctx.settings
    model = ctx.model(request.model)
    check_deterministic(model.backend.stochastic, model.name, "a Profile")
    x = ctx.inputs(model, request.inputs, "inputs")
    choice = specs.class_choice(request.class_choice)
    classes = _classes(request.labels, choice, len(x), model)
    spec, n_players = specs.profile_spec(
        request.spec, choice, x, settings, n_evaluations=len(x), layout=model.config.layout
    )
    # The final result carries every input's profile in one message.
    admission.admit_result_bytes(
        f"the ProfileResult of {len(x)} input(s)",
        len(x) * admission.profile_message_bytes(spec, n_players),
        settings,
    )
    check_defined(spec.value, model.backend.output_kind, model.name)
    # One more forward per input: its clean prediction.
    cost = admission.profile_cost(spec, n_players, len(x)) + len(x)
    return _ProfileJob(model, x, classes, spec, cost)


def _events(job: _ProfileJob, call: Call) -> Iterator[tuple[int, ProfileEvent]]:
    """(input index, engine event) for every input in turn (a worker thread). The engine finds
    each input's prediction on its first forward (one more row, reported in the profile).

    Progress is counted over the whole call and thinned here, before it crosses to the event
    loop: each event handed over may wake the loop, which then contends for the GIL with this
    thread while the engine is still working (a tiny profile's one progress event cost that
    wake-up, and was then dropped)."""
    evaluate = call.evaluator(job.model)
    throttle = _Throttle()
    n = len(job.x)
    for index in range(n):
        checked = numerics.finite_evaluator(evaluate, job.model.name, index)
        cls = None if job.classes is None else int(job.classes[index])
        events = profile_events(checked, job.x[index], job.spec, cls, call.cancel, predict=True)
        for event in events:
            if isinstance(event, results.ForwardProgress):
                planned = event.forwards_planned * n
                done = event.forwards_planned * index + event.forwards_done
                if not throttle.ready(done, planned):
                    continue
                event = results.ForwardProgress(done, planned, event.stage)
            yield index, event


async def profile(
    ctx: CallContext, request: analysis_pb2.ProfileRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[analysis_pb2.ProfileEvent]:
    """Serve one Profile call: progress, per-order partials, each input's profile, the result."""
    async with ctx.admit(context) as call:
        job = _check(ctx, request)
        profiles: list[analysis_pb2.InteractionProfile] = []
        events = ctx.events(lambda: _events(job, call), job.cost, call, job.model)
        async for index, event in events:
            if isinstance(event, results.ForwardProgress):  # the whole call's, thinned
                done, planned = event.forwards_done, event.forwards_planned
                progress = convert.progress("profile", done, planned, "forwards", index)
                yield convert.profile_event(progress=progress)
            elif isinstance(event, results.OrderEstimate):
                yield convert.profile_event(partial=convert.order_estimate(index, event))
            elif isinstance(event, results.InteractionProfile):
                assert event.prediction is not None  # predict=True
                message = convert.profile_to_proto(
                    event, index, event.prediction, job.spec.return_pairs
                )
                profiles.append(message)
                if not request.omit_input_profiles:
                    yield convert.profile_event(profile=message)
        # Each input's profile counts its own forwards, its prediction row included.
        forwards = sum(p.forwards for p in profiles)
        provenance = ctx.provenance(job.model, request.spec, int(request.spec.seed), call, forwards)
        yield convert.profile_event(result=convert.profile_result(profiles, provenance))
