"""Demo model repository: small digits CNNs (standard and PGD-trained) in ONNX and TorchScript."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from interscope_server.models.config import (
    CONFIG_FILE,
    ModelConfig,
    Normalization,
    OutputSpec,
    TensorSpec,
)

#: Models written by `build_demo_repository`, in the order they are written.
DEMO_MODEL_NAMES = ("digits-cnn", "digits-cnn-adv", "digits-cnn-ts", "digits-cnn-adv-ts")
#: Held-out images `x` (float32, N x 1 x 16 x 16, in [0, 1]) and labels `y` (int64).
TEST_DATA_FILE = "digits_test.npz"
#: Clean and PGD accuracies measured at build time, plus the build time.
METRICS_FILE = "demo_metrics.json"
#: Written last; holds the recipe hash, so a complete build with the same recipe is reused.
STAMP_FILE = ".demo-stamp"
_LOCK_FILE = ".demo-lock"

#: The raw inputs are in [0, 1]; the exported networks expect (x - 0.5) / 0.5, which the backend
#: applies from the config's `normalization`, so clients always send raw [0, 1] images.
DEMO_NORMALIZATION = Normalization(mean=[0.5], std=[0.5])


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo weights; its hash keys the build cache."""

    version: int = 1
    seed: int = 0
    image_size: int = 16
    test_fraction: float = 0.25
    epochs: int = 12
    adv_epochs: int = 14
    batch_size: int = 64
    learning_rate: float = 2e-3
    #: L-inf radius on the raw [0, 1] scale, for training and evaluation alike.
    epsilon: float = 0.1
    train_pgd_steps: int = 5
    train_pgd_step_size: float = 0.03
    eval_pgd_steps: int = 20
    eval_pgd_step_size: float = 0.01

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ModelMetrics:
    """Held-out accuracy of one demo network, clean and under L-inf PGD."""

    clean_accuracy: float
    pgd_accuracy: float


@dataclass(frozen=True)
class DemoMetrics:
    """What `build_demo_repository` measured; read back with `read_demo_metrics`."""

    standard: ModelMetrics
    adversarial: ModelMetrics
    epsilon: float
    pgd_steps: int
    pgd_step_size: float
    test_examples: int
    build_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DemoMetrics:
        return cls(
            standard=ModelMetrics(**data["standard"]),
            adversarial=ModelMetrics(**data["adversarial"]),
            epsilon=float(data["epsilon"]),
            pgd_steps=int(data["pgd_steps"]),
            pgd_step_size=float(data["pgd_step_size"]),
            test_examples=int(data["test_examples"]),
            build_seconds=float(data["build_seconds"]),
        )


def read_demo_metrics(root: Path) -> DemoMetrics:
    """The accuracies and build time stored by the last build of the repository at `root`."""
    return DemoMetrics.from_json(json.loads((Path(root) / METRICS_FILE).read_text()))


def build_demo_repository(
    root: Path, *, force: bool = False, recipe: DemoRecipe | None = None
) -> Path:
    """Write the four demo models, their configs and the held-out test data into `root`.

    Returns `root`. A second call with the same recipe returns at once (the stamp file matches);
    `force=True` rebuilds. Concurrent builders (several test sessions) serialise on a lock file.
    """
    recipe = recipe or DemoRecipe()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    digest = recipe.digest()
    if not force and _is_complete(root, digest):
        return root
    with _exclusive_lock(root / _LOCK_FILE):
        # Another process may have finished the build while we waited for the lock.
        if not force and _is_complete(root, digest):
            return root
        (root / STAMP_FILE).unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
            staging = Path(tmp)
            _build(staging, recipe)
            for entry in sorted(staging.iterdir()):
                target = root / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
        (root / STAMP_FILE).write_text(digest + "\n")
    return root


