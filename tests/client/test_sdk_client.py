"""Every SDK call against a real server on a free port, and errors as the SDK's exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import interscope
from interscope_server.config import Settings
from interscope_server.server import BackgroundServer


def test_models_and_health(server: BackgroundServer, demo_repository: Path) -> None:
    with interscope.Client(server.address, timeout=30) as client:
        names = [m.name for m in client.list_models()]
        assert "digits-cnn" in names
        info = client.get_model("digits-cnn")
        assert info.state == "ready" and info.input.shape == (1, 16, 16)
        assert info.gradients_available and len(info.classes) == 10
        assert info.to_dict()["input"]["shape"] == [1, 16, 16]
        assert client.health() == "SERVING"
        loaded = client.load_model("digits-cnn-ts")
        assert loaded.format == "torchscript" and loaded.state == "ready"
        client.unload_model("digits-cnn-ts")
        assert client.get_model("digits-cnn-ts").state != "ready"
        with pytest.raises(interscope.NotFoundError):
            client.get_model("no-such-model")


def test_profile_exact_pairwise_and_stream(
    server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    with interscope.Client(server.address, timeout=60) as client:
        result = client.profile(
            model="digits-cnn",
            x=x[:1],
            label=y[:1],
            grid=(3, 3),
            estimator="exact",
            return_pairs=True,
        )
        assert result.n_players == 9
        np.testing.assert_array_equal(result.orders, np.arange(8))
        assert result.pairs is not None and result.pairs.shape == (36, 2)
        assert (result.pairs[:, 0] < result.pairs[:, 1]).all()
        assert result.interactions is not None and result.interactions.shape == (8, 36)
        np.testing.assert_allclose(result.mean, result.interactions.mean(axis=1), atol=1e-9)
        np.testing.assert_allclose(
            result.mean_abs, np.abs(result.interactions).mean(axis=1), atol=1e-9
        )
        assert result.shapley_interaction is not None
        assert result.shapley_interaction.shape == (9, 9)
        assert result.provenance is not None and result.provenance.model == "digits-cnn"
        assert set(result.to_dict()) >= {"n_players", "orders", "mean", "mean_abs", "pairs"}
        one = client.profile(
            model="digits-cnn", x=x[0], label=int(y[0]), grid=(3, 3), estimator="exact"
        )  # one example, no batch dimension
        np.testing.assert_allclose(one.mean_abs, result.mean_abs, rtol=1e-6)
        events = list(client.profile_stream(model="digits-cnn", x=x[:2], label=y[:2], grid=(2, 2)))
        assert isinstance(events[-1], interscope.ProfileResult)
        assert sum(isinstance(e, interscope.InteractionProfile) for e in events) == 2


def test_attack_and_stream(server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    with interscope.Client(server.address, timeout=60) as client:
        result = client.attack(
            model="digits-cnn", x=x[:6], y=y[:6], eps=0.1, steps=5, step_size=0.04
        )
        assert result.adversarial is not None and result.adversarial.shape == (6, 1, 16, 16)
        assert np.abs(result.adversarial - x[:6]).max() <= 0.1 + 1e-5
        assert result.success.shape == (6,)
        assert result.success_rate == pytest.approx(result.success.mean())
        assert 0 <= result.robust_accuracy <= result.clean_accuracy <= 1
        events = list(
            client.attack_stream(
                model="digits-cnn", x=x[:2], y=y[:2], eps=0.1, attack="fgsm", omit_adversarial=True
            )
        )
        assert isinstance(events[-1], interscope.AttackResult)
        assert events[-1].adversarial is None and len(events[-1].examples) == 2


def test_errors_arrive_as_sdk_exceptions(
    server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    with interscope.Client(server.address, timeout=30) as client:
        with pytest.raises(interscope.NotFoundError) as caught:
            client.profile(model="nope", x=x[:1], label=y[:1], grid=(2, 2))
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        with pytest.raises(interscope.InvalidArgumentError):
            client.profile(model="digits-cnn", x=x[:1], label=y[:1], grid=(99, 99))
        with pytest.raises(interscope.InvalidArgumentError):
            client.attack(model="digits-cnn", x=x[:1], y=[42], eps=0.1)
        with pytest.raises(interscope.DeadlineExceededError):
            client.profile(
                model="digits-cnn",
                x=x[:8],
                label=y[:8],
                grid=(4, 4),
                estimator="exact",
                timeout=0.05,
            )
    with (
        interscope.Client("127.0.0.1:1", timeout=2, retries=0) as client,
        pytest.raises(interscope.UnavailableError),
    ):
        client.list_models()


def test_token_auth(demo_repository: Path, make_settings: Callable[..., Settings]) -> None:
    with BackgroundServer(make_settings(demo_repository, auth_tokens=["s3cret"])) as srv:
        with (
            interscope.Client(srv.address, timeout=10) as anonymous,
            pytest.raises(interscope.UnauthenticatedError),
        ):
            anonymous.list_models()
        with interscope.Client(srv.address, token="s3cret", timeout=10) as client:
            assert [m.name for m in client.list_models()]


def test_async_client(server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits

    async def main() -> None:
        async with interscope.AsyncClient(server.address, timeout=60) as client:
            assert "digits-cnn" in [m.name for m in await client.list_models()]
            assert await client.health() == "SERVING"
            profile = await client.profile(
                model="digits-cnn", x=x[:1], label=y[:1], grid=(2, 2), estimator="exact"
            )
            assert profile.n_players == 4
            attack = await client.attack(model="digits-cnn", x=x[:2], y=y[:2], eps=0.1, steps=2)
            assert len(attack.examples) == 2
            report = await client.audit(
                model="digits-cnn",
                x=x[:3],
                y=y[:3],
                attack={"eps": 0.1, "steps": 2},
                profile={"grid": (2, 2), "estimator": "exact"},
            )
            assert [s.id for s in report.samples] == ["0", "1", "2"]
            with pytest.raises(interscope.NotFoundError):
                await client.get_model("nope")

    asyncio.run(main())


def test_autoattack_and_the_dlr_loss_through_the_sdk(
    server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    with interscope.Client(server.address, timeout=120) as client:
        auto = client.attack(
            model="digits-cnn", x=x[:4], y=y[:4], attack="autoattack", eps=0.2, steps=3,
            query_budget=20,
        )  # fmt: skip
        assert auto.robust_accuracy <= auto.clean_accuracy
        assert auto.adversarial is not None
        assert np.abs(auto.adversarial - x[:4]).max() <= 0.2 + 1e-6
        dlr = client.attack(
            model="digits-cnn", x=x[:4], y=y[:4], attack="apgd", loss="dlr", eps=0.2, steps=5
        )
        assert dlr.robust_accuracy <= dlr.clean_accuracy
        with pytest.raises(interscope.InvalidArgumentError, match="does not take a loss"):
            client.attack(model="digits-cnn", x=x[:1], y=y[:1], attack="pgd", loss="dlr")
        with pytest.raises(ValueError, match="unknown loss"):
            client.attack(model="digits-cnn", x=x[:1], y=y[:1], attack="apgd", loss="hinge")
