"""TorchScript backend: torch.jit.load only (never pickle), eval and inference mode, CUDA, FP16.

Gradients are native, but not every graph has them: a traced model may keep ops without a
derivative (`aten::_native_multi_head_attention` from nn.MultiheadAttention's fast path), so
the backward pass is checked at load and the model serves without gradients if it fails.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from interscope_server.errors import InvalidArgument
from interscope_server.models.backend import (
    Backend,
    BackendOptions,
    NormalizedModule,
    value_bounds,
)
from interscope_server.models.config import ModelConfig
from interscope_server.models.gradient_check import check_gradients
from interscope_server.models.vetting import vet_torchscript_module

logger = logging.getLogger(__name__)


class TorchScriptBackend(Backend):
    """A TorchScript archive; gradients are native once the load-time check passes."""

    def __init__(
        self, config: ModelConfig, path: Path, options: BackendOptions | None = None
    ) -> None:
        super().__init__(config, path)
        options = options or BackendOptions()
        cuda = options.device != "cpu" and torch.cuda.is_available()
        if options.device == "cuda" and not cuda:
            logger.warning("model %s: device='cuda' but torch sees no GPU; on CPU", config.name)
        self._device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.float16 if options.half_precision and cuda else torch.float32
        try:
            with warnings.catch_warnings():
                # torch.jit.load is deprecated in favour of torch.export, but TorchScript archives
                # are what users have; jit.load runs no pickle code, unlike torch.load.
                warnings.simplefilter("ignore", DeprecationWarning)
                inner = torch.jit.load(str(path), map_location=self._device)
        except Exception as exc:
            raise InvalidArgument(
                f"model {config.name!r}: {path.name} is not a loadable TorchScript archive "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        # Before anything of the model runs (the registry's probe forward is next).
        vet_torchscript_module(config.name, inner)
        inner.eval()
        module = NormalizedModule(inner, config).to(self._device).eval()
        module.requires_grad_(False)
        # Checked in float32, before any FP16 conversion: the question is whether the graph's
        # ops have (correct) derivatives, which precision does not change.
        shape, value_range = tuple(config.input.shape), value_bounds(config)
        self.gradient_note = check_gradients(module, shape, value_range, self._device)
        if self.gradient_note:
            logger.warning("model %s: no gradients: %s", config.name, self.gradient_note)
        if dtype == torch.float16:
            inner = inner.half()
            module = NormalizedModule(inner, config, dtype=dtype).to(self._device).eval()
            module.requires_grad_(False)
        self._module = module

    @property
    def format(self) -> str:
        return "torchscript"

    @property
    def device(self) -> str:
        return self._device.type

    @property
    def gradients_available(self) -> bool:
        return not self.gradient_note

    @property
    def torch_device(self) -> torch.device:
        return self._device

    def torch_module(self) -> torch.nn.Module | None:
        return None if self.gradient_note else self._module

    def _forward(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self._module(torch.from_numpy(x).to(self._device))
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
