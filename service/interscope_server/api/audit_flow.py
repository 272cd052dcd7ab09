"""The Audit stream: config first, then samples; each sample attacked and profiled as it arrives."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc
import numpy as np
import torch

from interscope.v1 import analysis_pb2
from interscope_server import attacks, errors
from interscope_server.analysis.profile import ProfileSpec, run_perturbation
from interscope_server.analysis.values import ClassChoice, check_defined, check_deterministic
from interscope_server.api import admission, convert, numerics, specs
from interscope_server.api.attack_flow import attack_setup
from interscope_server.api.call import Call, CallContext
from interscope_server.api.errors import status_of
from interscope_server.attacks import masking
from interscope_server.attacks.base import AttackSpec
from interscope_server.cancel import CancelToken
from interscope_server.config import Settings
from interscope_server.models.registry import LoadedModel

log = logging.getLogger(__name__)

#: Samples of one audit worked on at once; their forward passes merge in the model's batcher.
AUDIT_PARALLELISM = 4


@dataclass(frozen=True)
class _AuditJob:
    """A checked AuditConfig: the model, the attack and profile every sample gets, their cost."""

    config: analysis_pb2.AuditConfig
    model: LoadedModel
    attack: AttackSpec
    torch_model: torch.nn.Module | None
    profile: ProfileSpec
    n_players: int
    sample_cost: int  # each sample takes a lane slot of its own when long
    per_sample_baseline: bool  # a mean baseline of each sample's own input
    sweep: tuple[AttackSpec, ...]  # the attack at each eps_sweep value, ascending


def _check(ctx: CallContext, config: analysis_pb2.AuditConfig, call: Call) -> _AuditJob:
    """Validate both specs up front, so a bad config fails before any sample is read."""
    settings = ctx.settings
    model = ctx.model(config.model)
    if not config.HasField("attack"):
        raise errors.InvalidArgument("config.attack is required: give at least attack.kind")
    if not config.HasField("profile"):
        raise errors.InvalidArgument("config.profile is required: give at least its players")
    check_deterministic(model.backend.stochastic, model.name, "an Audit (its profiles)")
    attack, torch_model = attack_setup(
        model, config.attack, [0] if config.attack.targeted else [], call.cancel
    )
    admission.admit_attack(attack, 1, settings)
    sweep = masking.sweep_specs(attack, config.eps_sweep)
    reference = np.zeros((1, *model.config.input.shape), dtype=np.float32)
    profile, n_players = specs.profile_spec(
        config.profile,
        ClassChoice.LABEL,
        reference,
        settings,
        n_evaluations=2,
        layout=model.config.layout,
    )
    profile = with_pairs(profile)
    admission.admit_result_bytes(
        "one audit sample's result",
        2 * admission.profile_message_bytes(profile, n_players) + reference.nbytes,
        settings,
    )
    check_defined(profile.value, model.backend.output_kind, model.name)
    # An attack (and one per sweep eps) and two profiles per sample.
    sample_cost = (1 + len(sweep)) * admission.attack_schedule_cost(
        attack, 1
    ) + 2 * admission.profile_cost(profile, n_players, 1)
    baseline = config.profile.baseline
    per_sample_baseline = (
        baseline.WhichOneof("kind") == "mean"
        and not baseline.mean.values
        and not baseline.mean.HasField("reference")
    )
    return _AuditJob(
        config,
        model,
        attack,
        torch_model,
        profile,
        n_players,
        sample_cost,
        per_sample_baseline,
        sweep,
    )


@dataclass(frozen=True)
class _Sample:
    """One checked sample: its input, label, target and the profile spec it is measured with."""

    id: str
    x: np.ndarray
    label: int
    target: int | None
    profile: ProfileSpec


def _check_sample(job: _AuditJob, sample: analysis_pb2.AuditSample, settings: Settings) -> _Sample:
    model = job.model.config
    n_classes = len(model.classes)
    x = convert.decode_inputs(
        sample.input,
        tuple(model.input.shape),
        what=f"sample {sample.id!r} input",
        max_bytes=settings.max_tensor_bytes,
        max_inputs=1,
        batched=False,
    )
    label = int(convert.check_classes([sample.label], 1, n_classes, "label")[0])
    target = None
    if job.config.attack.targeted:
        target = int(convert.check_classes([sample.target], 1, n_classes, "target")[0])
    profile = job.profile
    if job.per_sample_baseline:
        profile, _ = specs.profile_spec(
            job.config.profile,
            ClassChoice.LABEL,
            x[None],
            settings,
            n_evaluations=2,
            layout=model.layout,
        )
        profile = with_pairs(profile)
    return _Sample(sample.id, x, label, target, profile)


async def audit(
    ctx: CallContext,
    requests: AsyncIterator[analysis_pb2.AuditRequest],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[analysis_pb2.AuditEvent]:
    """Serve one Audit stream; errors of the stream as a whole end it with their status."""
    settings = ctx.settings
    async with ctx.admit(context) as call:
        incoming = _IdleLimitedReader(requests, settings.audit_idle_seconds)
        first = await incoming.next(busy=lambda: False)
        if first is None:
            raise errors.InvalidArgument("empty Audit stream: send an AuditConfig first")
        if first.WhichOneof("message") != "config":
            raise errors.InvalidArgument(
                "the first message of an Audit stream must be the AuditConfig, not a sample"
            )
        job = _check(ctx, first.config, call)
        config, model = job.config, job.model
        yield convert.audit_accepted(config.audit_id, job.n_players)

        outbox: asyncio.Queue[analysis_pb2.AuditEvent | BaseException | None] = asyncio.Queue()
        slots = asyncio.Semaphore(AUDIT_PARALLELISM)
        results: list[analysis_pb2.SampleResult] = []
        # Ids in flight or answered in this stream: a second copy is refused. An id answered
        # with an error leaves `seen`: the SDK retries retryable errors, possibly on this same
        # stream, and then the retry's result replaces the failure in the summary.
        seen: set[str] = set()
        failures: dict[str, analysis_pb2.SampleResult] = {}
        pending: set[asyncio.Task[None]] = set()

        async def work(sample: analysis_pb2.AuditSample) -> None:
            # The reader took a slot for this sample; it is given back when the sample is done.
            try:
                try:
                    checked = _check_sample(job, sample, settings)
                    result = await ctx.run(
                        job.sample_cost, call, _audit_sample, job, checked, call.cancel
                    )
                except (errors.Cancelled, errors.DeadlineExceeded) as exc:
                    await outbox.put(exc)
                    return
                except Exception as exc:
                    if call.cancel.cancelled:
                        # The whole call is being stopped (shutdown drain: UNAVAILABLE). The
                        # sample was not answered, and must not be reported as failed: end the
                        # stream with the call's status so the client sends it elsewhere.
                        await outbox.put(exc)
                        return
                    # One bad sample must not end the audit.
                    code, text = status_of(exc)
                    failed = convert.failed_sample(sample.id, sample.label, code.name, text)
                    results.append(failed)
                    failures[sample.id] = failed
                    seen.discard(sample.id)
                    await outbox.put(convert.audit_event(sample=failed))
                    return
                results.append(result)
                await outbox.put(convert.audit_event(sample=result))
            finally:
                slots.release()

        async def read() -> None:
            try:
                while (message := await incoming.next(busy=lambda: bool(pending))) is not None:
                    if message.WhichOneof("message") != "sample":
                        raise errors.InvalidArgument(
                            "an Audit stream takes one AuditConfig, first; then only samples"
                        )
                    sample = message.sample
                    if sample.id in seen:
                        duplicate = f"sample id {sample.id!r} was sent twice in this stream"
                        code = grpc.StatusCode.INVALID_ARGUMENT.name
                        failed = convert.failed_sample(sample.id, sample.label, code, duplicate)
                        results.append(failed)
                        await outbox.put(convert.audit_event(sample=failed))
                        continue
                    seen.add(sample.id)
                    if sample.id in failures:  # a retry: its new result counts instead
                        results.remove(failures.pop(sample.id))
                    await slots.acquire()  # backpressure: read no further than we can work
                    task = asyncio.create_task(work(sample))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
                await outbox.put(None)
            except Exception as exc:  # re-raised by the writer side
                await outbox.put(exc)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await outbox.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            call.cancel.cancel()
            reader.cancel()
            incoming.close()
            for task in list(pending):
                task.cancel()
            await asyncio.gather(reader, *pending, return_exceptions=True)

        forwards = sum(r.forwards for r in results)
        provenance = ctx.provenance(model, config, int(config.attack.seed), call, forwards)
        sweep_eps = tuple(s.eps for s in job.sweep)
        summary = convert.audit_summary(results, model.config.classes, provenance, sweep_eps)
        yield convert.audit_event(summary=summary)


class _IdleLimitedReader:
    """Reads an Audit request stream, ending it when the client goes quiet.

    An idle stream used to hold its call slot for ever: 64 streams that never sent a config
    locked every analysis call out. A stream that sends nothing for `idle_seconds` while none
    of its samples is in work ends with DEADLINE_EXCEEDED. The read is never cancelled (that
    could lose a message); it stays pending across waits.
    """

    def __init__(self, requests: AsyncIterator[analysis_pb2.AuditRequest], idle: float) -> None:
        self._requests = aiter(requests)
        self._idle = idle
        self._next: asyncio.Future[analysis_pb2.AuditRequest] | None = None

    async def next(self, busy: Callable[[], bool]) -> analysis_pb2.AuditRequest | None:
        """The next message, None at the end of the stream."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._requests))
        while True:
            done, _ = await asyncio.wait({self._next}, timeout=self._idle)
            if done:
                break
            if not busy():
                self._next.cancel()
                raise errors.DeadlineExceeded(
                    f"the Audit stream sent nothing for {self._idle:.0f} s with no sample in "
                    "work (audit_idle_seconds); send the config and samples, then half-close"
                )
        future, self._next = self._next, None
        try:
            return future.result()
        except StopAsyncIteration:
            return None

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None


