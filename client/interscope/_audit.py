"""Batch audits over several concurrent Audit streams: failover, checkpoints, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from google.protobuf import json_format

from interscope._checkpoint import Checkpoint, data_fingerprint, fingerprint
from interscope._exceptions import InterscopeError, UnavailableError, from_rpc_error
from interscope._models import AuditReport, AuditSummary, SampleResult
from interscope._summary import summarize
from interscope._wire import RETRY_METADATA
from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc

#: Stream failures that another stream (or the same replica, later) may get past.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
    }
)
_RETRYABLE_NAMES = frozenset(code.name for code in RETRYABLE)


@dataclass(frozen=True)
class AuditProgress:
    """Where an audit stands: samples finished (ok or failed) out of all, and the latest one."""

    done: int
    total: int
    failed: int
    resumed: int
    last: SampleResult | None


@dataclass
class AuditPlan:
    """Everything one audit run needs besides the channels."""

    model: str
    x: np.ndarray
    y: np.ndarray
    targets: np.ndarray | None
    ids: list[str]
    attack: analysis_pb2.AttackSpec
    profile: analysis_pb2.InteractionSpec
    checkpoint: Path | None = None
    streams_per_address: int = 2
    window: int = 4
    max_sample_attempts: int = 3
    max_stream_failures: int = 6
    return_adversarial: bool = False
    audit_id: str = ""
    on_progress: Callable[[AuditProgress], None] | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    #: (index, count, total): this plan holds shard `index` of `count` of a `total`-sample
    #: dataset (samples index, index + count, ...); None for a whole dataset.
    shard: tuple[int, int, int] | None = None
    #: The audit's eps sweep, as given (the server attacks and reports it ascending).
    eps_sweep: tuple[float, ...] = ()


@dataclass
class _State:
    total: int
    queue: asyncio.Queue[int]
    stop: asyncio.Event
    results: dict[str, analysis_pb2.SampleResult] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    n_players: int = 0
    resumed: int = 0
    fatal: InterscopeError | None = None
    last_error: InterscopeError | None = None
    summaries: list[analysis_pb2.AuditSummary] = field(default_factory=list)


class _StreamBroken(Exception):
    def __init__(self, error: InterscopeError) -> None:
        self.error = error


def _validate(plan: AuditPlan) -> None:
    n = len(plan.x)
    if plan.x.ndim < 2 or n == 0:
        raise ValueError(f"x must be (N, *input_shape) with N >= 1, got shape {plan.x.shape}")
    if plan.y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {plan.y.shape}")
    if plan.targets is not None and plan.targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {plan.targets.shape}")
    if len(plan.ids) != n or len(set(plan.ids)) != n:
        raise ValueError(f"ids must be {n} unique strings, one per sample")
    if plan.streams_per_address < 1 or plan.window < 1:
        raise ValueError("streams_per_address and window must be >= 1")


def audit_config(plan: AuditPlan) -> analysis_pb2.AuditConfig:
    return analysis_pb2.AuditConfig(
        model=plan.model,
        attack=plan.attack,
        profile=plan.profile,
        audit_id=plan.audit_id,
        return_adversarial=plan.return_adversarial,
        # The client computes the summary from per-sample clean and adversarial profiles.
        return_profiles=True,
        eps_sweep=plan.eps_sweep,
    )


async def run_audit(
    plan: AuditPlan, channels: Sequence[grpc.aio.Channel], classes_from: grpc.aio.Channel
) -> AuditReport:
    """Audit every sample of `plan` exactly once over Audit streams on `channels`.

    Each channel carries `streams_per_address` streams; a stream keeps at most `window` samples
    in flight and pulls the next from a shared queue as results return, so faster replicas take
    more. When a stream breaks, its unanswered samples go back on the queue and the stream
    reconnects on the next channel after a backoff; finished results are appended to the
    checkpoint as they arrive.
    """
    _validate(plan)
    try:
        info = await models_pb2_grpc.ModelServiceStub(classes_from).GetModel(
            models_pb2.GetModelRequest(name=plan.model), metadata=plan.metadata
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    config = audit_config(plan)
    config_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    config_dict.pop("audit_id", None)
    # Whether x_adv comes back changes no number: an audit asking for it (a report's gallery)
    # and one that does not are the same audit, and resume from each other's checkpoints.
    config_dict.pop("return_adversarial", None)
    fp = fingerprint({"config": config_dict, "model_content_hash": info.content_hash})
    state = _State(total=len(plan.ids), queue=asyncio.Queue(), stop=asyncio.Event())
    wanted = set(plan.ids)
    checkpoint = None
    if plan.checkpoint:
        data_fp = data_fingerprint(plan.ids, plan.x, plan.y, plan.targets)
        extra = checkpoint_header(plan, info)
        checkpoint = Checkpoint.open(plan.checkpoint, fp, config_dict, extra, data_fp)
    try:
        if checkpoint is not None:
            state.results = {k: v for k, v in checkpoint.done.items() if k in wanted}
            state.resumed = len(state.results)
        for index, sample_id in enumerate(plan.ids):
            if sample_id not in state.results:
                state.queue.put_nowait(index)
        _report_progress(plan, state, None)
        if state.queue.empty():
            state.stop.set()
        else:
            tasks = [
                asyncio.ensure_future(_worker(plan, state, config, checkpoint, channels, slot))
                for slot in range(len(channels) * plan.streams_per_address)
            ]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # An error escaping one stream (a failing on_progress callback, Ctrl-C) stops
                # them all before the checkpoint closes; what was recorded stays resumable.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
    finally:
        if checkpoint is not None:
            checkpoint.close()
    if state.fatal is not None:
        raise state.fatal
    missing = [i for i in plan.ids if i not in state.results]
    if missing:
        cause = state.last_error or UnavailableError("no replica could be reached")
        raise UnavailableError(
            f"audit stopped with {len(missing)} of {len(plan.ids)} samples unfinished (the "
            f"checkpoint keeps the rest; run again to resume); last error: {cause}"
        )
    samples = [SampleResult.from_proto(state.results[i]) for i in plan.ids]
    if not state.n_players:
        for s in samples:
            if s.perturbation is not None and s.perturbation.clean is not None:
                state.n_players = s.perturbation.clean.n_players
                break
    return AuditReport(
        model=plan.model,
        model_content_hash=info.content_hash,
        fingerprint=fp,
        config=config_dict,
        n_players=state.n_players,
        samples=samples,
        summary=summarize(samples, list(info.classes), sorted(plan.eps_sweep)),
        resumed_samples=state.resumed,
        server_summaries=[AuditSummary.from_proto(s) for s in state.summaries],
    )


def checkpoint_header(plan: AuditPlan, info: models_pb2.ModelInfo) -> dict[str, Any]:
    """What a checkpoint records beyond the config, so shards can be merged without a server."""
    shard = None
    if plan.shard is not None:
        index, count, total = plan.shard
        shard = {"index": index, "count": count, "total": total}
    return {
        "model": plan.model,
        "model_content_hash": info.content_hash,
        "classes": list(info.classes),
        "shard": shard,
        "sample_ids": list(plan.ids),
    }


def _report_progress(plan: AuditPlan, state: _State, last: SampleResult | None) -> None:
    if plan.on_progress is None:
        return
    failed = sum(1 for r in state.results.values() if r.HasField("error"))
    plan.on_progress(AuditProgress(len(state.results), state.total, failed, state.resumed, last))


async def _worker(
    plan: AuditPlan,
    state: _State,
    config: analysis_pb2.AuditConfig,
    checkpoint: Checkpoint | None,
    channels: Sequence[grpc.aio.Channel],
    slot: int,
) -> None:
    channel_index = slot % len(channels)
    failures = 0
    while not state.stop.is_set():
        try:
            await _run_stream(plan, state, config, checkpoint, channels[channel_index])
            failures = 0
        except _StreamBroken as broken:
            state.last_error = broken.error
            failures += 1
            if failures > plan.max_stream_failures:
                return  # the other streams carry on; run_audit reports what is unfinished
            # Try the next address; back off (exponential, jittered) so a dead replica is not
            # hammered while the live ones carry the audit.
            channel_index = (channel_index + 1) % len(channels)
            delay = min(2.0, 0.05 * 2 ** (failures - 1)) * (0.5 + random.random() / 2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(state.stop.wait(), timeout=delay)
        except InterscopeError as error:
            state.fatal = error
            state.stop.set()
            return


async def _run_stream(
    plan: AuditPlan,
    state: _State,
    config: analysis_pb2.AuditConfig,
    checkpoint: Checkpoint | None,
    channel: grpc.aio.Channel,
) -> None:
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    call = stub.Audit(metadata=plan.metadata)
    in_flight: dict[str, int] = {}
    slots = asyncio.Semaphore(plan.window)
    accepted = asyncio.Event()
    write_failed = False

    async def writer() -> None:
        nonlocal write_failed
        try:
            await call.write(analysis_pb2.AuditRequest(config=config))
            # No sample goes out before the server accepts the config. A sample written while
            # the server refuses the config races the call's end, and a write that loses that
            # race makes grpc set INTERNAL "Internal error from Core" on the call, hiding the
            # server's status (issue 14 item 13).
            await accepted.wait()
            await _write_samples()
        except grpc.RpcError:
            write_failed = True
            raise

    async def _write_samples() -> None:
        while True:
            await slots.acquire()
            getter = asyncio.ensure_future(state.queue.get())
            stopper = asyncio.ensure_future(state.stop.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
            if getter.done() and not getter.cancelled():
                index = getter.result()
                if state.stop.is_set():
                    state.queue.put_nowait(index)
                else:
                    in_flight[plan.ids[index]] = index
                    await call.write(_sample_request(plan, index))
                    continue
            await call.done_writing()
            return

    writer_task = asyncio.ensure_future(writer())
    try:
        while True:
            event = await call.read()
            if event is grpc.aio.EOF:
                break
            kind = event.WhichOneof("event")
            if kind == "accepted":
                state.n_players = state.n_players or event.accepted.n_players
                accepted.set()
            elif kind == "sample":
                _on_sample(plan, state, checkpoint, event.sample, in_flight)
                slots.release()
            elif kind == "summary":
                state.summaries.append(event.summary)
        await writer_task
        if in_flight:
            raise _StreamBroken(UnavailableError("stream ended with samples unanswered"))
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        if write_failed and code == grpc.StatusCode.INTERNAL:
            # The server ended an accepted stream (a drain, a restart) while a sample was being
            # written: grpc reports its own INTERNAL instead of the server's status. The
            # unanswered samples go to another stream.
            raise _StreamBroken(
                UnavailableError("the server ended the stream while a sample was being sent")
            ) from None
        mapped = from_rpc_error(error)
        if code in RETRYABLE and not _over_a_limit(error):
            raise _StreamBroken(mapped) from None
        raise mapped from None
    except asyncio.InvalidStateError:
        # Writing to a call that the server already ended: read() reports why.
        raise _StreamBroken(UnavailableError("stream ended while writing")) from None
    finally:
        if not writer_task.done():
            writer_task.cancel()
        # Collect the writer's outcome (its errors surface through read()) so none is left
        # unretrieved.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await writer_task
        for index in in_flight.values():
            state.queue.put_nowait(index)
        in_flight.clear()
        call.cancel()


def _over_a_limit(error: grpc.RpcError) -> bool:
    """A RESOURCE_EXHAUSTED the server marks as the request's own (over a cost or size limit),
    which every stream and replica would refuse again; a busy server says "later" instead."""
    trailing = getattr(error, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    return any(key == RETRY_METADATA and value == "no" for key, value in metadata or ())


def _sample_request(plan: AuditPlan, index: int) -> analysis_pb2.AuditRequest:
    sample = analysis_pb2.AuditSample(
        id=plan.ids[index],
        input=to_tensor(np.asarray(plan.x[index], dtype=np.float32)),
        label=int(plan.y[index]),
        target=int(plan.targets[index]) if plan.targets is not None else 0,
    )
    return analysis_pb2.AuditRequest(sample=sample)


def _on_sample(
    plan: AuditPlan,
    state: _State,
    checkpoint: Checkpoint | None,
    result: analysis_pb2.SampleResult,
    in_flight: dict[str, int],
) -> None:
    index = in_flight.pop(result.id, None)
    if index is None or result.id in state.results:
        return  # not ours or already recorded elsewhere: exactly once
    if result.HasField("error") and result.error.code in _RETRYABLE_NAMES:
        attempts = state.attempts.get(index, 0) + 1
        state.attempts[index] = attempts
        if attempts < plan.max_sample_attempts:
            state.queue.put_nowait(index)
            return
    state.results[result.id] = result
    if checkpoint is not None:
        checkpoint.append(result)
    _report_progress(plan, state, SampleResult.from_proto(result))
    if len(state.results) == state.total:
        state.stop.set()
