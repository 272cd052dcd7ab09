"""ModelService: a thin servicer over the model registry (list, describe, load, unload)."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from concurrent.futures import Executor

import grpc
from pydantic import ValidationError

from interscope.v1 import models_pb2, models_pb2_grpc
from interscope_server import errors
from interscope_server.api.errors import unary_errors
from interscope_server.api.interceptors import bearer_token, token_matches
from interscope_server.config import Settings
from interscope_server.models.config import (
    CONFIG_FILE,
    MODEL_NAME_PATTERN,
    ModelConfig,
    Normalization,
    OutputSpec,
    TensorSpec,
)
from interscope_server.models.registry import (
    LoadedModel,
    ModelRegistry,
    ModelState,
    ModelStatus,
)
from interscope_server.models.repository import config_error_message

_FORMAT_TO_PROTO = {
    "onnx": models_pb2.MODEL_FORMAT_ONNX,
    "torchscript": models_pb2.MODEL_FORMAT_TORCHSCRIPT,
    "oip": models_pb2.MODEL_FORMAT_OIP,
    "torch_export": models_pb2.MODEL_FORMAT_TORCH_EXPORT,
}
# A remote (oip) model has no file to upload: it comes only from a repository config.json.
_FORMAT_FROM_PROTO = {value: key for key, value in _FORMAT_TO_PROTO.items() if key != "oip"}
#: The file name an upload is saved under, by format.
_UPLOAD_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "torch_export": "model.pt2"}
_STATE_TO_PROTO = {
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.READY: models_pb2.MODEL_STATE_READY,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
    ModelState.UNLOADED: models_pb2.MODEL_STATE_UNLOADED,
}


def model_info(registry: ModelRegistry, status: ModelStatus) -> models_pb2.ModelInfo:
    """Metadata of one model, whatever its state (config from the repository when not loaded)."""
    info = models_pb2.ModelInfo(
        name=status.name, state=_STATE_TO_PROTO[status.state], state_message=status.message
    )
    loaded: LoadedModel | None = None
    config: ModelConfig | None = None
    if status.state is ModelState.READY:
        try:
            loaded = registry.get(status.name)
            config = loaded.config
        except errors.InterscopeError:  # unloaded between the two reads
            loaded = None
    if config is None:
        try:
            config = registry.repository.read_config(status.name)
        except errors.InterscopeError:
            config = None  # a broken config: its FAILED state message says why
    if config is not None:
        info.format = _FORMAT_TO_PROTO[config.format]
        info.input.CopyFrom(
            models_pb2.TensorInfo(
                name=config.input.name,
                datatype=config.input.datatype or "",
                shape=config.input.shape,
                layout=config.layout if config.input.shape else "",
            )
        )
        info.output.CopyFrom(
            models_pb2.TensorInfo(
                name=config.output.name, datatype="FP32", shape=[len(config.classes)]
            )
        )
        info.output_kind = config.output.kind or ""
        info.classes.extend(config.classes)
        if isinstance(config.value_range, list):
            info.value_ranges.extend(
                models_pb2.ValueRange(low=low, high=high) for low, high in config.value_range
            )
            info.value_range_low = min(low for low, _ in config.value_range)
            info.value_range_high = max(high for _, high in config.value_range)
        else:
            info.value_range_low, info.value_range_high = config.value_range
        info.feature_names.extend(config.feature_names or [])
        if config.normalization is not None:
            info.normalization.CopyFrom(
                models_pb2.Normalization(
                    mean=config.normalization.mean, std=config.normalization.std
                )
            )
        info.max_batch_size = config.max_batch_size
        info.description = config.description
    if loaded is not None:
        backend = loaded.backend
        info.content_hash = f"sha256:{backend.content_hash}"
        info.gradients_available = backend.gradients_available
        info.gradients_message = backend.gradient_note
        info.device = backend.device
    return info


def config_from_json(name: str, text: str) -> ModelConfig:
    """An upload's config.json, validated exactly as a repository folder's is."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise errors.InvalidArgument(f"upload.config_json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"upload.config_json must be a JSON object ({CONFIG_FILE})")
    if data.setdefault("name", name) != name:
        raise errors.InvalidArgument(
            f"upload.config_json names the model {data['name']!r} but the request names it "
            f"{name!r}; drop the name or make them equal"
        )
    if data.get("format") == "oip":
        raise errors.InvalidArgument(
            "an oip model comes from a repository config.json, never an upload"
        )
    if data.get("format") in _UPLOAD_FILES:
        data.setdefault("file", _UPLOAD_FILES[data["format"]])
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise errors.InvalidArgument(config_error_message(name, exc)) from None


