"""Small torch models (CNN, MLP, ViT) and every way users export them: both ONNX exporters,
TorchScript scripted and traced, torch.export; importable by any test that needs real exports.

Random weights are enough for forward and gradient checks; the builders are seeded, so every
call returns the same network. Inputs are in the raw [0, 1] range; none of these models
normalises, so configs need no `normalization`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

#: Per-example input shapes of the three families.
IMAGE_SHAPE = (3, 8, 8)
FEATURES = 12


class SmallCNN(nn.Module):
    """Conv, BatchNorm, MaxPool, GroupNorm, InstanceNorm, GELU, ConvTranspose, Resize, Pad."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = nn.functional.max_pool2d(h, 2)
        h = nn.functional.gelu(self.inorm(self.gn(self.conv2(h))))
        h = torch.sigmoid(self.up(h)) * torch.tanh(h).mean(dim=(1, 2, 3), keepdim=True)
        h = nn.functional.interpolate(h, scale_factor=0.5, mode="bilinear", align_corners=False)
        h = nn.functional.pad(h, (1, 1, 1, 1), mode="reflect")
        h = nn.functional.avg_pool2d(h, 2, stride=1)
        return self.fc(torch.flatten(h, 1))


class SmallMLP(nn.Module):
    """Linear, Tanh, LayerNorm, Softplus: a tabular MLP over `FEATURES` inputs."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.l1 = nn.Linear(FEATURES, 16)
        self.norm = nn.LayerNorm(16)
        self.l2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.softplus(self.norm(torch.tanh(self.l1(x))))
        return self.l2(torch.clamp(h, max=4.0))


class SmallViT(nn.Module):
    """Patch-embedding conv, class token, position embedding, one pre-norm encoder layer
    (multi-head attention, GELU MLP), LayerNorm, linear head on the class token."""

    def __init__(self, classes: int = 4, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=32,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class AttentionViT(nn.Module):
    """A ViT block on nn.MultiheadAttention: traced without grad in eval mode, its graph keeps
    `aten::_native_multi_head_attention`, which has no derivative."""

    def __init__(self, classes: int = 4, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(out.mean(dim=1))


@dataclass(frozen=True)
class Family:
    """One model family: how to build it, its per-example input shape and class count."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    classes: int


def _seeded(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        module = cls()
        for buffer_name, buffer in module.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.uniform_(-0.3, 0.3)  # non-trivial BatchNorm statistics
            elif buffer_name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        return module.eval()

    return build


FAMILIES = {
    "cnn": Family("cnn", _seeded(SmallCNN), IMAGE_SHAPE, 5),
    "mlp": Family("mlp", _seeded(SmallMLP), (FEATURES,), 3),
    "vit": Family("vit", _seeded(SmallViT), IMAGE_SHAPE, 4),
}

#: Opsets each exporter is tested at. The classic exporter cannot write the ViT's attention
#: (scaled_dot_product_attention) below opset 14, so the ViT uses 14 there instead of 13.
#: The dynamo exporter writes opset 18 and converts down: asked for 13 it silently writes 18,
#: so 13 is not tested; asked for 17 it writes 17 for the MLP and the ViT but 18 for the CNN
#: (its down-conversion gives up on InstanceNormalization/Resize and keeps 18).
CLASSIC_OPSETS = (13, 17, 20)
DYNAMO_OPSETS = (17, 20)


def classic_opset(family: str, opset: int) -> int:
    """The opset the classic exporter is asked for, given the one a test names."""
    return 14 if family == "vit" and opset < 14 else opset


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters warn (deprecations) and log progress; neither matters to a test."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(module: nn.Module, shape: tuple[int, ...], *, dynamo: bool, opset: int) -> bytes:
    """ONNX bytes from torch's classic (TorchScript-based) or dynamo exporter, batch dynamic."""
    example = torch.rand(2, *shape)
    with _quiet_exporter():
        if dynamo:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
            assert program is not None
            model = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
            model = onnx.load_from_string(buffer.getvalue())
    return model.SerializeToString()


def script(module: nn.Module, path: Path) -> Path:
    """A TorchScript archive made by torch.jit.script."""
    with _quiet_exporter():
        torch.jit.script(module).save(str(path))
    return path


def trace(module: nn.Module, shape: tuple[int, ...], path: Path, *, no_grad: bool = False) -> Path:
    """A TorchScript archive made by torch.jit.trace.

    With `no_grad` (as inference code often traces), nn.MultiheadAttention and
    nn.TransformerEncoderLayer take their fused fast path, whose ops have no derivative.
    """
    with _quiet_exporter(), torch.set_grad_enabled(not no_grad):
        # check_trace re-traces and compares graphs; TransformerEncoder's differ only in
        # TorchScript's name mangling, which the check reports as a divergence.
        torch.jit.trace(module, torch.rand(2, *shape), check_trace=False).save(str(path))
    return path


def export_program(
    module: nn.Module, shape: tuple[int, ...], path: Path, *, dynamic: bool = True
) -> Path:
    """A torch.export ExportedProgram saved as .pt2 (batch dynamic unless `dynamic=False`)."""
    dims = ({0: torch.export.Dim("batch")},) if dynamic else None
    with _quiet_exporter():
        program = torch.export.export(module, (torch.rand(2, *shape),), dynamic_shapes=dims)
        torch.export.save(program, str(path))
    return path
