"""torch.export backend: `.pt2` ExportedPrograms, opened only after proving no pickle runs.

`torch.export.load` is not safe on untrusted files as it stands (its docstring says so): it
unpickles with `weights_only=False` any weight or constant the archive marks `use_pickle`
(tensor subclasses), unpickles custom and opaque objects, retries sample inputs with
`weights_only=False` when the safe unpickler refuses them, loads AOTInductor shared libraries
found under `data/aotinductor/`, and reads an older zip layout through the same pickles. And a
loaded program's graph may name any function reachable from `torch.` (`torch.os.system`
included) as a call target.

So before calling it, `check_archive` reads the bytes once and allows only what a plain
`torch.export.save` of a model with tensor weights writes: the JSON graph, raw tensor payloads
whose configs say `use_pickle: false`, sample inputs the safe unpickler (`weights_only=True`)
accepts, and text extra files; anything else (pickled payloads, custom objects, AOTInductor
code, the legacy layout) is refused, naming the member. The same bytes are then loaded, and
`check_program` allows only ATen / prims operators and plain arithmetic in the graph before the
program runs once.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interscope_server.errors import InvalidArgument
from interscope_server.models.backend import (
    BackendOptions,
    NormalizedModule,
    TorchBackend,
    value_bounds,
)
from interscope_server.models.config import ModelConfig
from interscope_server.models.gradient_check import check_gradients

logger = logging.getLogger(__name__)

#: What a plain torch.export.save writes, relative to the archive's root folder. Each member
#: of an upload must match one of these; every other name is refused.
_ALLOWED_MEMBERS = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt"
    r"|extra/[A-Za-z0-9_.-]+)$"
)
_PAYLOAD_CONFIGS = {
    "data/weights/model_weights_config.json": re.compile(r"^weight_\d+$"),
    "data/constants/model_constants_config.json": re.compile(r"^tensor_\d+$"),
}
#: torch.export.save stores members uncompressed; a little slack covers zip headers. A member
#: claiming far more bytes than the file holds is a zip bomb.
_MAX_EXPANSION = 2


def _refuse(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"model {name!r}: not a loadable torch.export archive: {why}")


def check_archive(data: bytes, name: str) -> None:
    """InvalidArgument unless `data` is a .pt2 archive that torch.export.load opens unpickling
    nothing but plain tensors with the safe unpickler."""
    try:
        _check_archive(data, name)
    except InvalidArgument:
        raise
    except Exception as exc:  # a damaged zip fails in many ways (zlib, EOF, bad headers)
        raise _refuse(name, f"the archive is damaged ({type(exc).__name__})") from None


def _check_archive(data: bytes, name: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise _refuse(name, "the file is not a zip archive, as torch.export.save writes") from None
    with archive:
        infos = archive.infolist()
        if sum(i.file_size for i in infos) > _MAX_EXPANSION * len(data) + (1 << 20):
            raise _refuse(name, "its members expand to far more than the file's size")
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1 or any("/" not in i.filename for i in infos):
            raise _refuse(name, "the members do not sit in one root folder")
        (root,) = roots
        members = {i.filename[len(root) + 1 :]: i for i in infos if not i.is_dir()}
        for member in sorted(members):
            if not _ALLOWED_MEMBERS.match(member):
                what = "compiled AOTInductor code" if "aotinductor" in member else "a member"
                raise _refuse(
                    name,
                    f"{what} {member!r} is not among what torch.export.save writes for a plain "
                    "program (JSON graph, raw tensor weights, sample inputs, text extras)",
                )
        for required in ("archive_version", "models/model.json"):
            if required not in members:
                raise _refuse(
                    name,
                    f"{required!r} is missing (older torch.export layouts "
                    "are read through pickle and are refused)",
                )
        for config_name, allowed in _PAYLOAD_CONFIGS.items():
            if config_name not in members:
                raise _refuse(name, f"{config_name!r} is missing")
            try:
                entries = json.loads(archive.read(members[config_name]))["config"]
                payloads = [(key, e["path_name"], e["use_pickle"]) for key, e in entries.items()]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise _refuse(name, f"{config_name!r} is not a payload config") from None
            for key, path_name, use_pickle in payloads:
                if use_pickle is not False or not allowed.match(str(path_name)):
                    raise _refuse(
                        name,
                        f"{key!r} is stored as a pickled object ({path_name!r}); only raw "
                        "tensors are accepted, since loading a pickle can run code",
                    )
        sample = "data/sample_inputs/model.pt"
        if sample in members:
            try:
                # The safe unpickler: if it accepts the bytes, torch's own first attempt (also
                # weights_only=True) succeeds and its unsafe fallback never runs.
                torch.load(io.BytesIO(archive.read(members[sample])), weights_only=True)
            except Exception as exc:
                raise _refuse(
                    name, f"its sample inputs are not plain tensors ({type(exc).__name__})"
                ) from None


#: Non-operator call targets a program may hold: symbolic-shape arithmetic.
_BUILTIN_TARGETS = frozenset(
    [getattr(operator, n) for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv")]
    + [getattr(operator, n) for n in ("mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")]
    + [operator.and_, operator.or_, operator.not_, math.ceil, math.floor, math.sqrt]
    + [torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not]
)
_OPERATOR_NAMESPACES = ("aten", "prims")


def check_program(program: torch.export.ExportedProgram, name: str) -> None:
    """InvalidArgument unless every node of the program calls an ATen / prims operator or
    plain arithmetic (nothing else runs when it does)."""
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            allowed = node.op == "call_function" and (
                (
                    isinstance(target, torch._ops.OpOverload)
                    and target.namespace in _OPERATOR_NAMESPACES
                )
                or target in _BUILTIN_TARGETS
            )
            if not allowed:
                raise _refuse(
                    name,
                    f"its graph calls {getattr(target, '__name__', target)!r} ({node.op}); only "
                    "ATen and prims operators are accepted",
                )


class _Program(torch.nn.Module):
    """An ExportedProgram's module: picks the configured output, honours a fixed batch size.

    A program exported without a dynamic batch dimension accepts exactly its example's batch
    size; rows are run in chunks of that size, the last one padded with copies of its final
    row whose outputs are dropped (so they add nothing to any gradient).
    """

    def __init__(self, inner: torch.nn.Module, output: str, batch: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.output = output
        self.batch = batch

    def train(self, mode: bool = True) -> _Program:
        # The program's train/eval behaviour was fixed at export; its module refuses eval().
        self.training = mode
        return self

    def _select(self, out: Any) -> torch.Tensor:
        if isinstance(out, dict):
            out = out.get(self.output)
        if not isinstance(out, torch.Tensor):
            raise InvalidArgument(
                f"the program returns {type(out).__name__}; give it a single tensor output or "
                f"a dict holding the output {self.output!r}"
            )
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return self._select(self.inner(x))
        outs = []
        for chunk in x.split(self.batch):
            rows = chunk.shape[0]
            if rows < self.batch:
                filler = chunk[-1:].expand(self.batch - rows, *chunk.shape[1:])
                chunk = torch.cat([chunk, filler])
            outs.append(self._select(self.inner(chunk))[:rows])
        return torch.cat(outs)


class TorchExportBackend(TorchBackend):
    """A torch.export ExportedProgram (.pt2); gradients are native once the load check passes."""

    def __init__(
        self, config: ModelConfig, path: Path, options: BackendOptions | None = None
    ) -> None:
        super().__init__(config, path)
        options = options or BackendOptions()
        cuda = options.device != "cpu" and torch.cuda.is_available()
        if options.device == "cuda" and not cuda:
            logger.warning("model %s: device='cuda' but torch sees no GPU; on CPU", config.name)
        self._device = torch.device("cuda" if cuda else "cpu")
        data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
        check_archive(data, config.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise _refuse(
                config.name,
                f"torch.export.load failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})",
            ) from None
        check_program(program, config.name)
        batch = self._check_signature(program)
        inner = _Program(program.module(), config.output_name, batch)
        module = NormalizedModule(inner, config).to(self._device).eval()
        module.requires_grad_(False)
        self._module = module
        self.gradient_note = check_gradients(
            module, tuple(config.input.shape), value_bounds(config), self._device
        )
        if self.gradient_note:
            logger.warning("model %s: no gradients: %s", config.name, self.gradient_note)

    def _check_signature(self, program: torch.export.ExportedProgram) -> int | None:
        """The program's fixed batch size (None when dynamic), after checking its one input."""
        user_inputs = list(program.graph_signature.user_inputs)
        if len(user_inputs) != 1:
            raise InvalidArgument(
                f"model {self.config.name!r}: the program takes {len(user_inputs)} inputs; "
                "exactly one is supported"
            )
        placeholder = next(
            n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]
        )
        value = placeholder.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(f"model {self.config.name!r}: the program input is no tensor")
        if value.dtype != torch.float32:
            raise InvalidArgument(
                f"model {self.config.name!r}: the program input is {value.dtype}; only FP32 "
                "(torch.float32) inputs are supported"
            )
        dims = [d if isinstance(d, int) else None for d in value.shape]
        expected = list(self.config.input.shape)
        if len(dims) != len(expected) + 1 or any(
            d is not None and d != e for d, e in zip(dims[1:], expected, strict=True)
        ):
            raise InvalidArgument(
                f"model {self.config.name!r}: config input shape {expected} does not match the "
                f"program's per-example shape {[str(d) for d in value.shape[1:]]}"
            )
        return dims[0]

    @property
    def format(self) -> str:
        return "torch_export"

    def _forward(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self._module(torch.from_numpy(x).to(self._device))
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
