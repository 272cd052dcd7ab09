"""An ONNX -> torch converter for what torch's exporters write, so ONNX models get gradients.

It interprets the graph node by node with torch functional ops (no code generation, no tracing),
which keeps dynamic shapes (Shape/Gather/Reshape chains) working and makes every supported op a
few readable lines. It covers what `torch.onnx.export` writes for CNNs, MLPs and ViT-style
transformers with both exporters (classic TorchScript-based and dynamo) at opsets 13 to 20.
Unsupported ops or attributes raise `UnsupportedOnnxGraph` naming them; the caller then serves
the model without gradients. (Sin and Cos are left out on purpose: no exporter writes them for
these families, and the test suite's gradient-free model is built on Sin.)

Why not onnx2torch, the maintained converter: it imports torchvision at module import (its
RoiAlign/NMS converters), and torchvision pins a torch build, which on a CPU host pulls the CUDA
one; installed with --no-deps it fails to import. It also code-generates an fx module per graph,
which makes a failure at an odd op harder to report as one clear reason. The ops torch's
exporters emit are a bounded list, which this file covers; the backend checks the result
against onnxruntime and against finite differences before it trusts any gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.inliner
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
            if int(attrs.get("storage_order", 0)):
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


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        return [functools.reduce(fn, [t for t in inp if t is not None])]

    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX integer Div truncates; shape arithmetic (Shape -> Div -> Reshape) relies on it.
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _coerced_2d(fn: Callable[..., torch.Tensor], x: torch.Tensor, axis: int) -> torch.Tensor:
    """Opset < 13 Softmax/LogSoftmax: flatten to 2-D at `axis`, normalise rows, reshape back."""
    axis = axis + x.dim() if axis < 0 else axis
    return fn(x.reshape(int(np.prod(x.shape[:axis])), -1), 1).reshape(x.shape)


def _softmax(log: bool, *, legacy: bool = False) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        x = inp[0]
        assert x is not None
        fn = F.log_softmax if log else F.softmax
        if legacy:
            return [_coerced_2d(fn, x, int(attrs.get("axis", 1)))]
        return [fn(x, dim=int(attrs.get("axis", -1)))]

    return run


#: ONNX TensorProto data types -> torch; the unsigned wide ints have no torch arithmetic.
_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

#: Largest tensor a shape-making op (ConstantOfShape, Expand, Range, Tile) may create: a hostile
#: graph must fail with a message, not exhaust memory. 2**28 elements is 1 GiB of float32.
_MAX_ELEMENTS = 1 << 28


def _dtype(code: int) -> torch.dtype:
    if code not in _DTYPES:
        raise UnsupportedOnnxGraph(f"tensor data type {onnx.TensorProto.DataType.Name(code)}")
    return _DTYPES[code]


def _checked_shape(shape: Sequence[int], op: str) -> list[int]:
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape) or math.prod(shape) > _MAX_ELEMENTS:
        raise ValueError(f"{op} would create a tensor of shape {shape}, over the size limit")
    return shape


def _cast(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    assert inp[0] is not None
    return [inp[0].to(_dtype(int(attrs["to"])))]


def _constant_of_shape(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    assert inp[0] is not None
    shape = _checked_shape(inp[0].tolist(), "ConstantOfShape")
    value = attrs.get("value")
    if value is None:
        return [torch.zeros(shape, dtype=torch.float32)]
    fill = torch.from_numpy(np.array(value).reshape(-1)[:1].copy())
    return [fill.reshape(()).expand(shape).clone()]


def _expand(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, shape_t = inp[0], inp[1]
    assert x is not None and shape_t is not None
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps x's size there.
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(int(d) for d in shape_t.tolist()))
    _checked_shape(shape, "Expand")
    return [x.expand(shape)]


def _range(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    start, limit, delta = inp[0], inp[1], inp[2]
    assert start is not None and limit is not None and delta is not None
    s, lim, d = start.item(), limit.item(), delta.item()
    if d == 0:
        raise ValueError("Range with delta 0")
    _checked_shape([max(math.ceil((lim - s) / d), 0)], "Range")
    return [torch.arange(s, lim, d, dtype=start.dtype)]


def _mod(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    a, b = inp[0], inp[1]
    assert a is not None and b is not None
    # fmod=1 takes the dividend's sign (C fmod); fmod=0 (integers only) the divisor's (Python %).
    return [torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)]


def _where(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    c, a, b = inp[0], inp[1], inp[2]
    assert c is not None and a is not None and b is not None
    return [torch.where(c.bool(), a, b)]


def _layer_norm(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, scale = inp[0], inp[1]
    bias = inp[2] if len(inp) > 2 else None
    assert x is not None and scale is not None
    axis = int(attrs.get("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    normalized = tuple(x.shape[axis:])
    eps = float(attrs.get("epsilon", 1e-5))
    # Scale and bias may be anything that broadcasts to the normalised dims; F.layer_norm
    # wants them exactly that shape.
    weight = scale.expand(normalized) if tuple(scale.shape) != normalized else scale
    if bias is not None and tuple(bias.shape) != normalized:
        bias = bias.expand(normalized)
    return [F.layer_norm(x, normalized, weight, bias, eps)]


def _group_norm(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, scale, bias = inp[0], inp[1], inp[2]
    assert x is not None and scale is not None and bias is not None
    groups = int(attrs["num_groups"])
    channels = x.shape[1]
    if scale.numel() == groups != channels:
        # Opsets 18-20 give one scale and bias per group (opset 21 fixed it to per channel).
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return [F.group_norm(x, groups, scale, bias, float(attrs.get("epsilon", 1e-5)))]


def _instance_norm(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, scale, bias = inp[0], inp[1], inp[2]
    assert x is not None
    eps = float(attrs.get("epsilon", 1e-5))
    return [F.instance_norm(x, weight=scale, bias=bias, eps=eps)]


def _lrn(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    return [
        F.local_response_norm(
            x,
            int(attrs["size"]),
            alpha=float(attrs.get("alpha", 1e-4)),
            beta=float(attrs.get("beta", 0.75)),
            k=float(attrs.get("bias", 1.0)),
        )
    ]


def _gelu(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    approximate = attrs.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
    if approximate not in ("none", "tanh"):
        raise UnsupportedOnnxGraph(f"Gelu with approximate={approximate!r}")
    return [F.gelu(x, approximate=approximate)]


def _prelu(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, slope = inp[0], inp[1]
    assert x is not None and slope is not None
    return [torch.where(x < 0, x * slope, x)]


def _reduce(kind: str) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        x = inp[0]
        assert x is not None
        axes = _axes(inp, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        dims = tuple(sorted(a + x.dim() if a < 0 else a for a in axes))
        if kind == "ReduceMean":
            return [x.mean(dim=dims, keepdim=keep)]
        if kind == "ReduceSum":
            return [x.sum(dim=dims, keepdim=keep)]
        if kind == "ReduceMax":
            return [x.amax(dim=dims, keepdim=keep)]
        if kind == "ReduceMin":
            return [x.amin(dim=dims, keepdim=keep)]
        if kind == "ReduceSumSquare":
            return [(x * x).sum(dim=dims, keepdim=keep)]
        if kind == "ReduceL1":
            return [x.abs().sum(dim=dims, keepdim=keep)]
        if kind == "ReduceL2":
            return [(x * x).sum(dim=dims, keepdim=keep).sqrt()]
        if kind == "ReduceLogSum":
            return [x.sum(dim=dims, keepdim=keep).log()]
        if kind == "ReduceLogSumExp":
            return [torch.logsumexp(x, dim=dims, keepdim=keep)]
        # ReduceProd: torch.prod takes one dim at a time; go from the last so indices hold.
        for d in reversed(dims):
            x = x.prod(dim=d, keepdim=keep)
        return [x]

    return run


def _arg(largest: bool) -> _OpFn:
    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        x = inp[0]
        assert x is not None
        if attrs.get("select_last_index", 0):
            raise UnsupportedOnnxGraph("ArgMax/ArgMin with select_last_index=1")
        fn = torch.argmax if largest else torch.argmin
        keep = bool(attrs.get("keepdims", 1))
        return [fn(x, dim=int(attrs.get("axis", 0)), keepdim=keep)]

    return run


def _conv_transpose(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, w, b = inp[0], inp[1], inp[2] if len(inp) > 2 else None
    assert x is not None and w is not None
    _no_auto_pad(attrs, "ConvTranspose")
    if "output_shape" in attrs:
        raise UnsupportedOnnxGraph("ConvTranspose with output_shape")
    spatial = w.dim() - 2
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(spatial)
    if conv is None:
        raise UnsupportedOnnxGraph(f"ConvTranspose with {spatial} spatial dimensions")
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    sym = _pads(pads, spatial)
    out = conv(
        x,
        w,
        b,
        stride=tuple(attrs.get("strides", [1] * spatial)),
        padding=sym if sym is not None else (0,) * spatial,
        output_padding=tuple(attrs.get("output_padding", [0] * spatial)),
        groups=int(attrs.get("group", 1)),
        dilation=tuple(attrs.get("dilations", [1] * spatial)),
    )
    if sym is None:
        # Asymmetric pads crop the full output: begin pads off the front, end pads off the back.
        index = [slice(None), slice(None)]
        for d in range(spatial):
            index.append(slice(pads[d], out.shape[2 + d] - pads[d + spatial]))
        out = out[tuple(index)]
    return [out]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _resize(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    # Opset 10 takes (X, scales); 11+ take (X, roi, scales, sizes).
    scales_t = inp[1] if len(inp) == 2 else (inp[2] if len(inp) > 2 else None)
    sizes_t = inp[3] if len(inp) > 3 else None
    mode = _text(attrs.get("mode", "nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    for name, ok in (
        ("antialias", 0),
        ("exclude_outside", 0),
    ):
        if int(attrs.get(name, ok)) != ok:
            raise UnsupportedOnnxGraph(f"Resize with {name}={attrs[name]}")
    if "axes" in attrs or _text(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise UnsupportedOnnxGraph("Resize with axes or a keep_aspect_ratio_policy")
    spatial = x.dim() - 2
    align: bool | None = None
    if mode == "nearest":
        nearest = _text(attrs.get("nearest_mode", "round_prefer_floor"))
        if transform != "asymmetric" or nearest != "floor":
            raise UnsupportedOnnxGraph(f"Resize nearest with {transform}/{nearest}")
        torch_mode = "nearest"
    elif mode in ("linear", "cubic"):
        if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise UnsupportedOnnxGraph(f"Resize {mode} with {transform}")
        if mode == "cubic" and float(attrs.get("cubic_coeff_a", -0.75)) != -0.75:
            raise UnsupportedOnnxGraph("Resize cubic with cubic_coeff_a other than -0.75")
        align = transform == "align_corners"
        names = {1: "linear", 2: "bilinear", 3: "trilinear"} if mode == "linear" else {2: "bicubic"}
        if spatial not in names:
            raise UnsupportedOnnxGraph(f"Resize {mode} over {spatial} spatial dimensions")
        torch_mode = names[spatial]
    else:
        raise UnsupportedOnnxGraph(f"Resize mode {mode!r}")
    if sizes_t is not None and sizes_t.numel():
        sizes = [int(s) for s in sizes_t.tolist()]
        if sizes[:2] != list(x.shape[:2]):
            raise UnsupportedOnnxGraph("Resize over the batch or channel dimension")
        return [F.interpolate(x, size=sizes[2:], mode=torch_mode, align_corners=align)]
    assert scales_t is not None
    scales = [float(s) for s in scales_t.tolist()]
    if scales[:2] != [1.0, 1.0]:
        raise UnsupportedOnnxGraph("Resize over the batch or channel dimension")
    # Given scales (not recomputed from sizes) set both the output size, floor(in * scale),
    # and the coordinate map, as in ONNX.
    return [
        F.interpolate(
            x,
            scale_factor=scales[2:],
            mode=torch_mode,
            align_corners=align,
            recompute_scale_factor=False,
        )
    ]


def _pad(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    if len(inp) > 1 and inp[1] is not None:
        pads = [int(p) for p in inp[1].tolist()]
    else:
        pads = [int(p) for p in attrs.get("pads", [])]  # opset < 11
    value_t = inp[2] if len(inp) > 2 else None
    value = float(value_t.item()) if value_t is not None and value_t.numel() else 0.0
    value = float(attrs.get("value", value))
    axes_t = inp[3] if len(inp) > 3 else None
    rank = x.dim()
    axes = [int(a) % rank for a in axes_t.tolist()] if axes_t is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    mode = _text(attrs.get("mode", "constant"))
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if mode == "wrap":
        torch_mode = "circular"
    if torch_mode is None:
        raise UnsupportedOnnxGraph(f"Pad mode {mode!r}")
    flat: list[int] = []
    for d in reversed(range(rank)):
        flat += [begin[d], end[d]]
    if torch_mode != "constant":
        # torch pads only the trailing (spatial) dims in these modes; drop leading zero pairs.
        while len(flat) > 2 and flat[-2:] == [0, 0]:
            flat = flat[:-2]
        if len(flat) // 2 > rank - 2 or any(p < 0 for p in flat):
            raise UnsupportedOnnxGraph(f"Pad {mode} of the batch/channel dims or negative")
        return [F.pad(x, flat, mode=torch_mode)]
    return [F.pad(x, flat, mode="constant", value=value)]


def _split(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    axis = int(attrs.get("axis", 0))
    if len(inp) > 1 and inp[1] is not None:
        sizes = [int(s) for s in inp[1].tolist()]
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]  # opset < 13
    else:
        parts = int(attrs["num_outputs"] if "num_outputs" in attrs else attrs["_outputs"])
        # Ceil-sized chunks; opset 18's num_outputs lets the last be smaller, even empty
        # (onnxruntime splits 4 in 3 as 2, 2, 0), so the sizes are spelled out.
        size, chunk = x.shape[axis], math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, max(size - i * chunk, 0)) for i in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


def _slice(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, starts_t, ends_t = inp[0], inp[1], inp[2]
    assert x is not None and starts_t is not None and ends_t is not None
    starts, ends = starts_t.tolist(), ends_t.tolist()
    axes_t = inp[3] if len(inp) > 3 else None
    steps_t = inp[4] if len(inp) > 4 else None
    axes = axes_t.tolist() if axes_t is not None else list(range(len(starts)))
    steps = steps_t.tolist() if steps_t is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) + x.dim() if axis < 0 else int(axis)
        size, step = x.shape[axis], int(step)
        if step == 0:
            raise ValueError("Slice with step 0")
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end"): negative ones count
        # from the end, then positive steps clamp to [0, size], negative ones to [-1, size - 1].
        start = int(start) + size if start < 0 else int(start)
        end = int(end) + size if end < 0 else int(end)
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index: list[slice] = [slice(None)] * x.dim()
            index[axis] = slice(start, end, step)
            x = x[tuple(index)]
        else:
            start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
            picks = torch.arange(start, end, step, dtype=torch.int64, device=x.device)
            x = torch.index_select(x, axis, picks)
    return [x]


def _gather_elements(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, idx = inp[0], inp[1]
    assert x is not None and idx is not None
    axis = int(attrs.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    return [torch.gather(x, axis, idx)]


def _nd_index(x: torch.Tensor, idx: torch.Tensor, attrs: _Attrs, op: str) -> tuple[Any, ...]:
    if attrs.get("batch_dims", 0):
        raise UnsupportedOnnxGraph(f"{op} with batch_dims")
    idx = idx.long()
    depth = idx.shape[-1]
    sizes = torch.tensor(x.shape[:depth], dtype=torch.int64, device=idx.device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    return tuple(idx[..., i] for i in range(depth))


def _gather_nd(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, idx = inp[0], inp[1]
    assert x is not None and idx is not None
    return [x[_nd_index(x, idx, attrs, "GatherND")]]


def _scatter_nd(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, idx, updates = inp[0], inp[1], inp[2]
    assert x is not None and idx is not None and updates is not None
    if _text(attrs.get("reduction", "none")) != "none":
        raise UnsupportedOnnxGraph("ScatterND with a reduction")
    return [x.index_put(_nd_index(x, idx, attrs, "ScatterND"), updates)]


def _shape(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    dims = list(x.shape)
    start = int(attrs.get("start", 0))
    end = attrs.get("end")
    return [torch.tensor(dims[start : None if end is None else int(end)], dtype=torch.int64)]


def _tile(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, reps = inp[0], inp[1]
    assert x is not None and reps is not None
    repeats = [int(r) for r in reps.tolist()]
    _checked_shape([d * r for d, r in zip(x.shape, repeats, strict=True)], "Tile")
    return [x.repeat(repeats)]


def _trilu(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    k = int(inp[1].item()) if len(inp) > 1 and inp[1] is not None else 0
    return [torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)]


def _cumsum(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x, axis_t = inp[0], inp[1]
    assert x is not None and axis_t is not None
    axis = int(axis_t.item())
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis)
    if attrs.get("exclusive", 0):
        out = out - x
    return [out.flip(axis) if attrs.get("reverse", 0) else out]


def _einsum(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    return [torch.einsum(_text(attrs["equation"]), *[t for t in inp if t is not None])]


def _transpose(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*[int(p) for p in perm])]


def _hard_sigmoid(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return [torch.clamp(alpha * x + beta, 0.0, 1.0)]


def _scaled(fn: Callable[..., torch.Tensor], **defaults: float) -> _OpFn:
    """An activation whose float attributes (alpha, gamma) map to keyword arguments."""

    def run(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
        assert inp[0] is not None
        return [fn(inp[0], **{k: float(attrs.get(k, v)) for k, v in defaults.items()})]

    return run


def _selu(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _elu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.elu(x, alpha)


def _celu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.celu(x, alpha)


def _leaky_relu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.leaky_relu(x, alpha)


_OPS: dict[str, _OpFn] = {
    # Convolutions, pools, norms.
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _pool("MaxPool"),
    "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm,
    "LRN": _lrn,
    # Activations.
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Gelu": _gelu,
    "Erf": _unary(torch.erf),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": _scaled(_leaky_relu, alpha=0.01),
    "Elu": _scaled(_elu, alpha=1.0),
    "Celu": _scaled(_celu, alpha=1.0),
    "Selu": _scaled(_selu, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875),
    "PRelu": _prelu,
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    # Elementwise maths.
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),  # both round half to even
    "Sign": _unary(torch.sign),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _unary(torch.isinf),
    "Not": _unary(torch.logical_not),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Mod": _mod,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": lambda inp, attrs: [
        functools.reduce(torch.add, [t for t in inp if t is not None])
        / len([t for t in inp if t is not None])
    ],
    "Where": _where,
    "Clip": _clip,
    "Cast": _cast,
    "CastLike": lambda inp, attrs: [inp[0].to(inp[1].dtype)],  # type: ignore[union-attr]
    "Identity": _unary(lambda x: x),
    "Dropout": lambda inp, attrs: [inp[0]] if inp[0] is not None else [],
    # Linear algebra.
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Einsum": _einsum,
    # Reductions.
    **{
        kind: _reduce(kind)
        for kind in (
            "ReduceMean",
            "ReduceSum",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceSumSquare",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
        )
    },
    "ArgMax": _arg(largest=True),
    "ArgMin": _arg(largest=False),
    "CumSum": _cumsum,
    # Shapes and indexing.
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": lambda inp, attrs: [
        torch.cat([t for t in inp if t is not None], dim=int(attrs["axis"]))
    ],
    "Split": _split,
    "Shape": _shape,
    "Size": lambda inp, attrs: [torch.tensor(inp[0].numel(), dtype=torch.int64)],  # type: ignore[union-attr]
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Expand": _expand,
    "Tile": _tile,
    "Trilu": _trilu,
    "Pad": _pad,
    "Resize": _resize,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
}


def _linear_classifier(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    # skl2onnx writes sklearn's linear models (LogisticRegression, SGDClassifier, ...) as one
    # ai.onnx.ml.LinearClassifier: scores = post_transform(x W^T + b). The binary form (a single
    # coefficient row, which onnxruntime expands to two columns) and the rarer transforms are
    # refused rather than guessed; the load check compares the rest with onnxruntime.
    x = inp[0]
    assert x is not None
    labels = attrs.get("classlabels_ints")
    if labels is None:
        raise UnsupportedOnnxGraph("LinearClassifier with string class labels")
    intercepts = torch.as_tensor(np.asarray(attrs.get("intercepts", []), np.float32))
    coefficients = np.asarray(attrs["coefficients"], np.float32)
    rows = intercepts.numel() or len(labels)
    if rows < 2 or rows != len(labels):
        raise UnsupportedOnnxGraph(f"LinearClassifier with {rows} coefficient rows (binary form)")
    weight = torch.as_tensor(coefficients.reshape(rows, -1)).to(x.dtype)
    scores = x.reshape(x.shape[0], -1) @ weight.T
    if intercepts.numel():
        scores = scores + intercepts.to(x.dtype)
    transform = _text(attrs.get("post_transform", b"NONE"))
    if transform == "SOFTMAX":
        scores = torch.softmax(scores, dim=1)
    elif transform == "LOGISTIC":
        scores = torch.sigmoid(scores)
    elif transform != "NONE":
        raise UnsupportedOnnxGraph(f"LinearClassifier with post_transform {transform}")
    label = torch.as_tensor(np.asarray(labels, np.int64))[scores.argmax(dim=1)]
    return [label, scores]


def _normalizer(inp: list[torch.Tensor | None], attrs: _Attrs) -> list[torch.Tensor]:
    x = inp[0]
    assert x is not None
    norm = _text(attrs.get("norm", b"MAX"))
    if norm == "MAX":
        scale = x.amax(dim=1, keepdim=True)
    elif norm == "L1":
        scale = x.abs().sum(dim=1, keepdim=True)
    elif norm == "L2":
        scale = x.square().sum(dim=1, keepdim=True).sqrt()
    else:
        raise UnsupportedOnnxGraph(f"Normalizer with norm {norm}")
    return [x / scale]


#: Ops of the ai.onnx.ml domain with a differentiable torch form (the tree ensembles have none).
_ML_OPS: dict[str, _OpFn] = {
    "LinearClassifier": _linear_classifier,
    "Normalizer": _normalizer,
}

#: Before opset 13, Softmax and LogSoftmax flatten to 2-D at `axis` instead of acting on it.
_LEGACY_OPS: dict[str, _OpFn] = {
    "Softmax": _softmax(log=False, legacy=True),
    "LogSoftmax": _softmax(log=True, legacy=True),
}

#: Ops that may have more than one output, and how many this converter computes; a graph that
#: reads a further output (BatchNorm's training statistics, MaxPool's indices, Dropout's mask,
#: LayerNormalization's mean) is refused rather than fed a missing value.
_OUTPUTS = {"Split": 1 << 30, "LinearClassifier": 2}


def _constant_value(attrs: _Attrs) -> np.ndarray:
    """The value of a Constant node, whichever attribute (value, value_float(s), ...) holds it."""
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise UnsupportedOnnxGraph(f"Constant with attribute {sorted(attrs)}")


def _attributes(node: onnx.NodeProto) -> _Attrs:
    attrs: _Attrs = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH or attr.type == onnx.AttributeProto.GRAPHS:
            raise UnsupportedOnnxGraph(f"{node.op_type} with a subgraph attribute")
        if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            raise UnsupportedOnnxGraph(f"{node.op_type} with a sparse tensor attribute")
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        attrs[attr.name] = value
    return attrs


class OnnxModule(torch.nn.Module):
    """An ONNX graph run op by op in torch; differentiable with respect to its inputs.

    `output` picks which graph output `forward` returns (default the first).
    """

    def __init__(self, model: onnx.ModelProto, output: str | None = None) -> None:
        super().__init__()
        if model.functions:
            # The dynamo exporter may write model-local functions; inlining makes them nodes.
            model = onnx.inliner.inline_local_functions(model)
        graph = model.graph
        opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
        if not opset:
            opset = {o.domain: o.version for o in model.opset_import}.get("ai.onnx", 0)
        ops = {**_OPS, **_LEGACY_OPS} if opset and opset < 13 else _OPS

        def op(node: onnx.NodeProto) -> _OpFn | None:
            if node.domain == "ai.onnx.ml":
                return _ML_OPS.get(node.op_type)
            return ops.get(node.op_type) if node.domain in ("", "ai.onnx") else None

        unsupported = sorted(
            {
                f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                for n in graph.node
                if op(n) is None and not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))
            }
        )
        if unsupported:
            raise UnsupportedOnnxGraph(f"unsupported ONNX ops: {', '.join(unsupported)}")
        consumed = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        # Initialiser names contain dots, which buffer names may not: keep an index instead.
        self._constant_names: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            self._add_constant(f"_c{i}", init.name, numpy_helper.to_array(init))
        initialisers = {init.name for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initialisers]
        self.output_names = [o.name for o in graph.output]
        if output is not None and output not in self.output_names:
            raise UnsupportedOnnxGraph(f"no graph output named {output!r}")
        self._output = output if output is not None else self.output_names[0]
        self._nodes: list[tuple[_OpFn, list[str], list[str], _Attrs]] = []
        for j, node in enumerate(graph.node):
            attrs = _attributes(node)
            if node.op_type == "Constant":
                self._add_constant(f"_k{j}", node.output[0], _constant_value(attrs))
                continue
            computed = _OUTPUTS.get(node.op_type, 1)
            extra = [name for name in node.output[computed:] if name and name in consumed]
            if extra:
                raise UnsupportedOnnxGraph(f"{node.op_type} with its extra outputs in use")
            attrs["_outputs"] = len(node.output)
            fn = op(node)
            assert fn is not None  # checked above
            self._nodes.append((fn, list(node.input), list(node.output), attrs))

    def _add_constant(self, buffer: str, onnx_name: str, value: np.ndarray) -> None:
        if value.dtype == object:
            raise UnsupportedOnnxGraph(f"string constant {onnx_name!r}")
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
        for fn, ins, outs, attrs in self._nodes:
            results = fn([values[name] for name in ins], attrs)
            values.update(zip(outs, results, strict=False))
        out = values[self._output]
        assert out is not None
        return out
