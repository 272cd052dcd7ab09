"""A zoo of real models as teams bring them, built in seconds on load_digits by the libraries
users export with (skl2onnx, onnxmltools, torch's two ONNX exporters, TorchScript).

Each builder returns a `ZooModel`: the exported bytes, the minimal config.json a user would
write (most fields left for the server to read from the file), sample inputs and labels, and
a reference `probabilities` function computed from the original model itself (sklearn's
predict_proba, the torch module), which the tests compare the service's numbers against.
To add a model, write a builder taking `Digits` and add it to `BUILDERS`.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Inputs per model the tests send (kept small: every profile is exact).
SAMPLES = 6


@dataclass(frozen=True)
class Digits:
    """load_digits split once: tabular (N, 64) in [0, 16], images (N, 1, 8, 8) in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def images_train(self) -> np.ndarray:
        return (self.x_train / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)

    @property
    def images_test(self) -> np.ndarray:
        return (self.x_test / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)


def load_data() -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    return Digits(x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64))


@dataclass
class ZooModel:
    """One exported model, its minimal config.json, data and a reference from the model."""

    name: str
    family: str
    format: str
    model_bytes: bytes
    #: config.json as a user writes it: only what the file cannot say, or what they insist on.
    config: dict[str, Any]
    #: Sample raw-range float32 inputs (SAMPLES, *input_shape) and their labels.
    x: np.ndarray
    y: np.ndarray
    #: Class probabilities (B, K) of raw inputs, computed by the original (unexported) model.
    probabilities: Callable[[np.ndarray], np.ndarray]
    #: Whether the input is an image (grid players, square attack) or a feature vector.
    image: bool
    #: The output kind the server must infer (or be told).
    kind: str
    #: Whether the server must offer gradients for it (checked: a lost op fails the zoo test).
    differentiable: bool
    value_range: tuple[float, float] = (0.0, 1.0)
    notes: list[str] = field(default_factory=list)

    @property
    def file(self) -> str:
        return "model.onnx" if self.format == "onnx" else "model.pt"

    def config_json(self) -> dict[str, Any]:
        """The full config.json of a repository folder."""
        return {"name": self.name, "format": self.format, "file": self.file, **self.config}

    def write(self, root: Path) -> Path:
        folder = root / self.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.file).write_bytes(self.model_bytes)
        (folder / "config.json").write_text(json.dumps(self.config_json(), indent=2) + "\n")
        return folder


def _samples(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(x[:SAMPLES], dtype=np.float32), y[:SAMPLES].copy()


# -- sklearn, xgboost, lightgbm: tabular classifiers (64 features in [0, 16]) ---------------


def _skl2onnx(model: Any, options: dict[Any, Any] | None = None) -> bytes:
    from skl2onnx import to_onnx

    proto = to_onnx(model, np.zeros((1, 64), np.float32), options=options, target_opset=17)
    return bytes(proto.SerializeToString())


def _tabular(
    name: str,
    family: str,
    data: Digits,
    model: Any,
    onnx_bytes: bytes,
    *,
    kind: str = "probabilities",
    differentiable: bool = False,
) -> ZooModel:
    x, y = _samples(data.x_test, data.y_test)

    def probabilities(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_proba(np.asarray(batch, np.float32)), np.float64)

    return ZooModel(
        name=name,
        family=family,
        format="onnx",
        model_bytes=onnx_bytes,
        # The file says input name, shape, dtype, output, kind and classes; the range it cannot.
        config={"value_range": [0.0, 16.0]},
        x=x,
        y=y,
        probabilities=probabilities,
        image=False,
        kind=kind,
        differentiable=differentiable,
        value_range=(0.0, 16.0),
    )


def sk_logreg(data: Digits) -> ZooModel:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=300).fit(data.x_train, data.y_train)
    return _tabular(
        "sk-logreg",
        "sklearn LogisticRegression (ZipMap)",
        data,
        model,
        _skl2onnx(model),
        differentiable=True,  # ai.onnx.ml LinearClassifier + Normalizer convert to torch
    )


def sk_forest(data: Digits) -> ZooModel:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0)
    model.fit(data.x_train, data.y_train)
    return _tabular("sk-forest", "sklearn RandomForest (ZipMap)", data, model, _skl2onnx(model))


def _mlp(data: Digits) -> Any:
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few epochs are enough here
        return MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0).fit(
            data.x_train, data.y_train
        )


def sk_mlp_zipmap(data: Digits) -> ZooModel:
    model = _mlp(data)
    return _tabular(
        "sk-mlp-zipmap",
        "sklearn MLPClassifier (ZipMap)",
        data,
        model,
        _skl2onnx(model),
        differentiable=True,
    )


def sk_mlp_tensor(data: Digits) -> ZooModel:
    model = _mlp(data)
    onnx_bytes = _skl2onnx(model, {id(model): {"zipmap": False}})
    return _tabular(
        "sk-mlp-tensor",
        "sklearn MLPClassifier (zipmap off)",
        data,
        model,
        onnx_bytes,
        differentiable=True,
    )


