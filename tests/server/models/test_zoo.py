"""The real-model zoo end to end over gRPC: each model loaded from a repository and by upload
with a minimal config.json, exact profile values against the original model, attacks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import interscope
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings
from tests.zoo import ZooModel

#: Four players: a 2x2 grid on images, four blocks of 16 features on tabular inputs.
FEATURE_GROUPS = [list(range(16 * g, 16 * (g + 1))) for g in range(4)]
NAMES = [
    "sk-logreg",
    "sk-forest",
    "sk-mlp-zipmap",
    "sk-mlp-tensor",
    "xgboost",
    "lightgbm",
    "softmax-mlp-classic",
    "softmax-mlp-dynamo",
    "ts-tuple",
    "ts-dict",
    "uint8-cnn",
    "fixed-batch-1",
    "two-output",
]


@pytest.fixture(scope="module")
def zoo_server(
    zoo: dict[str, ZooModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("zoo-repository")
    for model in zoo.values():
        model.write(root)
    # The zoo is also uploaded (each model once by bytes and its config.json).
    with BackgroundServer(server_settings(root, allow_uploads=True)) as server:
        yield server


@pytest.fixture(scope="module")
def client(zoo_server: BackgroundServer) -> Iterator[interscope.Client]:
    with interscope.Client(zoo_server.address) as c:
        yield c


def _players(model: ZooModel) -> dict[str, object]:
    return {"grid": (2, 2)} if model.image else {"features": FEATURE_GROUPS}


def _check_profile(client: interscope.Client, name: str, model: ZooModel) -> None:
    """v(N) = log p(y | x) and v(empty) = log p(y | baseline), from the original model."""
    result = client.profile(
        model=name,
        x=model.x,
        label=model.y,
        baseline="zero",
        value="log-prob",
        estimator="exact",
        **_players(model),
    )
    p_full = model.probabilities(model.x)[np.arange(len(model.y)), model.y]
    p_empty = model.probabilities(np.zeros_like(model.x))[np.arange(len(model.y)), model.y]
    got_full = np.array([p.value_full for p in result.profiles])
    got_empty = np.array([p.value_empty for p in result.profiles])
    np.testing.assert_allclose(got_full, np.log(p_full), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(
        got_empty, np.log(np.maximum(p_empty, 1.1754944e-38)), atol=2e-4, rtol=1e-4
    )
    # The probability value function reads p itself.
    prob = client.profile(
        model=name,
        x=model.x[:1],
        label=model.y[:1],
        baseline="zero",
        value="prob",
        estimator="exact",
        **_players(model),
    )
    np.testing.assert_allclose(prob.profiles[0].value_full, p_full[0], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_repository_model_loads_with_minimal_config_and_profiles_exactly(
    client: interscope.Client, zoo: dict[str, ZooModel], name: str
) -> None:
    model = zoo[name]
    info = client.get_model(name)
    assert info.state == "ready", info.state_message
    assert info.output_kind == model.kind
    assert list(info.input.shape) == list(model.x.shape[1:])
    assert len(info.classes) == 10
    assert info.value_range == model.value_range
    _check_profile(client, name, model)


@pytest.mark.parametrize("name", NAMES)
def test_uploaded_model_with_its_config_json_matches(
    client: interscope.Client, zoo: dict[str, ZooModel], name: str
) -> None:
    model = zoo[name]
    upload = f"{name}-up"
    config = {k: v for k, v in model.config_json().items() if k not in ("name", "file")}
    info = client.load_model(upload, model_bytes=model.model_bytes, config=json.dumps(config))
    try:
        assert info.state == "ready" and info.output_kind == model.kind
        _check_profile(client, upload, model)
    finally:
        client.unload_model(upload)


@pytest.mark.parametrize("name", NAMES)
def test_attacks(client: interscope.Client, zoo: dict[str, ZooModel], name: str) -> None:
    """A white-box attack wherever gradients are offered; square on every image model."""
    model = zoo[name]
    info = client.get_model(name)
    low, high = model.value_range
    eps = 0.3 * (high - low)
    if info.gradients_available:
        result = client.attack(
            model=name, x=model.x, y=model.y, attack="pgd", norm="linf", eps=eps, steps=10
        )
        _check_attack(model, result, eps)
    else:
        with pytest.raises(interscope.FailedPreconditionError, match="square"):
            client.attack(model=name, x=model.x, y=model.y, attack="pgd", eps=eps)
    if model.image:
        result = client.attack(
            model=name, x=model.x, y=model.y, attack="square", eps=eps, query_budget=200
        )
        _check_attack(model, result, eps)


def _check_attack(model: ZooModel, result: interscope.AttackResult, eps: float) -> None:
    adv = result.adversarial
    assert adv is not None
    assert np.abs(adv - model.x).max() <= eps + 1e-5
    # Predictions reported for the adversarial examples are the original model's own.
    predicted = model.probabilities(adv).argmax(axis=1)
    assert [e.adversarial_prediction for e in result.examples] == predicted.tolist()
    assert result.success_rate > 0
    if model.value_range == (0.0, 255.0):  # UINT8: examples lie on the model's grid
        np.testing.assert_array_equal(adv, np.rint(adv))


def test_logit_value_is_refused_for_a_probability_model(
    client: interscope.Client, zoo: dict[str, ZooModel]
) -> None:
    model = zoo["softmax-mlp-classic"]
    with pytest.raises(interscope.FailedPreconditionError, match="use log_prob, log_odds or prob"):
        client.profile(
            model=model.name,
            x=model.x[:1],
            label=model.y[:1],
            grid=(2, 2),
            value="logit",
            estimator="exact",
        )
    # The same value function on a logits model is the raw logit z_y.
    logits_model = zoo["two-output"]
    result = client.profile(
        model=logits_model.name,
        x=logits_model.x[:1],
        label=logits_model.y[:1],
        grid=(2, 2),
        value="logit",
        estimator="exact",
    )
    import torch

    from tests.zoo import TupleOutput, load_data, trained_cnn

    with torch.no_grad():
        z = TupleOutput(trained_cnn(load_data()))(torch.from_numpy(logits_model.x[:1]))[1]
    np.testing.assert_allclose(
        result.profiles[0].value_full, float(z[0, logits_model.y[0]]), atol=1e-4
    )


def test_cli_uploads_a_repository_config_json_as_it_is(
    zoo_server: BackgroundServer,
    zoo: dict[str, ZooModel],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from interscope.cli import main

    folder = zoo["sk-forest"].write(tmp_path)  # config.json names the model "sk-forest"
    argv = ["models", "load", "sk-forest", "--address", zoo_server.address, "--replace"]
    argv += ["--file", str(folder / "model.onnx"), "--config", str(folder / "config.json")]
    assert main([*argv, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "ready" and info["output_kind"] == "probabilities"
    assert info["classes"] == [str(c) for c in range(10)]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "other", "format": "onnx"}))
    argv[-1] = str(wrong)
    assert main(argv) == 1
    assert "names the model 'other'" in capsys.readouterr().err