def config_from_proto(name: str, message: models_pb2.ModelConfig) -> ModelConfig:
    """The repository config of a typed (deprecated) upload config."""
    if message.format not in _FORMAT_FROM_PROTO:
        raise errors.InvalidArgument(
            "config.format must be MODEL_FORMAT_ONNX, _TORCHSCRIPT or _TORCH_EXPORT (an oip "
            "model comes from a repository config.json, never an upload)"
        )
    low, high = message.value_range_low, message.value_range_high
    value_range: tuple[float, float] | list[tuple[float, float]] = (
        (low, high) if (low, high) != (0.0, 0.0) else (0.0, 1.0)
    )
    if message.value_ranges:
        value_range = [(r.low, r.high) for r in message.value_ranges]
    normalization = None
    if message.HasField("normalization"):
        normalization = Normalization(
            mean=list(message.normalization.mean), std=list(message.normalization.std)
        )
    model_format = _FORMAT_FROM_PROTO[message.format]
    fields: dict[str, object] = {}
    if message.max_batch_size:
        fields["max_batch_size"] = message.max_batch_size  # unset: the model file may fix it
    if message.description:
        fields["description"] = message.description
    return ModelConfig(
        name=name,
        format=model_format,  # type: ignore[arg-type]
        file=_UPLOAD_FILES[model_format],
        input=TensorSpec(
            name=message.input.name or "input",
            shape=list(message.input.shape),
            datatype=message.input.datatype or "FP32",  # type: ignore[arg-type]
            layout=message.input.layout or None,  # type: ignore[arg-type]  # pydantic checks it
        ),
        output=OutputSpec(name=message.output_name or "logits"),
        classes=list(message.classes),
        value_range=value_range,
        feature_names=list(message.feature_names) or None,
        normalization=normalization,
        **fields,  # type: ignore[arg-type]
    )


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Lists, describes, loads and unloads models; loading runs off the event loop."""

    def __init__(
        self, registry: ModelRegistry, executor: Executor, settings: Settings | None = None
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._settings = settings or Settings()

    def _require_admin(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Uploads and unloads change what the server runs: with tokens configured, they need
        an admin token (INTERSCOPE_ADMIN_TOKENS); an analysis token is not enough."""
        s = self._settings
        if not (s.auth_tokens or s.admin_tokens):
            return
        if not token_matches(bearer_token(context.invocation_metadata()), s.admin_tokens):
            raise errors.PermissionDenied(
                f"{what} needs an admin token (INTERSCOPE_ADMIN_TOKENS); this caller's token "
                "may only run analysis and read models"
            )

    @unary_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        statuses = self._registry.statuses()
        return models_pb2.ListModelsResponse(
            models=[model_info(self._registry, s) for s in statuses]
        )

    @unary_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelInfo:
        return model_info(self._registry, self._registry.status(request.name))

    @unary_errors
    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.LoadModelResponse:
        if not re.match(MODEL_NAME_PATTERN, request.name):
            raise errors.InvalidArgument(
                f"model name {request.name!r} is not allowed: use 1-128 characters of "
                "letters, digits, '_', '.', '-', starting with a letter or digit"
            )
        source = request.WhichOneof("source")
        loop = asyncio.get_running_loop()
        if source == "repository":
            current = self._registry.status(request.name)
            if current.state is ModelState.READY and not request.replace:
                raise errors.AlreadyExists(
                    f"model {request.name!r} is already loaded; set replace to reload it"
                )
            await loop.run_in_executor(self._executor, self._registry.load, request.name)
        elif source == "upload":
            if not self._settings.allow_uploads:
                raise errors.PermissionDenied(
                    "this server does not accept uploaded models (INTERSCOPE_ALLOW_UPLOADS is "
                    "off); load a model from its repository instead"
                )
            self._require_admin(context, "LoadModel with an upload")
            # Whether the name is taken is decided under the repository's per-name lock.
            upload = request.upload
            config = (
                config_from_json(request.name, upload.config_json)
                if upload.config_json
                else config_from_proto(request.name, upload.config)
            )
            if not request.upload.model:
                raise errors.InvalidArgument("upload.model is empty: send the model file's bytes")
            await loop.run_in_executor(
                self._executor,
                functools.partial(
                    self._registry.upload,
                    request.name,
                    request.upload.model,
                    config,
                    replace=request.replace,
                ),
            )
        else:
            raise errors.InvalidArgument("LoadModelRequest needs a source: repository or upload")
        status = self._registry.status(request.name)
        return models_pb2.LoadModelResponse(model=model_info(self._registry, status))

    @unary_errors
    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        self._require_admin(context, "UnloadModel")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._executor,
            functools.partial(self._registry.unload, request.name, delete=request.delete),
        )
        return models_pb2.UnloadModelResponse()
