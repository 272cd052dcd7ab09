"""Paper-scale benchmark: a ResNet-18-style network on 64x64 inputs, a 16x16 grid (256 players),
200 neighbor pairs, ten orders, through a real server over loopback.

Run from the repository root: `python bench/bench_paper.py [--contexts-per-order 8] [--images 2]`.

What it measures, side by side in this one script on one onnxruntime model:
- (a) the raw batched forward rate of the model (onnxruntime, batch 256): the limit;
- (b) a sampled Profile with shared contexts and one with independent contexts (the paper's
  per-pair scheme, four forwards per Delta v sample), each with `--contexts-per-order` contexts per
  pair and order: forwards, wall time and the per-pair standard errors the server reports;
- from those, the forwards and wall time per image to reach the paper's per-pair standard error
  (100 contexts per pair and order in the per-pair scheme): standard errors shrink as
  1/sqrt(samples), so a scheme with mean per-pair variance V at F forwards needs F * V / V* for
  the target variance V*; the speed-up at equal standard error is the ratio of those;
- (c) an Attack with the perturbation profile (paired contexts for the clean and adversarial
  input): forwards and time per image;
- (d) peak memory of the server process at 50, 100 and 200 pairs (one fresh server each): flat
  in the number of pairs when the engine streams its contexts.

The network is ResNet-18's topology (7x7 stride-2 stem, max pool, four stages of two basic
blocks, global pool) at a quarter of its width, with random weights: CPU-sized, and the cost
of a profile depends on the forward's cost and the plan, not on what the weights learnt.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import interscope
from interscope_server.config import Settings
from interscope_server.server import BackgroundServer

GRID = (16, 16)
PAIRS = 200
RATIOS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
PAPER_CONTEXTS = 100
SIZE = 64
WIDTH = 16  # ResNet-18 has 64


class Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = WIDTH, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [Block(cin, cout, 1 if stage == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def build_repository(root: Path, **config_fields: object) -> Path:
    """A model repository under `root` holding the seeded network as resnet18-64/model.onnx."""
    torch.manual_seed(0)
    net = ResNet18().eval()
    folder = root / "resnet18-64"
    folder.mkdir(parents=True)
    torch.onnx.export(
        net,
        (torch.rand(1, 3, SIZE, SIZE),),
        str(folder / "model.onnx"),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    config = {"name": folder.name, "format": "onnx", "file": "model.onnx", **config_fields}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def raw_rate(model: Path, batch: int = 256, seconds: float = 5.0) -> float:
    """Forwards per second of the bare onnxruntime session at `batch`, one thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(size=(batch, 3, SIZE, SIZE)).astype(np.float32)
    session.run(None, {"input": x})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        done += batch
    return done / (time.perf_counter() - start)


def settings(repository: Path) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        metrics_host="127.0.0.1",
        model_repository=repository,
        intra_op_threads=1,
    )  # type: ignore[call-arg]


def profile_options(contexts: int, independent: bool, pairs: int = PAIRS) -> dict[str, Any]:
    return {
        "grid": GRID,
        "baseline": "zero",
        "estimator": "sampled",
        "pairs": "neighbors",
        "num_pairs": pairs,
        "ratios": RATIOS,
        "contexts_per_order": contexts,
        "context_sharing": "independent" if independent else "shared",
        "return_pairs": True,
        "seed": 1,
    }


def mean_variance(result: interscope.ProfileResult) -> float:
    """Mean over images, pairs and orders of the squared per-pair standard error."""
    stderrs = [p.interactions_stderr for p in result.profiles]
    assert all(s is not None for s in stderrs), "the server returned no per-pair errors"
    return float(np.mean([np.mean(np.square(s)) for s in stderrs]))


def sampled(
    client: interscope.Client, x: np.ndarray, y: np.ndarray, contexts: int, independent: bool
) -> tuple[float, int, float]:
    """(wall seconds, forwards, mean per-pair variance) of one Profile over the images."""
    start = time.perf_counter()
    result = client.profile(
        model="resnet18-64", x=x, label=y, **profile_options(contexts, independent)
    )
    wall = time.perf_counter() - start
    return wall, sum(p.forwards for p in result.profiles), mean_variance(result)