def _audit_sample(
    job: _AuditJob, sample: _Sample, cancel: CancelToken
) -> analysis_pb2.SampleResult:
    """Attack one sample, then profile it clean and adversarial on the same contexts (a thread)."""
    model, attack, config = job.model, job.attack, job.config
    sample_id, x, label, target = sample.id, sample.x, sample.label, sample.target
    forwards = 0

    def count(batch: np.ndarray) -> np.ndarray:
        nonlocal forwards
        forwards += len(batch)
        return model.evaluate(batch, cancel)

    evaluate = numerics.finite_evaluator(count, model.name, sample_id)

    spec = replace(attack, target_classes=(target,)) if target is not None else attack
    (outcome,) = attacks.run_attack(
        spec, x[None], np.array([label]), job.torch_model, evaluate, cancel
    ).results
    numerics.check_example(outcome, model.name, sample_id)
    # Square's queries went through `evaluate`; white-box steps and checks did not.
    white_box = outcome.queries + outcome.check_queries if attack.white_box else 0
    sweep_robust: list[bool] = []
    if job.sweep:
        sweep = tuple(replace(s, target_classes=spec.target_classes) for s in job.sweep)
        robust, spent_sweep = attacks.robust_at(
            sweep, x[None], np.array([label]), job.torch_model, evaluate, cancel
        )
        sweep_robust = [bool(r) for r in robust[:, 0]]
        white_box += spent_sweep
    perturbation = run_perturbation(evaluate, x, outcome.x_adv, sample.profile, label, cancel)
    spent = forwards + white_box
    message = convert.perturbation_to_proto(
        perturbation,
        0,
        (outcome.clean_prediction, outcome.adversarial_prediction),
        return_profiles=config.return_profiles,
        return_pairs=True,
    )
    if not (config.return_profiles and config.profile.return_pairs):
        # Pairs and their I^(m) always go out (the SDK recomputes the specificity from them);
        # their standard errors would double that and only go out when asked for.
        message.clean.ClearField("interactions_stderr")
        message.adversarial.ClearField("interactions_stderr")
    return convert.sample_result(
        sample_id, label, outcome, spent, message, config.return_adversarial, sweep_robust
    )


def with_pairs(profile: ProfileSpec) -> ProfileSpec:
    """The audit's profile keeps per-pair I^(m): the summary's category specificity needs them."""
    return replace(profile, return_pairs=True)
