"""ONNX Runtime backend: provider choice with logged fallback, graph checks, optional gradients."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from interscope_server.errors import InvalidArgument
from interscope_server.models.backend import (
    Backend,
    BackendOptions,
    ModelSignature,
    NormalizedModule,
    blank_input,
    cast_input,
    check_output_kind,
    normalization_arrays,
    probe_inputs,
    resolve_config,
    scores_from_output,
    value_bounds,
)
from interscope_server.models.config import InputDatatype, ModelConfig, OutputKind
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


#: onnxruntime input types -> the config datatype that feeds them.
_ORT_INPUT_TYPES: dict[str, InputDatatype] = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(uint8)": "UINT8",
}
#: Output types that can hold class scores: float tensors, and ZipMap's sequence of maps.
_SCORE_OUTPUT_PREFIXES = ("tensor(float", "tensor(double", "seq(map(")
#: ai.onnx.ml classifiers: their second output holds per-class scores.
_ML_CLASSIFIERS = ("TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier")
#: Ops that pass scores through unchanged in meaning, walked past when inferring the kind.
_TRANSPARENT_OPS = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def infer_output_kind(model: onnx.ModelProto, output: str) -> tuple[OutputKind | None, str]:
    """What `output` holds, read from the node that makes it, and a reason to log.

    Softmax / LogSoftmax, an L1 Normalizer and ai.onnx.ml classifiers with a probability
    transform are read as such; a graph ending in anything else is logits (the load's probe
    then refuses rows that look like probabilities, see `check_output_kind`). An SVM without
    probability estimates outputs decision values, which are neither: None (set output.kind).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    ones = {
        init.name
        for init in model.graph.initializer
        if np.all(onnx.numpy_helper.to_array(init) == 1)
    }
    name, via = output, []
    while name in producers:
        node = producers[name]
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in _TRANSPARENT_OPS or op == "ZipMap":
            via.append(op)
            name = node.input[0]
            continue
        if op == "Mul" and (scaled := _times_one(node, ones)) is not None:
            via.append("Mul by 1")  # onnxmltools' LightGBM converter ends in one
            name = scaled
            continue
        trail = f" (through {', '.join(via)})" if via else ""
        if op == "Softmax":
            return "probabilities", f"made by a Softmax node{trail}"
        if op == "LogSoftmax":
            return "log_probabilities", f"made by a LogSoftmax node{trail}"
        if op == "Normalizer" and attrs.get("norm") == b"L1":
            return "probabilities", f"made by an L1 Normalizer{trail}"
        if op in _ML_CLASSIFIERS:
            transform = attrs.get("post_transform", b"NONE").decode()
            if op == "SVMClassifier" and "prob_a" not in attrs:
                return None, "an SVMClassifier without probability estimates gives decision values"
            if op == "LinearClassifier" and transform == "NONE":
                return "logits", f"raw LinearClassifier scores{trail}"
            # Tree ensembles without a transform average leaf probabilities (random forests);
            # the load's probe checks that rows really sum to 1.
            return "probabilities", f"made by {op} (post_transform {transform}){trail}"
        return "logits", f"made by a {op} node{trail}, no Softmax"
    return "logits", "a graph input or constant"


def _times_one(node: onnx.NodeProto, ones: set[str]) -> str | None:
    """The other input of a Mul whose one input is a constant 1, else None."""
    first, second = [*node.input, "", ""][:2]
    if second in ones:
        return first
    if first in ones:
        return second
    return None


def classifier_labels(model: onnx.ModelProto) -> tuple[str, ...]:
    """Class labels recorded by a ZipMap or ai.onnx.ml classifier node, in output order."""
    for node in model.graph.node:
        if node.op_type in ("ZipMap", *_ML_CLASSIFIERS):
            for attr in node.attribute:
                if attr.name in ("classlabels_int64s", "classlabels_ints"):
                    return tuple(str(v) for v in attr.ints)
                if attr.name == "classlabels_strings":
                    return tuple(v.decode() for v in attr.strings)
    return ()