def peak_rss_kib() -> int:
    """This process's peak resident memory so far (VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def memory_child(repository: str, pairs: int, queue: Any) -> None:
    """One fresh in-process server: its peak RSS after a profile with `pairs` pairs."""
    before = peak_rss_kib()
    x = np.random.default_rng(2).uniform(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    options = profile_options(2, False, pairs=pairs)
    with (
        BackgroundServer(settings(Path(repository))) as server,
        interscope.Client(server.address) as client,
    ):
        client.profile(model="resnet18-64", x=x, label=[0], **options)
    queue.put((before, peak_rss_kib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--contexts-per-order", type=int, default=8, help="contexts per pair and order"
    )
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("INTERSCOPE_MODEL_HOSTS", "inline")
    root = Path(tempfile.mkdtemp(prefix="interscope-paper-"))
    folder = build_repository(root)
    rate = raw_rate(folder / "model.onnx")
    print(f"ResNet-18 topology at width {WIDTH}, {SIZE}x{SIZE} RGB, random weights; ONNX CPU")
    print(f"(a) raw onnxruntime forwards at batch 256, one thread: {rate:,.0f}/s")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.images, 3, SIZE, SIZE)).astype(np.float32)
    with BackgroundServer(settings(root)) as server, interscope.Client(server.address) as client:
        # Warm-up, which also gives the predicted classes the profiles explain.
        warm = client.profile(model="resnet18-64", x=x, **profile_options(2, False))
        y = np.array([p.prediction for p in warm.profiles])
        shared = sampled(client, x, y, args.contexts_per_order, independent=False)
        per_pair = sampled(client, x, y, args.contexts_per_order, independent=True)
        target = per_pair[2] * args.contexts_per_order / PAPER_CONTEXTS  # the paper's variance
        print(
            f"(b) {GRID[0]}x{GRID[1]} grid ({GRID[0] * GRID[1]} players), {PAIRS} neighbor "
            f"pairs, {len(RATIOS)} orders, {args.contexts_per_order} contexts per pair and order, "
            f"{args.images} images:"
        )
        needed = {}
        for name, (wall, forwards, variance) in (("shared", shared), ("per-pair", per_pair)):
            scale = variance / target
            per_image_f = forwards / args.images * scale
            per_image_s = wall / args.images * scale
            needed[name] = (per_image_f, per_image_s)
            print(
                f"    {name:9s}: {forwards / args.images:,.0f} forwards/image in "
                f"{wall / args.images:.1f} s/image ({forwards / wall:,.0f} forwards/s, "
                f"{forwards / wall / rate:.2f}x raw); per-pair s.e. "
                f"{np.sqrt(variance):.3g}; to the paper's s.e. ({np.sqrt(target):.3g}): "
                f"{per_image_f:,.0f} forwards, {per_image_s:.0f} s per image"
            )
        print(
            f"    shared vs the paper's per-pair scheme at equal per-pair s.e.: "
            f"{needed['per-pair'][0] / needed['shared'][0]:.2f}x fewer forwards, "
            f"{needed['per-pair'][1] / needed['shared'][1]:.2f}x faster; "
            f"raw-rate limit for the shared plan: {needed['shared'][0] / rate:.0f} s per image"
        )
        start = time.perf_counter()
        attack = client.attack(
            model="resnet18-64",
            x=x,
            y=y,
            attack="pgd",
            eps=8 / 255,
            steps=10,
            profile=profile_options(args.contexts_per_order, False),
        )
        wall = time.perf_counter() - start
        provenance = attack.summary.provenance
        assert provenance is not None
        print(
            f"(c) PGD-10 + perturbation profile (paired contexts, clean and adversarial): "
            f"{provenance.forwards / args.images:,.0f} forwards and "
            f"{wall / args.images:.1f} s per image"
        )
    if args.skip_memory:
        return
    print("(d) peak RSS of a fresh server process per pair count (2 contexts, one image):")
    context = multiprocessing.get_context("spawn")
    for pairs in (50, 100, 200):
        queue = context.Queue()
        child = context.Process(target=memory_child, args=(str(root), pairs, queue))
        child.start()
        before, after = queue.get()
        child.join()
        print(f"    {pairs:4d} pairs: {after / 1024:,.0f} MiB ({before / 1024:,.0f} at start)")


if __name__ == "__main__":
    main()