def xgboost_trees(data: Digits) -> ZooModel:
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType
    from xgboost import XGBClassifier

    model = XGBClassifier(n_estimators=8, max_depth=3, learning_rate=0.5, n_jobs=1)
    model.fit(data.x_train, data.y_train)
    proto = convert_xgboost(model, initial_types=[("input", FloatTensorType([None, 64]))])
    return _tabular("xgboost", "XGBoost (onnxmltools)", data, model, proto.SerializeToString())


def lightgbm_trees(data: Digits) -> ZooModel:
    from lightgbm import LGBMClassifier
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = LGBMClassifier(n_estimators=8, num_leaves=8, n_jobs=1, verbose=-1)
    model.fit(data.x_train, data.y_train)
    proto = convert_lightgbm(
        model, initial_types=[("input", FloatTensorType([None, 64]))], zipmap=False
    )
    return _tabular("lightgbm", "LightGBM (onnxmltools)", data, model, proto.SerializeToString())


# -- torch: image models on (1, 8, 8) in [0, 1] ---------------------------------------------


class SmallCNN(nn.Module):
    """conv 3x3 -> relu -> linear: logits for 10 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SoftmaxMLP(nn.Module):
    """An MLP whose last op is softmax: it outputs probabilities, not logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class TupleOutput(nn.Module):
    """Returns (features, logits): the logits are the second element."""

    def __init__(self, cnn: SmallCNN) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.cnn.features(x)
        return features, self.cnn.fc(features)


class DictOutput(nn.Module):
    """Returns {"logits": ..., "probs": ...}."""

    def __init__(self, cnn: SmallCNN) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.cnn(x)
        return {"logits": logits, "probs": torch.softmax(logits, dim=1)}


class Uint8Input(nn.Module):
    """Takes uint8 pixels 0..255 and scales them inside, as many deployed CNNs do."""

    def __init__(self, cnn: SmallCNN) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn(x.float() / 255.0)


def _train(module: nn.Module, data: Digits, steps: int, loss_on_probs: bool = False) -> nn.Module:
    torch.manual_seed(0)
    x = torch.from_numpy(data.images_train)
    y = torch.from_numpy(data.y_train)
    optimiser = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        out = module(x)
        loss = (
            nn.functional.nll_loss(torch.log(out + 1e-12), y)
            if loss_on_probs
            else (nn.functional.cross_entropy(out, y))
        )
        loss.backward()
        optimiser.step()
    return module.eval()


_CACHE: dict[str, nn.Module] = {}


def trained_cnn(data: Digits) -> SmallCNN:
    if "cnn" not in _CACHE:
        torch.manual_seed(0)
        _CACHE["cnn"] = _train(SmallCNN(), data, 40)
    cnn = _CACHE["cnn"]
    assert isinstance(cnn, SmallCNN)
    return cnn


def trained_softmax_mlp(data: Digits) -> SoftmaxMLP:
    if "mlp" not in _CACHE:
        torch.manual_seed(0)
        _CACHE["mlp"] = _train(SoftmaxMLP(), data, 40, loss_on_probs=True)
    mlp = _CACHE["mlp"]
    assert isinstance(mlp, SoftmaxMLP)
    return mlp


