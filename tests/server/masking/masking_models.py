"""Demo digits CNNs rebuilt to mask their gradients, served from a repository made in the test
session: each wraps the demo's standard TorchScript network, which sees normalised inputs."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from tests.server.models.torch_exports import trace


class Quantised(nn.Module):
    """Rounds the (normalised, [-1, 1]) input to 5 levels first: torch.round has a zero
    derivative everywhere, so every input gradient is exactly 0."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(z * 2) / 2)


class Saturated(nn.Module):
    """Logits times 1e4: the softmax is exactly one-hot in float32 on every example with a
    margin above ~0.01, so the cross-entropy and its gradient are exactly 0 there."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) * 1e4


class Shattered(nn.Module):
    """Adds a small, fast-oscillating term to each normalised pixel: the values barely move
    (at most AMPLITUDE) but the input gradient is dominated by AMPLITUDE * FREQUENCY *
    cos(FREQUENCY z), whose sign changes every 1/FREQUENCY: the gradient is noise."""

    AMPLITUDE = 0.02
    FREQUENCY = 2000.0

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z + self.AMPLITUDE * torch.sin(self.FREQUENCY * z))


class Gated(nn.Module):
    """A perturbation detector that saturates: the demo digits are 2x2 blocks of one value
    (nearest-neighbor upsampling), so a pixel far from its block's mean means an attack.
    Beyond THRESHOLD (normalised units; 2 * raw) the logits are scaled by up to 1e6, the
    softmax goes one-hot and the CE gradient is exactly 0; predictions never change. An
    attack at an eps below THRESHOLD / 2 sees the network itself, one above it sees nothing:
    robust accuracy rises with eps."""

    THRESHOLD = 0.15

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        block = nn.functional.avg_pool2d(z, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
        deviation = (z - block).abs().flatten(1).amax(dim=1, keepdim=True)
        return self.net(z) * (1 + 1e6 * torch.relu(deviation - self.THRESHOLD))


class Randomised(nn.Module):
    """Adds fresh Gaussian noise (SIGMA, normalised units) to the input on every forward: a
    randomised defence. Each gradient is of one noise draw, so an attack follows a noisy
    direction and a longer run (more draws, more tries) fools examples a shorter one left
    robust: robust accuracy falls with more steps (Athalye et al. 2018, stochastic gradients).
    Its backward is right for each fixed draw, so it loads with gradients."""

    SIGMA = 0.6

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z + self.SIGMA * torch.randn_like(z))


WRAPPERS = {
    "digits-quantised": Quantised,
    "digits-saturated": Saturated,
    "digits-shattered": Shattered,
    "digits-gated": Gated,
    "digits-randomised": Randomised,
}


def build_masking_repository(demo: Path, out: Path) -> Path:
    """A repository with the demo's digits-cnn-ts and its masking variants (TorchScript)."""
    source = demo / "digits-cnn-ts"
    shutil.copytree(source, out / "digits-cnn-ts")
    config = json.loads((source / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the served format is TorchScript
        net = torch.jit.load(str(source / "model.pt")).eval()
    for name, wrapper in WRAPPERS.items():
        folder = out / name
        folder.mkdir()
        trace(wrapper(net).eval(), tuple(config["input"]["shape"]), folder / "model.pt")
        (folder / "config.json").write_text(
            json.dumps({**config, "name": name, "description": wrapper.__doc__}, indent=2)
        )
    return out
