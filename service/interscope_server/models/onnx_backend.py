"""ONNX Runtime backend: provider choice with logged fallback, graph checks, optional gradients."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from interscope_server.errors import InvalidArgument
from interscope_server.models.backend import (
    Backend,
    BackendOptions,
    NormalizedModule,
    normalization_arrays,
    value_bounds,
)
from interscope_server.models.config import ModelConfig
from interscope_server.models.gradient_check import check_gradients
from interscope_server.models.onnx_to_torch import OnnxModule, UnsupportedOnnxGraph

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_TENSORRT = "TensorrtExecutionProvider"

#: The converted module must reproduce onnxruntime's logits this closely to be trusted.
_GRADIENT_CHECK_ATOL = 1e-3
_GRADIENT_CHECK_RTOL = 1e-3


def choose_providers(options: BackendOptions, available: list[str]) -> tuple[list[str], str]:
    """Execution providers to ask for, in order, and a note when the wish could not be met."""
    if options.device == "cpu":
        return [_CPU], ""
    if _CUDA not in available:
        note = (
            f"device={options.device!r} but onnxruntime offers no CUDA provider "
            f"(available: {', '.join(available)}); running on CPU"
        )
        return [_CPU], note
    providers = [_CUDA, _CPU]
    if options.tensorrt and _TENSORRT in available:
        providers.insert(0, _TENSORRT)
    return providers, ""


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """Every external-data file the model's tensors point at (initialisers and Constant nodes)."""
    tensors: list[onnx.TensorProto] = list(model.graph.initializer)

    def walk(graph: onnx.GraphProto) -> None:
        tensors.extend(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    locations = []
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.append(entries.get("location", ""))
    return locations


class OnnxBackend(Backend):
    """An ONNX model in onnxruntime; gradients through `OnnxModule` when the graph converts."""

    def __init__(
        self, config: ModelConfig, path: Path, options: BackendOptions | None = None
    ) -> None:
        super().__init__(config, path)
        options = options or BackendOptions()
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise InvalidArgument(
                f"model {config.name!r}: {path.name} is not a readable ONNX file ({exc})"
            ) from None
        self._check_external_data(model)
        providers, note = choose_providers(options, ort.get_available_providers())
        if note:
            # Asked-for CUDA that is missing is worth a warning; "auto" on a CPU host is normal.
            level = logging.WARNING if options.device == "cuda" else logging.INFO
            logger.log(level, "model %s: %s", config.name, note)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options, providers=providers
            )
        except Exception as exc:
            raise InvalidArgument(
                f"model {config.name!r}: onnxruntime cannot load {path.name}: {exc}"
            ) from None
        used = self._session.get_providers()
        # onnxruntime silently drops a provider whose libraries fail to load: say so.
        if providers[0] != _CPU and providers[0] not in used:
            logger.warning(
                "model %s: asked for %s, onnxruntime runs it with %s", config.name, providers, used
            )
        self._on_gpu = used[0] in (_CUDA, _TENSORRT)
        self._provider = used[0]
        self._check_signature()
        self._norm = normalization_arrays(config)
        self._module: torch.nn.Module | None = None
        self._torch_device = torch.device("cpu")
        self._convert(model, options)

    @property
    def format(self) -> str:
        return "onnx"

    @property
    def device(self) -> str:
        return "cuda" if self._on_gpu else "cpu"

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider that runs the model."""
        return self._provider

    @property
    def gradients_available(self) -> bool:
        return self._module is not None

    @property
    def torch_device(self) -> torch.device:
        return self._torch_device

    def torch_module(self) -> torch.nn.Module | None:
        return self._module

    def _check_external_data(self, model: onnx.ModelProto) -> None:
        folder = self.path.parent.resolve()
        for location in external_data_locations(model):
            target = (folder / location).resolve()
            if not location or not target.is_relative_to(folder):
                raise InvalidArgument(
                    f"model {self.config.name!r}: external data location {location!r} is outside "
                    "the model folder; external data files must sit inside it"
                )

    def _check_signature(self) -> None:
        inputs = self._session.get_inputs()
        name = self.config.input.name
        if len(inputs) != 1 or inputs[0].name != name:
            raise InvalidArgument(
                f"model {self.config.name!r}: config input {name!r} but the graph takes "
                f"{[i.name for i in inputs]}; exactly one input of that name is supported"
            )
        graph_shape = list(inputs[0].shape)[1:]
        expected = self.config.input.shape
        fixed = [d if isinstance(d, int) else None for d in graph_shape]
        if len(fixed) != len(expected) or any(
            d is not None and d != e for d, e in zip(fixed, expected, strict=False)
        ):
            raise InvalidArgument(
                f"model {self.config.name!r}: config input shape {expected} does not match the "
                f"graph's per-example shape {graph_shape}"
            )
        if inputs[0].type != "tensor(float)":
            raise InvalidArgument(
                f"model {self.config.name!r}: the graph input is {inputs[0].type}; only FP32 "
                "(tensor(float)) inputs are supported"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if self.config.output_name not in outputs:
            raise InvalidArgument(
                f"model {self.config.name!r}: config output {self.config.output_name!r} is not "
                f"among the graph's outputs {outputs}"
            )

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        if self._norm is None:
            return x
        mean, std = self._norm
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        feed = self._normalised(x)
        if not self._on_gpu:
            (out,) = self._session.run([self.config.output_name], {self.config.input.name: feed})
            return np.asarray(out, dtype=np.float32)
        # On GPU, IO binding lets onnxruntime copy the input once and keep the output on device
        # until we fetch it; a fresh binding per call keeps concurrent callers independent.
        binding = self._session.io_binding()
        binding.bind_cpu_input(self.config.input.name, feed)
        binding.bind_output(self.config.output_name, "cuda")
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def _convert(self, model: onnx.ModelProto, options: BackendOptions) -> None:
        if external_data_locations(model):
            # The converter reads weights from the proto; loading external data is possible but
            # not needed by any model we serve yet.
            self.gradient_note = "the model keeps weights in external data files"
            logger.info("model %s: no gradients: %s", self.config.name, self.gradient_note)
            return
        try:
            inner = OnnxModule(model, output=self.config.output_name)
        except UnsupportedOnnxGraph as exc:
            self.gradient_note = f"the ONNX->torch converter does not support it: {exc}"
            logger.info("model %s: no gradients: %s", self.config.name, self.gradient_note)
            return
        module = NormalizedModule(inner, self.config).eval()
        module.requires_grad_(False)
        device = torch.device(
            "cuda" if options.device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        module = module.to(device)
        # Check the conversion against onnxruntime on inputs spread over the whole value range.
        low, high = value_bounds(self.config)
        rng = np.random.default_rng(0)
        # A graph with a fixed batch size takes only that many rows.
        rows = self._session.get_inputs()[0].shape[0]
        rows = rows if isinstance(rows, int) and rows > 0 else 4
        probe = rng.uniform(low, high, size=(rows, *low.shape)).astype(np.float32)
        probe[0] = low
        expected = self._forward(probe)
        try:
            with torch.no_grad():
                got = module(torch.from_numpy(probe).to(device)).cpu().numpy()
        except Exception as exc:  # a converter bug must not fail the load, only the gradients
            self.gradient_note = f"the converted module failed on a probe batch: {exc}"
            logger.warning("model %s: no gradients: %s", self.config.name, self.gradient_note)
            return
        if got.shape != expected.shape or not np.allclose(
            got, expected, atol=_GRADIENT_CHECK_ATOL, rtol=_GRADIENT_CHECK_RTOL
        ):
            diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else -1.0
            self.gradient_note = (
                f"the converted module disagrees with onnxruntime (max abs diff {diff:.3g})"
            )
            logger.warning("model %s: no gradients: %s", self.config.name, self.gradient_note)
            return
        note = check_gradients(module, tuple(self.config.input.shape), (low, high), device)
        if note:
            self.gradient_note = note
            logger.warning("model %s: no gradients: %s", self.config.name, note)
            return
        self._module = module
        self._torch_device = device
