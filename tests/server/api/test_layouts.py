"""Channels-last models: a (N, H, W, C) ONNX export profiles and attacks exactly like the same
network taking (N, C, H, W), on the transposed input, through a real server and the SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import interscope
from interscope_server.models.config import CONFIG_FILE, ModelConfig, Normalization, TensorSpec
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings
from tests.server.models.torch_exports import export_onnx

H, W, C = 8, 8, 3
MEAN, STD = [0.2, 0.5, 0.7], [0.5, 0.25, 1.0]


class _Net(torch.nn.Module):
    """A tiny CNN on (N, 3, 8, 8); asymmetric in its channels so a wrong axis shows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(C, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * H * W, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class _ChannelsLast(torch.nn.Module):
    """The same network taking (N, H, W, C), as a Keras/TF-style export would."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x.permute(0, 3, 1, 2))
        return out


def _export(folder: Path, net: torch.nn.Module, shape: list[int]) -> None:
    folder.mkdir()
    (folder / "model.onnx").write_bytes(export_onnx(net, tuple(shape), dynamo=False, opset=17))
    config = ModelConfig(
        name=folder.name,
        format="onnx",
        file="model.onnx",
        # No layout field: (3, 8, 8) and (8, 8, 3) are unambiguous, so both are inferred.
        input=TensorSpec(name="input", shape=shape),
        classes=["a", "b", "c"],
        normalization=Normalization(mean=MEAN, std=STD),
    )
    (folder / CONFIG_FILE).write_text(config.model_dump_json())


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return _Net().eval()


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory, net: torch.nn.Module) -> Iterator[str]:
    repo = tmp_path_factory.mktemp("layouts")
    _export(repo / "nchw", net, [C, H, W])
    _export(repo / "nhwc", _ChannelsLast(net), [H, W, C])
    settings = server_settings(repo, load_models=["nchw", "nhwc"], metrics_port=None)
    with BackgroundServer(settings) as srv:
        yield srv.address


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] with structure, so blurs and windows matter."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(6, C, H, W)).astype(np.float32)
    x[:, :, : H // 2] *= 0.3
    return x


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def test_metadata_reports_the_inferred_layouts(address: str) -> None:
    with interscope.Client(address) as client:
        assert client.get_model("nchw").input.layout == "NCHW"
        assert client.get_model("nhwc").input.layout == "NHWC"


def _profiles(address: str, x: np.ndarray, **options: Any) -> tuple[Any, Any]:
    with interscope.Client(address) as client:
        first = client.profile(model="nchw", x=x, label=[0] * len(x), options=options)
        second = client.profile(model="nhwc", x=_nhwc(x), label=[0] * len(x), options=options)
    return first, second


def _same(a: Any, b: Any) -> None:
    for pa, pb in zip(a.profiles, b.profiles, strict=True):
        assert pa.value_full == pytest.approx(pb.value_full, rel=1e-5, abs=1e-6)
        assert pa.value_empty == pytest.approx(pb.value_empty, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(pa.interactions, pb.interactions, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(pa.pairs, pb.pairs)


def test_exact_grid_profile_with_channel_means_matches_the_nchw_network(
    address: str, net: torch.nn.Module, images: np.ndarray
) -> None:
    x = images[:1]
    options = {"grid": (4, 4), "baseline": "mean", "estimator": "exact", "return_pairs": True}
    nchw, nhwc = _profiles(address, x, **options)
    _same(nchw, nhwc)
    profile = nhwc.profiles[0]
    assert profile.n_players == 16 and profile.estimator == "exact"
    # v(N) and v(0) from the network itself: normalised per channel, log-softmax of class 0.
    mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(STD, dtype=np.float32)[:, None, None]
    channel_means = x[0].mean(axis=(1, 2), keepdims=True)
    empty = np.broadcast_to(channel_means, x[0].shape)
    with torch.no_grad():
        logits = net(torch.from_numpy((np.stack([x[0], empty]) - mean) / std))
        logp = torch.log_softmax(logits.double(), dim=1)[:, 0].numpy()
    assert profile.value_full == pytest.approx(logp[0], abs=1e-5)
    assert profile.value_empty == pytest.approx(logp[1], abs=1e-5)
    assert abs(profile.value_full - profile.value_empty) > 1e-3  # the baseline changed v


@pytest.mark.parametrize("baseline", ["blur", "zero"])
def test_sampled_grid_profiles_match_for_other_baselines(
    address: str, images: np.ndarray, baseline: str
) -> None:
    options = {
        "grid": (4, 4),
        "baseline": baseline,
        "estimator": "sampled",
        "contexts_per_order": 8,
        "ratios": [0.0, 0.5, 1.0],
        "return_pairs": True,
        "seed": 3,
    }
    nchw, nhwc = _profiles(address, images[:2], **options)
    _same(nchw, nhwc)


def test_a_two_dimensional_mask_covers_every_channel_of_a_pixel(
    address: str, images: np.ndarray
) -> None:
    mask = (np.arange(H)[:, None] // 4 * 2 + np.arange(W)[None, :] // 4).astype(np.int64)
    options = {"mask": mask, "estimator": "exact", "return_pairs": True, "baseline": 0.5}
    nchw, nhwc = _profiles(address, images[:2], **options)
    assert nhwc.profiles[0].n_players == 4
    _same(nchw, nhwc)


@pytest.mark.parametrize(
    ("attack", "norm", "eps"),
    [("square", "linf", 0.1), ("square", "l2", 1.0), ("simba", "linf", 0.1)],
)
def test_black_box_attacks_move_the_same_pixels_in_either_layout(
    address: str, images: np.ndarray, attack: str, norm: str, eps: float
) -> None:
    y = np.zeros(len(images), dtype=np.int64)
    options = {"attack": attack, "norm": norm, "eps": eps, "query_budget": 60, "seed": 5}
    with interscope.Client(address) as client:
        nchw = client.attack(model="nchw", x=images, y=y, **options)
        nhwc = client.attack(model="nhwc", x=_nhwc(images), y=y, **options)
    for a, b in zip(nchw.examples, nhwc.examples, strict=True):
        assert a.adversarial is not None and b.adversarial is not None
        # Square's windows are drawn in the NCHW view of either layout (SimBA walks the model's
        # own flattened coordinates, so only its constraints are compared). L-inf lands on the
        # same vertices exactly; L2 rescales by norms whose float32 sums run in another memory
        # order, so those agree to rounding.
        if attack == "square" and norm == "linf":
            np.testing.assert_array_equal(_nhwc(a.adversarial[None])[0], b.adversarial)
            assert a.queries == b.queries
        elif attack == "square":
            np.testing.assert_allclose(_nhwc(a.adversarial[None])[0], b.adversarial, atol=1e-5)
        if attack == "square":
            assert a.success == b.success
        delta = b.adversarial.astype(np.float64) - _nhwc(images[a.input_index][None])[0]
        size = np.abs(delta).max() if norm == "linf" else np.sqrt((delta**2).sum())
        assert size <= eps
        assert b.adversarial.min() >= 0.0 and b.adversarial.max() <= 1.0
    assert any(e.queries > 1 for e in nhwc.examples)


def test_white_box_attacks_take_the_same_steps_in_either_layout(
    address: str, images: np.ndarray
) -> None:
    """PGD without a random start is deterministic: on the NHWC export its gradients are the
    NCHW network's, transposed, so it lands on the same (transposed) adversarial examples."""
    y = np.zeros(len(images), dtype=np.int64)
    options = {"attack": "pgd", "eps": 0.1, "steps": 5, "random_start": False}
    with interscope.Client(address) as client:
        nchw = client.attack(model="nchw", x=images, y=y, **options)
        nhwc = client.attack(model="nhwc", x=_nhwc(images), y=y, **options)
    assert nchw.adversarial is not None and nhwc.adversarial is not None
    moved = _nhwc(nchw.adversarial)
    # Float32 sums in another memory order can flip the sign of a gradient entry near zero,
    # moving that one coordinate by a step: nearly every coordinate must agree exactly.
    same = np.isclose(moved, nhwc.adversarial, atol=1e-5)
    assert same.mean() > 0.99, same.mean()
    assert [e.success for e in nchw.examples] == [e.success for e in nhwc.examples]
    assert np.abs(nhwc.adversarial - _nhwc(images)).max() <= 0.1 + 1e-6