def score_tensor_name(model: onnx.ModelProto, output: str) -> str:
    """The tensor behind `output`: the ZipMap's input when a ZipMap makes it, else itself."""
    for node in model.graph.node:
        if node.op_type == "ZipMap" and output in node.output:
            return node.input[0]
    return output


def pruned_to(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy of `model` whose only output is `tensor`, keeping only the nodes it needs.

    The converter then sees neither the label branch of a sklearn classifier (ArgMax,
    ai.onnx.ml ops) nor a second output it was not asked for.
    """
    needed, keep = {tensor}, []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:]
    pruned.graph.node.extend(reversed(keep))
    del pruned.graph.output[:]
    pruned.graph.output.append(
        onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
    )
    used = {i for n in keep for i in n.input}
    kept_inits = [init for init in pruned.graph.initializer if init.name in used]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(kept_inits)
    domains = {n.domain for n in keep}
    kept_opsets = [o for o in pruned.opset_import if o.domain in ("", "ai.onnx", *domains)]
    del pruned.opset_import[:]
    pruned.opset_import.extend(kept_opsets)
    return pruned


def read_scores(out: object, what: str) -> np.ndarray:
    """An output as float32 (B, K): a tensor as is, ZipMap's list of {label: p} maps by label."""
    if isinstance(out, list):
        if not out or not all(isinstance(row, dict) for row in out):
            raise InvalidArgument(f"{what} is a sequence but not of per-class maps")
        keys = list(out[0])
        if any(list(row) != keys for row in out):
            raise InvalidArgument(f"{what}: the per-class maps disagree on their classes")
        return np.asarray([[row[k] for k in keys] for row in out], dtype=np.float32)
    scores = np.asarray(out, dtype=np.float32)
    if scores.ndim != 2:
        raise InvalidArgument(
            f"{what} has shape {list(scores.shape)}; a classifier output is (batch, classes)"
        )
    return scores


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
        spin = "1" if options.spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
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
        self._fixed_batch: int | None = None
        self._output_is_map = False
        self._norm: tuple[np.ndarray, np.ndarray] | None = None
        self.config = self._resolve(model)
        self._norm = normalization_arrays(self.config)
        check_output_kind(
            self.config,
            self._raw_scores(probe_inputs(self.config)),
            inferred=config.output.kind is None,
        )
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

    def _resolve(self, model: onnx.ModelProto) -> ModelConfig:
        """The config with what the graph says filled in; refuses what disagrees with it."""
        config = self.config
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise InvalidArgument(
                f"model {config.name!r}: the graph takes {[i.name for i in inputs]}; exactly "
                "one input is supported"
            )
        graph_input = inputs[0]
        datatype = _ORT_INPUT_TYPES.get(graph_input.type)
        if datatype is None:
            raise InvalidArgument(
                f"model {config.name!r}: the graph input is {graph_input.type}; supported: "
                f"{', '.join(_ORT_INPUT_TYPES)} ({', '.join(_ORT_INPUT_TYPES.values())})"
            )
        dims = list(graph_input.shape)
        batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        per_example = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:])
        outputs = {o.name: o.type for o in self._session.get_outputs()}
        output = config.output.name
        if output and output not in outputs:
            raise InvalidArgument(
                f"model {config.name!r}: config output.name {output!r} is not among the "
                f"graph's outputs {list(outputs)}"
            )
        if not output:
            scores = [n for n, t in outputs.items() if t.startswith(_SCORE_OUTPUT_PREFIXES)]
            if len(scores) != 1:
                raise InvalidArgument(
                    f"model {config.name!r}: the graph has outputs "
                    f"{[f'{n}: {t}' for n, t in outputs.items()]}; set output.name to the one "
                    "holding the class scores"
                )
            output = scores[0]
        if not outputs[output].startswith(_SCORE_OUTPUT_PREFIXES):
            raise InvalidArgument(
                f"model {config.name!r}: output {output!r} is {outputs[output]}; class scores "
                "must be a float tensor or a ZipMap"
            )
        self._output_is_map = outputs[output].startswith("seq(")
        self._fixed_batch = batch
        kind, reason = infer_output_kind(model, output)
        labels = classifier_labels(model)
        found = ModelSignature(
            input_name=graph_input.name,
            input_shape=per_example,
            input_datatype=datatype,
            fixed_batch=batch,
            output_name=output,
            classes=labels,
            kind=kind,
            kind_reason=reason,
        )
        # The class count is the output's width: read it from one forward on a blank input.
        shape = config.input.shape or [d for d in per_example if d is not None]
        k: int | None = None
        failure = "the input shape does not fit the graph"
        if len(shape) == len(per_example):
            staged = config.model_copy(
                update={
                    "input": config.input.model_copy(
                        update={"name": graph_input.name, "shape": shape, "datatype": datatype}
                    ),
                    "output": config.output.model_copy(update={"name": output}),
                }
            )
            # _raw_scores reads names, dtype and normalisation from self.config: stage them.
            self.config = staged
            try:
                self._norm = normalization_arrays(staged)
                k = self._raw_scores(blank_input(config, shape)).shape[1]
            except Exception as exc:  # reported below, after the config's own mismatches
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        resolved = resolve_config(config, replace(found, num_classes=k))
        if k is None:
            raise InvalidArgument(
                f"model {config.name!r}: a forward pass on a blank input failed ({failure})"
            )
        return resolved

    def _raw_scores(self, x: np.ndarray) -> np.ndarray:
        """The chosen output, as float32 (B, K), for float32 raw inputs of any batch size."""
        size = self._fixed_batch
        if size is None:
            return self._run(x)
        parts = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            rows = chunk.shape[0]
            if rows < size:  # the graph takes exactly `size` rows: repeat the last one
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - rows, axis=0)])
            parts.append(self._run(chunk)[:rows])
        return np.concatenate(parts)

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        if self._norm is None:
            return x
        mean, std = self._norm
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        config = self.config
        feed = cast_input(self._normalised(x), config.input.datatype or "FP32")
        what = f"model {config.name!r} output {config.output.name!r}"
        if not self._on_gpu or self._output_is_map:
            (out,) = self._session.run([config.output.name], {config.input.name: feed})
            return read_scores(out, what)
        # On GPU, IO binding lets onnxruntime copy the input once and keep the output on device
        # until we fetch it; a fresh binding per call keeps concurrent callers independent.
        binding = self._session.io_binding()
        binding.bind_cpu_input(config.input.name, feed)
        binding.bind_output(config.output.name, "cuda")
        self._session.run_with_iobinding(binding)
        return read_scores(binding.copy_outputs_to_cpu()[0], what)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return scores_from_output(self._raw_scores(x), self.output_kind)

    def _convert(self, model: onnx.ModelProto, options: BackendOptions) -> None:
        if external_data_locations(model):
            # The converter reads weights from the proto; loading external data is possible but
            # not needed by any model we serve yet.
            self.gradient_note = "the model keeps weights in external data files"
            logger.info("model %s: no gradients: %s", self.config.name, self.gradient_note)
            return
        try:
            inner = OnnxModule(pruned_to(model, score_tensor_name(model, self.config.output.name)))
        except UnsupportedOnnxGraph as exc:
            self.gradient_note = f"the ONNX->torch converter does not support it: {exc}"
            logger.info("model %s: no gradients: %s", self.config.name, self.gradient_note)
            return
        half = self.config.input.datatype == "FP16"
        module = NormalizedModule(
            inner,
            self.config,
            torch.float16 if half else torch.float32,
            fixed_batch=self._fixed_batch,
        ).eval()
        module.requires_grad_(False)
        device = torch.device(
            "cuda" if options.device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        module = module.to(device)
        # Check the conversion against onnxruntime on inputs spread over the whole value range.
        probe = probe_inputs(self.config)
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
        bounds = value_bounds(self.config)
        note = check_gradients(module, tuple(self.config.input.shape), bounds, device)
        if note:
            self.gradient_note = note
            logger.warning("model %s: no gradients: %s", self.config.name, note)
            return
        self._module = module
        self._torch_device = device
