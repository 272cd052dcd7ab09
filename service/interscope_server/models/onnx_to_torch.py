"""A small ONNX -> torch converter for the ops of common CNNs/MLPs, so ONNX models get gradients.

It interprets the graph node by node with torch functional ops (no code generation, no tracing),
which keeps dynamic shapes (Shape/Gather/Reshape chains) working and makes every supported op a
few readable lines. Unsupported ops or attributes raise `UnsupportedOnnxGraph` naming them; the
caller then serves the model without gradients. onnx2torch would cover more ops but drags in
torchvision, which we do not want in the server image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

_Attrs = dict[str, Any]
_OpFn = Callable[[list[torch.Tensor | None], _Attrs], list[torch.Tensor]]


class UnsupportedOnnxGraph(Exception):
    """The graph uses an op or attribute the converter does not implement."""


def _pads(pads: Sequence[int], spatial: int) -> tuple[int, ...] | None:
    """ONNX [b1, b2, ..., e1, e2, ...] as symmetric torch padding, or None if asymmetric."""
    pads = list(pads) or [0] * (2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    return tuple(begin) if begin == end else None


def _f_pad(pads: Sequence[int], spatial: int) -> list[int]:
    """ONNX pads as F.pad's (last dim first) list."""
    out: list[int] = []
    for d in reversed(range(spatial)):
        out += [int(pads[d]), int(pads[d + spatial])]
    return out


def _no_auto_pad(attrs: _Attrs, op: str) -> None:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedOnnxGraph(f"{op} with auto_pad={auto_pad!r}")


def _conv(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, w, b = inp[0], inp[1], inp[2] if len(inp) > 2 else None
    assert x is not None and w is not None
    _no_auto_pad(attrs, "Conv")
    spatial = w.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(spatial)
    if conv is None:
        raise UnsupportedOnnxGraph(f"Conv with {spatial} spatial dimensions")
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    sym = _pads(pads, spatial)
    if sym is None:
        x = F.pad(x, _f_pad(pads, spatial))
        sym = (0,) * spatial
    return [
        conv(
            x,
            w,
            b,
            stride=tuple(attrs.get("strides", [1] * spatial)),
            padding=sym,
            dilation=tuple(attrs.get("dilations", [1] * spatial)),
            groups=int(attrs.get("group", 1)),
        )
    ]


def _pool(kind: str) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        x = inp[0]
        assert x is not None
        _no_auto_pad(attrs, kind)
        kernel = list(attrs["kernel_shape"])
        spatial = len(kernel)
        if spatial not in (1, 2, 3):
            raise UnsupportedOnnxGraph(f"{kind} with {spatial} spatial dimensions")
        strides = tuple(attrs.get("strides", [1] * spatial))
        pads = list(attrs.get("pads", [0] * 2 * spatial))
        ceil = bool(attrs.get("ceil_mode", 0))
        sym = _pads(pads, spatial)
        if kind == "MaxPool":
            if len(attrs.get("storage_order", [])) or attrs.get("storage_order", 0):
                raise UnsupportedOnnxGraph("MaxPool with storage_order=1")
            if sym is None:
                x = F.pad(x, _f_pad(pads, spatial), value=float("-inf"))
                sym = (0,) * spatial
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            dil = tuple(attrs.get("dilations", [1] * spatial))
            return [fn(x, tuple(kernel), strides, sym, dil, ceil_mode=ceil)]
        count_pad = bool(attrs.get("count_include_pad", 0))
        if sym is None:
            if not count_pad:
                raise UnsupportedOnnxGraph("AveragePool with asymmetric pads")
            x = F.pad(x, _f_pad(pads, spatial))
            sym = (0,) * spatial
        afn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return [afn(x, tuple(kernel), strides, sym, ceil, count_pad)]

    return run


def _gemm(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    a, b, c = inp[0], inp[1], inp[2] if len(inp) > 2 else None
    assert a is not None and b is not None
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(attrs.get("beta", 1.0)) * c
    return [y]


def _reshape(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, shape_t = inp[0], inp[1]
    assert x is not None and shape_t is not None
    shape = [int(s) for s in shape_t.tolist()]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1)]


def _batch_norm(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, scale, bias, mean, var = inp[:5]
    assert x is not None and mean is not None and var is not None
    if attrs.get("training_mode", 0):
        raise UnsupportedOnnxGraph("BatchNormalization with training_mode=1")
    eps = float(attrs.get("epsilon", 1e-5))
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)]


