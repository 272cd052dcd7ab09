"""Converter ops the model exports in test_torch_exports do not reach, each against onnxruntime.

Each case is a one-node graph (plus constant inputs) at a given opset; the converted module's
output must equal onnxruntime's, and where the output is float its input gradient must pass the
load-time finite-difference check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from interscope_server.models import OnnxModule, UnsupportedOnnxGraph
from interscope_server.models.gradient_check import check_gradients

I64 = np.int64


@dataclass
class Op:
    """One op on a float input `x` of `shape`, with constant extra inputs and attributes."""

    op: str
    shape: tuple[int, ...] = (2, 3, 4, 4)
    consts: list[Any] = field(default_factory=list)  # None leaves an optional input out
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    outputs: int = 1
    out_type: int = TensorProto.FLOAT
    #: Whether the gradient check applies: it feeds a batch of one, which ops indexing the
    #: first dimension (gather/scatter rows, resize to fixed sizes) do not take.
    per_example: bool = True

    def model(self) -> onnx.ModelProto:
        inputs, inits = ["x"], []
        for i, value in enumerate(self.consts):
            if value is None:
                inputs.append("")
                continue
            inits.append(numpy_helper.from_array(np.asarray(value), f"c{i}"))
            inputs.append(f"c{i}")
        outs = [f"y{i}" for i in range(self.outputs)]
        node = helper.make_node(self.op, inputs, outs, **self.attrs)
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shape))],
            [helper.make_tensor_value_info(o, self.out_type, None) for o in outs],
            initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        return model


CASES = {
    "resize-nearest": Op(
        "Resize",
        consts=[None, np.array([1, 1, 2, 1.5], np.float32)],
        attrs={
            "mode": "nearest",
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        },
    ),
    "resize-linear-sizes": Op(
        "Resize",
        consts=[None, None, np.array([2, 3, 7, 5], I64)],
        attrs={"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
        per_example=False,
    ),
    "resize-cubic-align": Op(
        "Resize",
        consts=[None, np.array([1, 1, 2, 2], np.float32)],
        attrs={"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
    ),
    "pad-edge": Op("Pad", consts=[np.array([0, 0, 1, 2, 0, 0, 2, 1], I64)], attrs={"mode": "edge"}),
    "pad-constant-crop": Op(
        "Pad", consts=[np.array([0, 0, -1, 2, 0, 0, 1, -2], I64), np.array(0.5, np.float32)]
    ),
    "pad-axes-18": Op(
        "Pad",
        consts=[np.array([1, 1], I64), np.array(0.0, np.float32), np.array([-1], I64)],
        opset=18,
    ),
    "split-input": Op("Split", consts=[np.array([1, 3], I64)], attrs={"axis": 2}, outputs=2),
    "split-num-outputs-18": Op("Split", attrs={"axis": 3, "num_outputs": 3}, opset=18, outputs=3),
    "split-attr-11": Op("Split", attrs={"axis": 1, "split": [2, 1]}, opset=11, outputs=2),
    "slice-negative-step": Op(
        "Slice",
        consts=[
            np.array([-1, 3], I64),
            np.array([-10, 0], I64),
            np.array([2, 3], I64),
            np.array([-1, -2], I64),
        ],
    ),
    "group-norm-18": Op(
        "GroupNormalization",
        shape=(2, 4, 3, 3),
        consts=[np.array([0.5, 2.0], np.float32), np.array([0.1, -0.2], np.float32)],
        attrs={"num_groups": 2},
        opset=18,
    ),
    "reduce-mean-axes-input-18": Op(
        "ReduceMean", consts=[np.array([1, -1], I64)], attrs={"keepdims": 0}, opset=18
    ),
    "reduce-l2-attr-13": Op("ReduceL2", attrs={"axes": [2, 3]}, opset=13),
    "reduce-logsumexp": Op("ReduceLogSumExp", attrs={"axes": [1]}, opset=13),
    "reduce-prod-18": Op("ReduceProd", consts=[np.array([2, 3], I64)], opset=18),
    "squeeze-attr-11": Op("Squeeze", shape=(2, 1, 4, 1), attrs={"axes": [1, 3]}, opset=11),
    "unsqueeze-attr-11": Op("Unsqueeze", attrs={"axes": [0, -1]}, opset=11),
    "softmax-legacy-11": Op("Softmax", attrs={"axis": 1}, opset=11),
    "log-softmax-13": Op("LogSoftmax", attrs={"axis": 2}, opset=13),
    "expand": Op("Expand", shape=(3, 1, 4), consts=[np.array([2, 1, 5, 4], I64)]),
    "tile": Op("Tile", shape=(2, 3), consts=[np.array([2, 3], I64)]),
    "trilu": Op("Trilu", shape=(2, 4, 4), consts=[np.array(1, I64)], attrs={"upper": 0}),
    "einsum": Op("Einsum", shape=(2, 3, 4), attrs={"equation": "bij->bji"}),
    "cumsum-reverse-exclusive": Op(
        "CumSum", shape=(2, 5), consts=[np.array(1, I64)], attrs={"reverse": 1, "exclusive": 1}
    ),
    "gather-elements": Op(
        "GatherElements",
        shape=(3, 4),
        consts=[np.array([[0, -1], [2, 1], [3, 3]], I64)],
        attrs={"axis": 1},
        per_example=False,
    ),
    "gather-nd": Op(
        "GatherND", shape=(3, 4, 2), consts=[np.array([[0, 1], [2, -1]], I64)], per_example=False
    ),
    "scatter-nd": Op(
        "ScatterND",
        shape=(4, 3),
        consts=[np.array([[1], [3]], I64), np.full((2, 3), 7.0, np.float32)],
        per_example=False,
    ),
    "conv-transpose-asymmetric": Op(
        "ConvTranspose",
        consts=[np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)],
        attrs={"strides": [2, 2], "pads": [0, 1, 1, 0], "output_padding": [1, 1]},
    ),
    "layer-norm-axis": Op(
        "LayerNormalization", consts=[np.full((4, 4), 1.5, np.float32)], attrs={"axis": 2}
    ),
    "instance-norm": Op(
        "InstanceNormalization", consts=[np.ones(3, np.float32), np.zeros(3, np.float32)]
    ),
    "lrn": Op("LRN", attrs={"size": 3}),
    "gelu-tanh-20": Op("Gelu", attrs={"approximate": "tanh"}, opset=20),
    "hard-swish": Op("HardSwish"),
    "prelu": Op("PRelu", consts=[np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)]),
    "selu": Op("Selu"),
    "mod-fmod": Op("Mod", consts=[np.array(0.3, np.float32)], attrs={"fmod": 1}),
    "max-broadcast": Op("Max", consts=[np.array(0.5, np.float32)]),
    "clip-inputs": Op("Clip", consts=[np.array(0.2, np.float32), np.array(0.7, np.float32)]),
    "cast-float16-back": Op(
        "Cast", attrs={"to": TensorProto.FLOAT16}, out_type=TensorProto.FLOAT16
    ),
    "shape-start-end-15": Op(
        "Shape", attrs={"start": 1, "end": -1}, opset=15, out_type=TensorProto.INT64
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    case = CASES[name]
    model = case.model()
    x = np.random.default_rng(1).uniform(0.05, 0.95, case.shape).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    for index, want in enumerate(expected):
        module = OnnxModule(model, output=f"y{index}")
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-4, atol=1e-5)
        if case.per_example and got.dtype == np.float32 and got.ndim >= 2 and got.size:
            flat = _Flat(module)
            assert check_gradients(flat, case.shape[1:], (0.0, 1.0), torch.device("cpu")) == ""


class _Flat(torch.nn.Module):
    """An op's output flattened to (batch, features): the form the gradient check takes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).reshape(x.shape[0], -1)  # type: ignore[no-any-return]


