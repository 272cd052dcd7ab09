"""Load-time proof that a model's backward pass delivers true input gradients.

Every backend that offers a differentiable module runs `check_gradients` on it at load: one
backward pass, compared against central finite differences of the module's own forward pass on
a few input coordinates. A model whose graph has an op without a derivative (a traced
`aten::_native_multi_head_attention`), a converter bug, or a backward that silently returns
wrong numbers then loads without gradients, with the reason, instead of failing white-box
attacks later or, worse, feeding them wrong directions.

Every evaluation runs with the random number generator seeded the same (inside
`torch.random.fork_rng`, so the caller's RNG state is untouched): a randomised model (noise
added to its input, say) then draws the same noise in the backward pass and in every finite
difference, and its backward is checked for that one fixed draw, the function it computes
once the noise is fixed. A deterministic model computes exactly what it did unseeded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Coordinates checked: the largest |gradient| ones (where a wrong derivative shows most) and
#: random others (where a gradient that is wrongly zero shows).
TOP_COORDINATES = 3
RANDOM_COORDINATES = 3

#: Central differences err by O(h^2 f''') (truncation) plus O(eps |f| / h) (rounding). Trying a
#: few steps, small to large, keeps one of them where both are far below the tolerance: small
#: steps for smooth ops and to stay clear of ReLU / max-pool kinks, larger ones when part of
#: the graph runs in float32 even in a float64 copy (a Cast in the graph). A missing or wrong
#: derivative is off by O(1) relative at the largest-gradient coordinates, far outside any of
#: these tolerances, so the generous margins cost nothing in power.
_STEPS = {torch.float64: (1e-6, 1e-4, 1e-2), torch.float32: (1e-3, 1e-2)}
#: Relative tolerance per coordinate, and an absolute one as a fraction of the largest gradient
#: entry (rounding noise scales with the function, not with one small coordinate).
_RTOL = {torch.float64: 1e-3, torch.float32: 3e-2}
_ATOL = {torch.float64: 1e-4, torch.float32: 1e-2}


#: The seed every evaluation of the check starts from (see the module doc).
NOISE_SEED = 0


@contextlib.contextmanager
def fixed_noise(device: torch.device, seed: int = NOISE_SEED) -> Iterator[None]:
    """Run the block with the RNGs `device` draws from seeded to `seed`; restore them after."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _precise_copy(
    module: torch.nn.Module, x32: torch.Tensor, out32: torch.Tensor, device: torch.device
) -> torch.nn.Module | None:
    """A float64 copy of `module` that reproduces its float32 outputs, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations inside torch's own deepcopy support
            double = copy.deepcopy(module).double()
        with torch.no_grad(), fixed_noise(device):
            out64 = double(x32.double())
    except Exception as exc:  # hard-coded float32 ops in a traced graph, say: check in float32
        logger.debug("float64 copy unusable (%s); checking gradients in float32", exc)
        return None
    scale = float(out32.abs().max()) + 1.0
    if out64.shape != out32.shape or not torch.allclose(
        out64.float(), out32, rtol=1e-3, atol=1e-3 * scale
    ):
        return None
    return double


def check_gradients(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    value_range: tuple[float, float] | tuple[np.ndarray, np.ndarray],
    device: torch.device,
    *,
    seed: int = 0,
) -> str:
    """ "" when `module`'s input gradients match finite differences, else why they do not.

    `module` maps raw inputs (B, *input_shape) to logits (eval mode, as attacks get it). The
    check runs on a float64 copy when the module survives `.double()` with the same outputs,
    on the module itself in float32 otherwise; `module` is left as it was. Every evaluation is
    a batch of one, which any model accepts, fixed batch size or not.
    """
    low, high = value_range
    # Per-element bounds (per-feature ranges) or one pair; steps scale with each element's span.
    low = np.broadcast_to(np.asarray(low, dtype=np.float64), input_shape)
    span = np.broadcast_to(np.asarray(high, dtype=np.float64) - low, input_shape)
    rng = np.random.default_rng(seed)
    # Inside the range by a margin, so every finite-difference step stays valid input.
    x_np = rng.uniform(low + 0.1 * span, high - 0.1 * span, size=(1, *input_shape))
    x32 = torch.from_numpy(x_np.astype(np.float32)).to(device)
    try:
        with torch.no_grad(), fixed_noise(device):
            out32 = module(x32)
    except Exception as exc:
        return f"the differentiable module fails a forward pass ({_first_line(exc)})"
    if out32.dim() != 2 or out32.shape[0] != 1 or out32.shape[1] == 0:
        return f"the differentiable module returns shape {list(out32.shape)}, not (1, classes)"
    checked = _precise_copy(module, x32, out32, device)
    dtype = torch.float64 if checked is not None else torch.float32
    checked = checked if checked is not None else module
    weights = torch.from_numpy(rng.standard_normal(out32.shape[1])).to(device, dtype)

    def value(x: torch.Tensor) -> torch.Tensor:
        # A random mix of all logits, so every output's derivative is in the check; the same
        # noise draw in every evaluation (see the module doc).
        with fixed_noise(device):
            return (checked(x).to(dtype) * weights).sum()

    x = x32.to(dtype).requires_grad_(True)
    try:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(value(x), x)
    except Exception as exc:
        return f"its backward pass fails ({_first_line(exc)})"
    flat = grad.detach().reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        return "its backward pass gives non-finite gradients"
    order = torch.argsort(flat.abs(), descending=True).cpu().numpy()
    top = list(order[:TOP_COORDINATES])
    rest = order[TOP_COORDINATES:]
    picks = top + list(rng.choice(rest, size=min(RANDOM_COORDINATES, len(rest)), replace=False))
    scale = float(flat.abs().max())
    base = x.detach().reshape(-1)
    for index in picks:
        g = float(flat[index])
        errors = []
        for step in _STEPS[dtype]:
            h = float(step * span.reshape(-1)[index])
            plus, minus = base.clone(), base.clone()
            plus[index] += h
            minus[index] -= h
            with torch.no_grad():
                fd = float(value(plus.reshape(x.shape)) - value(minus.reshape(x.shape))) / (2 * h)
            error = abs(g - fd)
            if error <= _RTOL[dtype] * max(abs(g), abs(fd)) + _ATOL[dtype] * scale:
                break
            errors.append(f"{fd:.4g} at step {h:.0e}")
        else:
            coordinate = np.unravel_index(int(index), input_shape)
            return (
                f"its backward pass disagrees with finite differences at input "
                f"{tuple(int(c) for c in coordinate)}: gradient {g:.4g}, differences "
                f"{', '.join(errors)} ({'float64' if dtype == torch.float64 else 'float32'})"
            )
    return ""