def _is_complete(root: Path, digest: str) -> bool:
    stamp = root / STAMP_FILE
    return (
        stamp.is_file()
        and stamp.read_text().strip() == digest
        and (root / TEST_DATA_FILE).is_file()
        and (root / METRICS_FILE).is_file()
        and all((root / name / CONFIG_FILE).is_file() for name in DEMO_MODEL_NAMES)
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent test sessions to guard against there.
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_digits_16(recipe: DemoRecipe) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits in [0, 1], upsampled to 16x16, split (seeded): x_tr, y_tr, x_te, y_te."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values are 0..16
    factor = recipe.image_size // 8
    # Nearest-neighbor upsampling keeps the values exactly in [0, 1] and is bit-reproducible.
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(recipe.seed).permutation(len(labels))
    n_test = round(len(labels) * recipe.test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _build(out: Path, recipe: DemoRecipe) -> None:
    import torch

    started = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_16(recipe)
    np.savez(out / TEST_DATA_FILE, x=x_te, y=y_te)

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    # One thread: a fixed reduction order makes the weights bit-identical across machines with
    # different core counts, and a tiny CNN gains little from more threads anyway.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        xe, ye = torch.from_numpy(x_te), torch.from_numpy(y_te)
        standard = _train(xt, yt, recipe, adversarial=False)
        adversarial = _train(xt, yt, recipe, adversarial=True)
        results = {
            "standard": _evaluate(standard, xe, ye, recipe),
            "adversarial": _evaluate(adversarial, xe, ye, recipe),
        }
        _export(out, "digits-cnn", standard, "onnx", recipe, "standard training")
        _export(out, "digits-cnn-ts", standard, "torchscript", recipe, "standard training")
        adv_note = f"PGD adversarial training, L-inf eps {recipe.epsilon} on [0, 1]"
        _export(out, "digits-cnn-adv", adversarial, "onnx", recipe, adv_note)
        _export(out, "digits-cnn-adv-ts", adversarial, "torchscript", recipe, adv_note)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    metrics = DemoMetrics(
        standard=results["standard"],
        adversarial=results["adversarial"],
        epsilon=recipe.epsilon,
        pgd_steps=recipe.eval_pgd_steps,
        pgd_step_size=recipe.eval_pgd_step_size,
        test_examples=len(y_te),
        build_seconds=round(time.perf_counter() - started, 2),
    )
    (out / METRICS_FILE).write_text(json.dumps(metrics.to_json(), indent=2) + "\n")


def _network() -> Any:
    """The demo CNN; it sees normalised inputs ((x - 0.5) / 0.5), see DEMO_NORMALIZATION."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _normalise(x: Any) -> Any:
    return (x - DEMO_NORMALIZATION.mean[0]) / DEMO_NORMALIZATION.std[0]


def _pgd(net: Any, x: Any, y: Any, eps: float, step: float, steps: int, gen: Any) -> Any:
    """L-inf PGD with a random start, on the raw [0, 1] scale; returns the adversarial batch."""
    import torch
    import torch.nn.functional as F

    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    adv = (x + delta).clamp(0.0, 1.0)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(net(_normalise(adv)), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
    return adv.detach()


def _train(x: Any, y: Any, recipe: DemoRecipe, *, adversarial: bool) -> Any:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(recipe.seed + (1 if adversarial else 0))
    gen = torch.Generator().manual_seed(recipe.seed + 100)
    net = _network()
    epochs = recipe.adv_epochs if adversarial else recipe.epochs
    opt = torch.optim.Adam(net.parameters(), lr=recipe.learning_rate)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe.learning_rate,
        total_steps=epochs * ((len(y) + recipe.batch_size - 1) // recipe.batch_size),
    )
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        # Ramp eps up over the first epochs: PGD training from scratch at full eps stalls.
        eps = recipe.epsilon * min(1.0, (epoch + 1) / max(1, epochs // 3))
        for start in range(0, len(y), recipe.batch_size):
            idx = perm[start : start + recipe.batch_size]
            xb, yb = x[idx], y[idx]
            if adversarial:
                net.eval()
                xb = _pgd(net, xb, yb, eps, recipe.train_pgd_step_size, recipe.train_pgd_steps, gen)
            net.train()
            loss = F.cross_entropy(net(_normalise(xb)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def _evaluate(net: Any, x: Any, y: Any, recipe: DemoRecipe) -> ModelMetrics:
    import torch

    gen = torch.Generator().manual_seed(recipe.seed + 200)
    with torch.no_grad():
        clean = (net(_normalise(x)).argmax(1) == y).float().mean().item()
    adv = _pgd(net, x, y, recipe.epsilon, recipe.eval_pgd_step_size, recipe.eval_pgd_steps, gen)
    with torch.no_grad():
        robust = (net(_normalise(adv)).argmax(1) == y).float().mean().item()
    return ModelMetrics(clean_accuracy=round(clean, 4), pgd_accuracy=round(robust, 4))


def _export(out: Path, name: str, net: Any, fmt: str, recipe: DemoRecipe, note: str) -> None:
    import torch

    folder = out / name
    folder.mkdir()
    example = torch.zeros(1, 1, recipe.image_size, recipe.image_size)
    with warnings.catch_warnings():
        # Both exporters are deprecated in torch 2.9+ in favour of torch.export; they still
        # produce the formats the service loads, and dynamo export would need onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "onnx":
            file = "model.onnx"
            torch.onnx.export(
                net,
                (example,),
                str(folder / file),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
            )
        else:
            file = "model.pt"
            traced = torch.jit.trace(net, example)
            torch.jit.save(traced, str(folder / file))
    config = ModelConfig(
        name=name,
        format="onnx" if fmt == "onnx" else "torchscript",
        file=file,
        input=TensorSpec(name="input", shape=[1, recipe.image_size, recipe.image_size]),
        output=OutputSpec(name="logits", kind="logits"),
        classes=[str(d) for d in range(10)],
        value_range=(0.0, 1.0),
        normalization=DEMO_NORMALIZATION,
        max_batch_size=1024,
        description=f"Digits CNN (scikit-learn load_digits, 16x16), {note}.",
    )
    (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