def _torch_probabilities(
    module: nn.Module, pick: Callable[[Any], torch.Tensor], kind: str
) -> Callable[[np.ndarray], np.ndarray]:
    def probabilities(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = pick(module(torch.from_numpy(np.asarray(batch, np.float32)))).double()
        return (out if kind == "probabilities" else torch.softmax(out, dim=1)).numpy()

    return probabilities


def _onnx_export(module: nn.Module, example: torch.Tensor, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, **kwargs)
    return buffer.getvalue()


def _image(
    name: str,
    family: str,
    fmt: str,
    model_bytes: bytes,
    config: dict[str, Any],
    data: Digits,
    probabilities: Callable[[np.ndarray], np.ndarray],
    kind: str,
    differentiable: bool = True,
) -> ZooModel:
    x, y = _samples(data.images_test, data.y_test)
    return ZooModel(
        name=name,
        family=family,
        format=fmt,
        model_bytes=model_bytes,
        config=config,
        x=x,
        y=y,
        probabilities=probabilities,
        image=True,
        kind=kind,
        differentiable=differentiable,
    )


def softmax_mlp_classic(data: Digits) -> ZooModel:
    mlp = trained_softmax_mlp(data)
    onnx_bytes = _onnx_export(
        mlp,
        torch.zeros(1, 1, 8, 8),
        input_names=["x"],
        output_names=["probs"],
        dynamic_axes={"x": {0: "batch"}, "probs": {0: "batch"}},
    )
    return _image(
        "softmax-mlp-classic",
        "torch MLP + softmax (classic ONNX exporter)",
        "onnx",
        onnx_bytes,
        {},
        data,
        _torch_probabilities(mlp, lambda o: o, "probabilities"),
        "probabilities",
    )


def softmax_mlp_dynamo(data: Digits) -> ZooModel:
    mlp = trained_softmax_mlp(data)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            mlp,
            (torch.zeros(2, 1, 8, 8),),
            dynamo=True,
            input_names=["x"],
            output_names=["probs"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    assert program is not None
    buffer = io.BytesIO()
    program.save(buffer)  # type: ignore[arg-type]
    return _image(
        "softmax-mlp-dynamo",
        "torch MLP + softmax (dynamo ONNX exporter)",
        "onnx",
        buffer.getvalue(),
        {},
        data,
        _torch_probabilities(mlp, lambda o: o, "probabilities"),
        "probabilities",
    )


def _script(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def torchscript_tuple(data: Digits) -> ZooModel:
    module = TupleOutput(trained_cnn(data)).eval()
    return _image(
        "ts-tuple",
        "TorchScript returning (features, logits)",
        "torchscript",
        _script(module),
        {"input": {"shape": [1, 8, 8]}, "output": {"name": "1"}},
        data,
        _torch_probabilities(module, lambda o: o[1], "logits"),
        "logits",
    )


def torchscript_dict(data: Digits) -> ZooModel:
    module = DictOutput(trained_cnn(data)).eval()
    return _image(
        "ts-dict",
        "TorchScript returning {logits, probs}, probs chosen",
        "torchscript",
        _script(module),
        {"input": {"shape": [1, 8, 8]}, "output": {"name": "probs"}},
        data,
        _torch_probabilities(module, lambda o: o["probs"], "probabilities"),
        "probabilities",
    )


def uint8_cnn(data: Digits) -> ZooModel:
    module = Uint8Input(trained_cnn(data)).eval()
    onnx_bytes = _onnx_export(
        module,
        torch.zeros(1, 1, 8, 8, dtype=torch.uint8),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
    )
    x, y = _samples(np.rint(data.images_test * 255.0), data.y_test)
    cnn = trained_cnn(data)

    def probabilities(batch: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
        with torch.no_grad():
            return torch.softmax(cnn(pixels.float() / 255.0), dim=1).double().numpy()

    return ZooModel(
        name="uint8-cnn",
        family="torch CNN with UINT8 input (classic exporter)",
        format="onnx",
        model_bytes=onnx_bytes,
        config={},  # UINT8 and the 0..255 range are read from the graph
        x=x,
        y=y,
        probabilities=probabilities,
        image=True,
        kind="logits",
        differentiable=True,
        value_range=(0.0, 255.0),
    )


def fixed_batch_cnn(data: Digits) -> ZooModel:
    cnn = trained_cnn(data)
    # No dynamic axes: the graph's batch dimension is fixed at 1.
    onnx_bytes = _onnx_export(
        cnn, torch.zeros(1, 1, 8, 8), input_names=["x"], output_names=["logits"]
    )
    return _image(
        "fixed-batch-1",
        "torch CNN exported with batch 1",
        "onnx",
        onnx_bytes,
        {},
        data,
        _torch_probabilities(cnn, lambda o: o, "logits"),
        "logits",
    )


def two_output_cnn(data: Digits) -> ZooModel:
    module = TupleOutput(trained_cnn(data)).eval()
    onnx_bytes = _onnx_export(
        module,
        torch.zeros(1, 1, 8, 8),
        input_names=["x"],
        output_names=["features", "logits"],
        dynamic_axes={"x": {0: "b"}, "features": {0: "b"}, "logits": {0: "b"}},
    )
    return _image(
        "two-output",
        "ONNX with (features, logits), logits second",
        "onnx",
        onnx_bytes,
        {"output": {"name": "logits"}},
        data,
        _torch_probabilities(module, lambda o: o[1], "logits"),
        "logits",
    )


#: Every builder, by model name; tests build them all once per session.
BUILDERS: dict[str, Callable[[Digits], ZooModel]] = {
    "sk-logreg": sk_logreg,
    "sk-forest": sk_forest,
    "sk-mlp-zipmap": sk_mlp_zipmap,
    "sk-mlp-tensor": sk_mlp_tensor,
    "xgboost": xgboost_trees,
    "lightgbm": lightgbm_trees,
    "softmax-mlp-classic": softmax_mlp_classic,
    "softmax-mlp-dynamo": softmax_mlp_dynamo,
    "ts-tuple": torchscript_tuple,
    "ts-dict": torchscript_dict,
    "uint8-cnn": uint8_cnn,
    "fixed-batch-1": fixed_batch_cnn,
    "two-output": two_output_cnn,
}


def build_zoo(data: Digits | None = None) -> dict[str, ZooModel]:
    """Every zoo model, trained and exported now (about ten seconds on two cores)."""
    data = data or load_data()
    return {name: build(data) for name, build in BUILDERS.items()}
