"""ModelService: a thin servicer over the model registry (list, describe, load, unload)."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor

import grpc

from interscope.v1 import models_pb2, models_pb2_grpc
from interscope_server.api import convert, model_flow
from interscope_server.api.errors import rpc_errors
from interscope_server.config import Settings
from interscope_server.models.registry import ModelRegistry


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Lists, describes, loads and unloads models; loading runs off the event loop."""

    def __init__(
        self, registry: ModelRegistry, executor: Executor, settings: Settings | None = None
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._settings = settings or Settings()

    @rpc_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        statuses = self._registry.statuses()
        return convert.list_models([model_flow.describe(self._registry, s) for s in statuses])

    @rpc_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelInfo:
        return model_flow.describe(self._registry, self._registry.status(request.name))

    @rpc_errors
    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.LoadModelResponse:
        return await model_flow.load(
            self._registry, self._executor, self._settings, request, context
        )

    @rpc_errors
    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        model_flow.require_admin(self._settings, context, "UnloadModel")
        unload = functools.partial(self._registry.unload, request.name, delete=request.delete)
        await asyncio.get_running_loop().run_in_executor(self._executor, unload)
        return convert.unload_model_response()
