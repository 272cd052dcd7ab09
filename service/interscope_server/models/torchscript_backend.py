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
    BackendOptions,
    ModelSignature,
    NormalizedModule,
    TorchBackend,
    blank_input,
    check_output_kind,
    describe_outputs,
    probe_inputs,
    resolve_config,
    select_output,
    value_bounds,
)
from interscope_server.models.config import ModelConfig, OutputKind
from interscope_server.models.gradient_check import check_gradients
from interscope_server.models.vetting import vet_torchscript_module

logger = logging.getLogger(__name__)


def scripted_output_kind(module: torch.jit.ScriptModule, name: str) -> tuple[OutputKind, str]:
    """logits, or the kind a final softmax / log_softmax in the TorchScript graph gives.

    Follows the returned value (through a tuple or dict to the chosen element) to the node
    that makes it; anything but softmax is logits, which the load's probe double-checks.
    """
    try:
        graph = module.inlined_graph
        value = graph.return_node().inputsAt(0)
        node = value.node()
        if node.kind() == "prim::TupleConstruct" and name.isdigit():
            node = node.inputsAt(int(name)).node()
        elif node.kind() == "prim::DictConstruct":
            items = list(node.inputs())
            for key, item in zip(items[::2], items[1::2], strict=False):
                if key.toIValue() == name:
                    node = item.node()
        while node.kind() in ("aten::to", "aten::contiguous", "aten::clone", "aten::float"):
            node = node.inputsAt(0).node()
        kind = node.kind()
    except Exception as exc:  # the graph API is internal; a failure here only means "unknown"
        return "logits", f"the graph could not be read ({type(exc).__name__}); taken as logits"
    if kind == "aten::softmax":
        return "probabilities", "the graph ends in softmax"
    if kind == "aten::log_softmax":
        return "log_probabilities", "the graph ends in log_softmax"
    return "logits", f"the graph ends in {kind}, no softmax"


class TorchScriptBackend(TorchBackend):
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
        # Before anything of the model runs (resolving the config runs a probe forward).
        vet_torchscript_module(config.name, inner)
        inner.eval()
        self.config = self._resolve(inner, torch.float32)
        self._integer_only = self.config.input.datatype == "UINT8"
        declared = "max_batch_size" in config.model_fields_set
        # A declared max batch (e.g. 1 for a traced batch-1 model) also binds attacks.
        max_batch = self.config.max_batch_size if declared else None
        if self._integer_only:
            # Integer inputs cannot carry gradients; forwards cast, white-box attacks are refused.
            self.gradient_note = "the model takes UINT8 inputs, which have no gradients"
        else:
            # Checked in float32, before any FP16 conversion: the question is whether the
            # graph's ops have (correct) derivatives, which precision does not change.
            probe_module = NormalizedModule(inner, self.config, max_batch=max_batch)
            probe_module = probe_module.to(self._device).eval().requires_grad_(False)
            shape, value_range = tuple(self.config.input.shape), value_bounds(self.config)
            self.gradient_note = check_gradients(probe_module, shape, value_range, self._device)
            if self.gradient_note:
                logger.warning("model %s: no gradients: %s", config.name, self.gradient_note)
        if dtype == torch.float16:
            inner = inner.half()
            self._inner = inner
            self._input_torch_dtype = self._input_dtype(dtype)
        module = NormalizedModule(inner, self.config, self._input_dtype(dtype), max_batch=max_batch)
        module = module.to(self._device).eval()
        module.requires_grad_(False)
        self._module = module
        check_output_kind(
            self.config,
            self._raw(probe_inputs(self.config)),
            inferred=config.output.kind is None,
        )

    def _input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        datatype = self.config.input.datatype
        if datatype == "UINT8":
            return torch.uint8
        return torch.float16 if datatype == "FP16" else dtype

    def _resolve(self, inner: torch.jit.ScriptModule, dtype: torch.dtype) -> ModelConfig:
        """The config with the output structure, kind and class count read from a probe."""
        config = self.config
        if not config.input.shape:
            raise InvalidArgument(
                f"model {config.name!r}: TorchScript archives do not record their input shape; "
                "set input.shape in config.json"
            )
        self._inner = inner
        self._input_torch_dtype = {"UINT8": torch.uint8, "FP16": torch.float16}.get(
            config.input.datatype or "FP32", dtype
        )
        blank = torch.from_numpy(blank_input(config, config.input.shape)).to(self._device)
        with torch.inference_mode():
            out = inner(blank.to(self._input_torch_dtype))
        name = config.output.name
        if not isinstance(out, torch.Tensor) and not name:
            raise InvalidArgument(
                f"model {config.name!r}: the model returns {describe_outputs(out)}; set "
                "output.name to the one holding the class scores"
            )
        try:
            scores = select_output(out, name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"model {config.name!r}: {exc}") from None
        if scores.ndim != 2:
            raise InvalidArgument(
                f"model {config.name!r}: output {name or 'the output'} has shape "
                f"{list(scores.shape)}; a classifier output is (batch, classes)"
            )
        kind, reason = scripted_output_kind(inner, name)
        found = ModelSignature(
            input_name=config.input.name or "input",
            output_name=name,
            num_classes=int(scores.shape[1]),
            kind=kind,
            kind_reason=reason,
        )
        return resolve_config(config, found)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        """The chosen raw output (before canonical scores) for a float32 probe batch."""
        module = self._inner
        with torch.inference_mode():
            tensor = torch.from_numpy(x).to(self._device)
            if self._input_torch_dtype == torch.uint8:
                tensor = torch.clamp(torch.round(tensor), 0, 255)
            out = select_output(module(tensor.to(self._input_torch_dtype)), self.config.output.name)
        return np.asarray(out.float().cpu().numpy())

    @property
    def format(self) -> str:
        return "torchscript"

    def _forward(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(x).to(self._device)
        if self._integer_only:
            tensor = torch.clamp(torch.round(tensor), 0, 255)
        with torch.inference_mode():
            out = self._module(tensor)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
