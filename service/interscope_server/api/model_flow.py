"""The ModelService's work: describing models, and loading them from the repository or an upload."""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import Executor

import grpc
from pydantic import ValidationError

from interscope.v1 import models_pb2
from interscope_server import errors
from interscope_server.api import convert
from interscope_server.api.interceptors import bearer_token, token_matches
from interscope_server.config import Settings
from interscope_server.models.config import (
    CONFIG_FILE,
    ModelConfig,
    Normalization,
    OutputSpec,
    TensorSpec,
)
from interscope_server.models.registry import ModelRegistry, ModelState, ModelStatus
from interscope_server.models.repository import config_error_message, validate_model_name

# A remote (oip) model has no file to upload: it comes only from a repository config.json.
_FORMAT_FROM_PROTO = {value: key for key, value in convert.FORMAT_TO_PROTO.items() if key != "oip"}
#: The file name an upload is saved under, by format.
_UPLOAD_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "torch_export": "model.pt2"}


def describe(registry: ModelRegistry, status: ModelStatus) -> models_pb2.ModelInfo:
    """Metadata of one model, whatever its state (config from the repository when not loaded)."""
    backend = None
    config: ModelConfig | None = None
    if status.state is ModelState.READY:
        try:
            loaded = registry.get(status.name)
            backend, config = loaded.backend, loaded.config
        except errors.InterscopeError:  # unloaded between the two reads
            backend = None
    if config is None:
        try:
            config = registry.repository.read_config(status.name)
        except errors.InterscopeError:
            config = None  # a broken config: its FAILED state message says why
    return convert.model_info(status, config, backend)


def require_admin(settings: Settings, context: grpc.aio.ServicerContext, what: str) -> None:
    """Uploads and unloads change what the server runs: with tokens configured, they need
    an admin token (INTERSCOPE_ADMIN_TOKENS); an analysis token is not enough."""
    if not (settings.auth_tokens or settings.admin_tokens):
        return
    if not token_matches(bearer_token(context.invocation_metadata()), settings.admin_tokens):
        raise errors.PermissionDenied(
            f"{what} needs an admin token (INTERSCOPE_ADMIN_TOKENS); this caller's token "
            "may only run analysis and read models"
        )


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


async def load(
    registry: ModelRegistry,
    executor: Executor,
    settings: Settings,
    request: models_pb2.LoadModelRequest,
    context: grpc.aio.ServicerContext,
) -> models_pb2.LoadModelResponse:
    """Load a model from the repository or an upload (off the event loop); its info after."""
    validate_model_name(request.name)
    source = request.WhichOneof("source")
    loop = asyncio.get_running_loop()
    if source == "repository":
        current = registry.status(request.name)
        if current.state is ModelState.READY and not request.replace:
            raise errors.AlreadyExists(
                f"model {request.name!r} is already loaded; set replace to reload it"
            )
        await loop.run_in_executor(executor, registry.load, request.name)
    elif source == "upload":
        if not settings.allow_uploads:
            raise errors.PermissionDenied(
                "this server does not accept uploaded models (INTERSCOPE_ALLOW_UPLOADS is "
                "off); load a model from its repository instead"
            )
        require_admin(settings, context, "LoadModel with an upload")
        # Whether the name is taken is decided under the repository's per-name lock.
        upload = request.upload
        config = (
            config_from_json(request.name, upload.config_json)
            if upload.config_json
            else config_from_proto(request.name, upload.config)
        )
        if not upload.model:
            raise errors.InvalidArgument("upload.model is empty: send the model file's bytes")
        await loop.run_in_executor(
            executor,
            functools.partial(
                registry.upload, request.name, upload.model, config, replace=request.replace
            ),
        )
    else:
        raise errors.InvalidArgument("LoadModelRequest needs a source: repository or upload")
    return convert.load_model_response(describe(registry, registry.status(request.name)))
