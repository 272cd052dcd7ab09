"""Checks on a model file before any runtime loads or runs it: operator allowlist, memory budget.

A model file is code the server runs. These checks read the file as data and refuse, naming
the operator or the size and the budget, what could touch files, the network, processes or
memory maps (TorchScript), or what would pin more memory than the budget when the runtime
folds its constants at load (ONNX). They run before `torch.jit.load` or an onnxruntime session.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from interscope_server.errors import InvalidArgument, ResourceExhausted
from interscope_server.models.config import ModelConfig

#: Operator namespaces a TorchScript graph may use: tensor maths and control flow. Others
#: (c10d: network; profiler; custom ops of libraries the model expects to be loaded) are refused.
TORCHSCRIPT_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized"})

#: Operators inside those namespaces that reach outside the tensor world. `prim::Print` and
#: `aten::warn` stay allowed: they write to the server's log, which is harmless.
TORCHSCRIPT_REFUSED = {
    "aten::from_file": "reads (and with shared=True writes through a memory map of) a file",
    "aten::save": "writes a file",
    "aten::set_": "points a tensor at another storage (aliasing memory it does not own)",
    "aten::_pin_memory": "pins host memory",
    "aten::pin_memory": "pins host memory",
    "prim::fork": "starts work on another thread that outlives the call",
    "aten::wait": "waits on forked work",
    "prim::awaitable": "starts deferred work",
    "prim::awaitable_wait": "waits on deferred work",
    "prim::awaitable_nowait": "starts deferred work",
}

#: Text of a TorchScript archive's code that runs at load (`__setstate__`) or names a refused
#: operator; checked on the archive's source before torch.jit.load, which would run it.
_SOURCE_REFUSED = re.compile(
    r"def __setstate__|\bfrom_file\b|\btorch\.save\b|\bops\.aten\.save\b|\bset_\(|\bfork\("
)


def vet_model_file(config: ModelConfig, path: Path, memory_budget_bytes: int) -> None:
    """Refuse `path` if a check fails (InvalidArgument or ResourceExhausted, saying why)."""
    if config.format == "torchscript":
        vet_torchscript_archive(config.name, path)
    elif config.format == "onnx":
        vet_onnx_memory(config.name, path, memory_budget_bytes)


# -- TorchScript --------------------------------------------------------------------------------


def vet_torchscript_archive(name: str, path: Path) -> None:
    """Scan the archive's TorchScript source before anything of it is loaded or run.

    torch.jit.load runs a module's `__setstate__`, so the source is checked as text first: no
    `__setstate__` at all (models from torch.jit.script/trace have none), no refused operator.
    The graph walk after loading (`vet_torchscript_module`) is the precise check.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if "/code/" not in f"/{entry.filename}" or not entry.filename.endswith(".py"):
                    continue
                if entry.file_size > 64 * 1024 * 1024:
                    raise InvalidArgument(
                        f"model {name!r}: TorchScript source {entry.filename} is "
                        f"{entry.file_size} bytes; refusing to read it"
                    )
                text = archive.read(entry).decode("utf-8", errors="replace")
                found = _SOURCE_REFUSED.search(text)
                if found:
                    raise InvalidArgument(
                        f"model {name!r}: its TorchScript code ({entry.filename}) uses "
                        f"{found.group(0).strip('(')!r}, which the server does not run "
                        "(file, network, process, memory-map and load-time code are refused)"
                    )
    except zipfile.BadZipFile:
        raise InvalidArgument(
            f"model {name!r}: {path.name} is not a loadable TorchScript archive (not a zip file)"
        ) from None


def _nodes(blocks: Iterable[object]) -> Iterator[object]:
    for block in blocks:
        for node in block.nodes():  # type: ignore[attr-defined]
            yield node
            yield from _nodes(node.blocks())


def torchscript_operators(module: object) -> set[str]:
    """Every operator kind in every method of `module` and its submodules, calls inlined."""
    kinds: set[str] = set()
    for sub in module.modules():  # type: ignore[attr-defined]
        c_module = getattr(sub, "_c", None)
        if c_module is None:
            continue
        for method_name in c_module._method_names():
            graph = c_module._get_method(method_name).inlined_graph
            kinds.update(node.kind() for node in _nodes([graph]))  # type: ignore[attr-defined]
    return kinds


