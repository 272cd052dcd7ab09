"""Model backends (onnxruntime, TorchScript, torch.export), repository, registry, batcher."""

from __future__ import annotations

from interscope_server.models.backend import Backend, BackendOptions, NormalizedModule
from interscope_server.models.batcher import BatcherOptions, DynamicBatcher, ModelObserver
from interscope_server.models.config import (
    CONFIG_FILE,
    MODEL_NAME_PATTERN,
    ModelConfig,
    Normalization,
    TensorSpec,
)
from interscope_server.models.onnx_backend import OnnxBackend
from interscope_server.models.onnx_to_torch import OnnxModule, UnsupportedOnnxGraph
from interscope_server.models.registry import (
    LoadedModel,
    ModelRegistry,
    ModelState,
    ModelStatus,
    StateListener,
    open_backend,
)
from interscope_server.models.repository import ModelRepository, validate_model_name
from interscope_server.models.torch_export_backend import TorchExportBackend
from interscope_server.models.torchscript_backend import TorchScriptBackend

__all__ = [
    "CONFIG_FILE",
    "MODEL_NAME_PATTERN",
    "Backend",
    "BackendOptions",
    "BatcherOptions",
    "DynamicBatcher",
    "LoadedModel",
    "ModelConfig",
    "ModelObserver",
    "ModelRegistry",
    "ModelRepository",
    "ModelState",
    "ModelStatus",
    "Normalization",
    "NormalizedModule",
    "OnnxBackend",
    "OnnxModule",
    "StateListener",
    "TensorSpec",
    "TorchExportBackend",
    "TorchScriptBackend",
    "UnsupportedOnnxGraph",
    "open_backend",
    "validate_model_name",
]
