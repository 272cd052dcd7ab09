"""Tabular models (a torch MLP and gradient-boosted trees) on synthetic data with per-feature
ranges: feature-player profiles checked exactly against onnxruntime, Square over features and
SimBA inside every feature's range and eps ball, trees refused white-box, a CLI audit."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.ensemble import GradientBoostingClassifier

import interscope
from interscope.cli import main
from interscope_server.models.config import CONFIG_FILE, ModelConfig, Normalization, TensorSpec
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings
from tests.server.models.torch_exports import export_onnx

N_FEATURES = 6
NAMES = ["age", "income", "height", "score", "debt", "visits"]
#: Features on very different scales, as real tables have them.
SCALES = np.array([10.0, 1000.0, 0.1, 1.0, 100.0, 3.0])
OFFSETS = np.array([40.0, 5000.0, 1.7, 0.0, 50.0, 10.0])
#: Gradient-boosted trees: scikit-learn via skl2onnx, LightGBM and XGBoost via onnxmltools.
TREES = ["boosted", "lightgbm", "xgboost"]


@pytest.fixture(scope="module")
def table() -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    x, y = make_classification(
        n_samples=400,
        n_features=N_FEATURES,
        n_informative=4,
        n_redundant=1,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=0,
    )
    x = (x * SCALES + OFFSETS).astype(np.float32)
    low, high = x.min(axis=0), x.max(axis=0)
    pad = 0.1 * (high - low)
    ranges = [(float(a), float(b)) for a, b in zip(low - pad, high + pad, strict=True)]
    return x, y.astype(np.int64), ranges


def _write_config(folder: Path, ranges: list[tuple[float, float]], **fields: Any) -> None:
    config = ModelConfig(
        name=folder.name,
        format="onnx",
        file="model.onnx",
        input=TensorSpec(name="input", shape=[N_FEATURES]),  # layout features, inferred
        classes=["a", "b", "c"],
        value_range=ranges,
        feature_names=NAMES,
        **fields,
    )
    (folder / CONFIG_FILE).write_text(config.model_dump_json())


def _mlp(folder: Path, x: np.ndarray, y: np.ndarray, ranges: list[tuple[float, float]]) -> None:
    mean, std = x.mean(axis=0), x.std(axis=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    )
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        optimiser.step()
    net.eval()
    folder.mkdir()
    (folder / "model.onnx").write_bytes(export_onnx(net, (N_FEATURES,), dynamo=False, opset=17))
    # The network was trained on standardised features: the server standardises per feature.
    norm = Normalization(mean=mean.tolist(), std=std.tolist())
    _write_config(folder, ranges, normalization=norm)


def _boosted(folder: Path, x: np.ndarray, y: np.ndarray, ranges: list[tuple[float, float]]) -> None:
    from skl2onnx import to_onnx

    model = GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0).fit(x, y)
    onx = to_onnx(
        model,
        x[:1],
        options={id(model): {"zipmap": False}},
        initial_types=None,
        target_opset=17,
    )
    onx.graph.input[0].name = "input"
    for node in onx.graph.node:
        node.input[:] = ["input" if i == "X" else i for i in node.input]
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onx.SerializeToString())
    _write_config(folder, ranges, output_name="probabilities")


def _onnxmltools(
    folder: Path, kind: str, x: np.ndarray, y: np.ndarray, ranges: list[tuple[float, float]]
) -> None:
    import lightgbm
    import xgboost
    from onnxmltools import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    inputs = [("input", FloatTensorType([None, N_FEATURES]))]
    if kind == "lightgbm":
        model = lightgbm.LGBMClassifier(n_estimators=30, verbose=-1, random_state=0).fit(x, y)
        onx = convert_lightgbm(model, initial_types=inputs, zipmap=False, target_opset=15)
    else:
        booster = xgboost.XGBClassifier(n_estimators=30, max_depth=3, random_state=0).fit(x, y)
        onx = convert_xgboost(booster, initial_types=inputs, target_opset=15)
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onx.SerializeToString())
    _write_config(folder, ranges, output_name="probabilities")


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory,
    table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]],
) -> Path:
    x, y, ranges = table
    repo = tmp_path_factory.mktemp("tabular")
    _mlp(repo / "mlp", x[:300], y[:300], ranges)
    _boosted(repo / "boosted", x[:300], y[:300], ranges)
    for kind in TREES[1:]:
        _onnxmltools(repo / kind, kind, x[:300], y[:300], ranges)
    return repo


@pytest.fixture(scope="module")
def address(repository: Path) -> Iterator[str]:
    settings = server_settings(repository, load_models=["mlp", *TREES], metrics_port=None)
    with BackgroundServer(settings) as srv:
        yield srv.address


def _mlp_log_probs(repository: Path, batch: np.ndarray, label: int) -> np.ndarray:
    """log p(label) straight from onnxruntime, normalising as the config says."""
    config = json.loads((repository / "mlp" / CONFIG_FILE).read_text())
    mean = np.asarray(config["normalization"]["mean"], dtype=np.float32)
    std = np.asarray(config["normalization"]["std"], dtype=np.float32)
    session = ort.InferenceSession(str(repository / "mlp" / "model.onnx"))
    (logits,) = session.run(None, {"input": ((batch - mean) / std).astype(np.float32)})
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True)))[:, label]


def test_metadata_has_names_ranges_and_the_features_layout(
    address: str, table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]
) -> None:
    with interscope.Client(address) as client:
        info = client.get_model("mlp")
        boosted = client.get_model("boosted")
    assert info.input.layout == "features" and info.feature_names == NAMES
    np.testing.assert_allclose(info.value_ranges, table[2], rtol=1e-6)
    assert info.gradients_available and not boosted.gradients_available
    assert boosted.input.layout == "features" and boosted.feature_names == NAMES


def test_feature_group_profile_is_exact_against_onnxruntime(
    address: str,
    repository: Path,
    table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]],
) -> None:
    x, y, _ = table
    sample, label = x[300:301], int(y[300])
    reference = x[:300]
    groups = [[0, 1], [2], [3, 4], [5]]
    with interscope.Client(address) as client:
        result = client.profile(
            model="mlp",
            x=sample,
            label=[label],
            options={
                "features": groups,
                "baseline": "mean",
                "baseline_reference": reference,
                "estimator": "exact",
                "return_pairs": True,
            },
        )
    profile = result.profiles[0]
    # Brute force: v(S) for every coalition, the absent groups at the per-feature means.
    baseline = reference.astype(np.float64).mean(axis=0).astype(np.float32)
    n = len(groups)
    masked = np.repeat(sample, 2**n, axis=0)
    for s in range(2**n):
        for g, members in enumerate(groups):
            if not s >> g & 1:
                masked[s, members] = baseline[members]
    v = _mlp_log_probs(repository, masked, label)
    assert profile.value_full == pytest.approx(v[-1], abs=1e-5)
    assert profile.value_empty == pytest.approx(v[0], abs=1e-5)
    assert abs(v[-1] - v[0]) > 1e-2  # the features matter
    assert profile.pairs is not None and profile.interactions is not None
    for k, (i, j) in enumerate(profile.pairs.tolist()):
        rest = [p for p in range(n) if p not in (i, j)]
        for row, m in enumerate(profile.orders.tolist()):
            deltas = []
            for ctx in itertools.combinations(rest, m):
                b = sum(1 << p for p in ctx)
                deltas.append(v[b | 1 << i | 1 << j] - v[b | 1 << i] - v[b | 1 << j] + v[b])
            assert profile.interactions[row, k] == pytest.approx(np.mean(deltas), abs=1e-4)


def test_the_mean_baseline_is_per_feature_over_the_request_inputs(
    address: str,
    repository: Path,
    table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]],
) -> None:
    x, y, _ = table
    batch = x[300:310]
    with interscope.Client(address) as client:
        result = client.profile(
            model="mlp",
            x=batch,
            label=y[300:310],
            options={"features": [], "baseline": "mean", "estimator": "exact"},
        )
    means = batch.astype(np.float64).mean(axis=0).astype(np.float32)[None]
    for profile in result.profiles:
        assert profile.n_players == N_FEATURES
        label = int(y[300 + profile.input_index])
        assert profile.value_empty == pytest.approx(
            _mlp_log_probs(repository, means, label)[0], abs=1e-5
        )


def _check_feasible(
    x: np.ndarray, x_adv: np.ndarray, ranges: list[tuple[float, float]], norm: str, eps: float
) -> None:
    pairs = np.asarray(ranges, dtype=np.float64)
    width = pairs[:, 1] - pairs[:, 0]
    adv64, x64 = x_adv.astype(np.float64), x.astype(np.float64)
    # Exact in float64 (differences of float32 numbers are exact): no tolerance.
    assert (adv64 >= pairs[:, 0]).all() and (adv64 <= pairs[:, 1]).all()
    if norm == "linf":
        assert (np.abs(adv64 - x64) <= eps * width).all()
    else:
        assert (np.sqrt((((adv64 - x64) / width) ** 2).sum(axis=1)) <= eps).all()


@pytest.mark.parametrize("model", ["mlp", *TREES])
@pytest.mark.parametrize(
    ("attack", "norm"), [("square", "linf"), ("square", "l2"), ("simba", "linf"), ("simba", "l2")]
)
def test_black_box_attacks_lower_accuracy_inside_every_feature_range(
    address: str,
    table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]],
    model: str,
    attack: str,
    norm: str,
) -> None:
    x, y, ranges = table
    xs, ys = x[300:340], y[300:340]
    eps = 0.15 if norm == "linf" else 0.3
    with interscope.Client(address) as client:
        result = client.attack(
            model=model, x=xs, y=ys, attack=attack, norm=norm, eps=eps, query_budget=200, seed=1
        )
    adv = np.stack([e.adversarial for e in result.examples])  # type: ignore[misc]
    _check_feasible(xs, adv, ranges, norm, eps)
    summary = result.summary
    assert summary.clean_accuracy > 0.7
    assert summary.robust_accuracy < summary.clean_accuracy - 0.1
    # Reported norms are in units of the feature ranges, the units eps is in.
    for e in result.examples:
        assert (e.linf if norm == "linf" else e.l2) <= eps * (1 + 1e-12)


def test_white_box_attack_on_the_mlp_respects_per_feature_ranges(
    address: str, table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]
) -> None:
    x, y, ranges = table
    xs, ys = x[300:340], y[300:340]
    with interscope.Client(address) as client:
        result = client.attack(model="mlp", x=xs, y=ys, attack="pgd", eps=0.15, steps=10)
    adv = np.stack([e.adversarial for e in result.examples])  # type: ignore[misc]
    _check_feasible(xs, adv, ranges, "linf", 0.15)
    assert result.summary.robust_accuracy < result.summary.clean_accuracy - 0.1


@pytest.mark.parametrize("model", TREES)
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "apgd", "pgd-margin"])
def test_trees_refuse_white_box_attacks_naming_the_black_box_ones(
    address: str,
    table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]],
    model: str,
    attack: str,
) -> None:
    x, y, _ = table
    with interscope.Client(address) as client, pytest.raises(interscope.InterscopeError) as info:
        client.attack(model=model, x=x[:4], y=y[:4], attack=attack, eps=0.1)
    assert info.value.code == "FAILED_PRECONDITION"
    assert "simba" in str(info.value) and "square" in str(info.value)


def test_cli_audits_a_tabular_model_with_named_feature_groups(
    address: str,
    tmp_path: Path,
    table: tuple[np.ndarray, np.ndarray, list[tuple[float, float]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    x, y, _ = table
    data, reference = tmp_path / "table.npz", tmp_path / "reference.npy"
    np.savez(data, x=x[300:312], y=y[300:312])
    np.save(reference, x[:300])
    argv = [
        "audit", "--address", address, "--model", "mlp", "--data", str(data), "--json",
        "--attack", "simba", "--eps", "0.15", "--query-budget", "100",
        "--features", "age,income;height;score,debt;visits",
        "--baseline", "mean", "--baseline-reference", str(reference),
        "--estimator", "exact",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_samples"] == 12 and report["n_failed"] == 0 and report["n_players"] == 4
    assert report["robust_accuracy"] < report["clean_accuracy"]
    assert main([*argv[:-6], "--features", "age;nope"]) == 1
    assert "nope" in capsys.readouterr().err