def vet_torchscript_module(name: str, module: object) -> None:
    """Refuse a loaded TorchScript module whose graphs use an operator outside the allowlist."""
    for kind in sorted(torchscript_operators(module)):
        namespace = kind.split("::", 1)[0]
        if kind in TORCHSCRIPT_REFUSED:
            raise InvalidArgument(
                f"model {name!r} uses the operator {kind}, which {TORCHSCRIPT_REFUSED[kind]}; "
                "models may only compute on their inputs"
            )
        if namespace not in TORCHSCRIPT_NAMESPACES:
            raise InvalidArgument(
                f"model {name!r} uses the operator {kind}, outside the allowed namespaces "
                f"({', '.join(sorted(TORCHSCRIPT_NAMESPACES))})"
            )


# -- ONNX ---------------------------------------------------------------------------------------


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8  # unknown element types are sized as the widest common one


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod([int(d) for d in tensor.dims], dtype=object)) * _itemsize(tensor.data_type)


def _small_value(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The value of a small inline tensor (shapes, repeats); None for big or external ones,
    whose bytes are not read here (the backend refuses external data on its own)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or _tensor_bytes(tensor) > 4096:
        return None
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # a malformed constant: the runtime will refuse it, not size it
        return None


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def onnx_constant_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, constants and the constants foldable at load.

    Folding (ConstantOfShape, Expand, Tile of constants) is what turns a few hundred bytes of
    file into gigabytes of memory inside onnxruntime's session; each folded tensor is sized
    from its constant inputs' values and shapes, without computing it.
    """
    total = 0
    for graph in _graphs(model.graph):
        values: dict[str, np.ndarray] = {}  # small constant tensors (shapes, repeats)
        shapes: dict[str, tuple[int, ...]] = {}  # every constant tensor's shape
        itemsizes: dict[str, int] = {}
        for tensor in graph.initializer:
            total += _tensor_bytes(tensor)
            shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
            itemsizes[tensor.name] = _itemsize(tensor.data_type)
            value = _small_value(tensor)
            if value is not None:
                values[tensor.name] = value
        for node in graph.node:
            out = node.output[0] if node.output else ""
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.HasField("t"):
                        total += _tensor_bytes(attr.t)
                        shapes[out] = tuple(int(d) for d in attr.t.dims)
                        itemsizes[out] = _itemsize(attr.t.data_type)
                        value = _small_value(attr.t)
                        if value is not None:
                            values[out] = value
                continue
            ins = list(node.input)
            shape: tuple[int, ...] | None = None
            itemsize = 4
            if node.op_type == "ConstantOfShape" and ins and ins[0] in values:
                shape = tuple(int(v) for v in values[ins[0]].reshape(-1))
                for attr in node.attribute:
                    if attr.name == "value":
                        itemsize = _itemsize(attr.t.data_type)
            elif node.op_type == "Expand" and len(ins) == 2 and ins[0] in shapes:
                if ins[1] in values:
                    target = tuple(int(v) for v in values[ins[1]].reshape(-1))
                    shape = _broadcast(shapes[ins[0]], target)
                    itemsize = itemsizes.get(ins[0], 4)
            elif node.op_type == "Tile" and len(ins) == 2 and ins[0] in shapes and ins[1] in values:
                repeats = [int(v) for v in values[ins[1]].reshape(-1)]
                base = shapes[ins[0]]
                if len(repeats) == len(base):
                    shape = tuple(b * r for b, r in zip(base, repeats, strict=True))
                    itemsize = itemsizes.get(ins[0], 4)
            if shape is not None and out:
                shapes[out] = shape
                itemsizes[out] = itemsize
                total += int(np.prod([max(d, 0) for d in shape], dtype=object)) * itemsize
    return total


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    width = max(len(a), len(b))
    a = (1,) * (width - len(a)) + a
    b = (1,) * (width - len(b)) + b
    return tuple(max(x, y) for x, y in zip(a, b, strict=True))


def vet_onnx_memory(name: str, path: Path, budget_bytes: int) -> None:
    """Refuse an ONNX model whose constants (folded ones included) exceed the memory budget."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidArgument(
            f"model {name!r}: {path.name} is not a readable ONNX file ({exc})"
        ) from None
    needed = onnx_constant_bytes(model)
    if needed > budget_bytes:
        raise ResourceExhausted(
            f"model {name!r}: its weights and load-time constants need {needed} bytes, over "
            f"the model memory budget of {budget_bytes} bytes "
            "(INTERSCOPE_MODEL_MEMORY_BUDGET_BYTES)"
        )