def test_shape_making_ops_refuse_huge_tensors() -> None:
    case = Op("Expand", shape=(1,), consts=[np.array([1 << 20, 1 << 20], I64)])
    with pytest.raises(ValueError, match="over the size limit"):
        OnnxModule(case.model())(torch.zeros(1))


def test_an_extra_output_in_use_is_refused() -> None:
    case = Op("LayerNormalization", consts=[np.ones(4, np.float32)], outputs=2)
    with pytest.raises(UnsupportedOnnxGraph, match="extra outputs"):
        OnnxModule(case.model())


@pytest.mark.parametrize("classes", [2, 3])
def test_sklearn_logistic_regression_converts_with_its_normalizer(classes: int) -> None:
    """skl2onnx's LogisticRegression (LinearClassifier with SOFTMAX then an L1 Normalizer, or
    for a binary one LOGISTIC over two rows) against onnxruntime and sklearn, and its input
    gradient against finite differences."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = (x / x.max(axis=0)).astype(np.float32)
    y = np.minimum(y, classes - 1)
    model = LogisticRegression(max_iter=500).fit(x, y)
    proto = to_onnx(model, x[:1], options={"zipmap": False}, target_opset=17)
    ml_ops = {n.op_type for n in proto.graph.node if n.domain == "ai.onnx.ml"}
    assert ml_ops == ({"LinearClassifier", "Normalizer"} if classes > 2 else {"LinearClassifier"})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"X": x})[0]
    module = OnnxModule(proto, output="probabilities")
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, model.predict_proba(x), rtol=1e-4, atol=1e-5)
    assert check_gradients(module, (4,), (0.0, 1.0), torch.device("cpu")) == ""


def test_a_one_row_linear_classifier_is_refused_not_guessed() -> None:
    # onnxruntime expands a single coefficient row into two score columns by rules of its own.
    node = helper.make_node(
        "LinearClassifier",
        ["x"],
        ["label", "y0"],
        domain="ai.onnx.ml",
        coefficients=[1.0, -1.0],
        intercepts=[0.5],
        classlabels_ints=[0, 1],
        post_transform="LOGISTIC",
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("y0", TensorProto.FLOAT, [None, 2]),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    module = OnnxModule(helper.make_model(graph, opset_imports=opsets), output="y0")
    with pytest.raises(UnsupportedOnnxGraph, match="binary form"):
        module(torch.zeros(1, 2))
