"""AnalysisService: each RPC hands its request to its flow over the shared call context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from interscope.v1 import analysis_pb2, analysis_pb2_grpc
from interscope_server.api import attack_flow, audit_flow, profile_flow
from interscope_server.api.call import CallContext
from interscope_server.api.errors import rpc_errors
from interscope_server.api.lanes import WorkerLanes
from interscope_server.config import Settings
from interscope_server.models.registry import ModelRegistry


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Profile, Attack and Audit over the registry, the engine and the attacks."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        executor: Executor,
        lanes: WorkerLanes | None = None,
    ) -> None:
        #: Admission, shutdown and drain live here; the server sets and awaits them.
        self.calls = CallContext(settings, registry, executor, lanes)

    @rpc_errors
    async def Profile(
        self, request: analysis_pb2.ProfileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[analysis_pb2.ProfileEvent]:
        async for event in profile_flow.profile(self.calls, request, context):
            yield event

    @rpc_errors
    async def Attack(
        self, request: analysis_pb2.AttackRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[analysis_pb2.AttackEvent]:
        async for event in attack_flow.attack(self.calls, request, context):
            yield event

    @rpc_errors
    async def Audit(
        self,
        requests: AsyncIterator[analysis_pb2.AuditRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[analysis_pb2.AuditEvent]:
        async for event in audit_flow.audit(self.calls, requests, context):
            yield event