def _axes(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[int]:
    """Axes from the input (opset >= 13) or the attribute (older opsets)."""
    if len(inp) > 1 and inp[1] is not None:
        return [int(a) for a in inp[1].tolist()]
    return [int(a) for a in attrs.get("axes", [])]


def _unsqueeze(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    axes = _axes(inp, attrs)
    rank = x.dim() + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _squeeze(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    axes = _axes(inp, attrs)
    if not axes:
        return [x.squeeze()]
    dims = sorted((a + x.dim() if a < 0 else a for a in axes), reverse=True)
    for a in dims:
        x = x.squeeze(a)
    return [x]


def _gather(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, idx = inp[0], inp[1]
    assert x is not None and idx is not None
    axis = int(attrs.get("axis", 0))
    axis = axis + x.dim() if axis < 0 else axis
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    flat = torch.index_select(x, axis, idx.reshape(-1))
    return [flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]


def _slice(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, starts_t, ends_t = inp[0], inp[1], inp[2]
    assert x is not None and starts_t is not None and ends_t is not None
    starts, ends = starts_t.tolist(), ends_t.tolist()
    axes_t = inp[3] if len(inp) > 3 else None
    steps_t = inp[4] if len(inp) > 4 else None
    axes = axes_t.tolist() if axes_t is not None else list(range(len(starts)))
    steps = steps_t.tolist() if steps_t is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise UnsupportedOnnxGraph("Slice with a non-positive step")
        size = x.shape[axis]
        # ONNX clamps out-of-range bounds (e.g. INT64_MAX for "to the end"); Python slices too,
        # but only after they fit in a C long, so clamp first.
        start = max(-size, min(size, int(start)))
        end = max(-size, min(size, int(end)))
        index[axis if axis >= 0 else axis + x.dim()] = slice(start, end, int(step))
    return [x[tuple(index)]]


def _clip(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    lo = inp[1] if len(inp) > 1 else None
    hi = inp[2] if len(inp) > 2 else None
    low = float(lo) if lo is not None else attrs.get("min")
    high = float(hi) if hi is not None else attrs.get("max")
    return [torch.clamp(x, min=low, max=high)]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        assert inp[0] is not None
        return [fn(inp[0])]

    return run


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        assert inp[0] is not None and inp[1] is not None
        return [fn(inp[0], inp[1])]

    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX integer Div truncates; shape arithmetic (Shape -> Div -> Reshape) relies on it.
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _softmax(log: bool) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        x = inp[0]
        assert x is not None
        axis = int(attrs.get("axis", -1))
        return [F.log_softmax(x, dim=axis) if log else F.softmax(x, dim=axis)]

    return run


_OPS: dict[str, _OpFn] = {
    "Conv": _conv,
    "MaxPool": _pool("MaxPool"),
    "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Neg": _unary(torch.neg),
    "Exp": _unary(torch.exp),
    "Sqrt": _unary(torch.sqrt),
    "Identity": _unary(lambda x: x),
    "Dropout": lambda inp, attrs: [inp[0]] if inp[0] is not None else [],
    "LeakyRelu": lambda inp, attrs: [F.leaky_relu(inp[0], float(attrs.get("alpha", 0.01)))],  # type: ignore[arg-type]
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda inp, attrs: [
        inp[0].permute(*attrs["perm"])  # type: ignore[union-attr]
        if "perm" in attrs
        else inp[0].permute(*reversed(range(inp[0].dim())))  # type: ignore[union-attr]
    ],
    "BatchNormalization": _batch_norm,
    "Concat": lambda inp, attrs: [
        torch.cat([t for t in inp if t is not None], dim=int(attrs["axis"]))
    ],
    "Shape": lambda inp, attrs: [torch.tensor(inp[0].shape, dtype=torch.int64)],  # type: ignore[union-attr]
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Clip": _clip,
    "Slice": _slice,
}


def _attributes(node: onnx.NodeProto) -> _Attrs:
    attrs: _Attrs = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH or attr.type == onnx.AttributeProto.GRAPHS:
            raise UnsupportedOnnxGraph(f"{node.op_type} with a subgraph attribute")
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        attrs[attr.name] = value
    return attrs


class OnnxModule(torch.nn.Module):
    """An ONNX graph run op by op in torch; differentiable with respect to its inputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        opsets = {o.domain: o.version for o in model.opset_import}
        if any(domain not in ("", "ai.onnx") for domain in opsets):
            raise UnsupportedOnnxGraph(f"custom opset domains {sorted(opsets)}")
        unsupported = sorted(
            {
                n.op_type
                for n in graph.node
                if (n.op_type not in _OPS and n.op_type != "Constant") or n.domain
            }
        )
        if unsupported:
            raise UnsupportedOnnxGraph(f"unsupported ONNX ops: {', '.join(unsupported)}")
        # Initialiser names contain dots, which buffer names may not: keep an index instead.
        self._constant_names: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            self._add_constant(f"_c{i}", init.name, numpy_helper.to_array(init))
        initialisers = {init.name for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initialisers]
        self.output_names = [o.name for o in graph.output]
        self._nodes: list[tuple[str, list[str], list[str], _Attrs]] = []
        for j, node in enumerate(graph.node):
            attrs = _attributes(node)
            if node.op_type == "Constant":
                if "value" not in attrs:
                    raise UnsupportedOnnxGraph("Constant without a tensor 'value'")
                self._add_constant(f"_k{j}", node.output[0], np.asarray(attrs["value"]))
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))

    def _add_constant(self, buffer: str, onnx_name: str, value: np.ndarray) -> None:
        tensor = torch.from_numpy(np.array(value, copy=True))
        self.register_buffer(buffer, tensor)
        self._constant_names[onnx_name] = buffer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
        values: dict[str, torch.Tensor | None] = {"": None}
        for onnx_name, buffer in self._constant_names.items():
            values[onnx_name] = getattr(self, buffer)
        values.update(zip(self.input_names, inputs, strict=True))
        for op, ins, outs, attrs in self._nodes:
            results = _OPS[op]([values[name] for name in ins], attrs)
            values.update(zip(outs, results, strict=False))
        out = values[self.output_names[0]]
        assert out is not None
        return out
