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


def _player_masks(model: ZooModel) -> np.ndarray:
    """(4, *input_shape) booleans: which input elements each of the four players owns."""
    shape = model.x.shape[1:]
    masks = np.zeros((4, *shape), dtype=bool)
    if model.image:  # a 2x2 grid over the last two axes, cells numbered row by row
        h, w = shape[-2] // 2, shape[-1] // 2
        for r in range(2):
            for c in range(2):
                masks[r * 2 + c, ..., r * h : (r + 1) * h, c * w : (c + 1) * w] = True
    else:
        for g, group in enumerate(FEATURE_GROUPS):
            masks[g].reshape(-1)[group] = True
    return masks


def _reference_values(model: ZooModel) -> np.ndarray:
    """v(S) = log p(y | x_S, zero elsewhere) for every coalition S (bit k: player k), (B, 16),
    from the original model."""
    masks = _player_masks(model)
    rows = []
    for s in range(16):
        keep = np.zeros(model.x.shape[1:], dtype=bool)
        for k in range(4):
            if s >> k & 1:
                keep |= masks[k]
        p = model.probabilities(np.where(keep, model.x, 0.0).astype(np.float32))
        rows.append(np.log(np.maximum(p[np.arange(len(model.y)), model.y], 1.1754944e-38)))
    return np.stack(rows, axis=1)


def _reference_interactions(v: np.ndarray, i: int, j: int, m: int) -> np.ndarray:
    """The paper's I^(m)(i, j): the mean over contexts S of size m, S in N \\ {i, j}, of
    v(S + i + j) - v(S + i) - v(S + j) + v(S)."""
    terms = []
    for s in range(16):
        if s & (1 << i | 1 << j) or bin(s).count("1") != m:
            continue  # S must leave out i and j and have m players
        terms.append(v[:, s | 1 << i | 1 << j] - v[:, s | 1 << i] - v[:, s | 1 << j] + v[:, s])
    return np.mean(terms, axis=0)


def _check_profile(client: interscope.Client, name: str, model: ZooModel) -> None:
    """Exact 4-player profiles against every v(S) computed from the original model: v(N) =
    log p(y | x), v(empty), every pairwise I^(m)(i, j) and the Shapley values."""
    result = client.profile(
        model=name,
        x=model.x,
        label=model.y,
        baseline="zero",
        value="log-prob",
        estimator="exact",
        orders=[0, 1, 2],
        return_pairs=True,
        **_players(model),
    )
    v = _reference_values(model)
    got_full = np.array([p.value_full for p in result.profiles])
    got_empty = np.array([p.value_empty for p in result.profiles])
    np.testing.assert_allclose(got_full, v[:, 15], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got_empty, v[:, 0], atol=2e-4, rtol=1e-4)
    weights = {0: 1 / 4, 1: 1 / 12, 2: 1 / 12, 3: 1 / 4}  # |S|! (n - |S| - 1)! / n!
    for b, profile in enumerate(result.profiles):
        assert profile.pairs is not None and profile.interactions is not None  # (orders, pairs)
        for q, (i, j) in enumerate(profile.pairs.tolist()):
            for o, m in enumerate(profile.orders.tolist()):
                expected = _reference_interactions(v, i, j, m)[b]
                assert profile.interactions[o, q] == pytest.approx(expected, abs=5e-4), (i, j, m)
        assert profile.shapley_values is not None
        for k in range(4):
            phi = sum(
                weights[bin(s).count("1")] * (v[b, s | 1 << k] - v[b, s])
                for s in range(16)
                if not s >> k & 1
            )
            assert profile.shapley_values[k] == pytest.approx(phi, abs=5e-4), k
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
    np.testing.assert_allclose(prob.profiles[0].value_full, np.exp(v[0, 15]), atol=1e-5)


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
    """A white-box attack wherever gradients are offered; both black-box attacks on every model."""
    model = zoo[name]
    info = client.get_model(name)
    assert info.gradients_available == model.differentiable, info.gradients_message
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
    # Black-box attacks run on every model: Square's windows cover an image's pixels or a
    # vector's features; SimBA searches one coordinate at a time.
    for attack in ("square", "simba"):
        result = client.attack(
            model=name, x=model.x, y=model.y, attack=attack, eps=eps, query_budget=200
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


@pytest.mark.parametrize("name", NAMES)
def test_cli_audit(
    zoo_server: BackgroundServer,
    client: interscope.Client,
    zoo: dict[str, ZooModel],
    name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`interscope audit` on every family: a white-box attack where the model has gradients,
    SimBA where it has none; exact 4-player profiles of clean and adversarial inputs."""
    from interscope.cli import main

    model = zoo[name]
    low, high = model.value_range
    data = tmp_path / "data.npz"
    np.savez(data, x=model.x, y=model.y)
    white_box = client.get_model(name).gradients_available
    players = ["--grid", "2x2"] if model.image else ["--features", "0-15;16-31;32-47;48-63"]
    argv = ["audit", "--address", zoo_server.address, "--model", name, "--data", str(data)]
    argv += ["--attack", "pgd" if white_box else "simba", "--eps", str(0.3 * (high - low))]
    argv += ["--steps", "5", "--query-budget", "100", "--estimator", "exact", "--json"]
    argv += ["--baseline", "zero", *players, "--out", str(tmp_path / "out"), "--no-plots"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["n_samples"] == len(model.y) and report["n_failed"] == 0
    assert report["n_players"] == 4
    clean = model.probabilities(model.x).argmax(axis=1) == model.y
    assert report["clean_accuracy"] == pytest.approx(clean.mean())
    assert report["robust_accuracy"] <= report["clean_accuracy"]
    assert (tmp_path / "out" / "report.json").exists()
